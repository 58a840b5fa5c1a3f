"""Reduced precision and torch.compile against transformers 5.23.0 on tiny random models (every weight random):
loaded in bf16 by both, the same logits and loss, and gradients rounded where transformers' backward rounds them;
the experts and the model traced whole by torch.compile, as transformers' are."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moelm
from moelm.inference.attention import decode_attention
from moelm.inference.experts import FastExperts
from moelm.nn.moe import Experts
from test_fast import kernels_forced
from test_parity import build, labels_for, ref_name, tokens

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family,overrides", [
    ("ernie4_5", dict(use_bias=True)),
    ("ernie4_5_moe", dict(moe_num_shared_experts=1)),
    ("phimoe", dict(attention_bias=True)),
])
def test_bf16_gradients_as_transformers(family, overrides):
    """ERNIE's rotation in bf16 rounds each of its two products' gradients to bf16 before adding them, and its
    MoE block's input gets the shared experts' gradient first, as transformers: every gradient matches (the
    experts' to within the order of their rows, which transformers' unstable sort leaves open)."""
    _, _, path = build(family, "sdpa", **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = tokens(batch=2, seq=10)
    kwargs = dict(input_ids=ids, labels=labels_for(ids))
    a, b = ref.eval()(**kwargs), ours.eval()(**kwargs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs[ref_name(name)].grad
        assert (p.grad is None) == (q is None), name
        if q is not None:
            gap, top = float((p.grad.float() - q.float()).abs().max()), float(q.float().abs().max())
            assert gap <= 1e-3 * top, f"{name}: gradient {gap:.3g} off transformers' (its largest: {top:.3g})"


def test_experts_under_torch_compile():
    """torch.compile traces fp32 experts whole (fullgraph): its torch._grouped_mm takes bf16 only and the padded
    bmm has data-dependent shapes, so they run as one op opaque to it (transformers falls back likewise); output and
    gradients as eager."""
    torch.manual_seed(0)
    experts = Experts(4, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(6, 32, requires_grad=True)
    index, weights = torch.tensor([[0, 1], [1, 0], [0, 3], [3, 1], [1, 0], [0, 3]]), torch.rand(6, 2)
    outs = []
    for run in (experts, torch.compile(experts, backend="aot_eager", fullgraph=True)):
        experts.zero_grad()
        x.grad = None
        out = run(x, index, weights)
        out.square().sum().backward()
        outs.append((out.detach(), x.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_model_compiles_whole():
    """torch.compile(model, fullgraph=True) traces a forward, with padding or without, as transformers' models
    (moelm's layers, without the inference fast paths)."""
    _, _, path = build("ernie4_5_moe", "sdpa", num_hidden_layers=2)
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", fast=False)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    ids = tokens(batch=2, seq=6)
    for mask in (None, torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0)):
        with torch.no_grad():
            want = ours(input_ids=ids, attention_mask=mask).logits
            got = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fast_experts_sum_in_fp32():
    """The fast experts add the chosen experts' bf16 outputs in fp32 and round once, as the plain ones
    (index_add_ on CPU) and transformers: k = 4 experts a token, the same output bit for bit."""
    torch.manual_seed(0)
    experts = Experts(8, 64, 32).to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(24, 64, dtype=torch.bfloat16)
    index, weights = torch.rand(24, 8).topk(4).indices, torch.rand(24, 4)
    with torch.no_grad(), kernels_forced("experts=torch"):
        want = experts(x, index, weights)
        experts.__class__ = FastExperts
        got = experts(x, index, weights)
    assert torch.equal(got, want)


def test_decode_attention_rounds_as_sdpa():
    """One query against a bf16 cache: the probabilities rounded to bf16 before V, as SDPA's CPU kernel rounds them;
    many cases then equal SDPA bit for bit (its exp is an approximation: not all)."""
    g = torch.Generator().manual_seed(0)
    same = 0
    for t in range(4, 64):
        q, k, v = (torch.randn(2, h, n, 32, generator=g).bfloat16() for h, n in ((4, 1), (2, t), (2, t)))
        want = F.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True)
        same += torch.equal(decode_attention(q, k, v, None, 0.2), want)
    assert same >= 10, f"{same} of 60 equal SDPA"  # 17 (0 with the probabilities kept in fp32)


def test_fast_paths_follow_autocast():
    """An fp32 model under CPU autocast to bf16: the fast paths (kernels, fused projections, decode attention, the
    C decoding steps) give way to the plain layers, which autocast rounds as it rounds transformers'."""
    _, _, path = build("ernie4_5_moe", "sdpa", num_hidden_layers=2)
    fast, plain = (moelm.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", fast=f)
                   for f in (True, False))
    ids = tokens(batch=2, seq=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(input_ids=ids, use_cache=True), plain(input_ids=ids, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        step = ids[:, -1:]
        assert torch.equal(fast(input_ids=step, past_key_values=a.past_key_values).logits,
                           plain(input_ids=step, past_key_values=b.past_key_values).logits)
        assert torch.equal(fast.generate(input_ids=ids, max_new_tokens=6, do_sample=False),
                           plain.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fast_model_compiles_whole(quantization):
    """torch.compile(model, fullgraph=True) with the fast layers (the default): while tracing they take the plain
    path (no data pointers, measured choices or C calls), as eager within rounding."""
    _, _, path = build("ernie4_5", "sdpa", num_hidden_layers=2)
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", quantization=quantization)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    ids = tokens(batch=2, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
