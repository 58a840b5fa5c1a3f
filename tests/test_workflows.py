"""Whole workflows chained as a user runs them, on one tiny random ERNIE 4.5 MoE (`moelm new`): LoRA `moelm
finetune --merge` -> the adapter and merged checkpoint -> `moelm quantize` -> `from_pretrained`, and `--resume`
from the first step checkpoint; each hand-off keeps the model exact and carries the tokenizer, chat template and
generation config."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.cli import main
from moelm.train.lora import load_adapter

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len() do?"}]


def cli(*args) -> None:
    assert main([str(a) for a in args]) == 0, args


def finetune(base: Path, out: Path, *extra) -> None:
    cli("finetune", ROOT / "recipes/chat_sft_lora.yaml", f"--model.name_or_path={base}", f"--checkpoint.dir={out}",
        "--step.max_steps=2", "--step.global_batch_size=4", "--step.local_batch_size=2", "--step.val_every_steps=0",
        "--checkpoint.every_steps=1", "--checkpoint.merge=true", "--optimizer.lr=0.05", "--lr_scheduler.warmup_steps=0",
        "--peft.target_modules=all-linear", "--dataset.num_samples_limit=8", "--dataset.seq_length=48",
        "--dataset.truncation=right", "--validation_dataset.num_samples_limit=2",
        "--validation_dataset.seq_length=48", "--validation_dataset.truncation=right", *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("workflow")
        cli("new", "ernie4_5_moe-tiny", root / "base", "--seed", "7")
        finetune(root / "base", root / "run")
        yield root
    finally:
        torch.set_num_threads(threads)


def ids_of(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]])


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_merged_equals_the_adapter_and_carries_the_files(run):
    base, merged = run / "base", run / "run" / "merged"
    umask = os.umask(0)
    os.umask(umask)
    for folder in (merged, run / "run" / "final"):  # as a plain mkdir makes them (a temporary folder's is 0700)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = ids_of(tokenizer)
    assert ids_of(AutoTokenizer.from_pretrained(base)).tolist() == ids.tolist()
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    assert json.loads((merged / "generation_config.json").read_text()) == \
        json.loads((base / "generation_config.json").read_text())
    adapted = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, fast=False)
    load_adapter(adapted, run / "run" / "final")
    want = logits(adapted, ids)
    assert (want - logits(AutoModelForCausalLM.from_pretrained(base, fast=False), ids)).abs().max() > 1e-3
    model = AutoModelForCausalLM.from_pretrained(merged, fast=False)
    assert model.dtype == torch.float32
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=0)

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-4, rtol=0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(theirs, run / "run" / "final")
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-4, rtol=0)


def test_quantized_merge_equals_quantizing_on_load(run, tmp_path):
    merged = run / "run" / "merged"
    cli("quantize", merged, tmp_path / "q", "--quantization", "int4")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(merged).chat_template
    ids = ids_of(tokenizer)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    want = AutoModelForCausalLM.from_pretrained(merged, quantization="int4")
    assert torch.equal(logits(ours, ids), logits(want, ids))
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(ids, **kw), want.generate(ids, **kw))


def test_resume_from_a_step_gives_the_same_adapter_and_merge(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run / "run" / "step_1", out / "step_1")
    finetune(run / "base", out, f"--resume={out / 'step_1'}")
    for name in ("final/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(run / "run" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in losses if x is not None]) == 1  # step 2 only: the resumed run logged from there


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_quantized_gguf_saves_and_reloads(run, tmp_path, ftype):
    """A tied model from a quantized GGUF: its head is its own quantized copy of token_embd, so save_pretrained
    writes it with tie_word_embeddings false, and the saved checkpoint loads back (it was refused: a quantized
    lm_head with tied embeddings)."""
    pytest.importorskip("gguf")
    from moelm.bench.gguf import write_gguf

    base = run / "base"
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    write_gguf(base, tmp_path / "m.gguf", ftype)
    with pytest.warns(UserWarning, match="placeholder vocabulary"):
        tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", fast=False)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert not json.loads((tmp_path / "saved" / "config.json").read_text())["tie_word_embeddings"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", fast=False)
    ids = torch.tensor([[1, 5, 9, 30, 77, 12]])
    assert torch.equal(logits(again, ids), logits(model, ids))
