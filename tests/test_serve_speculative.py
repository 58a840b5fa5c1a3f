"""Speculative decoding in the serving engine (moelm.serve.speculation, `moelm serve --speculative-config`).

Greedy: each sequence's tokens and finish reason are those of the engine without drafts, for the three families with
n-gram lookup and a draft model, and ERNIE MoE's MTP head; more prompts than slots, prompts prefilled in chunks beside
rows checking drafts, stop tokens inside an accepted run. Sampling: the 1st-3rd new tokens of 4000 seeded sequences
follow the model's own distribution (chi-square, fixed seeds). The counters reach /metrics under vLLM's names.
"""
from __future__ import annotations

import json

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.models.scaffold import new_checkpoint
from moelm.serve.engine import Engine, SamplingParams
from moelm.serve.speculation import SpeculativeConfig, SpeculativeConfigError
from reference import randomise_scaled
from test_speculative import VOCAB, chi2, exact_marginals
from test_speculative import model as tiny_model

NAMES = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}


def checkpoint(family: str, path, seed: int = 0, mtp: bool = False):
    """A tiny checkpoint with its tokenizer, every weight random, scaled so that greedy decoding both wanders and
    repeats itself (n-gram drafts are then sometimes right)."""
    new_checkpoint(NAMES[family], path, seed=seed)
    m = randomise_scaled(AutoModelForCausalLM.from_pretrained(path, fast=False), seed, 2.0, mtp)
    with torch.no_grad():
        if mtp:  # a head that drafts the last token again (its block adds nothing, the projection keeps the
            base = m.model  # token's embedding), right where the model repeats itself
            block = base.mtp_block[0]
            for linear in (block.self_attn.o_proj, block.mlp.down_proj):
                linear.weight.zero_()
            proj = base.mtp_linear_proj[0].weight  # [H, 2H]
            proj.zero_()
            proj[:, :proj.shape[0]] = torch.eye(proj.shape[0])
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-speculative")


class Counts:
    """The engine's metrics hooks, counting drafts."""

    def __init__(self):
        self.drafts = self.drafted = self.kept = 0

    def speculated(self, drafted: int, kept: int):
        self.drafts, self.drafted, self.kept = self.drafts + 1, self.drafted + drafted, self.kept + kept

    def __getattr__(self, name):
        return lambda *args: None


def serve_all(model, tokenizer, prompts, params, **kwargs):
    """Every prompt submitted at once: [(tokens, finish reason)] in order, and the engine."""
    with Engine(model, tokenizer, max_num_seqs=3, max_num_batched_tokens=12, max_model_len=96,
                **kwargs).start() as engine:
        requests = [engine.submit(p, params) for p in prompts]
        got = []
        for r in requests:
            tokens, finish = [], None
            for out in r:
                tokens += out.token_ids
                finish = out.finish_reason or finish
            got.append((tokens, finish))
    return got, engine


TEXTS = ["Hello world. Hello world. Hello world.", "The quick brown fox jumps over the lazy dog. " * 2, "a",
         "def add(a, b): return a + b\ndef sub(a, b): return a - b\ndef", "abc abc abc abc", "你好，世界"]


@pytest.mark.parametrize("family,method,fast", [
    ("ernie4_5", "ngram", True), ("ernie4_5", "ngram", False), ("ernie4_5_moe", "ngram", True),
    ("phimoe", "ngram", True), ("ernie4_5", "draft_model", True), ("ernie4_5_moe", "draft_model", True),
    ("phimoe", "draft_model", True), ("ernie4_5_moe", "mtp", True), ("ernie4_5_moe", "mtp", False),
    ("ernie4_5_moe", "mtp:3", True), ("ernie4_5_moe", "mtp:3", False)])
def test_greedy_with_drafts_equals_greedy_without(family, method, fast, tmp):
    """mtp: one draft a step; mtp:3: three, the 2nd and 3rd from the head's own output."""
    method, _, tokens = method.partition(":")
    path = tmp / f"{family}-{method == 'mtp'}"
    if not path.exists():
        checkpoint(family, path, mtp=method == "mtp")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, fast=fast)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    plain, _ = serve_all(model, tokenizer, prompts, params)
    # a stop token that comes late in some answers: those finish inside a run of kept drafts or at its end
    stop = plain[1][0][9]
    params = SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop])
    plain, _ = serve_all(model, tokenizer, prompts, params)
    spec = {"method": method, "num_speculative_tokens": int(tokens or (1 if method == "mtp" else 3)), "adaptive": False}
    draft = None
    if method == "ngram":
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    if method == "draft_model":  # the model in int8: it mostly agrees, not always
        spec["model"] = str(path)
        draft = AutoModelForCausalLM.from_pretrained(path, quantization="int8", fast=fast)
    counts = Counts()
    got, engine = serve_all(model, tokenizer, prompts, params, speculative=spec, draft_model=draft, metrics=counts)
    assert got == plain
    assert any(reason == "stop" for _, reason in got)
    assert counts.drafts and 0 < counts.kept < counts.drafted, vars(counts)  # some kept, some rejected
    assert engine.cache.used() == 0 and not engine.running


