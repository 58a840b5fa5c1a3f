"""Edge cases that fuzzing the C kernels against PyTorch turned up (shapes and inputs the other kernel tests do not
use): kernel entry points of moelm.inference.kernels against the computation they replace."""
from __future__ import annotations

import pytest
import torch

import moelm
from moelm.inference import decode, kernels
from moelm.inference.quantization import dequantize, quantize
from moelm.nn.layers import DecoderLayer
from reference import randomise
from test_fast import kernels_forced

pytestmark = pytest.mark.skipif(not kernels.available(), reason="csrc kernels not available")


@pytest.mark.parametrize("mode,group,features", (("int8", 0, 96), ("int4", 32, 96), ("int4", 64, 128),
                                                 ("int4", 96, 96)))
@pytest.mark.parametrize("rows", (1, 5))
def test_integer_kernels_on_rows_of_tiny_activations(mode, group, features, rows):
    """Rows whose largest |x| is a normal fp32 number below 4e-34 (gemv's int16 rounding) or 1.5e-36 (intgemm's
    int8 rounding): the step max|x| / 32767 (/ 127) would be subnormal and its inverse infinite, and the product
    garbage (wrong by 100% or more). The step is at least FLT_MIN instead: here within 0.5% (gemv) and 10%
    (intgemm, x ~1e-37: codes of ~30)."""
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize(torch.randn(9, features, generator=g), mode, group or 64)
    dense = dequantize(q, scale, group).double()
    x = torch.randn(rows, features, generator=g) * 1e-35
    runs = [(kernels.gemv(x, q, scale, group), x, 5e-3)]
    runs += [(kernels.intgemm(x * 1e-2, q, scale, group, v), x * 1e-2, 0.1) for v in kernels.int_variants()]
    for y, x, bound in runs:
        want = x.double() @ dense.T
        err = float((y.double() - want).abs().max() / want.abs().max())
        assert err < bound, f"{mode} g{group} {rows} rows, max|x| {float(x.abs().max()):.2g}: relative error {err:.3g}"


def test_inputs_the_kernels_cannot_read_are_errors():
    """gemv / gemm / rmsnorm / layernorm read raw pointers: a weight of other input features, a column slice of a
    weight, a strided bias or scale, features the kernels do not take gave silently wrong results (or wrote past
    the output); each is a ValueError naming the input at fault."""
    g = torch.Generator().manual_seed(0)
    x, wide = torch.randn(2, 64, generator=g), torch.randn(9, 96, generator=g)
    w = wide[:, :64].contiguous()
    q, scale = quantize(w, "int8")
    for call, match in ((lambda: kernels.gemv(x, wide), "input features"),
                        (lambda: kernels.gemv(x, wide[:, :64]), "weight must be contiguous"),
                        (lambda: kernels.gemv(x, w, bias=torch.randn(18)[::2]), "bias must be contiguous"),
                        (lambda: kernels.gemv(x, w, bias=torch.randn(9).bfloat16()), "bias must be fp32"),
                        (lambda: kernels.gemv(x, q, torch.stack([scale, scale], 1)[:, 0]), "scale must be contig"),
                        (lambda: kernels.gemv(x[:, :48], w[:, :48].contiguous()), "multiple of 32"),
                        (lambda: kernels.gemm(x, wide[:, :64]), "weight must be contiguous"),
                        (lambda: kernels.gemm(x, wide), "input features"),
                        (lambda: kernels.gemm(x.bfloat16(), w), "must be fp32"),
                        (lambda: kernels.rmsnorm(x[:, :12], torch.ones(12), 1e-5), "multiple of 8"),
                        (lambda: kernels.rmsnorm(x, torch.ones(32), 1e-5), "weight must be"),
                        (lambda: kernels.layernorm(x, torch.ones(64), torch.ones(128)[::2], 1e-5), "bias must be")):
        with pytest.raises(ValueError, match=match):
            call()


