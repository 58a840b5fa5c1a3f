"""The MoE block at decode in one C call (gemv.c moe_block; folded into decode_layer for ERNIE's RMSNorm layers
and PhiMoE's LayerNorm ones) against the block op by op: routing (ERNIE's softmax + correction-bias
top-k + norm_min, PhiMoE's sparsemixer), the chosen experts, the shared experts and the weighted sum, with every
weight random (norms, biases, correction bias), experts in fp32, bf16, int8 and int4; whole greedy decodes with
padding against the op-by-op model and, in fp32, against transformers."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moelm
from moelm.inference import StaticCache, decode, kernels
from moelm.nn.layers import DecoderLayer
from moelm.nn.moe import ernie_route, sparsemixer
from reference import random_checkpoint
from test_fast import (
    _one_thread,  # noqa: F401 (one thread for the module, as test_fast's)
    count_layer_calls,
)
from test_fast import kernels_forced as forced

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not kernels.available(), reason="csrc/gemv.c kernels not available")]

# name -> (named config, overrides): k from 2 to 6, with and without shared experts (and biases), a norm_min that
# clamps, a group size of 64 for int4 (moe_intermediate_size 64), PhiMoE with its jitter and a wider one
CASES = {
    "ernie-k2-shared1-bias": ("ernie4_5_moe-tiny", dict(moe_k=2, moe_num_shared_experts=1, use_bias=True)),
    "ernie-k4-noshared-normmin": ("ernie4_5_moe-tiny", dict(moe_k=4, moe_num_shared_experts=0, moe_norm_min=0.9)),
    "ernie-k6-shared2-i64": ("ernie4_5_moe-tiny", dict(moe_k=6, moe_num_shared_experts=2,
                                                       moe_intermediate_size=64)),
    "phimoe": ("phimoe-tiny", dict(attention_bias=True, lm_head_bias=True)),
    "phimoe-jitter": ("phimoe-tiny", dict(router_jitter_noise=0.4, num_local_experts=6)),
}
VOCAB = 512
_TMP = tempfile.TemporaryDirectory(prefix="moelm-moe-decode-")




ONE_CALL = "gemv"  # decode_layer and moe_block in C, the gemv kernels wherever they apply
PER_OP = "gemv,decode_layer=torch,moe_block=torch"  # the layers op by op, on the same gemv kernels


@functools.cache
def checkpoint(case: str) -> Path:
    return random_checkpoint(*CASES[case], Path(_TMP.name) / case)


@functools.cache
def load(case: str, fmt: str):
    kwargs = dict(quantization=fmt) if fmt in ("int8", "int4") else dict(dtype="bfloat16") if fmt == "bf16-model" \
        else {}
    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint(case), **kwargs).eval()
    if fmt == "bf16":  # bf16 experts under fp32 activations (the kernels read bf16 weights in fp32)
        for layer in model.model.layers:
            block = getattr(layer, layer.mlp_name)
            if hasattr(block, "experts"):
                block.experts.to(torch.bfloat16)
    return model


def moe_layers(model):
    return [layer for layer in model.model.layers if hasattr(getattr(layer, layer.mlp_name), "experts")]


def close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str):
    scale = float(b.abs().max())
    torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m} (scale {scale:.3g})")


@pytest.mark.parametrize("rows", (1, 3, 16))
@pytest.mark.parametrize("fmt", ("fp32", "bf16", "int8", "int4"))
@pytest.mark.parametrize("case", tuple(CASES))
@torch.no_grad()
def test_block_matches_op_by_op(case, fmt, rows):
    """One MoE block in one C call == the block op by op on the same inputs: the output (added to the residual),
    the router logits, and the routing itself (the experts chosen, their weights) against the models' routers."""
    model = load(case, fmt)
    g = torch.Generator().manual_seed(rows)
    for layer in moe_layers(model):
        block = getattr(layer, layer.mlp_name)
        x = torch.randn(rows, 1, model.config.hidden_size, generator=g)
        h = torch.randn(rows, 1, model.config.hidden_size, generator=g) * 2
        run = decode.moe_step(block, x, h)
        assert run is not None, f"{case} {fmt}: the block is not run in C"
        plan = decode._moe_plan(block, h)
        with forced(PER_OP):
            want, want_logits = DecoderLayer.feed_forward(layer, x, h)
        got, logits = run()
        close(logits, want_logits, 1e-6, f"{case} {fmt} rows {rows}: router logits")
        # int8/int4: the integer kernels round activations to int16 (1.5e-5 of a group's largest); the C SiLU and
        # PyTorch's differ in the last bit, which can move an activation of down_proj across such a step, and past
        # 64 (row, expert) pairs the quantized experts go op by op through dequantized fp32 weights (no rounding)
        # (then test_fast's bounds for a quantized decode against the dequantized path)
        rel = {"int8": 1e-4, "int4": 1e-4} if rows * plan.spec.K <= 64 else {"int8": 5e-4, "int4": 1.5e-3}
        close(got, want, rel.get(fmt, 1e-5), f"{case} {fmt} rows {rows}: output")
        _, index, weights = kernels.moe_block(plan.spec, h.reshape(rows, -1), x.reshape(rows, -1).clone())
        if "ernie" in case:
            _, want_w, want_i = ernie_route(h.reshape(rows, -1), block.gate.weight,
                                            block.moe_statics.e_score_correction_bias, model.config.moe_k,
                                            model.config.moe_norm_min)
        else:
            want_w, want_i = sparsemixer(want_logits, model.config.router_jitter_noise, training=False)
        order, want_order = index.sort(-1), want_i.sort(-1)
        assert torch.equal(order.values, want_order.values), f"{case} {fmt} rows {rows}: experts chosen"
        close(weights.gather(-1, order.indices), want_w.gather(-1, want_order.indices), 1e-6,
              f"{case} {fmt} rows {rows}: routing weights")


