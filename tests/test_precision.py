"""Reduced precision and torch.compile against transformers 5.23.0 on tiny random models (every weight random):
loaded in bf16 by both, the same logits and loss, and gradients rounded where transformers' backward rounds them;
the experts and the model traced whole by torch.compile, as transformers' are."""
from __future__ import annotations

import pytest
import torch

import moelm
from moelm.nn.moe import Experts
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
