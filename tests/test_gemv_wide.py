"""gemv.c's int4 group-64 and group-32 kernels in 512-bit vectors ("zmm", AVX-512BW) against the 256-bit ones
("ymm"): the same int16 products summed in another order, both within the activations' int16 rounding of the dense
product; chosen by measurement once per CPU (MOELM_KERNELS=int4_g64=... forces it). The group-32 kernels (two or
four groups a step) take I a multiple of 64 (ymm) or 128 (zmm), the one-group-at-a-time kernel the rest. int8 has
a 512-bit kernel too (I a multiple of 64), chosen the same way (int8_width=ymm|zmm)."""
from __future__ import annotations

import pytest
import torch

from moelm.inference import cpu, kernels
from moelm.inference.quantization import dequantize, quantize
from test_fast import kernels_forced as forced

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: no kernels")
WIDE = kernels.available() and kernels.library().gemv_wide(-1) >= 0
PATHS = ("ymm", "zmm", "zmm2") if WIDE else ("ymm",)  # without AVX-512BW only the 256-bit kernels are built


def product(path: str, x, q, s, select=None, group: int = 64):
    with forced(f"int4_g64={path}"):
        y = kernels.gemv(x, q, s, group, select=select)
        assert kernels._TOLD.get("int4_g64") == path or not WIDE
    return y


