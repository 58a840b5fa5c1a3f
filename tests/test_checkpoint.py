"""Checkpoints: loading hub-layout safetensors (sharded, dtypes, tied embeddings, MTP tensors), clear errors,
saving in the hub layout atomically, peak memory and progress."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelm
from moelm import AutoModelForCausalLM, CheckpointError
from moelm.config import Ernie4_5_MoeConfig, Ernie4_5Config, PhimoeConfig
from moelm.io.weights import SafetensorsCheckpoint
from moelm.loading.checkpoint import hub_state_dict
from reference import reference_model

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96)
TINY_KW = {"ernie4_5": dict(TINY, head_dim=16),
           "ernie4_5_moe": dict(TINY, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
           "phimoe": dict(TINY, num_local_experts=4, attention_bias=True, lm_head_bias=True)}
CONFIGS = {"ernie4_5": Ernie4_5Config, "ernie4_5_moe": Ernie4_5_MoeConfig, "phimoe": PhimoeConfig}
IDS = torch.tensor([[1, 5, 9, 2, 77, 3], [4, 4, 100, 8, 0, 12]])


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def ours(family, seed=0, dtype=None, **kw):
    config = CONFIGS[family](**{**TINY_KW[family], **kw})
    return AutoModelForCausalLM.from_config(config, seed=seed, dtype=dtype).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def file_tensors(path):
    with SafetensorsCheckpoint(path) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.keys()}


def edit_single_file(path, edit):
    """Rewrite model.safetensors with `edit(tensors)` applied."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def assert_loaded(model, path):
    """The model holds exactly the checkpoint's tensors, under the same hub names."""
    ours_hub = dict(hub_state_dict(model))
    theirs = file_tensors(path)
    assert sorted(ours_hub) == sorted(theirs)
    for k, t in theirs.items():
        assert torch.equal(ours_hub[k], t.to(ours_hub[k].dtype)), k


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("family", CONFIGS)
def test_load_sharded_transformers_checkpoint(tmp_path, family):
    ref = reference_model(family, **TINY_KW[family])
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == type(ref).__name__
    assert not model.training and model.dtype == torch.float32
    assert_loaded(model, tmp_path)
    assert ("lm_head.weight" in index["weight_map"]) is (family == "phimoe")


@pytest.mark.parametrize("family", CONFIGS)
def test_save_writes_hub_layout(tmp_path, family):
    import transformers

    model = ours(family)
    model.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    reference_model(family, **TINY_KW[family]).save_pretrained(tmp_path / "ref")
    with SafetensorsCheckpoint(tmp_path / "ours") as a, SafetensorsCheckpoint(tmp_path / "ref") as b:
        assert a.keys() == b.keys()
        assert all(a.shape(k) == b.shape(k) for k in a.keys())
        keys = a.keys()
    if family == "ernie4_5_moe":
        assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
        assert {"model.layers.2.mlp.experts.0.up_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight",
                "model.layers.1.mlp.moe_statics.e_score_correction_bias"} <= set(keys)
    if family == "phimoe":
        assert {f"model.layers.0.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= set(keys)
        assert "lm_head.bias" in keys
    assert ("lm_head.weight" in keys) is (family == "phimoe")  # ERNIE ties the embeddings
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["dtype"] == "float32"
    assert config["model_type"] == family

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(logits(reloaded), logits(model))
    # transformers reads it with nothing missing or unexpected, and holds the same tensors
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.save_pretrained(tmp_path / "again")
    again, written = file_tensors(tmp_path / "again"), file_tensors(tmp_path / "ours")
    assert sorted(again) == sorted(written)
    assert all(torch.equal(again[k], written[k]) for k in written)


def test_sharded_save_and_load(tmp_path):
    model = ours("ernie4_5_moe")
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(shards + ["config.json", "generation_config.json",
                                                                          "model.safetensors.index.json"])
    assert set(index["weight_map"]) == {k for k, _ in hub_state_dict(model)}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(logits(reloaded), logits(model))
    assert all(p.device.type == "cpu" for p in reloaded.parameters())


FP32_KEEP = ("mlp.gate.weight", "moe_statics.e_score_correction_bias")


def dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters()}


def assert_dtype(model, dtype):
    for name, dt in dtypes(model).items():
        assert dt == (torch.float32 if name.endswith(FP32_KEEP) else dtype), name
    assert model.dtype == dtype


