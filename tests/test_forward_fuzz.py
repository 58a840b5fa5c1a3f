"""forward() arguments the plain parity tests do not pass, against transformers 5.23.0 on tiny random models: 4D
float masks, packed sequences in position_ids, shift_labels, cache_position, ERNIE's attention dropout (none, as
transformers), and bf16 / fp16."""
from __future__ import annotations

import pytest
import torch

import moelm
from test_parity import BASE, _big_correction_bias, build, close, ref_name, tokens

transformers = pytest.importorskip("transformers")

S = 10
PACKED = torch.cat([torch.arange(4), torch.arange(6)])[None].expand(2, -1)  # two documents in each row


def block_diagonal() -> torch.Tensor:
    """bool [2, 1, S, S]: causal within two documents (4 and 6 tokens) in each row, True = attend."""
    doc = (PACKED[0] == 0).cumsum(0)
    return ((doc[:, None] == doc[None, :]) & torch.ones(S, S, dtype=torch.bool).tril())[None, None].expand(2, 1, S, S)


def additive(mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, value)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(BASE))
def test_4d_float_mask_is_additive(family, attn):
    """A 4D float attention_mask adds to the scores as transformers takes it (0 attends; -inf or the dtype's min
    does not), the same as the boolean mask it stands for; ones and zeros are an error naming it."""
    ref, ours, _ = build(family, attn)
    ids = tokens(seq=S)
    mask = block_diagonal()
    with torch.no_grad():
        as_bool = ours(input_ids=ids, attention_mask=mask).logits
        for value in (float("-inf"), torch.finfo(torch.float32).min):
            kwargs = dict(input_ids=ids, attention_mask=additive(mask, value), position_ids=PACKED)
            close(ref(**kwargs).logits, ours(**kwargs).logits, f"logits under a 4D float mask ({value})")
            close(as_bool, ours(input_ids=ids, attention_mask=additive(mask, value)).logits, "float vs bool mask")
        with pytest.raises(ValueError, match="4D float attention_mask is additive"):
            ours(input_ids=ids, attention_mask=mask.float())


@pytest.mark.parametrize("family,overrides", [("ernie4_5", {}), ("ernie4_5_moe", {}), ("phimoe", {}),
                                              ("phimoe", dict(sliding_window=3))])
def test_packed_position_ids_without_cache(family, overrides):
    """With no attention_mask and no cache, transformers reads packed documents from position_ids restarting (each
    attends to itself only); with a cache it does not. moelm the same, logits and aux loss."""
    ref, ours, _ = build(family, "sdpa", **overrides)
    ids = tokens(seq=S)
    moe = family != "ernie4_5"
    for use_cache in (False, True):
        kwargs = dict(input_ids=ids, position_ids=PACKED, use_cache=use_cache, labels=ids)
        if moe:
            kwargs["output_router_logits"] = True
        with torch.no_grad():
            a, b = ref(**kwargs), ours(**kwargs)
        close(a.logits, b.logits, f"logits with packed position_ids, use_cache={use_cache}")
        close(a.loss, b.loss, f"loss (with the aux loss) with packed position_ids, use_cache={use_cache}")
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=PACKED, use_cache=False).logits
        alone = ours(input_ids=ids[:, 4:], use_cache=False).logits
    close(alone, packed[:, 4:], "the second document alone")


@pytest.mark.parametrize("family", list(BASE))
def test_gradients_under_4d_mask_and_packed_positions(family):
    """Training mode, labels (and the aux loss): every parameter's gradient equals transformers' under a 4D float mask
    and under packed position_ids with gradient checkpointing (which turns the cache off, so packing applies)."""
    edit = _big_correction_bias if family == "ernie4_5_moe" else None
    ref, ours, _ = build(family, "eager", cache=False, edit=edit)
    ids = tokens(seq=S)
    labels = ids.masked_fill(torch.arange(S) == 3, -100)
    cases = [dict(attention_mask=additive(block_diagonal(), float("-inf")), position_ids=PACKED),
             dict(position_ids=PACKED)]
    for checkpointing, extra in zip((False, True), cases):
        grads = []
        for model in (ref, ours):
            model.train()
            if checkpointing:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            model.zero_grad(set_to_none=True)
            torch.manual_seed(7)
            # the aux loss under the packed positions only: transformers' fails on a 4D mask (moelm: a ValueError)
            out = model(input_ids=ids, labels=labels, output_router_logits=family != "ernie4_5" and checkpointing,
                        **extra)
            out.loss.backward()
            grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
            model.gradient_checkpointing_disable()
        assert len(grads[1]) == len(grads[0]) > 10
        for name, grad in grads[1].items():
            close(grads[0][ref_name(name)], grad, f"grad {name} ({list(extra)})")


