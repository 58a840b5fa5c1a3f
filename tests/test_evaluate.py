"""Evaluation (moelm.train.evaluate): multiple-choice scores and accuracies against direct forwards of the tiny
ERNIE-MoE checkpoint, batched equal to one row at a time, and token-weighted perplexity."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.models.scaffold import new_checkpoint
from moelm.train.data import DataConfig, DataError, load_examples
from moelm.train.evaluate import Choice, choice_scores, load_choices, multiple_choice, perplexity

RECORDS = [
    {"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "is ripping tiles off the roof.",
                                                          "is holding a cube.", "starts pulling up."], "label": 1},
    {"ctx": "The quick brown fox", "endings": ["jumps over the lazy dog.", "is café naïve.", "sleeps."],
     "label": "0"},
    {"ctx": "Hello! How are you", "endings": ["today?", "fine, thank you.", "数学 语言 模型"], "label": 2},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("tiny") / "m", seed=0)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture
def swag(tmp_path):
    path = tmp_path / "swag.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return str(path)


def direct_score(model, context, ending):
    """Sum of log p(ending token | everything before it), from one unpadded forward."""
    logits = model(input_ids=torch.tensor([context + ending])).logits[0].float()  # [S, V]
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(context) - 1 + t, token].item() for t, token in enumerate(ending))


def test_load_choices(tiny, swag, tmp_path):
    _, tok = tiny
    choices = load_choices(swag, tok)
    assert [c.label for c in choices] == [1, 0, 2]
    assert choices[1].ending_chars == [24, 14, 7]  # characters, as lm-eval's acc_norm counts (not utf-8 bytes: 16)
    assert tok.decode(choices[0].context) == RECORDS[0]["ctx"]
    assert tok.decode(choices[2].endings[2]) == " 数学 语言 模型"
    assert len(load_choices(swag, tok, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({**RECORDS[0], "label": 7}) + "\n")
    with pytest.raises(DataError, match=f"^{bad}:2: label 7 is out of range for 4 endings"):
        load_choices(str(bad), tok)


def test_scores_batched_equal_one_at_a_time_and_a_direct_forward(tiny, swag):
    model, tok = tiny
    choices = load_choices(swag, tok)
    single = choice_scores(model, choices, batch_size=1)
    batched = choice_scores(model, choices, batch_size=5)  # rows of different choices and lengths, padded
    direct = [[direct_score(model, c.context, e) for e in c.endings] for c in choices]
    assert [len(s) for s in batched] == [4, 3, 3]
    flat = [torch.tensor(sum(s, [])) for s in (batched, single, direct)]
    torch.testing.assert_close(flat[0], flat[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(flat[0], flat[2], atol=1e-4, rtol=1e-5)
    raw = [max(range(len(s)), key=s.__getitem__) == c.label for s, c in zip(direct, choices)]
    norm = [max(range(len(s)), key=lambda j: s[j] / c.ending_chars[j]) == c.label for s, c in zip(direct, choices)]
    result = multiple_choice(model, choices, batch_size=5)
    assert result == {"accuracy": sum(raw) / 3, "accuracy_norm": sum(norm) / 3, "count": 3}
    assert result == multiple_choice(model, choices, batch_size=1)


def test_accuracy_norm_divides_by_the_ending_length(tiny, swag):
    model, tok = tiny
    c = load_choices(swag, tok)[0]
    scores = [direct_score(model, c.context, e) for e in c.endings[:2]]
    best = max(range(2), key=scores.__getitem__)
    other = 1 - best
    # a huge length brings the other ending's score / length close to 0, above the best's score / 1
    lengths = [1, 1]
    lengths[other] = 10 ** 6
    choice = Choice(c.context, c.endings[:2], lengths, label=other)
    assert multiple_choice(model, [choice]) == {"accuracy": 0.0, "accuracy_norm": 1.0, "count": 1}


def test_perplexity_is_token_weighted_and_keeps_the_training_flag(tiny, swag, tmp_path):
    model, tok = tiny
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Hello! How are you today?")
    examples = load_examples(DataConfig("hellaswag", swag), tok)
    examples += load_examples(DataConfig("text", str(text), seq_length=16, drop_last=False), tok)  # all labelled
    total = tokens = 0
    for e in examples:
        count = sum(label != -100 for label in e.labels[1:])
        loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
        total, tokens = total + loss * count, tokens + count
    model.train()
    try:
        result = perplexity(model, examples, batch_size=2, pad_id=tok.pad_token_id)
        assert model.training
    finally:
        model.eval()
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert perplexity(model, examples, batch_size=1)["loss"] == pytest.approx(result["loss"], rel=1e-5)


LM_EVAL_TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
  - metric: acc_norm
    aggregation: mean
"""


def test_dataset_rows_score_as_lm_eval_hellaswag(tmp_path, monkeypatch):
    """Rows of the HellaSwag dataset itself (activity_label, ctx_a, ctx_b, WikiHow's [tags], non-ASCII endings):
    every ending's score, acc and acc_norm equal lm-evaluation-harness's own hellaswag task (its process_docs) run
    with its `hf` model on the transformers twin of the checkpoint."""
    pytest.importorskip("lm_eval")
    import transformers
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path / "m", seed=3)
    rows = [{"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
             "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
            {"activity_label": "Home and Garden [title] Café", "ctx_a": "[header] How to clean a naïve tile.",
             "ctx_b": "you should [step] first", "endings": ["rinse it [title] Then dry it.", "数学 语言 [step] 模型",
                                                             "sweep the café floor.", "go."], "label": 0},
            {"activity_label": "Making a cake", "ctx_a": "She mixes the flour.", "ctx_b": "",
             "endings": ["then she bakes it.", "the oven is cold [substeps] now.", "é"], "label": 1}]
    for r in rows:
        r["ctx"] = f"{r['ctx_a']} {r['ctx_b']}".strip()
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    task = tmp_path / "task"
    task.mkdir()
    (task / "hellaswag_local.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (task / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = HFLM(pretrained=ref, tokenizer=transformers.AutoTokenizer.from_pretrained(path), batch_size=4)
    out = evaluate(lm, get_task_dict(["hellaswag_local"], TaskManager(include_path=str(task),
                                                                      include_defaults=False)), log_samples=True)
    samples = sorted(out["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    want = [[resp[0][0] for resp in s["resps"]] for s in samples]

    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    choices = load_choices(data, tok)
    assert [c.ending_chars for c in choices] == [[len(e) for e in s["doc"]["choices"]] for s in samples]
    got = choice_scores(model, choices)
    torch.testing.assert_close(torch.tensor(sum(got, [])), torch.tensor(sum(want, [])), atol=1e-4, rtol=0)
    result, results = multiple_choice(model, choices), out["results"]["hellaswag_local"]
    assert (result["accuracy"], result["accuracy_norm"]) == (results["acc,none"], results["acc_norm,none"])
