"""`moelm serve` of quantized models: a GGUF named by --gguf-file in a directory (config, weights, tokenizer and chat
template from the file), and a GGUF drafter for --speculative-config's draft_model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamacpp_harness import tiny_checkpoint
from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.bench.gguf import write_gguf
from moelm.cli import build_parser
from moelm.cli import load as cli_load
from moelm.serve.engine import Engine, SamplingParams
from moelm.serve.speculation import SpeculativeConfig
from tokenizer_fixtures import ERNIE_TEMPLATE, build_sentencepiece_dir


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """A directory with m.gguf (Q4_0) and d.gguf (Q8_0, another seed) of a tiny ERNIE 4.5 with a SentencePiece
    vocabulary and chat template."""
    root = tmp_path_factory.mktemp("serve-quantized")
    tok = build_sentencepiece_dir(root / "tok", model_type="bpe", chat_template=None)
    out = root / "gguf"
    out.mkdir()
    for name, ftype, seed in (("m.gguf", "q4_0", 0), ("d.gguf", "q8_0", 1)):
        ck = tiny_checkpoint("ernie4_5", root / name, seed=seed)
        for file in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tok / file, ck / file)
        (ck / "chat_template.jinja").write_text(ERNIE_TEMPLATE, encoding="utf-8")
        write_gguf(ck, out / name, ftype)
    return out


def test_serve_loads_the_gguf_file_of_a_directory(ggufs):
    args = build_parser().parse_args(["serve", "--model", str(ggufs), "--gguf-file", "m.gguf"])
    model, tokenizer = cli_load(args)
    want = AutoTokenizer.from_pretrained(ggufs, gguf_file="m.gguf")
    assert tokenizer.chat_template == ERNIE_TEMPLATE
    messages = [{"role": "user", "content": "Hello world"}]
    assert tokenizer.apply_chat_template(messages) == want.apply_chat_template(messages)
    ref = AutoModelForCausalLM.from_pretrained(ggufs, gguf_file="m.gguf")
    ids = torch.tensor([want("Hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_gguf_drafter_keeps_greedy_tokens(ggufs):
    from moelm.serve.server import load_draft

    model = AutoModelForCausalLM.from_pretrained(ggufs, gguf_file="m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(ggufs, gguf_file="m.gguf")
    spec = SpeculativeConfig.parse(json.dumps({"model": str(ggufs / "d.gguf"), "num_speculative_tokens": 2}))
    draft = load_draft(spec, model)
    assert draft.config.vocab_size == model.config.vocab_size
    prompt = tokenizer("Hello world. Hello world.")["input_ids"]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          eos_token_id=None)[0, len(prompt):].tolist()
    with Engine(model, tokenizer, max_num_seqs=1, max_model_len=64, speculative=spec,
                draft_model=draft).start() as engine:
        got = [t for out in engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
               for t in out.token_ids]
    assert got == want


def test_max_model_len_zero_is_refused(ggufs):
    model = AutoModelForCausalLM.from_pretrained(ggufs, gguf_file="m.gguf")
    with pytest.raises(ValueError, match="max_model_len must be a positive integer, got 0"):
        Engine(model, AutoTokenizer.from_pretrained(ggufs, gguf_file="m.gguf"), max_model_len=0)
