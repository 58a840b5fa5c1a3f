"""The integer prefill product (csrc/intgemm.c) for int8 / int4 weights, every variant compiled for this CPU.

(a) Against a PyTorch reference of the same integer computation: x rounded per row per block of 32 to int8 exactly
as the kernel does (d = max|x| * (1/127), xq = round-half-even(x / d)), int dots per block in float64 (exact),
scaled by d and the weight's scale: equal up to fp32 summation order, |y - ref| <= 1e-6 * sum_b |term_b|.
(b) Against the fp32 activations: each activation moves by at most d/2 = max|x_b| / 254, so
|y_int - x @ w^T| <= sum_b max|x_b| / 254 * sum_{k in b} |w_k| (w dequantized) for every output, plus fp32 rounding;
for random data the rounding errors are independent and uniform, so the relative error of a whole output is about
max|x_b| / (254 sqrt(3) rms(x)) ~ 0.5% for Gaussian blocks of 32: tested < 1%. (c) On tiny models, the
integer paths against the dequantizing ones (same weights): mean next-token KL < 1e-3 (measured 4.5e-4 int8,
1.7e-4 int4). The variants compute the same integers and the same fp32 operations in the same order: equal bits.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moelm
from moelm.inference import cpu, kernels
from moelm.inference.quantization import INT_PATHS, QuantizedExperts, QuantizedLinear, dequantize, fits_fp16, quantize
from moelm.nn.moe import Experts, sort_by_expert
from reference import randomise
from test_fast import kernels_forced as forced

VARIANTS = kernels.int_variants()
pytestmark = pytest.mark.skipif(not VARIANTS, reason="csrc/intgemm.c not built for this CPU (no AVX2 or no compiler)")
FORMATS = (("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128))



def ref_quantize(x: torch.Tensor):
    """x [M, K] -> (xq int8, d [M, K/32], block sums int32), as intgemm_quantize."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    d = blocks.abs().amax(-1) * torch.tensor(1 / 127, dtype=torch.float32)
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(m, k), d, q.sum(-1).to(torch.int32)


