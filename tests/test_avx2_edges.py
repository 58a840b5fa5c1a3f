"""Edge cases of the C fast paths found by an adversarial pass on an AVX2-only CPU (AMD Zen 3: AVX2/FMA/F16C, no
AVX-512), where the 256-bit kernels gave wrong results: int8 codes of -128 in the integer prefill, and activations
the integer kernels cannot round (NaN, inf, subnormal groups). Each test failed before its fix."""
from __future__ import annotations

import pytest
import torch

from moelm.inference import kernels
from moelm.inference.quantization import QuantizedLinear, dequantize, quantize
from moelm.loading.compressed import from_int8
from test_fast import kernels_forced as forced

pytestmark = pytest.mark.skipif(not kernels.available(), reason="csrc kernels not available")


def _int_reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x rounded as intgemm rounds it (quantize_rows: int8 per row per block of 32) times the dequantized weight,
    in float64: what intgemm must give up to fp32 rounding."""
    xq, d, _ = kernels.quantize_rows(x)
    m = x.shape[0]
    return (xq.double().view(m, -1, 32) * d.double()[..., None]).view(m, -1) @ dense.double().T


@pytest.mark.parametrize("variant", ("avx2",))
def test_intgemm_int8_code_minus_128(variant):
    """int8 weight codes of -128 (the low end of int8: compressed-tensors' symmetric int8 stores them, and
    moelm.loading.compressed.from_int8 / kernels.repack keep them as they are) in the AVX2 variant of intgemm
    (prefill of int8 Linear layers and experts): it multiplied |xq| by _mm256_sign_epi8(w, xq), and -(-128) wraps
    to -128 in int8, so every product of a -128 code with a negative activation had the wrong sign (>100%
    relative error); the sign now goes on the activation (in [-127, 127]). intgemm equals the integer reference
    (x rounded by quantize_rows times the dequantized weight) for every int8 code, as gemv (decode) does."""
    if variant not in kernels.int_variants():
        pytest.skip(f"no {variant} variant on this CPU")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (24, 96), dtype=torch.int8, generator=g)
    codes[:, ::5] = -128
    q, scale = from_int8(codes, torch.rand(24, 1, generator=g) * 0.01 + 1e-3)  # as a checkpoint's codes load
    assert int(q.min()) == -128
    dense = q.float() * scale[:, None]
    x = torch.randn(20, 96, generator=g)
    want = _int_reference(x, dense)
    assert float((kernels.gemv(x[:3], q, scale, 0) - want[:3]).abs().max() / want.abs().max()) < 1e-2  # gemv: right
    got = kernels.intgemm(x, q, scale, 0, variant)
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"intgemm {variant} with int8 codes of -128: relative error {err:.3g}"


def test_quantized_linear_prefill_with_minus_128_codes():
    """The same through the model's layer: a QuantizedLinear int8 holding a checkpoint's codes of -128
    (load_packed of from_int8's output), prefilled (20 rows) on the integer path int8dot_avx2, is within intgemm's
    activation-rounding error (~1%) of the same layer on its dequantized weight."""
    if "avx2" not in kernels.int_variants():
        pytest.skip("no avx2 variant")
    g = torch.Generator().manual_seed(1)
    m = QuantizedLinear(128, 16, False, "int8", 64)
    codes = torch.randint(-128, 128, (16, 128), dtype=torch.int8, generator=g)
    codes[codes < -100] = -128
    with torch.no_grad():
        m.load_packed(*from_int8(codes, torch.rand(16, 1, generator=g) * 0.01 + 1e-3))
        x = torch.randn(20, 128, generator=g)
        want = x @ dequantize(m.qweight, m.scale, 0).T
        with forced("quantized=int8dot_avx2"):
            got = m(x)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 2e-2, f"int8 QuantizedLinear prefill with codes of -128: relative error {err:.3g}"


@pytest.mark.parametrize("rows", (1, 4, 16))
def test_gemv_int8_propagates_nan_activations(rows):
    """A NaN in x with int8 weights and up to 16 rows of x (the integer decode kernel's rows) gives NaN in that row's
    outputs, as PyTorch's matmul, the fp32/bf16/int4 kernels and 17 rows (the float path) give. Before, quantize_x
    (gemv.c, -ffast-math) took max|x| with fmaxf, which drops the NaN, and rounded it to int16 0; the int8 dot never
    reads the group sums, so the row came out finite, as if that input were 0, and depended on the batch size. Rows
    the integer kernels cannot round now go to the float path (int_ready)."""
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize(torch.randn(8, 128, generator=g), "int8")
    x = torch.randn(rows, 128, generator=g)
    x[0, 7] = float("nan")
    assert kernels.gemv(torch.cat([x, x[:1].expand(17 - rows, -1)]), q, scale, 0)[0].isnan().all()  # 17 rows: NaN
    y = kernels.gemv(x, q, scale, 0)
    assert y[0].isnan().all(), f"NaN input, outputs {y[0].tolist()}"
    assert y[1:].isfinite().all()


def test_gemv_int8_infinite_activation_gives_infinities():
    """An infinite input with int8 weights gives +-inf where the dequantized product is +-inf, as PyTorch's matmul
    and the float path give (the integer path gave NaN in every output of the row: step = inf, inverse 0)."""
    g = torch.Generator().manual_seed(0)
    q, scale = quantize(torch.randn(8, 128, generator=g), "int8")
    x = torch.randn(1, 128, generator=g)
    x[0, 3] = float("inf")
    want = x @ dequantize(q, scale, 0).T
    assert want.isinf().all()
    y = kernels.gemv(x, q, scale, 0)
    assert torch.equal(y.isinf(), want.isinf()) and torch.equal(y.sign(), want.sign()), \
        f"inf input: got {y.tolist()}, want {want.tolist()}"


@pytest.mark.parametrize("mode,group", (("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)))
def test_gemv_integer_kernels_on_subnormal_activations(mode, group):
    """Rows of x whose values are all subnormal fp32 (|x| < 1.2e-38, e.g. a residual stream scaled to nearly
    nothing) are within 1e-2 of the result's scale of x @ dequantized(w).T. Before, quantize_x clamped the int16
    step to FLT_MIN, so every code rounded to 0: int8 gave exactly 0, int4 -8 * sum(scale * xsum) alone (wrong by
    3-40x). Groups whose largest |x| is below 32767 * FLT_MIN now go to the float path. (test_kernel_fuzz pins the
    tiny normal case, x ~1e-35.)"""
    g = torch.Generator().manual_seed(3)
    q, scale = quantize(torch.randn(8, 128, generator=g), mode, group or 64)
    dense = dequantize(q, scale, group).double()
    x = torch.randn(2, 128, generator=g) * 1e-40
    assert (x.abs() < torch.finfo(torch.float32).tiny).all() and (x != 0).all()
    want = x.double() @ dense.T
    y = kernels.gemv(x, q, scale, group)
    err = float((y.double() - want).abs().max() / want.abs().max())
    assert err < 1e-2, f"{mode} g{group}, subnormal x: relative error {err:.3g}"


@pytest.mark.parametrize("mode,group", (("int8", 0), ("int4", 64)))
def test_intgemm_propagates_nan_activations(mode, group):
    """A NaN in a row of x gives NaN in that row's outputs of the integer prefill (intgemm, variant avx2), int8
    and int4, as dequantize + matmul gives. Before, quantize_block (intgemm.c, -ffast-math) took max|x| with fmaxf
    (the NaN dropped) and stored (int8_t)NaN (undefined in C; 0 in practice), so a prompt whose hidden state held a
    NaN prefilled to finite, wrong logits. Now the block's step is NaN. (+-inf inputs give +-inf.)"""
    if "avx2" not in kernels.int_variants():
        pytest.skip("no avx2 variant")
    g = torch.Generator().manual_seed(0)
    q, scale = quantize(torch.randn(16, 256, generator=g), mode, group or 64)
    x = torch.randn(20, 256, generator=g)
    x[0, 3] = float("nan")
    y = kernels.intgemm(x, q, scale, group, "avx2")
    assert y[0].isnan().all(), f"{mode}: NaN input, outputs {y[0, :4].tolist()} ..."
    assert y[1:].isfinite().all()