@pytest.mark.parametrize("group,features", ((64, 384), (64, 320), (32, 384), (32, 320), (32, 352)))
@pytest.mark.parametrize("rows", (1, 3, 8, 16))
def test_512_bit_kernel_matches(rows, group, features):
    """features not a multiple of 128: the 256-bit kernels run either way (the same results)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, features, generator=g)
    w[5] = 0
    q, s = quantize(w, "int4", group)
    x = torch.randn(rows, features, generator=g) * torch.logspace(-2, 1, features)
    dense = dequantize(q, s, group).double()
    want = x.double() @ dense.T
    bound = 1e-4 * (x.abs().double() @ dense.abs().T) + 1e-30
    ys = {path: product(path, x, q, s, group=group) for path in PATHS}
    for y in ys.values():
        assert ((y.double() - want).abs() <= bound).all()
        assert (y[:, 5] == 0).all()
    if features % 128 and WIDE:
        assert torch.equal(ys["ymm"], ys["zmm"])
    if WIDE:  # the pairs sum each row as the single rows do
        assert torch.equal(ys["zmm"], ys["zmm2"])


@pytest.mark.parametrize("group", (32, 64))
def test_512_bit_kernel_with_experts_selected(group):
    """Stacked experts [E, O, I/2] with a matrix chosen per row (the MoE kernel's runs of rows)."""
    g = torch.Generator().manual_seed(7)
    e, o, i = 5, 40, 256
    q, s = quantize(torch.randn(e * o, i, generator=g), "int4", group)
    q, s = q.view(e, o, -1), s.view(e, o, -1)
    x = torch.randn(9, i, generator=g)
    select = torch.tensor([0, 0, 3, 3, 3, 1, 4, 4, 2])
    want = torch.stack([x[r].double() @ dequantize(q[select[r]], s[select[r]], group).double().T for r in range(9)])
    for path in PATHS:
        y = product(path, x, q, s, select, group)
        torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_measured_once_and_forced_by_name():
    with forced(""):
        cpu.reset()
        kernels._TOLD.pop("int4_g64", None)
        kernels.gemv(torch.randn(2, 128), *quantize(torch.randn(8, 128), "int4", 64), 64)
        assert cpu.choices(True)["int4_g64|()"] in PATHS
    with pytest.raises(ValueError, match="int4_g64"):
        with forced("int4_g64=xmm"):
            kernels.gemv(torch.randn(2, 128), *quantize(torch.randn(8, 128), "int4", 64), 64)


@pytest.mark.parametrize("group", (32, 64, 128))
@pytest.mark.parametrize("rows", (1, 3, 16, 20))
def test_int4_scales_in_fp32(rows, group):
    """int4 scales that are no fp16 values (a checkpoint's fp32 ones) are read as fp32 by every int4 kernel (20 rows:
    the weight rows converted to fp32) and by dequantize, as fp16 ones are."""
    g = torch.Generator().manual_seed(rows + group)
    w = torch.randn(70, 384, generator=g)
    q, s16 = quantize(w, "int4", group)
    x = torch.randn(rows, 384, generator=g)
    for s in (s16, s16.float() * (1 + 2 ** -20)):
        n = dequantize(q, torch.ones(s.shape), group)  # the codes n - 8
        dense = (n.view(70, -1, group) * s.double().view(70, -1, 1)).view(70, 384)
        assert torch.equal(kernels.dequantize(q, s, group), dense.float())  # one rounding of the exact product
        want = x.double() @ dense.T
        bound = 1e-4 * (x.abs().double() @ dense.abs().T) + 1e-30
        for path in PATHS:
            assert ((product(path, x, q, s, group=group).double() - want).abs() <= bound).all(), (path, s.dtype)


def test_half_to_float_is_exact_for_every_fp16_value():
    """gemv.c's fp16 -> fp32 widening (the scalar path, written without _Float16 for compilers that lack it) equals
    PyTorch's for all 65536 bit patterns: zeros, subnormals, normals, infinities; NaNs stay NaN."""
    lib = kernels.library()
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    want = bits.view(torch.float16).float()
    got = torch.tensor([lib.half_to_float(b & 0xFFFF) for b in range(65536)])
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bit for bit, signed zeros too


@pytest.mark.skipif(not WIDE, reason="no AVX-512BW: no 512-bit kernels")
@pytest.mark.parametrize("group", (32, 64))
@pytest.mark.parametrize("path", ("zmm", "zmm2"))
def test_a_row_alone_is_computed_as_beside_others(path, group):
    """In the 512-bit kernels a run of one row of x (a decoding step; with "zmm2" its weight rows go by pairs) gives
    each output bit for bit what the same row gets in a run of several (each weight row alone). 37 output rows: a
    row left over at the end of the last block of 8. (The 256-bit kernels' one-row and four-row code, inlined apart,
    differ in the last bits.)"""
    g = torch.Generator().manual_seed(11 + group)
    e, o, i = 3, 37, 384
    q, s = quantize(torch.randn(e * o, i, generator=g), "int4", group)
    q, s = q.view(e, o, -1), s.view(e, o, -1)
    x = torch.randn(4, i, generator=g)
    for m in range(e):
        several = product(path, x, q[m], s[m], group=group)
        alone = torch.cat([product(path, x[r:r + 1], q[m], s[m], group=group) for r in range(4)])
        assert torch.equal(alone, several)
    select = torch.tensor([2, 0, 0, 1])  # runs of 1, 2 and 1 rows
    several = product(path, x, q, s, select, group)
    assert torch.equal(several[[0, 3]], torch.cat([product(path, x[r:r + 1], q, s, select[r:r + 1], group)
                                                   for r in (0, 3)]))
    assert torch.equal(several[1:3], product(path, x[1:3], q[0], s[0], group=group))


@pytest.mark.parametrize("mode", ("int4", "int8"))
def test_threads_share_the_rows_whoever_takes_them(mode):
    """The integer GEMV's threads each stream their own range of weight rows and take chunks left in another's
    (work stealing): every output is written once, bit for bit what one thread computes, for 1 to 7 threads on
    this machine's cores (more threads than cores: descheduled threads' chunks are taken by the others). Outputs
    start as NaN, so a chunk nobody took shows. 6 experts' runs of 1-3 rows, 203 rows each (a block of 8 cut)."""
    g = torch.Generator().manual_seed(5)
    e, o, i = 6, 203, 256
    q, s = quantize(torch.randn(e * o, i, generator=g), mode, 64)
    q, s = q.view(e, o, -1).contiguous(), s.view(e, o, -1).contiguous()
    select = torch.tensor([0, 1, 1, 2, 3, 3, 3, 5])
    x = torch.randn(len(select), i, generator=g)
    fn = kernels.library().gemv_i4 if mode == "int4" else kernels.library().gemv_i8
    kernels.gemv(x, q, s, 64 if mode == "int4" else 0, select=select)  # the int4 path chosen (measured) first
    srow = s.shape[-1] if mode == "int4" else 1

    def run(threads: int, rows: int):
        y = torch.full((rows, o), float("nan"))
        fn(x.data_ptr(), rows, i, q.data_ptr(), q.shape[-1], s.data_ptr(), int(s.dtype == torch.float16), srow,
           64 if mode == "int4" else 0, None, select.data_ptr(), o, y.data_ptr(), threads)
        return y

    for rows in (1, len(select)):
        one = run(1, rows)
        assert not one.isnan().any()
        for threads in (2, 3, 7):
            for _ in range(5):
                assert torch.equal(run(threads, rows), one)


WIDE8 = kernels.available() and kernels.library().gemv_wide_i8(-1) >= 0
PATHS8 = ("ymm", "zmm") if WIDE8 else ("ymm",)


@pytest.mark.parametrize("features", (2560, 320, 96))
@pytest.mark.parametrize("rows", (1, 3, 8, 16))
def test_512_bit_int8_kernel_matches(rows, features):
    """int8 weights, 512-bit ("zmm") against 256-bit ("ymm"): both within the activations' int16 rounding of the
    dense product, the same where features are not a multiple of 64 (the 256-bit kernel runs either way); stacked
    experts with a matrix chosen per row too."""
    g = torch.Generator().manual_seed(features + rows)
    w = torch.randn(3 * 40, features, generator=g)
    w[5] = 0
    q, s = quantize(w, "int8", 64)
    x = torch.randn(rows, features, generator=g) * torch.logspace(-2, 1, features)
    dense = dequantize(q, s, 0).double()
    select = torch.arange(rows) % 3
    experts = dense.view(3, 40, features)
    ys = {}
    for path in PATHS8:
        with forced(f"int8_width={path}"):
            ys[path] = kernels.gemv(x, q, s)
            picked = kernels.gemv(x, q.view(3, 40, -1), s.view(3, 40), select=select)
            assert kernels._TOLD.get("int8_width") == path or not WIDE8
        for y, want, weights in ((ys[path], x.double() @ dense.T, dense),
                                 (picked, torch.stack([x[r].double() @ experts[select[r]].T for r in range(rows)]),
                                  None)):
            ref = (x.abs().double() @ dense.abs().T) if weights is not None else \
                torch.stack([x[r].abs().double() @ experts[select[r]].abs().T for r in range(rows)])
            assert ((y.double() - want).abs() <= 1e-4 * ref + 1e-30).all(), path
        assert (ys[path][:, 5] == 0).all()
    if features % 64 and WIDE8:
        assert torch.equal(ys["ymm"], ys["zmm"])
