"""`moelm serve --expert-metrics`: moelm:expert_tokens_total{layer, expert} counts the tokens each MoE layer routes to
each expert, scraped from /metrics and checked against routers set by hand: ERNIE MoE (a correction bias that
chooses two experts whatever the logits), PhiMoE (sparsemixer's top-2 of scores made constant), with prompts in
chunks, two choices decoded together, the prefix cache, MTP drafts, the C decode kernels and PyTorch's ops. Off by
default; a dense model is refused."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moelm import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from moelm.inference import kernels  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402
from moelm.serve.engine import Engine  # noqa: E402
from reference import constant_moe_input  # noqa: E402
from serve_fixtures import running_server  # noqa: E402
from test_fast import kernels_forced  # noqa: E402
from test_serve_api import metric  # noqa: E402
from test_serve_cli import ENV, free_port  # noqa: E402
from test_serve_speculative import checkpoint as speculative_checkpoint  # noqa: E402

ERNIE_PICKS = {1: (5, 6), 2: (0, 3)}  # MoE layer -> the experts its correction bias chooses (of 8, top-2)
PHI_PICKS = {0: (3, 1), 1: (0, 2)}  # layer -> sparsemixer's first and second pick (of 4)


def ernie_router(path):
    """Each MoE block's gate random (logits that differ per token) and a correction bias of 2 on its two experts:
    probabilities are at most 1, so biased they always win, while their weights stay the unbiased probabilities."""
    model = AutoModelForCausalLM.from_pretrained(path, fast=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in ERNIE_PICKS:
                block = layer.mlp
                block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * 0.5)
                bias = block.moe_statics.e_score_correction_bias
                bias.zero_()
                bias[0, list(ERNIE_PICKS[i])] = 2.0
            else:
                assert not hasattr(layer.mlp, "routed")
    model.save_pretrained(path)


def phi_router(path):
    """Each block's input made constant (its LayerNorm's weight 0, its bias e_0), so its router's scores are the
    gate's column 0 for every token: 4 for the first pick, 2 for the second, 0 for the rest."""
    model = AutoModelForCausalLM.from_pretrained(path, fast=False)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            constant_moe_input(layer)
            first, second = PHI_PICKS[i]
            gate = layer.block_sparse_moe.gate.weight
            gate.normal_()
            gate[:, 0] = 0.0
            gate[first, 0], gate[second, 0] = 4.0, 2.0
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("ernie-moe"), seed=0)
    ernie_router(path)
    return path


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    path = new_checkpoint("phimoe-tiny", tmp_path_factory.mktemp("phimoe"), seed=0)
    phi_router(path)
    return path


def expert_tokens(url) -> dict[tuple[int, int], float]:
    """{(layer, expert): count} of /metrics' moelm:expert_tokens_total, parsed as Prometheus reads it."""
    out = {}
    families = text_string_to_metric_families(httpx.get(url + "/metrics").text)
    for family in families:
        if family.name == "moelm:expert_tokens":
            assert family.type == "counter"
            for sample in family.samples:
                assert sample.name == "moelm:expert_tokens_total" and sample.labels["model_name"] == "tiny"
                key = (int(sample.labels["layer"]), int(sample.labels["expert"]))
                assert key not in out
                out[key] = sample.value
    return out


def expected(picks: dict[int, tuple[int, int]], experts: int, tokens: dict[int, int]) -> dict:
    """Every layer and expert: tokens[layer] for the layer's picks, else 0."""
    return {(layer, e): float(tokens[layer] if e in chosen else 0) for layer, chosen in picks.items()
            for e in range(experts)}