def test_block_ties_and_masking_in_routing():
    """ERNIE: equal probabilities + bias go to the lower expert index; PhiMoE: a score exactly at the masking
    threshold stays in the softmax (the comparison is strict, as the model's)."""
    model = load("ernie-k2-shared1-bias", "fp32")
    layer = moe_layers(model)[0]
    block = layer.mlp
    h = torch.zeros(1, 1, model.config.hidden_size)  # every logit 0: probabilities equal
    with torch.no_grad():
        bias = block.moe_statics.e_score_correction_bias
        saved = bias.clone()
        bias.zero_()
        try:
            plan = decode._moe_plan(block, h)
            _, index, weights = kernels.moe_block(plan.spec, h.reshape(1, -1), torch.zeros(1, h.shape[-1]))
        finally:
            bias.copy_(saved)
    assert index.tolist() == [[0, 1]] and torch.allclose(weights, torch.full((1, 2), 0.5))


def test_not_used_where_it_cannot_run():
    """PhiMoE with bf16 activations, gradients, training PhiMoE (jitter, sampled picks), hooks, more than MAX_ROWS
    rows: the block op by op."""
    model = load("phimoe", "fp32")
    layer = moe_layers(model)[0]
    block = layer.block_sparse_moe
    h = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        assert decode.moe_step(block, h, h) is not None
        assert decode.moe_step(block, h.bfloat16(), h.bfloat16()) is None
        big = torch.randn(kernels.MAX_ROWS + 1, 1, model.config.hidden_size)
        assert decode.moe_step(block, big, big) is None
        block.train()
        try:
            assert decode.moe_step(block, h, h) is None
        finally:
            block.eval()
        handle = block.experts.register_forward_hook(lambda *a: None)
        try:
            assert decode.moe_step(block, h, h) is None
        finally:
            handle.remove()
    with torch.enable_grad():
        assert decode.moe_step(block, h, h) is None
    # an ERNIE layer whose block was folded into decode_layer leaves the call once a hook is added
    model = load("ernie-k2-shared1-bias", "fp32")
    layer = moe_layers(model)[0]
    x = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        assert decode._layer_plan(layer, x).moe is not None
        handle = layer.mlp.shared_experts.register_forward_pre_hook(lambda *a: None)
        try:
            assert decode._layer_plan(layer, x).moe is None
        finally:
            handle.remove()
        assert decode._layer_plan(layer, x).moe is not None


@pytest.mark.parametrize("case", ("ernie-k2-shared1-bias", "ernie-k4-noshared-normmin", "ernie-k6-shared2-i64",
                                  "phimoe", "phimoe-jitter"))
