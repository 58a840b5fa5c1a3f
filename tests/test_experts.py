"""moelm experts / moelm prune (moelm.experts): every statistic against values computed by hand (loops over
tokens) on tiny models with hand-set routers; ERNIE's correction bias choosing without weighting; PhiMoE's
sparsemixer; padding; the report files; pruning exact when the pruned experts are never chosen, and the pruned
checkpoint loading in transformers with moelm's logits."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.cli import main
from moelm.config import named_config
from moelm.experts import prune as pr
from moelm.experts import report as rp
from moelm.models.modeling import moe_blocks
from moelm.models.scaffold import new_checkpoint
from moelm.train.data import Example
from reference import constant_moe_input, randomise


def ernie(seed=0, fast=True):
    model = AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), seed=seed, fast=fast)
    randomise(model, seed)
    with torch.no_grad():
        for _, block in moe_blocks(model):  # expert 0 always chosen, 3 never: the bias chooses, it does not weigh
            bias = block.moe_statics.e_score_correction_bias
            bias[0, 0], bias[0, 3] = 10.0, -10.0
    return model.eval()


def examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(ids := torch.randint(0, vocab, (n,), generator=g).tolist(), ids) for n in lengths]


def expert_out(block, e, x):
    """Expert e of the block on one token x [H], by its stacked weights (gate rows first)."""
    gate_up, down = block.experts.gate_up_proj[e].float(), block.experts.down_proj[e].float()
    gate, up = (gate_up @ x.float()).chunk(2)
    return down @ (F.silu(gate) * up)


def by_hand(model, batch, route):
    """Per MoE layer, from loops over the tokens of each row (padding skipped): tokens, gate mass, norm sum, REAP
    sum, co-activation and adjacent overlap; route(block, x [H]) -> [(expert, weight)]."""
    inputs = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, block in moe_blocks(model)]
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    for h in hooks:
        h.remove()
    e = moe_blocks(model)[0][1].experts.num_experts
    out = {}
    torch.set_grad_enabled(False)
    for i, block in moe_blocks(model):
        x = inputs[i]  # [B, S, H]
        tokens, gate, norm, reap = [0] * e, [0.0] * e, [0.0] * e, [0.0] * e
        coact = [[0] * e for _ in range(e)]
        overlap = 0
        for b in range(x.shape[0]):
            prev = None
            for s in range(x.shape[1]):
                if not batch["attention_mask"][b, s]:
                    prev = None
                    continue
                picks = route(block, x[b, s])
                chosen = {j for j, _ in picks}
                for j, w in picks:
                    n = float(expert_out(block, j, x[b, s]).norm())
                    tokens[j] += 1
                    gate[j] += w
                    norm[j] += n
                    reap[j] += w * n
                    for j2 in chosen:
                        coact[j][j2] += 1
                if prev is not None:
                    overlap += len(prev & chosen)
                prev = chosen
        out[i] = dict(tokens=tokens, gate=gate, norm=norm, reap=reap, coact=coact, overlap=overlap)
    torch.set_grad_enabled(True)
    return out


def ernie_route(block, x):
    logits = block.gate.weight.float() @ x.float()
    probs = logits.softmax(-1)
    biased = probs + block.moe_statics.e_score_correction_bias[0]
    index = sorted(range(len(probs)), key=lambda j: -float(biased[j]))[:block.config.moe_k]
    total = sum(float(probs[j]) for j in index)
    return [(j, float(probs[j]) / total) for j in index]


def check(rec, hand, pairs):
    for slot, layer in enumerate(rec.layers):
        h = hand[layer]
        assert rec.tokens[slot].tolist() == h["tokens"]
        for key in ("gate", "norm", "reap"):
            torch.testing.assert_close(getattr(rec, key)[slot], torch.tensor(h[key], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5)
        assert rec.coact[slot].tolist() == h["coact"]
        assert int(rec.overlap[slot]) == h["overlap"]
    assert rec.pairs == pairs


@pytest.mark.parametrize("fast", [True, False])
def test_ernie_statistics_by_hand(fast):
    model = ernie(fast=fast)
    data = examples([7, 4, 6], model.config.vocab_size)
    rec = rp.record(model, data, batch_size=3, pad_id=0)
    from moelm.train.data import collate

    hand = by_hand(model, collate(data, 0), ernie_route)
    check(rec, hand, pairs=6 + 3 + 5)
    assert rec.seen == 17 and rec.top_k == 2
    for slot in range(len(rec.layers)):
        assert rec.tokens[slot, 0] == 17 and rec.tokens[slot, 3] == 0  # the bias chose 0 always, 3 never
        assert float(rec.gate[slot, 0]) < 17 - 1e-3  # weighted by its unbiased probability, not 1


def test_ernie_batched_equals_one_at_a_time():
    model = ernie()
    data = examples([9, 3, 5, 8], model.config.vocab_size, seed=1)
    a, b = rp.record(model, data, batch_size=4), rp.record(model, data, batch_size=1)
    for key in ("tokens", "coact", "overlap"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    for key in ("gate", "norm", "reap"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-4, atol=1e-5)


def phimoe():
    """PhiMoE whose MoE input is the same vector for every token (the post-attention LayerNorm's weight 0, its bias
    one-hot): router logits (2, 1, -50, -50) -> sparsemixer picks 0 then 1, each with weight 1 (the others are
    masked: further below the top than 2 x jitter, relatively)."""
    model = AutoModelForCausalLM.from_config(named_config("phimoe-tiny"), seed=0)
    randomise(model, 0)
    with torch.no_grad():
        for layer in model.model.layers:
            constant_moe_input(layer)
            layer.block_sparse_moe.gate.weight[:, 0] = torch.tensor([2.0, 1.0, -50.0, -50.0])
    return model.eval()


def sparsemixer_route(block, x):
    logits = [float(v) for v in block.gate.weight.float() @ x.float()]
    eps = block.config.router_jitter_noise
    picks, masked = [], list(logits)
    for _ in range(2):
        top = max(masked)
        j = masked.index(top)
        kept = [s for s in masked if (top - s) / max(abs(s), top) <= 2 * eps]
        picks.append((j, math.exp(top) / sum(math.exp(s) for s in kept)))
        masked[j] = -math.inf
    return picks


def test_phimoe_sparsemixer_by_hand():
    model = phimoe()
    data = examples([5, 2], model.config.vocab_size)
    rec = rp.record(model, data, batch_size=2)
    from moelm.train.data import collate

    hand = by_hand(model, collate(data, 0), sparsemixer_route)
    check(rec, hand, pairs=4 + 1)
    for slot in range(len(rec.layers)):
        assert rec.tokens[slot].tolist() == [7, 7, 0, 0]
        assert rec.gate[slot].tolist() == [7.0, 7.0, 0.0, 0.0]
        assert rec.overlap[slot] == 2 * 5
    report = rp.build(rec, model, "phimoe", {"path": "-", "kind": "text", "examples": 2})
    for x in report["layers"]:  # loads [7, 7, 0, 0]: NeMo's definitions by hand
        assert x["dead_expert_frac"] == 0.5
        assert x["cv"] == pytest.approx(math.sqrt(4 * 3.5**2 / 3) / 3.5)  # unbiased std / mean
        assert x["expert_diversity"] == pytest.approx(0.5)
        assert x["utilization"] == [2.0, 2.0, 0.0, 0.0]
        assert x["adjacent_overlap"] == 2.0 and x["adjacent_union"] == 2.0
        assert x["reap"][2] == 0.0 and x["reap"][0] == pytest.approx(x["mean_output_norm"][0])
    assert report["balance"]["moe/dead_expert_frac_mean"] == 0.5


def test_dense_model_refused():
    model = AutoModelForCausalLM.from_config(named_config("ernie4_5-tiny"), seed=0)
    with pytest.raises(ValueError, match="no MoE layers"):
        rp.record(model, examples([3], 100))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    path = new_checkpoint("ernie4_5_moe-tiny", root / "m", seed=0)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"The list {i} holds {i * 7} items and a dict."}) + "\n"
                            for i in range(40)), encoding="utf-8")
    return path, text


def test_cli_report_and_compare(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    assert main(["experts", str(path), "--data", str(text), "--out", str(tmp_path / "a"), "--seq-length", "32",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["schema"] == "moelm.experts/1" and report["model_type"] == "ernie4_5_moe"
    assert [x["layer"] for x in report["layers"]] == [1, 2] and result["tokens"] == report["data"]["tokens"]
    for x in report["layers"]:
        assert sum(x["tokens"]) == 2 * report["data"]["tokens"]
        assert len(x["coactivation"]) == 8 and x["coactivation"][0][0] == x["tokens"][0]
    for name in ("load.png", "balance.png", "coactivation.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert main(["experts", str(path), "--data", str(text), "--out", str(tmp_path / "b"), "--seq-length", "16",
                 "--limit", "10", "--compare", str(tmp_path / "a"), "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [x["layer"] for x in report["compare"]["layers"]] == [1, 2]
    assert (tmp_path / "b" / "compare.png").is_file()


def test_cli_errors(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    dense = new_checkpoint("ernie4_5-tiny", tmp_path / "dense", seed=0)
    for argv, message in (
            (["experts", str(dense), "--data", str(text), "--out", str(tmp_path / "x")], "no MoE layers"),
            (["experts", str(path), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")],
             "nope.jsonl"),
            (["experts", str(path), "--data", str(text), "--out", str(tmp_path / "x"), "--coact-layer", "0",
              "--seq-length", "32"], "--coact-layer 0"),
            (["experts", str(path), "--data", str(text), "--out", str(tmp_path / "x"), "--compare",
              str(text)], "is not JSON"),
            (["prune", str(path), str(tmp_path / "p"), "--report", str(tmp_path / "none")], "no such file")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("moelm: error:") and message in err and "Traceback" not in err


def prunable(seed=0):
    """ERNIE tiny whose experts 2 and 5 are never chosen (bias -10) and whose other experts' biases are equal, so
    that dropping 2 and 5 changes no choice and no weight."""
    model = AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), seed=seed, fast=False)
    randomise(model, seed)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            bias = block.moe_statics.e_score_correction_bias
            bias.fill_(0.03)
            bias[0, 2] = bias[0, 5] = -10.0
    return model.eval()


def test_prune_exact_when_pruned_never_chosen(tmp_path):
    model = prunable()
    data = examples([64, 48], model.config.vocab_size)
    report = rp.build(rp.record(model, data, 2), model, "m", {"path": "-", "kind": "text", "examples": 2})
    keep = pr.chosen(report, 0.75, "frequency")
    assert all(ids == [0, 1, 3, 4, 6, 7] for ids in keep.values())
    ids = torch.tensor([data[0].input_ids])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        pr.prune(model, keep)
        after = model(input_ids=ids).logits
    assert model.config.moe_num_experts == 6
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    tok = new_checkpoint("ernie4_5_moe-tiny", tmp_path / "tok", seed=0)
    out = pr.save(model, tmp_path / "pruned", tok)
    config = json.loads((out / "config.json").read_text())
    assert config["moe_num_experts"] == 6 and config["moe_k"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).encode("hello")


def test_pruned_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name, keep in (("ernie4_5_moe-tiny", 0.5), ("phimoe-tiny", 0.5)):
        model = AutoModelForCausalLM.from_config(named_config(name), seed=1, fast=False)
        randomise(model, 1)
        model.eval()
        data = examples([10, 6], model.config.vocab_size)
        report = rp.build(rp.record(model, data, 2), model, name, {"path": "-", "kind": "text", "examples": 2})
        pr.prune(model, pr.chosen(report, keep, "reap"))
        tok = new_checkpoint(name, tmp_path / f"tok-{name}", seed=0)
        out = pr.save(model, tmp_path / f"pruned-{name}", tok)
        ids = torch.tensor([data[0].input_ids])
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ours = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert ref.config.num_experts_per_tok == 2


def test_cli_prune_with_eval(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    assert main(["experts", str(path), "--data", str(text), "--out", str(tmp_path / "r"), "--seq-length", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned"
    assert main(["prune", str(path), str(out), "--report", str(tmp_path / "r"), "--keep", "0.5", "--by",
                 "frequency", "--eval-data", str(text), "--seq-length", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["experts"] == 4 and result["of"] == 8
    assert result["before"]["tokens"] == result["after"]["tokens"] and result["after"]["perplexity"] > 0
    assert json.loads((out / "pruning.json").read_text()) == result
    assert json.loads((out / "config.json").read_text())["moe_num_experts"] == 4
    assert main(["prune", str(path), str(out), "--report", str(tmp_path / "r")]) == 1
    assert "not empty" in capsys.readouterr().err
    for bad, message in ((["--keep", "1.0"], "--keep"), (["--keep", "0.1"], "fewer than the 2")):
        assert main(["prune", str(path), str(tmp_path / "q"), "--report", str(tmp_path / "r"), *bad]) == 1
        assert message in capsys.readouterr().err


def test_keep_that_prunes_nothing_or_below_top_k_refused():
    report = {"num_experts": 8, "top_k": 3, "layers": [{"layer": 1, "reap": [1.0] * 8, "tokens": [1] * 8}]}
    for keep, message in ((0.9, "--keep 0.9 keeps all 8 experts"), (0.99, "--keep 0.99 keeps all 8"),
                          (0.25, "--keep 0.25 keeps 2 of 8 experts, fewer than the 3")):
        with pytest.raises(ValueError, match=message):
            pr.chosen(report, keep)
    assert pr.chosen(report, 0.875) == {1: [0, 1, 2, 3, 4, 5, 6]} and len(pr.chosen(report, 0.3)[1]) == 3


def test_quantized_checkpoint_reported_and_not_pruned(checkpoint, tmp_path, capsys):
    _, text = checkpoint
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path / "q", seed=0, quantization="int8")
    assert main(["experts", str(path), "--data", str(text), "--out", str(tmp_path / "r"), "--seq-length", "32",
                 "--limit", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["quantization"] == "int8"
    assert main(["prune", str(path), str(tmp_path / "p"), "--report", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "layer 1's experts are QuantizedExperts: pruning needs the unquantized" in err and "Traceback" not in err


def test_text_data_keeps_its_last_short_chunk(checkpoint, tmp_path):
    path, text = checkpoint
    tok = AutoTokenizer.from_pretrained(path)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "hello world"}) + "\n", encoding="utf-8")
    assert [e.input_ids for e in rp.load_data(short, "text", tok, None, 512)] == [tok("hello world")["input_ids"]]
    stream = sum(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in text.read_text().splitlines()) - 1
    lengths = [len(e.input_ids) for e in rp.load_data(text, "text", tok, None, 32)]
    assert sum(lengths) == stream and set(lengths[:-1]) == {32} and 1 < lengths[-1] < 32


def test_malformed_report_refused_in_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    good = {"schema": "moelm.experts/1", "model_type": "ernie4_5_moe", "num_experts": 8, "top_k": 2,
            "layers": [{"layer": 1, "tokens": [1] * 8, "load_share": [0.125] * 8, "reap": [0.5] * 8, "cv": 0.0,
                        "dead_expert_frac": 0.0, "expert_diversity": 1.0, "adjacent_overlap": 1.0}]}
    for change, message in (({"num_experts": None}, "num_experts and top_k must be positive integers"),
                            ({"layers": [{**good["layers"][0], "reap": [0.5] * 3}]}, "a layers entry without"),
                            ({"layers": good["layers"] * 2}, "a layers entry without a new int layer")):
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "report.json").write_text(json.dumps({**good, **change}), encoding="utf-8")
        assert main(["prune", str(path), str(tmp_path / "p"), "--report", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("moelm: error:") and message in err and "Traceback" not in err


def test_out_that_is_a_file_refused_before_running(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    (tmp_path / "f").write_text("", encoding="utf-8")
    for argv in (["prune", str(path), str(tmp_path / "f"), "--report", str(tmp_path / "none"), "--force"],
                 ["experts", str(path), "--data", str(text), "--out", str(tmp_path / "f")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("moelm: error:") and "is a file, not a directory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_chat_cut_before_the_answer_still_reported(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hello there " * 6},
                                                     {"role": "assistant", "content": f"fine {i}"}]}) + "\n"
                            for i in range(3)), encoding="utf-8")
    assert main(["experts", str(path), "--data", str(chat), "--kind", "chat", "--seq-length", "8",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 3 * 8