@pytest.mark.parametrize("method", ("ngram", "draft_model", "mtp"))
def test_sampling_with_drafts_keeps_the_model_distribution(method, tmp):
    family = "ernie4_5_moe" if method == "mtp" else "ernie4_5"
    model = tiny_model(family, mtp=method == "mtp", vocab=VOCAB, tmp=tmp)
    draft = tiny_model("ernie4_5", seed=5, vocab=VOCAB, tmp=tmp) if method == "draft_model" else None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint("ernie4_5", tmp / "tokenizer") if not
                                              (tmp / "tokenizer").exists() else tmp / "tokenizer")
    spec = {"method": method, "num_speculative_tokens": 2, "adaptive": False,
            **({"prompt_lookup_min": 1, "prompt_lookup_max": 1} if method == "ngram" else {}),
            **({"model": "draft"} if method == "draft_model" else {})}
    # ngram: every token occurs before, so lookup always finds a continuation; the others: short, so cheap
    prompt = (torch.arange(VOCAB + 1) % VOCAB).tolist() if method == "ngram" else [3, 4, 5, 6]
    temperature, n, requests = 0.7, 50, 80
    counts = Counts()
    new = []
    with Engine(model, tokenizer, max_num_seqs=50, max_num_batched_tokens=256, max_model_len=40, speculative=spec,
                draft_model=draft, metrics=counts).start() as engine:
        params = [SamplingParams(max_tokens=3, temperature=temperature, ignore_eos=True, n=n, seed=1000 + i)
                  for i in range(requests)]
        for p in params:
            rows = [[] for _ in range(n)]
            for out in engine.submit(prompt, p):
                rows[out.index] += out.token_ids
            new += rows
    new = torch.tensor(new)
    assert new.shape == (n * requests, 3) and counts.kept > 0
    for i, expected in enumerate(exact_marginals(model, torch.tensor([prompt]), temperature)):
        # 15 degrees of freedom: P(chi2 > 45) ~ 8e-5; the seeds are fixed, so this is not flaky
        assert chi2(new[:, i], expected) < 45.0, (method, i)


def test_the_config_takes_vllms_fields_and_names_the_fault():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}) \
        .prompt_lookup_min == 3
    assert SpeculativeConfig.parse({"method": "ernie_mtp", "num_speculative_tokens": 1}).method == "mtp"
    assert SpeculativeConfig.parse({"model": "d", "num_speculative_tokens": 2}).method == "draft_model"
    for bad, message in [
        ("{nope", "not JSON"),
        ("[1]", "JSON object"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
         "does not support draft_tensor_parallel_size"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
         "prompt_lookup_min (4) is more than prompt_lookup_max (2)"),
        ({"method": "draft_model", "num_speculative_tokens": 3}, "needs model"),
        ({"model": "d", "num_speculative_tokens": 3, "quantization": "int3"}, "quantization must be one of int8, int4"),
        ({"method": "ngram", "num_speculative_tokens": 3, "model": "x"}, "model is for method 'draft_model'"),
        ({"method": "mtp", "num_speculative_tokens": 1, "prompt_lookup_max": 2}, "are for method 'ngram'"),
        ({"method": "ngram", "num_speculative_tokens": 1, "adaptive": "yes"}, "adaptive must be true or false"),
    ]:
        with pytest.raises(SpeculativeConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SpeculativeConfig.parse(bad if isinstance(bad, str) else json.dumps(bad))


def test_engine_refuses_a_drafter_it_cannot_run(tmp):
    path = tmp / "ernie4_5-False"
    if not path.exists():
        checkpoint("ernie4_5", path)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with pytest.raises(SpeculativeConfigError, match="has none"):
        Engine(model, tokenizer, speculative={"method": "mtp", "num_speculative_tokens": 1})
    other = tiny_model("ernie4_5", vocab=VOCAB)
    with pytest.raises(SpeculativeConfigError, match="vocabulary of 16 tokens"):
        Engine(model, tokenizer, speculative={"model": "x", "num_speculative_tokens": 2}, draft_model=other)


def test_server_streams_equal_greedy_and_counts_drafts(tmp):
    httpx = pytest.importorskip("httpx")
    from serve_fixtures import running_server
    from test_serve_api import metric

    path = tmp / "ernie4_5_moe-True"
    if not path.exists():
        checkpoint("ernie4_5_moe", path, mtp=True)
    spec = {"method": "mtp", "num_speculative_tokens": 1, "adaptive": False}
    with running_server(path, max_num_seqs=2, max_model_len=96, speculative=spec) as (url, engine, tokenizer):
        prompt = tokenizer("Hello world. Hello world.")["input_ids"]
        want = engine.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=None)[0, len(prompt):].tolist()
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                "ignore_eos": True}
        text = ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[len("data: "):])["choices"][0]["text"]
        drafts = metric(url, "moelm:spec_decode_num_drafts_total")
        drafted = metric(url, "moelm:spec_decode_num_draft_tokens_total")
        kept = metric(url, "moelm:spec_decode_num_accepted_tokens_total")
        first = metric(url, "moelm:spec_decode_num_accepted_tokens_per_pos_total")
    assert text == tokenizer.decode(want, skip_special_tokens=True)
    assert drafts == drafted > 0 and kept == first <= drafted