@torch.no_grad()
def test_sparsemixer_with_a_top_logit_of_zero():
    """PhiMoE's router logits all 0 (a zeroed router; any token whose top logit is exactly 0): the sparsemixer's
    (top - s) / max(|s|, top) is 0 / 0, NaN in PyTorch, so not "far"; compiled with -ffast-math the C routing took
    it as far, summed no weight and gave NaN. The C block equals the block op by op."""
    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config("phimoe-tiny"), seed=0).eval()
    randomise(model, seed=0)
    layer = model.model.layers[0]
    block = getattr(layer, layer.mlp_name)
    block.gate.weight.zero_()
    g = torch.Generator().manual_seed(0)
    x, h = (torch.randn(3, 1, model.config.hidden_size, generator=g) for _ in range(2))
    run = decode.moe_step(block, x, h)
    assert run is not None, "the block is not run in C"
    got, _ = run()
    with kernels_forced("gemv,moe_block=torch"):
        want, _ = DecoderLayer.feed_forward(layer, x, h)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@torch.no_grad()
def test_swiglu_of_large_negative_gates():
    """silu(g) for g <= -89 (exp(-g) is inf) is -0 in PyTorch; the C SwiGLU, built with -ffast-math (a division by
    a Newton-refined reciprocal), gave NaN: in the MoE block (moe_block, decode_layer), the dense MLP of
    decode_layer and the integer prefill of experts (intgemm_experts). Each on inputs ~100x the usual against
    PyTorch."""
    config = moelm.named_config("ernie4_5_moe-tiny")
    model = moelm.AutoModelForCausalLM.from_config(config, seed=0).eval()
    randomise(model, seed=0)
    g = torch.Generator().manual_seed(0)
    for layer in model.model.layers:  # layer 0 a dense MLP, then MoE blocks
        mlp = getattr(layer, layer.mlp_name)
        (mlp.gate_proj.weight if hasattr(mlp, "gate_proj") else mlp.experts.gate_up_proj).mul_(100)
    ids = torch.randint(3, config.vocab_size, (2, 6), generator=g)
    logits = []
    for spec in ("gemv", "torch"):
        with kernels_forced(spec):
            logits.append(model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True).logits[-1])
    assert torch.isfinite(logits[0]).all(), "NaN from the C decoding step"
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4 * float(logits[1].abs().max()))
    for variant in kernels.int_variants():
        e, h, i = 2, 64, 32
        gq, gs = quantize(torch.randn(e, 2 * i, h, generator=g), "int8")
        dq, ds = quantize(torch.randn(e, h, i, generator=g), "int8")
        x = torch.randn(3, h, generator=g) * 100
        out = kernels.intgemm_experts(x, torch.tensor([0, 1, 2]), torch.ones(3, 1), torch.tensor([3, 0]),
                                      (gq, gs), (dq, ds), 0, variant)
        gate, up = kernels.intgemm(x, gq[0], gs[0], 0, variant).chunk(2, -1)
        want = kernels.intgemm(torch.nn.functional.silu(gate) * up, dq[0], ds[0], 0, variant)
        assert torch.isfinite(out).all(), f"NaN from intgemm_experts ({variant})"
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_moelm_kernels_that_contradicts_itself_is_an_error(monkeypatch):
    """MOELM_KERNELS naming two paths for one op: an error naming both (the last one was taken silently)."""
    from moelm.inference import cpu

    try:
        monkeypatch.setenv("MOELM_KERNELS", "linear=torch, linear=gemv")
        cpu.forced.cache_clear()  # read once a process
        with pytest.raises(ValueError, match="'torch' and 'gemv' for linear"):
            cpu.forced()
        monkeypatch.setenv("MOELM_KERNELS", "linear=torch,linear=torch,torch")
        cpu.forced.cache_clear()
        assert cpu.forced() == {"linear": "torch", "*": "torch"}
    finally:
        monkeypatch.undo()
        cpu.forced.cache_clear()