def ref_terms(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """The per-block terms [M, N, K/32] of the integer product, in float64 (the int dots exact)."""
    xq, d, _ = ref_quantize(x)
    m, k = x.shape
    n = q.shape[0]
    ones = torch.ones(n, k // group) if group else torch.ones(n)
    codes = dequantize(q, ones, group).double().view(n, k // 32, 32)  # int codes, q or n - 8
    dots = torch.einsum("mbk,nbk->mnb", xq.double().view(m, k // 32, 32), codes)
    sw = scale.double()[:, None].expand(n, k // 32) if not group else scale.double().repeat_interleave(group // 32, 1)
    return dots * d.double()[:, None, :] * sw[None]


def weights(mode: str, group: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3] = 0  # an all-zero row (scale 0)
    q, s = quantize(w, mode, group or 64)
    return q, s, dequantize(q, s, group)


def test_activations_rounded_as_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 160, generator=g) * torch.logspace(-3, 3, 160)
    x[2, 32:64] = 0  # an all-zero block
    x[4, 5] = 1e-30
    got, want = kernels.quantize_rows(x), ref_quantize(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[0].abs().max() == 127 and (got[1][2, 1] == 0) and (got[0][2, 32:64] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,group", FORMATS)
@pytest.mark.parametrize("rows", (1, 6, 7, 17, 100))
def test_matches_the_integer_reference(variant, mode, group, rows):
    """Outputs 70 (tails of every tile width), inputs 384 (3 groups of 128, 12 blocks), two threads."""
    q, s, _ = weights(mode, group, 70, 384, seed=rows)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(1)) * 3
    terms = ref_terms(x, q, s, group)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = kernels.intgemm(x, q, s, group, variant)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (rows, 70) and y.dtype == torch.float32
    err = (y.double() - terms.sum(-1)).abs()
    assert (err <= 1e-6 * terms.abs().sum(-1) + 1e-30).all(), f"{variant} {mode}/{group}: {float(err.max()):.3g}"
    assert (y[:, 3] == 0).all()


@pytest.mark.parametrize("mode,group", FORMATS)
@pytest.mark.parametrize("rows", (1, 15, 16, 37))
def test_variants_agree_bit_for_bit(mode, group, rows):
    """Row counts around AMX's 16-row tiles; an odd number of blocks of 32 (7) where the group allows it (AMX takes
    blocks in pairs)."""
    k = 224 if group in (0, 32) else 256
    q, s, _ = weights(mode, group, 45, k, seed=2)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3))
    ys = [kernels.intgemm(x, q, s, group, v) for v in VARIANTS]
    assert all(torch.equal(y, ys[0]) for y in ys)


@pytest.mark.parametrize("mode,k,group", (("int4", 96, 32), ("int4", 160, 32), ("int4", 448, 32), ("int4", 192, 64),
                                          ("int4", 384, 128), ("int8", 96, 0), ("int8", 448, 0)))
def test_unpack_by_transposes_equals_the_plain_unpack(mode, k, group):
    """Weights unpacked by 8 x 8 transposes (int8: any K; int4: K a multiple of 64, else the gathers) == by gathers
    (int4) or a row's 4-byte steps (int8), bit for bit, in every variant: the same tile. Outputs 45 (a tile of 5 rows
    at the end of an 8 / 32-row tile), int4 K with 32-byte loads that span two groups of 32 and K that does not fill
    one (96, 160: the gathers either way)."""
    q, s, _ = weights(mode, group, 45, k, seed=k)
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(group))
    for variant in VARIANTS:
        ys = []
        for unpack in ("plain", "transposes"):
            with forced(f"int_unpack={unpack}"):
                ys.append(kernels.intgemm(x, q, s, group, variant))
                assert kernels._unpack(mode) == unpack
        assert torch.equal(*ys), variant


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,group", FORMATS)
def test_error_against_fp32_activations_within_the_bound(variant, mode, group):
    q, s, w = weights(mode, group, 96, 256, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(33, 256, generator=g) * torch.rand(33, 1, generator=g) * 4
    x[:, :32] *= 50  # a block much larger than the rest of its row
    exact = F.linear(x.double(), w.double())
    err = (kernels.intgemm(x, q, s, group, variant).double() - exact).abs()
    amax = x.view(33, 8, 32).abs().amax(-1).double()  # [M, blocks]
    wsum = w.double().abs().view(96, 8, 32).sum(-1)  # [N, blocks]
    bound = amax @ wsum.T / 254
    slack = 1e-6 * (x.double().abs() @ w.double().abs().T)  # fp32 rounding of the scaled sums
    assert (err <= bound + slack).all()
    assert err.max() > 0
    rel = float(err.norm() / exact.norm())
    assert rel < 0.01, rel


def test_every_instruction_set_of_this_cpu_has_its_variant():
    """A CPU with AVX-VNNI, AVX512-VNNI or AMX-INT8 gets that variant (AMX: Linux lends the tiles on request): a
    failed request or a missing define would silently leave the CPU's fastest path out."""
    have = cpu.info().has
    want = {"avxvnni": have("avx_vnni"), "avx512vnni": have("avx512_vnni") and have("avx512bw"),
            "amx": have("amx_int8") and have("amx_tile") and have("avx512f")}
    assert {v: v in VARIANTS for v in want} == want


def test_unknown_variant_is_an_error():
    q, s, _ = weights("int8", 0, 8, 64, seed=0)
    with pytest.raises(ValueError, match="'neon'"):
        kernels.intgemm(torch.randn(20, 64), q, s, 0, "neon")


def random_linear(mode: str, rows: tuple, seed: int) -> tuple[QuantizedLinear, torch.Tensor]:
    """A QuantizedLinear 128 -> 40 of random weight and bias (group 64), and random x [*rows, 128]."""
    g = torch.Generator().manual_seed(seed)
    m = QuantizedLinear(128, 40, True, mode, 64)
    with torch.no_grad():
        m.load_weight(torch.randn(40, 128, generator=g))
        m.bias.copy_(torch.randn(40, generator=g))
    return m, torch.randn(*rows, 128, generator=g)


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_quantized_linear_forced_integer_paths(mode):
    """QuantizedLinear with > 16 rows forced onto each int8dot path: the kernel's result plus the bias, bf16
    activations too; fewer rows keep the gemv kernel (the integer paths are prefill only)."""
    m, x = random_linear(mode, (2, 20), seed=3)
    with torch.no_grad():
        for variant in VARIANTS:
            path = f"int8dot_{variant}"
            with forced(f"quantized={path}"):
                want = kernels.intgemm(x, m.qweight, m.scale, m.group_size, variant) + m.bias
                torch.testing.assert_close(m(x), want, rtol=0, atol=0)
                got = m(x.bfloat16())
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
                assert any(k.startswith("quantized.") and v == path for k, v in cpu.choices(True).items())
                cpu.reset()
                m(x[:, :3])
                assert path not in cpu.choices(True).values()


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_independent_rows_may_take_the_integer_path(mode):
    """Few rows are offered the integer paths only inside independent_rows (a server's step of one token of each
    of several sequences); one row never: forced onto int8dot there, 2..16 rows give the kernel's result, outside
    they keep gemv."""
    from moelm.inference.quantization import independent_rows

    m, x = random_linear(mode, (1, 8), seed=4)
    with torch.no_grad():
        for variant in VARIANTS:
            path = f"int8dot_{variant}"
            with forced(f"quantized={path}"):
                want = kernels.intgemm(x, m.qweight, m.scale, m.group_size, variant) + m.bias
                with independent_rows():
                    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
                    m(x[:, :1])
                assert sum(v == path for v in cpu.choices(True).values()) == 1  # 8 rows, not the one row
                cpu.reset()
                m(x)
                assert path not in cpu.choices(True).values()
                cpu.reset()


@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("e", (6, 12))
def test_quantized_experts_integer_path(mode, e, monkeypatch):
    """Prefill of stacked quantized experts forced onto each integer path equals each chosen expert's rows through
    kernels.intgemm (to fp32 rounding), and the dequantized experts within 2% (relative, whole output: two
    roundings, the second of SwiGLU products, whose blocks' max|x| / rms(x) is about twice a Gaussian's). With 5
    experts chosen they run one after another, with 11 in one call (intgemm_experts; two threads)."""
    h, i, t, k = 64, 96, 40, 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    real = kernels.intgemm_experts
    monkeypatch.setattr(kernels, "intgemm_experts", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    ex = Experts(e, h, i)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(e, 2 * i, h, generator=g))
        ex.down_proj.copy_(torch.randn(e, h, i, generator=g))
    qe = QuantizedExperts(ex, mode, 32)
    for name in ("gate_up_proj", "down_proj"):
        for j in range(e):
            qe.load_weight(name, getattr(ex, name)[j].detach(), j, slice(None))
    x = torch.randn(t, h, generator=g)
    index = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])  # expert e-1 never chosen
    wts = torch.rand(t, k, generator=g)
    gq, gs = qe.stacked("gate_up_proj")
    dq, ds = qe.stacked("down_proj")
    with torch.no_grad(), forced("quantized=torch"):
        dense = qe(x, index, wts)
    for variant in VARIANTS:
        want = torch.zeros(t, h)
        for j in range(e):
            token, slot = (index == j).nonzero(as_tuple=True)
            if len(token):
                gate, up = kernels.intgemm(x[token], gq[j], gs[j], qe.group_size, variant).chunk(2, -1)
                y = kernels.intgemm(F.silu(gate) * up, dq[j], ds[j], qe.group_size, variant)
                want.index_add_(0, token, y * wts[token, slot, None])
        with torch.no_grad(), forced(f"quantized=int8dot_{variant}"):
            got = qe(x, index, wts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        rel = float((got - dense).norm() / dense.norm())
        assert 0 < rel < 0.02, (variant, rel)
        assert len(calls) == (e == 12), (e, calls)
        calls.clear()


@pytest.mark.parametrize("mode,group,scales", (("int8", 0, "fp32"), ("int4", 32, "fp16"), ("int4", 64, "mixed")))
def test_experts_in_one_call_match_one_expert_at_a_time(mode, group, scales):
    """kernels.intgemm_experts (all chosen experts of a prefill in one C call, threads taking whole experts) equals
    each expert's rows through kernels.intgemm, SwiGLU and the weighted sum (to fp32 rounding: its SiLU and the
    order of the sums differ), for every variant, 1-3 threads, experts no token chose, one expert with most of the
    tokens, and gate_up / down scales of different dtypes; the same call twice gives the same bits."""
    e, h, i, t, k = 10, 128, 64, 37, 3
    g = torch.Generator().manual_seed(7)
    gate_up = [quantize(torch.randn(2 * i, h, generator=g), mode, group or 64) for _ in range(e)]
    down = [quantize(torch.randn(h, i, generator=g), mode, group or 64) for _ in range(e)]
    gq, gs = (torch.stack(a) for a in zip(*gate_up))
    dq, ds = (torch.stack(a) for a in zip(*down))
    if scales == "mixed":
        ds = ds.float()
    x = torch.randn(t, h, generator=g)
    index = torch.stack([torch.randperm(e - 2, generator=g)[:k] for _ in range(t)])  # experts 8, 9 never chosen
    index[: t // 2, 0] = 3  # expert 3 gets half of the tokens
    wts = torch.rand(t, k, generator=g)
    token, w, counts = sort_by_expert(index, wts, e)
    for variant in VARIANTS:
        want = torch.zeros(t, h)
        for j in range(e):
            rows, slot = (index == j).nonzero(as_tuple=True)
            if len(rows):
                gate, up = kernels.intgemm(x[rows], gq[j], gs[j], group, variant).chunk(2, -1)
                y = kernels.intgemm(F.silu(gate) * up, dq[j], ds[j], group, variant)
                want.index_add_(0, rows, y * wts[rows, slot, None])
        before = torch.get_num_threads()
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                got = kernels.intgemm_experts(x, token, w, counts, (gq, gs), (dq, ds), group, variant)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
                again = kernels.intgemm_experts(x, token, w, counts, (gq, gs), (dq, ds), group, variant)
                assert torch.equal(got, again), (variant, threads)
        finally:
            torch.set_num_threads(before)


def test_experts_prefill_probe_gives_every_candidate_the_same_rows(monkeypatch, tmp_path):
    """The experts' prefill choice times every candidate on the same pairs: those of the chosen experts with the
    median numbers of tokens (a window of probe_elements()' worth of experts), moved onto other experts at each
    call (other weights), never on experts no token chose. (Before, the window itself moved: with 4 candidates each
    saw other experts' rows, and the best of a few calls favoured whichever met the fewest; on the full-size model
    that chose the dequantizing path for short prompts, 3x slower.)"""
    monkeypatch.setenv("MOELM_CACHE", str(tmp_path))
    monkeypatch.delenv("MOELM_KERNELS", raising=False)
    e, h, i, k = 8, 64, 32, 2
    qe = QuantizedExperts(Experts(e, h, i), "int4", 32)
    each = (2 * i * h + h * i)
    monkeypatch.setattr(cpu, "probe_elements", lambda: 2 * each)  # a window of 2 experts
    counts = torch.tensor([0, 1, 2, 3, 5, 8, 13, 0])  # pairs per expert: 32, so 16 tokens of 2 choices
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    index = torch.repeat_interleave(torch.arange(e), counts)[order].view(16, k)
    x, wts = torch.randn(16, h), torch.rand(16, k)
    seen = []

    def recorder(name):
        def run(x, index, weights, **_):
            assert x.shape[0] == index.shape[0] == weights.shape[0]
            seen.append((name, sorted(torch.bincount(index.reshape(-1), minlength=e).tolist())[-2:],
                         tuple(index.reshape(-1).unique().tolist())))
            return torch.zeros_like(x)
        return run
    monkeypatch.setattr(qe, "dense", recorder("torch"))
    monkeypatch.setattr(qe, "integer", recorder("int"))
    cpu.reset()
    path = qe.prefill_path(x, index, wts, {"int8dot_a": "a", "int8dot_b": "b"})
    cpu.reset()
    assert path in ("torch", "int8dot_a", "int8dot_b") and len(seen) >= 9
    # of the 6 chosen experts (1, 2, 3, 5, 8, 13 pairs) the median two: 3 and 5 pairs
    assert {tuple(c) for _, c, _ in seen} == {(3, 5)}
    experts = [used for _, _, used in seen]
    assert all(a != b for a, b in zip(experts, experts[1:])), "each call reads other experts' weights"


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5_moe-tiny"), seed=0, fast=False)
    randomise(model, seed=0)
    path = tmp_path_factory.mktemp("intgemm") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("mode,bound", (("int8", 1e-3), ("int4", 1e-3)))
def test_tiny_model_logits_close_to_the_dequantizing_path(tiny_moe, mode, bound):
    model = moelm.AutoModelForCausalLM.from_pretrained(tiny_moe, quantization=mode)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), forced("quantized=tiles"):
        want = F.log_softmax(model(ids).logits.float(), -1)
    for path in (p for p, v in INT_PATHS.items() if v in VARIANTS):
        with torch.no_grad(), forced(f"quantized={path}"):
            got = F.log_softmax(model(ids).logits.float(), -1)
            assert any(v == path for v in cpu.choices(True).values())
        kl = float((want.exp() * (want - got)).sum(-1).mean())
        assert 0 < kl < bound, (path, kl)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group", (32, 64, 128))
def test_int4_scales_in_fp32(variant, group):
    """int4 scales that are no fp16 values (a checkpoint's fp32 ones) are read as fp32: the same reference."""
    q, s, _ = weights("int4", group, 70, 384, seed=5)
    s = s.float() * (1 + 2 ** -20)
    assert s.dtype == torch.float32 and not fits_fp16(s)
    x = torch.randn(17, 384, generator=torch.Generator().manual_seed(2))
    terms = ref_terms(x, q, s, group)
    err = (kernels.intgemm(x, q, s, group, variant).double() - terms.sum(-1)).abs()
    assert (err <= 1e-6 * terms.abs().sum(-1) + 1e-30).all(), f"{variant} int4/{group}: {float(err.max()):.3g}"