def test_dtype_auto_follows_config_then_tensors(tmp_path):
    model = ours("ernie4_5_moe", dtype="bfloat16")
    assert_dtype(model, torch.bfloat16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.dtype("model.embed_tokens.weight") == torch.bfloat16
        assert ckpt.dtype("model.layers.1.mlp.gate.weight") == torch.float32
        assert ckpt.dtype("model.layers.1.mlp.moe_statics.e_score_correction_bias") == torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # dtype="auto" is the default
    assert_dtype(loaded, torch.bfloat16)
    assert torch.equal(logits(loaded), logits(model))

    for key in ("dtype", "torch_dtype"):  # no dtype in config.json: the checkpoint's tensors decide
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_dtype(AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto"), torch.bfloat16)

    fp32 = ours("ernie4_5_moe")
    fp32.save_pretrained(tmp_path / "fp32")
    assert_dtype(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32"), torch.float32)
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    config["dtype"] = "bfloat16"  # config.json's dtype wins over the stored tensors' dtype
    (tmp_path / "fp32" / "config.json").write_text(json.dumps(config))
    assert_dtype(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32"), torch.bfloat16)


def test_explicit_dtype(tmp_path):
    model = ours("ernie4_5_moe")
    gate = model.model.layers[1].mlp.gate.weight
    bias = model.model.layers[1].mlp.moe_statics.e_score_correction_bias
    with torch.no_grad():
        bias.normal_()
    model.save_pretrained(tmp_path / "fp32")
    for dtype in ("bfloat16", torch.bfloat16):
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype)
        assert_dtype(bf16, torch.bfloat16)
        # kept in fp32: loaded without a round trip through bf16
        assert torch.equal(bf16.model.layers[1].mlp.gate.weight, gate)
        assert torch.equal(bf16.model.layers[1].mlp.moe_statics.e_score_correction_bias, bias)
        assert torch.equal(bf16.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())
    assert_dtype(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16), torch.bfloat16)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32, device="cpu")
    assert_dtype(back, torch.float32)
    assert torch.equal(back.model.embed_tokens.weight, half.model.embed_tokens.weight.float())
    with pytest.raises(ValueError, match="float64"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype="float64")


@pytest.mark.parametrize("family", ["ernie4_5", "ernie4_5_moe"])
def test_tied_embeddings(tmp_path, family):
    reference_model(family, **TINY_KW[family]).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embed)
    # a checkpoint that also stores lm_head.weight: tied where it equals the embedding; where it differs, the stored
    # head is used and the config says untied, as transformers 5.23 does (logits equal, a line on stderr)
    edit_single_file(tmp_path, lambda t: t.update({"lm_head.weight": embed.clone()}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = torch.randn_like(embed)
    edit_single_file(tmp_path, lambda t: t.update({"lm_head.weight": head}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings and torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    ref = pytest.importorskip("transformers").AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


MTP = {"model.mtp_block.0.self_attn.q_proj.weight": (64, 64), "model.mtp_block.0.mlp.up_proj.weight": (96, 64),
       "model.mtp_emb_norm.0.weight": (64,), "model.mtp_hidden_norm.0.weight": (64,),
       "model.mtp_linear_proj.0.weight": (64, 128)}


@pytest.mark.parametrize("family", ["ernie4_5", "ernie4_5_moe"])
def test_mtp_tensors_kept_aside_and_saved(tmp_path, family):
    model = ours(family)
    model.save_pretrained(tmp_path / "a")
    g = torch.Generator().manual_seed(1)
    mtp = {k: torch.randn(shape, generator=g) for k, shape in MTP.items()}
    edit_single_file(tmp_path / "a", lambda t: t.update(mtp))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert sorted(loaded.kept_aside) == sorted(MTP)
    assert all(torch.equal(loaded.kept_aside[k], v) for k, v in mtp.items())
    assert not any("mtp" in n for n, _ in loaded.named_parameters())
    assert torch.equal(logits(loaded), logits(model))
    loaded.save_pretrained(tmp_path / "b")
    written = file_tensors(tmp_path / "b")
    assert all(torch.equal(written[k], v) for k, v in mtp.items())
    assert sorted(written) == sorted(file_tensors(tmp_path / "a"))
    assert sorted(AutoModelForCausalLM.from_pretrained(tmp_path / "b").kept_aside) == sorted(MTP)


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe_ckpt")
    ours("ernie4_5_moe").save_pretrained(path)
    return path


@pytest.fixture
def broken(tmp_path, moe_ckpt):
    path = tmp_path / "ckpt"
    shutil.copytree(moe_ckpt, path)
    return path


def load_error(path, *names):
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(path)
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def test_missing_tensors(broken):
    edit_single_file(broken, lambda t: t.pop(EXPERT))
    msg = load_error(broken, EXPERT, broken)
    assert "1 missing tensor" in msg and "experts.3.gate_proj" not in msg
    edit_single_file(broken, lambda t: (t.pop("model.norm.weight"), t.pop("model.layers.2.mlp.gate.weight")))
    load_error(broken, "3 missing tensor", EXPERT, "model.norm.weight", "model.layers.2.mlp.gate.weight")


def test_unexpected_tensors(broken):
    extra = {"model.layers.0.mlp.bogus.weight": torch.zeros(3),
             "model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}  # only experts 0..7 exist
    edit_single_file(broken, lambda t: t.update(extra))
    load_error(broken, "2 unexpected tensor", *extra, broken)


def test_wrong_shape(broken):
    edit_single_file(broken, lambda t: t.update({"model.norm.weight": torch.ones(65),
                                                 "model.layers.2.mlp.experts.0.down_proj.weight": torch.ones(64, 31)}))
    load_error(broken, "2 tensor(s) with the wrong shape", "model.norm.weight: checkpoint [65] vs model [64]",
               "model.layers.2.mlp.experts.0.down_proj.weight: checkpoint [64, 31] vs model [64, 32]",
               "model.safetensors")


def test_wrong_shape_is_not_also_missing(broken):
    edit_single_file(broken, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    assert "missing" not in load_error(broken, "1 tensor(s) with the wrong shape", "model.norm.weight")


def test_wrong_dtype(broken):
    """An integer or bool tensor where the model has a float weight is an error, never cast silently."""
    key = "model.layers.0.self_attn.q_proj.weight"
    edit_single_file(broken, lambda t: t.update({key: (t[key] * 100).to(torch.int32),
                                                 "model.norm.weight": t["model.norm.weight"] > 0}))
    msg = load_error(broken, "2 tensor(s) with the wrong dtype", f"{key}: checkpoint int32", "model.norm.weight: "
                     "checkpoint bool", "model.safetensors")
    assert "missing" not in msg


def test_all_problems_in_one_message(broken):
    def edit(t):
        t.pop(EXPERT)
        t["model.bogus"] = torch.zeros(1)
        t["model.norm.weight"] = torch.ones(3)
    edit_single_file(broken, edit)
    load_error(broken, "missing", EXPERT, "unexpected", "model.bogus", "wrong shape", "model.norm.weight")


def test_truncated_file(broken):
    f = broken / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    load_error(broken, f, "truncated")


def test_corrupt_header(broken):
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    load_error(broken, f, "corrupt header")
    f.write_bytes(b"\xff" * 8 + bytes(data[8:]))
    load_error(broken, f, "corrupt header")


def test_missing_shard(tmp_path):
    ours("ernie4_5_moe").save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    load_error(tmp_path, tmp_path / shard, "missing", "model.safetensors.index.json")


def test_pickle_checkpoint_is_never_loaded(broken):
    sentinel = broken / "unpickled"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(sentinel),)

    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Evil()}))
    load_error(broken, "pytorch_model.bin", "safetensors", broken)
    assert not sentinel.exists()


def test_missing_config_and_paths(broken, tmp_path, monkeypatch):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"no config.json in {broken}") as info:
        AutoModelForCausalLM.from_pretrained(broken)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(CheckpointError, match="no config.json"):
        moelm.Ernie4_5_MoeForCausalLM.from_pretrained(broken)
    (broken / "config.json").write_text("{not json")
    load_error(broken, broken / "config.json", "not valid JSON")
    load_error(tmp_path / "does-not-exist", tmp_path / "does-not-exist", "does not exist")
    monkeypatch.chdir(tmp_path)
    load_error("some-org/no-such-model", "some-org/no-such-model", os.environ["HF_HUB_CACHE"], "offline")
    with pytest.raises(FileNotFoundError, match="some-org/no-such-model"):
        moelm.Ernie4_5_MoeForCausalLM.from_pretrained("some-org/no-such-model")


def test_hub_id_from_local_cache(tmp_path, monkeypatch, moe_ckpt):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--baidu--ERNIE-tiny"
    shutil.copytree(moe_ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = AutoModelForCausalLM.from_pretrained(moe_ckpt)
    for name in ("baidu/ERNIE-tiny", f"baidu/ERNIE-tiny@{commit}"):
        model = AutoModelForCausalLM.from_pretrained(name)
        assert torch.equal(logits(model), logits(expected))
    assert moelm.Ernie4_5_MoeForCausalLM.from_pretrained("baidu/ERNIE-tiny").name_or_path == "baidu/ERNIE-tiny"
    assert moelm.AutoConfig.from_pretrained("baidu/ERNIE-tiny") == expected.config


# ---------------------------------------------------------------- saving


def test_save_is_atomic(tmp_path, monkeypatch):
    from moelm.io import weights

    old = ours("ernie4_5_moe", seed=0)
    old.save_pretrained(tmp_path, max_shard_size="30KB")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = ours("ernie4_5_moe", seed=1, num_hidden_layers=2)

    real, calls = weights.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(old))

    monkeypatch.setattr(weights, "save_file", real)
    new.save_pretrained(tmp_path)  # now unsharded: the old shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(new))


def test_saved_files_are_readable_by_others(tmp_path):
    ours("ernie4_5").save_pretrained(tmp_path)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o044 == 0o044, p.name


# ---------------------------------------------------------------- memory and progress

# Peak RSS from /proc/self/status VmHWM, not getrusage's ru_maxrss: Linux carries the parent's (pytest's, several
# hundred MB) high-water mark over into ru_maxrss of a forked+exec'd child, which would hide the growth.
PEAK = textwrap.dedent("""
    import sys
    import torch

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    before = peak_kib()
    import moelm
    model = moelm.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    after = peak_kib()
    print(after - before, float(model.lm_head.weight.detach().double().sum()))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_near_model_size(tmp_path):
    config = Ernie4_5Config(hidden_size=512, num_hidden_layers=8, vocab_size=32000, intermediate_size=1536,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, seed=0)
    checksum = float(model.lm_head.weight.detach().double().sum())
    model.save_pretrained(tmp_path)
    del model
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 200e6
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown_kib, loaded_sum = out.stdout.split()
    assert float(loaded_sum) == pytest.approx(checksum, rel=1e-9)
    ratio = int(grown_kib) * 1024 / size
    assert ratio < 1.6, f"peak RSS grew by {ratio:.2f}x the checkpoint size while loading"


def test_progress(tmp_path, capfd, moe_ckpt):
    AutoModelForCausalLM.from_pretrained(moe_ckpt, progress=True)
    err = capfd.readouterr().err
    assert "Loading weights" in err and "100.0%" in err
    AutoModelForCausalLM.from_pretrained(moe_ckpt, progress=False)
    AutoModelForCausalLM.from_pretrained(moe_ckpt)  # small checkpoints are quiet by default
    assert "Loading weights" not in capfd.readouterr().err


def test_base_model_and_classifier_load_a_causal_lm_checkpoint(tmp_path, capfd):
    """Ernie4_5_MoeModel reads a causal-LM checkpoint without its `model.` prefix; a classifier keeps the
    decoder weights, ignores lm_head and starts `score` from random weights, saying so."""
    import moelm

    cfg = moelm.named_config("phimoe-tiny")
    cfg.pad_token_id = 0
    lm = moelm.PhimoeForCausalLM.from_config(cfg, seed=0).eval()
    lm.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    base = moelm.PhimoeModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    clf = moelm.PhimoeForSequenceClassification.from_pretrained(tmp_path)
    assert "score.weight" in capfd.readouterr().err
    torch.testing.assert_close(clf.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert clf(ids).logits.shape == (1, 2)


def test_an_adapter_folder_given_as_a_model_says_so(tmp_path):
    """A LoRA adapter's folder (adapter_config.json, no config.json) given where a model goes: the error says what
    it is and how an adapter is applied."""
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no config.json in .*; it holds a LoRA adapter .*--adapter"):
        moelm.AutoModelForCausalLM.from_pretrained(tmp_path)