def test_bf16_model_rounds_where_pytorch_does(case, monkeypatch):
    """A bf16 ERNIE model: its MoE layers run whole in decode_layer_bf16, rounding to bf16 where the op-by-op block's
    bf16 ops round (gate/up, SiLU, the product, down, times the bf16 weight, the per-expert sum in expert order, +
    shared, + residual): greedy tokens equal the op-by-op model's, logits to bf16 rounding, router logits (fp32) to
    1e-5; a block's output equal but for rare one-step differences."""
    model = load(case, "bf16-model")
    calls = []
    count_layer_calls(monkeypatch, lambda spec, x: calls.append(bool(spec.moe)))
    ids, mask, new = prompts(3, seed=11)
    with forced(ONE_CALL):
        fast, fast_routers = steps(model, ids, mask, new)
        fast_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert sum(calls) == len(moe_layers(model)) * (new.shape[1] + 4)
    with forced(PER_OP):
        per_op, per_op_routers = steps(model, ids, mask, new)
        per_op_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(fast_tokens, per_op_tokens)
    close(fast, per_op, 2e-2, f"{case} bf16 model: logits")
    close(fast_routers, per_op_routers, 2e-2, f"{case} bf16 model: router logits")
    # one layer from the same bf16 input: the C layer against the op-by-op layer, one step at most
    layer = moe_layers(model)[0]
    cache = StaticCache(model.config, 3, 8, torch.bfloat16)
    x = (torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    cos_sin = model.model.rotary(x, torch.zeros(3, 1, dtype=torch.long))
    with torch.no_grad(), forced(ONE_CALL):
        y, h, logits = decode.decode_layer_step(layer, x, cos_sin, None, cache)
        assert h is None
        cache.lengths[layer.self_attn.layer_idx] = 0
        a, _ = layer.self_attn(layer.input_layernorm(x), cos_sin, None, cache)
        want, want_logits = DecoderLayer.feed_forward(layer, x + a, layer.post_attention_layernorm(x + a))
    close(logits, want_logits, 1e-5, f"{case}: router logits")
    y, want = y.float(), want.float()
    differ = y != want
    assert float(differ.float().mean()) <= 0.01, f"{case}: {float(differ.float().mean()):.1%} of elements differ"
    assert bool(((y - want).abs() <= want.abs() * 2**-7 + 1e-6 * float(want.abs().max())).all())


def test_bf16_sparsemixer_rounds_as_its_bf16_ops():
    """A bf16 PhiMoE routes on bf16 logits with its ops' bf16 rounding: (top - s) / factor is rounded to bf16 and
    compared with 2 * jitter rounded to bf16. Logits set exactly (the post-attention norm gives its bias, the router
    reads one feature) where that decision differs from fp32's: 1 - 0.19921875 = 0.80078125 = bf16(0.8), masked in
    fp32 (> 0.8) but not in bf16; the one-call layer weighs the experts as the op-by-op block does."""
    model = load.__wrapped__("phimoe-jitter", "bf16-model")  # its own copy: jitter 0.4, 6 experts
    layer = moe_layers(model)[0]
    block, n = layer.block_sparse_moe, model.config.hidden_size
    values = torch.tensor([1.0, 0.19921875, -0.5, 0.0, 0.625, -2.0]).bfloat16()
    with torch.no_grad():
        layer.post_attention_layernorm.weight.zero_()
        layer.post_attention_layernorm.bias.copy_(F.one_hot(torch.tensor(0), n).bfloat16())
        block.gate.weight.zero_()
        block.gate.weight[:, 0] = values
    fp32_w, fp32_i = sparsemixer(values.float()[None], 0.4, training=False)
    bf16_w, bf16_i = sparsemixer(values[None], 0.4, training=False)
    assert torch.equal(fp32_i, bf16_i) and not torch.allclose(fp32_w, bf16_w.float(), rtol=1e-2, atol=0)
    cache = StaticCache(model.config, 2, 8, torch.bfloat16)
    x = (torch.randn(2, 1, n, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    cos_sin = model.model.rotary(x, torch.zeros(2, 1, dtype=torch.long))
    with torch.no_grad(), forced(ONE_CALL):
        y, h, logits = decode.decode_layer_step(layer, x, cos_sin, None, cache)
        assert h is None and logits.dtype == torch.bfloat16
        cache.lengths[layer.self_attn.layer_idx] = 0
        a, _ = layer.self_attn(layer.input_layernorm(x), cos_sin, None, cache)
        want, want_logits = DecoderLayer.feed_forward(layer, x + a, layer.post_attention_layernorm(x + a))
        moe, _ = block(layer.post_attention_layernorm(x + a))
    assert torch.equal(logits, want_logits) and torch.equal(logits[0], values)
    assert torch.equal(y, want)
    assert not torch.equal(moe, block.experts(layer.post_attention_layernorm(x + a).reshape(2, n), fp32_i.expand(2, 2),
                                              fp32_w.bfloat16().expand(2, 2)).reshape(2, 1, n))


@torch.no_grad()
def steps(model, ids, mask, new) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [B, 1 + N, V] and the decode steps' router logits [N, layers, B, E]: after the prompt,
    then after each token of `new` fed one at a time through a StaticCache."""
    dtype = model.get_input_embeddings().weight.dtype
    cache = StaticCache(model.config, ids.shape[0], ids.shape[1] + new.shape[1] + 1, dtype)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits, routers = [out.logits[:, -1]], []
    for t in range(new.shape[1]):
        mask = F.pad(mask, (0, 1), value=1)
        out = model(new[:, t:t + 1], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=out.past_key_values, use_cache=True, output_router_logits=True)
        logits.append(out.logits[:, -1])
        routers.append(torch.stack(out.router_logits))
    return torch.stack(logits, 1).float(), torch.stack(routers).float()


def prompts(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate((0, 3, 1)[:batch] if batch > 1 else (0,)):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask, torch.randint(3, VOCAB, (batch, 4), generator=g)


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("fmt", ("fp32", "int8", "int4"))  # bf16 experts under fp32 activations: the blocks only
# (the op-by-op prefill has no path for them; a bf16 model's MoE block stays op by op, see test_not_used_...)
@pytest.mark.parametrize("case", ("ernie-k2-shared1-bias", "ernie-k6-shared2-i64", "phimoe-jitter"))
def test_decode_matches_op_by_op(case, fmt, batch, monkeypatch):
    """Greedy generation and per-step logits with the one-call MoE forced == the layers op by op forced, with
    padding; the router logits of every decode step equal. The MoE layers run whole in decode_layer (PhiMoE's with
    its LayerNorms), a short prompt's MoE blocks in moe_block."""
    model = load(case, fmt)
    layers = len(moe_layers(model))
    calls = []
    real_block = kernels.moe_block
    count_layer_calls(monkeypatch, lambda spec, x: calls.append("layer" if spec.moe else "attention"))
    monkeypatch.setattr(kernels, "moe_block", lambda *a: calls.append("block") or real_block(*a))
    ids, mask, new = prompts(batch, seed=batch)
    with forced(ONE_CALL):
        fast, fast_routers = steps(model, ids, mask, new)
        fast_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert calls.count("layer") == layers * (new.shape[1] + 4), f"{case}: the one-call MoE was not used: {calls}"
    calls.clear()
    with forced(PER_OP):
        per_op, per_op_routers = steps(model, ids, mask, new)
        per_op_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert not calls
    assert torch.equal(fast_tokens, per_op_tokens)
    # int8/int4: the C SiLU and PyTorch's differ in the last bit, which can move an activation across an int16
    # rounding step of the integer kernels in a later layer or step (test_fast's bound for whole decodes)
    rel = {"int8": 5e-4, "int4": 1.5e-3}.get(fmt, 1e-5)
    close(fast, per_op, rel, f"{case} {fmt} batch {batch}: logits")
    close(fast_routers, per_op_routers, rel, f"{case} {fmt} batch {batch}: router logits")


@pytest.mark.parametrize("case", ("ernie-k4-noshared-normmin", "ernie-k6-shared2-i64", "phimoe"))
def test_decode_matches_transformers(case):
    """fp32: the one-call MoE decode against transformers' model on the same checkpoint (greedy tokens, per-step
    logits to 1e-4 as the parity tests)."""
    transformers = pytest.importorskip("transformers")
    model = load(case, "fp32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint(case), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids, mask, new = prompts(3, seed=7)
    with forced(ONE_CALL):
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(ours.sequences, theirs.sequences)
    close(torch.stack(ours.scores), torch.stack(theirs.scores), 1e-4, f"{case}: scores vs transformers")