def complete(url, prompt, max_tokens, n=1) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "n": n}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@contextlib.contextmanager
def kernel_calls():
    """Counts of the C decode kernels' calls (decode_layer, moe_block) inside the block."""
    calls = {"decode_layer": 0, "moe_block": 0}
    real = {name: getattr(kernels, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(kernels, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(kernels, name, fn)


@pytest.mark.parametrize("path", ["gemv", "torch"])
def test_ernie_counts_equal_the_tokens_each_layer_routes(ernie, path):
    """Layer 1 routes every token fed (prompt and tokens fed back: P + N - 1 per choice); layer 2, the last, runs
    its block on the positions whose next token is wanted only (N per choice). Prompts of 20 tokens in chunks of
    at most 8, two choices decoding together; the C kernels (their router logits) or PyTorch's ops."""
    with kernels_forced(path), kernel_calls() as calls, \
            running_server(ernie, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64,
                           enable_prefix_caching=False, expert_metrics=True) as (url, engine, tokenizer):
        assert expert_tokens(url) == expected(ERNIE_PICKS, 8, {1: 0, 2: 0})
        prompt = list(range(10, 30))
        complete(url, prompt, 5, n=2)
        assert expert_tokens(url) == expected(ERNIE_PICKS, 8, {1: 2 * (20 + 4), 2: 2 * 5})
        complete(url, prompt[:3], 4)
        assert expert_tokens(url) == expected(ERNIE_PICKS, 8, {1: 2 * 24 + 3 + 3, 2: 2 * 5 + 4})
        assert engine.expert_layers == [1, 2]
    assert (calls["decode_layer"] + calls["moe_block"] > 0) == (path == "gemv")


def test_phimoe_counts_sparsemixers_picks_and_skips_cached_tokens(phi):
    """Sparsemixer's two picks; the second request's prompt partly from the prefix cache, whose tokens are not
    run (nor counted)."""
    with running_server(phi, max_num_seqs=2, max_model_len=64, block_size=4,
                        expert_metrics=True) as (url, engine, tokenizer):
        prompt = list(range(40, 58))
        first = complete(url, prompt, 6)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert expert_tokens(url) == expected(PHI_PICKS, 4, {0: 18 + 5, 1: 6})
        second = complete(url, prompt, 3)
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0
        assert expert_tokens(url) == expected(PHI_PICKS, 4, {0: 18 + 5 + 18 - cached + 2, 1: 6 + 3})


def test_mtp_drafts_count_and_every_layer_runs_every_token(tmp_path):
    """With MTP drafting the model's hidden states of every position are wanted, so the last layer runs every
    token too; drafts the model rejects were routed and count: P + N - 1 + rejected drafts per layer."""
    path = tmp_path / "mtp"
    speculative_checkpoint("ernie4_5_moe", path, mtp=True)
    ernie_router(path)
    spec = {"method": "mtp", "num_speculative_tokens": 2, "adaptive": False}
    with running_server(path, max_num_seqs=2, max_model_len=96, speculative=spec,
                        expert_metrics=True) as (url, engine, tokenizer):
        assert engine.drafter.hidden
        prompt = tokenizer("Hello world. Hello world.")["input_ids"]
        complete(url, prompt, 12)
        drafted = metric(url, "moelm:spec_decode_num_draft_tokens_total")
        kept = metric(url, "moelm:spec_decode_num_accepted_tokens_total")
        fed = len(prompt) + 11 + drafted - kept
        assert drafted > 0
        assert expert_tokens(url) == expected(ERNIE_PICKS, 8, {1: fed, 2: fed})


def test_off_by_default(phi):
    with running_server(phi, max_num_seqs=2, max_model_len=64) as (url, engine, tokenizer):
        complete(url, [40, 41, 42], 2)
        text = httpx.get(url + "/metrics").text
        assert engine.expert_counts is None
        assert "moelm:generation_tokens_total" in text and "expert" not in text


def test_warmup_does_not_count(ernie):
    model = AutoModelForCausalLM.from_pretrained(ernie)
    engine = Engine(model, AutoTokenizer.from_pretrained(ernie), max_num_seqs=2, max_model_len=32,
                    max_num_batched_tokens=8, expert_metrics=True)
    engine.warmup()
    assert engine.expert_counts.shape == (2, 8) and not engine.expert_counts.any()


def test_a_dense_model_is_refused(tmp_path):
    path = new_checkpoint("ernie4_5-tiny", tmp_path / "dense", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="expert_metrics: Ernie4_5ForCausalLM is a dense model"):
        Engine(model, AutoTokenizer.from_pretrained(path), expert_metrics=True)
    r = subprocess.run([sys.executable, "-m", "moelm.cli", "serve", str(path), "--expert-metrics", "--port",
                        str(free_port())], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"moelm: error: --expert-metrics: {path} is a dense model (no MoE layers): it has "
                                "no experts to count")