@pytest.mark.parametrize("family", list(BASE))
def test_shift_labels(family):
    """shift_labels (labels already shifted, as transformers' loss takes them from HF Trainer) give the loss in
    their place; alone, without labels, an error naming them."""
    ref, ours, _ = build(family)
    ids = tokens(seq=S)
    shifted = ids.masked_fill(torch.arange(S) < 4, -100)
    for extra in ({}, dict(num_items_in_batch=torch.tensor(9))):
        kwargs = dict(input_ids=ids, labels=ids, shift_labels=shifted, **extra)
        with torch.no_grad():
            close(ref(**kwargs).loss, ours(**kwargs).loss, f"loss with shift_labels {list(extra)}")
    with pytest.raises(ValueError, match="shift_labels"):
        ours(input_ids=ids, shift_labels=shifted)


@pytest.mark.parametrize("family", ["ernie4_5", "ernie4_5_moe"])
def test_ernie_attention_has_no_dropout(family):
    """transformers' ERNIE attention drops nothing whatever attention_dropout config.json carries: the training
    loss equals transformers' (PhiMoE's attention dropout, which transformers applies, is left as it is)."""
    ref, ours, _ = build(family, "sdpa", attention_dropout=0.5)
    ids = tokens(seq=S)
    for model in (ref, ours):
        model.train()
    try:
        losses = [model(input_ids=ids, labels=ids).loss for model in (ref, ours)]
    finally:
        for model in (ref, ours):
            model.eval()
    close(losses[0].detach(), losses[1].detach(), "training loss with attention_dropout=0.5")


@pytest.mark.parametrize("family", list(BASE))
def test_cache_position(family):
    """cache_position, which transformers 5 takes and does not read: the cache's next positions as transformers
    computes them; any other an error naming it (moelm's cache appends)."""
    ref, ours, _ = build(family)
    ids = tokens(seq=S)
    with torch.no_grad():
        a, b = (m(input_ids=ids[:, :7], use_cache=True).past_key_values for m in (ref, ours))
        kwargs = dict(input_ids=ids[:, 7:], cache_position=torch.arange(7, S))
        close(ref(past_key_values=a, **kwargs).logits, ours(past_key_values=b, **kwargs).logits, "cached step")
        for wrong in (torch.arange(3, 6), torch.arange(S)):
            with pytest.raises(ValueError, match="cache_position must be"):
                ours(input_ids=ids[:, :wrong.numel()], cache_position=wrong,
                     past_key_values=ours(input_ids=ids[:, :7], use_cache=True).past_key_values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(BASE))
def test_half_precision_as_transformers(family, dtype):
    """Loaded in bf16 / fp16 (without moelm's fast paths), the logits and greedy tokens are transformers' in the same
    dtype (its fp32 RMSNorm, softmax, rope and ERNIE router included), ERNIE's router weights kept in fp32."""
    _, _, path = build(family, "sdpa")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", fast=False)
    kept = [{n: p.dtype for n, p in m.named_parameters() if n.endswith("gate.weight")} for m in (ref, ours)]
    if family == "ernie4_5_moe":
        assert set(kept[0].values()) == set(kept[1].values()) == {torch.float32}, kept
    ids = tokens(batch=4, seq=8)
    mask = torch.ones_like(ids).index_fill(1, torch.tensor([0, 1]), 0)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        a, b = ref(**kwargs).logits, ours(**kwargs).logits
        greedy = dict(kwargs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        tokens_a, tokens_b = ref.generate(**greedy), ours.generate(**greedy)
    assert a.dtype == b.dtype == dtype
    close(a[:, 2:], b[:, 2:], f"{dtype} logits")
    assert torch.equal(tokens_a, tokens_b)
