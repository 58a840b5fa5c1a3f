"""Edge cases of the prefill paths and of quantized-checkpoint loading found by an adversarial pass on an AVX2-only
CPU (AMD Zen 3: AVX2/FMA/F16C, no AVX-512), where moelm wrote past its buffers or gave wrong weights. Each test
failed before its fix."""
from __future__ import annotations

import pytest
import torch

from moelm.inference import kernels
from moelm.inference.quantization import dequantize, quantize


@pytest.mark.skipif(not kernels.available(), reason="csrc kernels not available")
@pytest.mark.parametrize("features", (36, 44, 20))
def test_dequantize_int8_rows_not_multiple_of_8_stay_in_bounds(features):
    """int8 weights whose input features are not a multiple of 8 (a compressed-tensors int8 checkpoint of a model
    whose intermediate_size or heads * head_dim is, say, 36 loads: moelm.loading.compressed checks in_features % 32
    for int4 only) are dequantized by kernels.dequantize (every 'torch' and 'tiles' prefill path of that layer) to
    exactly q * scale, with nothing written outside `out`. csrc/gemv.c row_i8 stepped 8 inputs at a time, so each
    row read past its codes and wrote up to 7 floats past its end: into the next row (racing with the thread that
    owns it) and, for the last row, past the output buffer (glibc aborted with 'free(): invalid pointer' for
    [16, 36]); it now takes the last n % 8 one by one."""
    g = torch.Generator().manual_seed(features)
    rows = 5
    q = torch.randint(-127, 128, (rows, features), dtype=torch.int8, generator=g)
    scale = torch.rand(rows, generator=g) + 0.5
    sentinel = torch.full((rows * features + 16,), float("nan"))
    out = sentinel[:rows * features]  # contiguous: what dequantize(out=...) accepts
    kernels.dequantize(q, scale, 0, out=out)
    assert torch.isnan(sentinel[rows * features:]).all(), \
        f"dequantize wrote {int((~torch.isnan(sentinel[rows * features:])).sum())} floats past its output"
    assert torch.equal(out.view(rows, features), q.float() * scale[:, None])


def test_quantize_int8_tiny_rows_use_the_scale_they_store():
    """quantize(w, 'int8') rounds against the scale it stores: dequantize(quantize(w)) is within half a step
    (max|w| / 254) of w for rows of ~1e-2, ~1e-11 and ~1e-20 alike (int8 scales are fp32, which holds these steps).
    It rounded w / scale.clamp(min=1e-12) but stored the unclamped scale, so a row with max|w| < 1.27e-10 got codes
    made for another scale: ~1e-11 dequantized with 73% error, ~1e-20 to codes of +-127 times 2.7e-22 (100%)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, generator=g) * torch.tensor([[1e-2], [1e-11], [1e-20]])
    q, s = quantize(w, "int8")
    back = dequantize(q, s, 0)
    err = ((back - w).abs().amax(-1) / w.abs().amax(-1)).tolist()
    assert all(e <= 1 / 254 + 1e-6 for e in err), f"relative error per row {err}"
