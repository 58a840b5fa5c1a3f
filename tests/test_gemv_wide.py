"""gemv.c's int4 group-64 kernel in 512-bit vectors ("zmm", AVX-512BW) against the 256-bit one ("ymm"): the same
int16 products summed in another order, both within the activations' int16 rounding of the dense product; chosen
by measurement once per CPU (MOELM_KERNELS=int4_g64=... forces it)."""
from __future__ import annotations

import pytest
import torch

from moelm.inference import cpu, kernels
from moelm.inference.quantization import dequantize, quantize
from test_fast import kernels_forced as forced

WIDE = kernels.available() and kernels.library().gemv_wide(-1) >= 0
pytestmark = pytest.mark.skipif(not WIDE, reason="no AVX-512BW (or no kernels): the 512-bit kernel is not built")


def product(path: str, x, q, s, select=None):
    with forced(f"int4_g64={path}"):
        y = kernels.gemv(x, q, s, 64, select=select)
        assert kernels._WIDTH[0] == path
    return y


@pytest.mark.parametrize("features", (384, 320))  # 320: not whole pairs of groups, so the 256-bit kernel runs
@pytest.mark.parametrize("rows", (1, 3, 8, 16))
def test_512_bit_kernel_matches(rows, features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, features, generator=g)
    w[5] = 0
    q, s = quantize(w, "int4", 64)
    x = torch.randn(rows, features, generator=g) * torch.logspace(-2, 1, features)
    want = (x.double() @ dequantize(q, s, 64).double().T)
    bound = 1e-4 * (x.abs().double() @ dequantize(q, s, 64).abs().double().T) + 1e-30
    ymm, zmm = product("ymm", x, q, s), product("zmm", x, q, s)
    for y in (ymm, zmm):
        assert ((y.double() - want).abs() <= bound).all()
    assert (zmm[:, 5] == 0).all()
    if features == 320:
        assert torch.equal(ymm, zmm)


def test_512_bit_kernel_with_experts_selected():
    """Stacked experts [E, O, I/2] with a matrix chosen per row (the MoE kernel's runs of rows)."""
    g = torch.Generator().manual_seed(7)
    e, o, i = 5, 40, 256
    q, s = quantize(torch.randn(e * o, i, generator=g), "int4", 64)
    q, s = q.view(e, o, -1), s.view(e, o, -1)
    x = torch.randn(9, i, generator=g)
    select = torch.tensor([0, 0, 3, 3, 3, 1, 4, 4, 2])
    want = torch.stack([x[r].double() @ dequantize(q[select[r]], s[select[r]], 64).double().T for r in range(9)])
    for path in ("ymm", "zmm"):
        y = product(path, x, q, s, select)
        torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_measured_once_and_forced_by_name():
    with forced(""):
        cpu.reset()
        kernels._WIDTH[0] = "unset"
        kernels.gemv(torch.randn(2, 128), *quantize(torch.randn(8, 128), "int4", 64), 64)
        assert cpu.choices(True)["int4_g64|()"] in ("ymm", "zmm")
    with pytest.raises(ValueError, match="int4_g64"):
        with forced("int4_g64=xmm"):
            kernels.gemv(torch.randn(2, 128), *quantize(torch.randn(8, 128), "int4", 64), 64)
