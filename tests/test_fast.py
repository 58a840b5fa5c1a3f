"""The inference fast paths: csrc/gemv.c kernels, StaticCache, fused q/k/v and gate/up projections, int8/int4
quantization while loading, the tiled fp32 compute of bf16 weights, and the memory of quantized loading.

Each family's tiny named config (biases switched on where the family has them) is randomised like the reference
models (reference.randomise), saved once, and loaded with fast=True (the default) and fast=False (plain PyTorch);
the two must agree to fp32 rounding. Quantized models are compared with the fp32 one by the KL divergence of their
next-token distributions, and their decode path (gemv kernels) with their prefill path (dequantize + matmul).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelm
from moelm.inference import StaticCache, cpu, decode, kernels, matmul, quantization
from moelm.inference import linear as linears
from moelm.inference.quantization import QuantizedExperts, QuantizedLinear, dequantize, quantize
from moelm.inference.quantize import resolve
from moelm.nn.layers import MLP, Attention, DynamicCache
from moelm.nn.moe import Experts
from reference import randomise

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# family -> (named config, overrides): biases on where the family has them, so fused / quantized biases are covered
FAMILIES = {
    "ernie4_5": ("ernie4_5-tiny", dict(use_bias=True)),
    "ernie4_5_moe": ("ernie4_5_moe-tiny", {}),
    "phimoe": ("phimoe-tiny", dict(attention_bias=True, lm_head_bias=True)),
}
FAMILY_NAMES = tuple(FAMILIES)
VOCAB = 512
PAD = 0

_TMP = tempfile.TemporaryDirectory(prefix="moelm-fast-")
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="csrc/gemv.c kernels not available (no C compiler, "
                                   "MOELM_NO_KERNELS set, or the build failed)")


# ------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for the model tests: light on a shared machine, and OpenMP barriers (gemv.c's and PyTorch's) are
    not slowed down by other processes. The gemv tests ask for two threads (`threads`), to split output blocks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def tiny_config(family: str):
    name, overrides = FAMILIES[family]
    config = moelm.named_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@functools.cache
def checkpoint(family: str) -> Path:
    """A randomised tiny model of the family saved in hub format (fp32)."""
    model = moelm.AutoModelForCausalLM.from_config(tiny_config(family), seed=0, fast=False)
    randomise(model, seed=0)
    path = Path(_TMP.name) / family
    model.save_pretrained(path)
    return path


_MODELS: dict = {}


def load(family: str, fresh: bool = False, **kwargs):
    """from_pretrained of the family's checkpoint; shared between tests unless fresh (tests that change a model)."""
    key = (family, repr(sorted(kwargs.items())))
    if fresh or key not in _MODELS:
        model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint(family), **kwargs)
        if fresh:
            return model
        _MODELS[key] = model
    return _MODELS[key]


def prompts(batch: int = 2, seq: int = 12, pads=(3, 0), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): random tokens, row i left-padded with pads[i] PAD tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in enumerate(pads[:batch]):
        mask[row, :n] = 0
        ids[row, :n] = PAD
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill_then_decode(model, ids, mask, new, cache) -> torch.Tensor:
    """Next-token logits [B, 1 + N, V]: after the prompt, then after each of the N tokens of `new` fed one at a
    time through `cache` (what generate does)."""
    out = model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(new.shape[1]):
        mask = F.pad(mask, (0, 1), value=1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(new[:, t:t + 1], attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1).float()


@torch.no_grad()
def full_logits(model, ids, mask, new) -> torch.Tensor:
    """The same next-token logits as prefill_then_decode, from one forward pass over prompt + new tokens."""
    ids = torch.cat([ids, new], dim=1)
    mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    return logits[:, -(new.shape[1] + 1):].float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float, msg: str = ""):
    """|a - b| <= rel * max|b| (+ the same relative tolerance elementwise)."""
    a, b = a.float(), b.float()
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(scale, 1e-6),
                               msg=lambda m: f"{msg}: {m} (logit scale {scale:.3g})")


@contextlib.contextmanager
def count_gemv():
    """Counts kernels.gemv calls inside the block: [n]."""
    calls = [0]
    real = kernels.gemv

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    kernels.gemv = counting
    try:
        yield calls
    finally:
        kernels.gemv = real


@contextlib.contextmanager
def kernels_forced(spec: str):
    """MOELM_KERNELS=spec inside the block (the measured choices are forgotten before and after)."""
    before = os.environ.get("MOELM_KERNELS")
    os.environ["MOELM_KERNELS"] = spec
    cpu.reset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["MOELM_KERNELS"]
        else:
            os.environ["MOELM_KERNELS"] = before
        cpu.reset()


@pytest.fixture
def gemv_forced():
    """The gemv kernel wherever it applies (tests that check it is used), PyTorch's op elsewhere."""
    with kernels_forced("gemv"):
        yield


def count_layer_calls(monkeypatch, record):
    """record(Layer spec, x) for each decoder layer run in one C call: by kernels.decode_layer, or as part of a
    whole step of kernels.decode_layers."""
    one, whole = kernels.decode_layer, kernels.decode_layers

    def layer(spec, x, *args):
        record(spec, x)
        return one(spec, x, *args)

    def layers(specs, threads, x, *args):
        for i in range(specs.count):
            record(specs.specs[i].contents, x)
        return whole(specs, threads, x, *args)

    monkeypatch.setattr(kernels, "decode_layer", layer)
    monkeypatch.setattr(kernels, "decode_layers", layers)


def op_by_op(m):
    """In the monkeypatch context m, the decoder layers op by op (no C call for a layer or a whole step)."""
    m.setattr(moelm.inference.modules, "layer_step", lambda *a: None)
    m.setattr(moelm.inference.modules, "layers_step", lambda *a: None)


def static_cache(model, batch: int, length: int) -> StaticCache:
    return StaticCache(model.config, batch, length, model.get_input_embeddings().weight.dtype)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions of next-token distributions [..., V]."""
    p = F.log_softmax(p_logits.float(), dim=-1)
    q = F.log_softmax(q_logits.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ------------------------------------------------------------------ 1. gemv kernels

def test_kernels_built_when_a_compiler_exists():
    """A broken build of csrc/gemv.c must not silently turn every kernel test into a skip."""
    if os.environ.get("MOELM_NO_KERNELS"):
        pytest.skip("MOELM_NO_KERNELS is set")
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert kernels.available(), "a C compiler exists but csrc/gemv.c did not build (see the warning)"


def test_kernels_build_from_scratch_in_a_fresh_cache(tmp_path):
    """The library compiles into $MOELM_CACHE on first use (a subprocess, so the loaded library is not reused)."""
    if os.environ.get("MOELM_NO_KERNELS") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler / kernels disabled")
    env = dict(os.environ, MOELM_CACHE=str(tmp_path))
    code = ("import torch, moelm.inference.kernels as k; assert k.available(); x = torch.ones(1, 32); w = torch.ones(3, 32); "
            "print(k.gemv(x, w).tolist())")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[32.0, 32.0, 32.0]]"
    assert list(tmp_path.glob("kernels/*/gemv.so")), "no compiled library in the fresh cache"


FORMATS = ("fp32", "bf16", "int8", "int4-g32", "int4-g64")


def make_weight(fmt: str, shape: tuple[int, ...], seed: int = 0):
    """(weight as gemv takes it, scale, group_size, the fp32 matrix it stands for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if fmt == "fp32":
        return w, None, 0, w
    if fmt == "bf16":
        wb = w.to(torch.bfloat16)
        return wb, None, 0, wb.float()
    if fmt == "int8":
        q, s = quantize(w, "int8")
        return q, s, 0, dequantize(q, s, 0)
    group = int(fmt.rpartition("g")[2])
    q, s = quantize(w, "int4", group)
    return q, s, group, dequantize(q, s, group)


def int16_group(fmt: str, features: int, group: int) -> int:
    """The group of activations gemv.c's integer kernels scale to int16 together: int4 its weight group, int8 256
    inputs (or the largest power of two dividing I)."""
    if fmt.startswith("int4"):
        return group
    return next(g for g in (256, 128, 64, 32) if features % g == 0)


def check_gemv(y, x, fmt, w, scale, group, dense, bias=None, select=None, msg=""):
    """y == x @ dense.T (+ bias) to fp32 rounding (1e-5 relative). int8/int4 (up to 16 rows, all that gemv takes)
    go through gemv.c's integer kernels, which round each group of activations to int16 steps of max|x_g| / 32767:
    |error| <= sum over groups of scale * step / 2 * sum(|q|), plus 1e-5 of sum |x| * |q| * scale, where q is the
    integer weight (int4: the nibble 0..15, offset 8 applied exactly in fp32; int8: -127..127, one scale per row)."""
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(x.shape[0], -1)
    if select is None:
        expected = F.linear(x, dense, bias)
    else:
        expected = torch.stack([F.linear(x[m], dense[int(select[m])], bias) for m in range(x.shape[0])])
    if not fmt.startswith("int"):
        close(y, expected, 1e-5, msg)
        return
    rows, features = x.shape
    xgroup = int16_group(fmt, features, group)
    if fmt == "int8":
        q = w.float().abs()  # [(E,) O, I]
        scale = scale[..., None].expand(*scale.shape, features // xgroup)
    else:
        q = dequantize(w, torch.ones_like(scale), group) + 8  # nibbles 0..15
        scale = scale.repeat_interleave(group // xgroup, dim=-1) if group > xgroup else scale
    if select is None:
        q, scale = q.expand(rows, *q.shape), scale.expand(rows, *scale.shape)
    else:
        q, scale = q[select], scale[select]  # [rows, O, I], [rows, O, groups]
    out_features, groups = scale.shape[1], features // xgroup
    q = q.reshape(rows, out_features, groups, xgroup)
    xg = x.reshape(rows, 1, groups, xgroup)
    step = xg.abs().amax(-1) / 32767  # [rows, 1, groups]
    rounding = (scale * step / 2 * q.sum(-1)).sum(-1)  # [rows, O]
    magnitude = (xg.abs() * (q + (8 if fmt != "int8" else 0)) * scale[..., None]).sum((-1, -2))
    err = (y - expected).abs()
    tol = rounding + 1e-5 * magnitude
    assert bool((err <= tol).all()), f"{msg}: {fmt} error {float(err.max()):.3g}, worst excess " \
                                    f"{float((err - tol).max()):.3g} (bound {float(tol.max()):.3g})"


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", (1, 2, 3, 4, 5, 6, 7, 8, 13, 16))
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
def test_gemv_matches_linear(fmt, rows, with_bias, threads):
    out_features, in_features = 37, 256  # 37: not a multiple of the 8-row output blocks
    w, scale, group, dense = make_weight(fmt, (out_features, in_features))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    y = kernels.gemv(x, w, scale, group, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    check_gemv(y, x, fmt, w, scale, group, dense, bias, msg=f"{fmt} rows={rows}")


@needs_kernels
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("rows", (2, 3, 5, 8))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_gemv_rows_are_what_each_row_gets_alone(dtype, rows, with_bias, threads):
    """Up to 8 rows of x against a bf16 weight (a speculative check of up to 7 drafted tokens) give each row bit for
    bit what a one-row call gives it, so a check computes what plain one-token steps compute; fp32 too where the
    kernels are built with AVX-512 (every number of rows by the same blocks)."""
    if dtype == torch.float32 and kernels.library().gemv_wide(-1) < 0:
        pytest.skip("fp32 rows match one row's sums only in the AVX-512 build")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(37, 192, generator=g).to(dtype)
    x = torch.randn(rows, 192, generator=g)
    bias = torch.randn(37, generator=g) if with_bias else None
    both = kernels.gemv(x, w, bias=bias)
    assert torch.equal(both, torch.cat([kernels.gemv(x[r:r + 1], w, bias=bias) for r in range(rows)]))
    torch.testing.assert_close(both, x @ w.float().T + (0 if bias is None else bias), rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_shapes_and_input_dtypes(fmt, threads):
    """Leading dims of x are kept; x in bf16 / fp64 is computed in fp32; larger I and O (several threads' blocks)."""
    w, scale, group, dense = make_weight(fmt, (300, 512), seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 512, generator=g)
    y = kernels.gemv(x, w, scale, group)
    assert y.shape == (2, 3, 300)
    check_gemv(y, x, fmt, w, scale, group, dense, msg="3d input")
    for dtype in (torch.bfloat16, torch.float64):
        xd = x[0, :1].to(dtype)
        check_gemv(kernels.gemv(xd, w, scale, group), xd, fmt, w, scale, group, dense, msg=str(dtype))
    # a narrow weight: fewer output rows than one block
    w, scale, group, dense = make_weight(fmt, (3, 64), seed=5)
    for rows in (1, 5):
        x = torch.randn(rows, 64, generator=g)
        check_gemv(kernels.gemv(x, w, scale, group), x, fmt, w, scale, group, dense, msg=f"O=3 rows={rows}")
    # I not a multiple of 256 (int8's activation groups shrink to 32 / 128), several groups per row
    for features in (96, 640):
        if features % (group or 32):
            continue
        w, scale, group, dense = make_weight(fmt, (9, features), seed=features)
        for rows in (1, 4, 5):
            x = torch.randn(rows, features, generator=g) * torch.linspace(0.01, 3, features)
            check_gemv(kernels.gemv(x, w, scale, group), x, fmt, w, scale, group, dense, msg=f"I={features}")


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", (1, 3, 5, 16))
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
def test_gemv_select_matches_per_row_linear(fmt, rows, with_bias, threads):
    """Stacked [E, O, I] matrices, one chosen per row of x (the experts of each (token, choice) pair)."""
    experts, out_features, in_features = 5, 37, 128
    w, scale, group, dense = make_weight(fmt, (experts, out_features, in_features), seed=rows)
    g = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, in_features, generator=g)
    select = torch.randint(0, experts, (rows,), generator=g)
    select[0] = experts - 1  # the last matrix is always read
    bias = torch.randn(out_features, generator=g) if with_bias else None
    y = kernels.gemv(x, w, scale, group, bias, select=select)
    check_gemv(y, x, fmt, w, scale, group, dense, bias, select, msg=f"{fmt} select rows={rows}")


@needs_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_linear_paths_agree(dtype):
    """Every path matmul.linear can choose gives F.linear's result (fp32 weights to 1e-5; half-precision ones to
    one rounding of the output), for row counts on both sides of the kernel's limit and I not a multiple of 32;
    the gemv kernel is offered exactly for few rows, contiguous fp32/bf16 weights and I % 32 == 0."""
    g = torch.Generator().manual_seed(0)
    for features in (64, 48):
        w, b = torch.randn(40, features, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
        for rows in (1, 8, 9, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 40, 300):
            x = torch.randn(rows, features, generator=g).to(dtype)
            want = F.linear(x.float(), w.float(), b.float())
            paths = matmul.paths(x, w)
            assert "torch" in paths and ("fp32_tiles" in paths) == (dtype != torch.float32)
            assert ("gemm" in paths) == (dtype == torch.float32)
            assert ("gemv" in paths) == (rows <= kernels.MAX_ROWS and features % 32 == 0 and dtype != torch.float16)
            for path in paths:
                with torch.no_grad():
                    got = matmul.PATHS[path](x, w, b)
                assert got.dtype == dtype and got.shape == want.shape, path
                rel = 1e-5 if dtype == torch.float32 else 2.0**-7
                close(got, want, rel, f"{path} {rows} rows, I={features}, {dtype}")


@needs_kernels
def test_linear_takes_the_chosen_or_forced_path(monkeypatch, tmp_path):
    """matmul.linear measures the paths once per shape bucket and then takes the one chosen; MOELM_KERNELS forces a
    path where it applies and PyTorch's op elsewhere; an unknown op or path is an error naming it."""
    monkeypatch.setenv("MOELM_CACHE", str(tmp_path))
    calls = []
    real = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        cpu.reset()
        close(matmul.linear(x, w, b), F.linear(x, w, b), 1e-5, "measured")
        chosen = matmul.path_for(x, w, b)
        assert chosen in matmul.paths(x, w) and cpu.cache_file().is_file()
        assert any(v == chosen for k, v in cpu.choices().items() if k.startswith("linear|"))
        with kernels_forced("linear=gemv"):
            calls.clear()
            close(matmul.linear(x, w, b), F.linear(x, w, b), 1e-5, "forced gemv")
            assert calls, "3 rows forced onto gemv"
            calls.clear()
            x40 = torch.randn(40, 64, generator=g)
            close(matmul.linear(x40, w, b), F.linear(x40, w, b), 1e-5, "forced gemv, 40 rows")
            assert not calls and matmul.path_for(x40, w, b) == "torch", "40 rows: gemv does not apply, PyTorch's op"
        with kernels_forced("torch"):
            calls.clear()
            matmul.linear(x, w, b)
            assert not calls and matmul.path_for(x, w, b) == "torch"
        for bad, what in (("linear=fast", "'fast'"), ("lineaar=gemv", "'lineaar'"), ("gemvv", "'gemvv'")):
            with kernels_forced(bad), pytest.raises(ValueError, match=what):
                matmul.linear(x, w, b)


def test_choose_measures_once_and_remembers(monkeypatch, tmp_path):
    """cpu.choose: the fastest candidate by the timer, measured once per (op, key), written to the per-CPU file
    and read back by a new process (simulated by forgetting the memory)."""
    monkeypatch.setenv("MOELM_CACHE", str(tmp_path))
    monkeypatch.delenv("MOELM_KERNELS", raising=False)
    cpu.reset()
    timed = []

    def timer(candidates):
        timed.extend(fn() for fn in candidates.values())
        return {name: {"a": 3.0, "b": 1.0, "torch": 2.0}[name] for name in candidates}

    candidates = {"a": lambda: "a", "b": lambda: "b", "torch": lambda: "torch"}
    assert cpu.choose("test", (1, 2), candidates, timer=timer) == "b" and len(timed) == 3
    assert cpu.choose("test", (1, 2), candidates, timer=timer) == "b" and len(timed) == 3
    assert cpu.chosen("test", (1, 2)) == "b" and cpu.chosen("test", (1, 3)) is None
    cpu.reset()
    assert cpu.chosen("test", (1, 2)) == "b"  # from the file
    assert cpu.choose("test", (1, 2), {"a": candidates["a"], "torch": candidates["torch"]}, timer=timer) == "torch"
    assert cpu.cache_file().parent == tmp_path / "kernels" and cpu.info().key in cpu.cache_file().name
    cpu.reset()


def test_cpu_info_reports_the_machine():
    info = cpu.info()
    assert info.model and info.cores >= 1 and info.capability == torch.backends.cpu.get_cpu_capability()
    assert set(info.features) <= set(cpu.FEATURES) and all(info.has(f) for f in info.features)
    if info.capability in ("AVX2", "AVX512"):
        assert info.has("avx2")
    assert info.model in info.line() and info.capability in info.line()


# ------------------------------------------------------------------ 2. quantize / dequantize

@pytest.mark.parametrize("shape", ((7, 64), (3, 5, 128)))
def test_int8_round_trip_error_within_half_a_step(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[-2])[:, None]
    q, scale = quantize(w, "int8")
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == w.shape[:-1]
    assert scale.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    torch.testing.assert_close(scale, w.abs().amax(-1) / 127)
    err = (w - dequantize(q, scale, 0)).abs()
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all()), float((err / scale[..., None]).max())
    # the largest entry of each row is exact (±127 steps)
    assert bool((q.abs().amax(-1) == 127).all())


@pytest.mark.parametrize("group", (32, 64, 128))
@pytest.mark.parametrize("lead", ((), (3,)))
def test_int4_round_trip_error_within_half_a_step(group, lead):
    rows, cols = 6, 256
    w = torch.randn(*lead, rows, cols, generator=torch.Generator().manual_seed(group))
    w[..., 0, :group] *= 50  # groups of very different magnitudes in one row
    q, scale = quantize(w, "int4", group)
    assert q.dtype == torch.uint8 and q.shape == (*lead, rows, cols // 2)
    assert scale.shape == (*lead, rows, cols // group) and scale.dtype == torch.float16
    deq = dequantize(q, scale, group)
    assert deq.shape == w.shape
    per_elem_scale = scale.repeat_interleave(group, dim=-1)
    err = (w - deq).abs()
    assert bool((err <= per_elem_scale / 2 * (1 + 1e-5) + 1e-7).all()), float((err / per_elem_scale).max())
    # dequantize in another dtype agrees
    torch.testing.assert_close(dequantize(q, scale, group, torch.float64), deq.double())


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Hand-written unpacking of one row: byte j of a group holds input j (low nibble) and j + group/2 (high)."""
    values = []
    half = group // 2
    for g0 in range(0, packed.shape[-1], half):
        chunk = [int(b) for b in packed[g0:g0 + half]]
        values += [b & 15 for b in chunk] + [b >> 4 for b in chunk]
    return torch.tensor(values)


@pytest.mark.parametrize("group", (32, 64))
def test_int4_packing_layout(group):
    # a literal group with scale exactly 1: low half -7.5, -7, ..., 7 and high half 7, 6, ..., -7, 0
    low = torch.tensor([-7.5] + [float(v) for v in range(-7, 8)])
    high = torch.tensor([float(v) for v in range(7, -8, -1)] + [0.0])
    row = torch.cat([low, high])
    if group == 64:
        row = torch.cat([row[:16], row[:16], row[16:], row[16:]])  # same values, group of 64
    w = torch.cat([row, row])[None]  # two groups
    q, scale = quantize(w, "int4", group)
    torch.testing.assert_close(scale, torch.ones(1, 2, dtype=torch.float16))
    half = group // 2
    nibbles = (w[0] + 8).round().clamp(0, 15).to(torch.uint8)  # -7.5 -> 0.5 -> 0 (round half to even)
    for start in (0, group):
        for j in range(half):
            expected = int(nibbles[start + j]) | (int(nibbles[start + j + half]) << 4)
            assert int(q[0, start // 2 + j]) == expected, (start, j)
    assert int(q[0, 0]) == 0xF0  # -7.5 -> nibble 0 low, 7 -> nibble 15 high

    # random weights: the hand-written unpacking agrees with dequantize and with the quantization rule
    w = torch.randn(4, 4 * group, generator=torch.Generator().manual_seed(1))
    q, scale = quantize(w, "int4", group)
    deq = dequantize(q, scale, group)
    for r in range(4):
        n = unpack_int4(q[r], group).float() - 8
        torch.testing.assert_close(deq[r], n * scale[r].repeat_interleave(group))
        s = scale[r].repeat_interleave(group)
        torch.testing.assert_close(n, (w[r] / s).round().clamp(-8, 7))


@pytest.mark.parametrize("mode", (None, "int8", "int4"))
@pytest.mark.parametrize("family", ("ernie4_5_moe", "phimoe"))
def test_no_position_kept(family, mode):
    """logits_to_keep with no position (a serving chunk that needs no logits): the last layer's MoE block gets no
    rows, and the forward gives no logits, with the cache of every position."""
    model = load(family, quantization=mode) if mode else load(family)
    ids, mask = prompts(batch=1, seq=20, pads=(0,))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, logits_to_keep=torch.tensor([], dtype=torch.long), use_cache=True)
    assert out.logits.shape == (1, 0, model.config.vocab_size)
    assert out.past_key_values.get_seq_length() == 20


def test_quantize_zero_rows_and_groups():
    w = torch.zeros(3, 64)
    w[1, 40] = 2.0
    for mode, group in (("int8", 0), ("int4", 32)):
        q, s = quantize(w, mode, group or 64)
        deq = dequantize(q, s, group)
        assert torch.isfinite(deq).all()
        assert bool((deq[0] == 0).all()) and bool((deq[2] == 0).all())
        torch.testing.assert_close(deq[1, 40], torch.tensor(2.0), rtol=0.07, atol=0)


# ------------------------------------------------------------------ 3. fast path == reference path

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_matches_reference_padded_prefill(family):
    fast, ref = load(family), load(family, fast=False)
    ids, mask = prompts(batch=2, seq=12, pads=(3, 0))
    with torch.no_grad():
        a = fast(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    close(a[valid], b[valid], 1e-5, f"{family} prefill")


@pytest.mark.usefixtures("gemv_forced")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_matches_reference_one_token_decode(family):
    """Decode steps (2 rows: the gemv kernels) through a StaticCache on the fast model, a DynamicCache on the
    reference path, and one forward pass over the whole sequence: all the same next-token logits."""
    fast, ref = load(family), load(family, fast=False)
    ids, mask = prompts(batch=2, seq=7, pads=(2, 0))
    new = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with count_gemv() as calls:
        a = prefill_then_decode(fast, ids, mask, new, static_cache(fast, 2, 16))
    if kernels.available():
        assert calls[0] > 0, "the fast model's decode steps did not use the gemv kernels"
    b = prefill_then_decode(ref, ids, mask, new, DynamicCache())
    c = full_logits(ref, ids, mask, new)
    close(a, b, 1e-5, f"{family} fast decode vs reference decode")
    close(a, c, 1e-5, f"{family} fast decode vs reference prefill")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stepping_through_left_padding_with_a_dynamic_cache(family):
    """One token at a time through a DynamicCache from the first (padding) position: the padding steps attend to
    nothing; their rows must come out as SDPA's zeros, not NaN that the next layer's cache would carry into the
    real positions. The fast model (decode_attention) against the reference path (SDPA)."""
    fast, ref = load(family), load(family, fast=False)
    ids, mask = prompts(batch=2, seq=6, pads=(2, 0))
    out = []
    for model in (fast, ref):
        cache, logits = DynamicCache(), []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                step = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
                logits.append(step.logits[:, 0])
        out.append(torch.stack(logits, 1))
    assert torch.isfinite(out[0]).all(), f"{family}: NaN from a fully masked step"
    close(out[0], out[1], 1e-5, f"{family} padded steps")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_generate_matches_reference(family):
    fast, ref = load(family), load(family, fast=False)
    ids, mask = prompts(batch=2, seq=8, pads=(3, 0))
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    greedy = fast.generate(ids, do_sample=False, **kw)
    assert greedy.shape[1] > ids.shape[1]
    assert torch.equal(greedy, ref.generate(ids, do_sample=False, **kw)), f"{family} greedy"
    assert len(set(greedy[0, ids.shape[1]:].tolist())) > 1, "greedy decoding repeats one token: weak test"

    sampled = []
    for model in (fast, ref):
        torch.manual_seed(1234)
        sampled.append(model.generate(ids, do_sample=True, top_k=50, temperature=1.0, top_p=1.0, **kw))
    assert torch.equal(*sampled), f"{family} sampling"

    beams = [m.generate(ids, num_beams=3, do_sample=False, **kw) for m in (fast, ref)]
    assert torch.equal(*beams), f"{family} beam search"


@needs_kernels
@pytest.mark.parametrize("interleaved", (True, False), ids=("ernie-pairs", "halves"))
@pytest.mark.parametrize("heads,kv_heads", ((4, 2), (4, 4), (6, 1)))
@pytest.mark.parametrize("masking", ("none", "padded", "window"))
def test_attend_kernel_matches_rotate_cache_and_attention(interleaved, heads, kv_heads, masking, threads):
    """kernels.attend (one C call) == rotary embedding, cache write at `pos`, then softmax attention as the
    PyTorch path computes them, for both rotations, GQA group sizes, and padding / sliding-window masks."""
    from moelm.inference.attention import decode_attention
    from moelm.nn.rope import rotate_half_split, rotate_interleaved

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, d, t, pos = 3, 16, 12, 7
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g)
    angles = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin() * 0.9  # scaled sin: the kernel must not assume cos^2 + sin^2 = 1
    keys, values = torch.randn(b, kv_heads, t, d, generator=g), torch.randn(b, kv_heads, t, d, generator=g)
    mask = None
    if masking == "padded":
        mask = torch.ones(b, pos + 1, dtype=torch.bool)
        mask[1, :3] = False
        mask[2, :pos] = False  # only the new position
    elif masking == "window":
        mask = torch.arange(pos + 1)[None].expand(b, -1) > pos - 4
    rotate = rotate_interleaved if interleaved else rotate_half_split
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = rotate(q.view(b, 1, heads, d).transpose(1, 2), cos[:, None], sin[:, None])  # [B, H, 1, D]
    k = rotate(k.view(b, 1, kv_heads, d).transpose(1, 2), cos[:, None], sin[:, None])
    v = v.view(b, 1, kv_heads, d).transpose(1, 2)
    ref_keys, ref_values = keys.clone(), values.clone()
    ref_keys[:, :, pos:pos + 1], ref_values[:, :, pos:pos + 1] = k, v
    expected = decode_attention(q, ref_keys[:, :, :pos + 1], ref_values[:, :, :pos + 1],
                                None if mask is None else mask[:, None, None], 0.3)
    out = kernels.attend(qkv, heads, kv_heads, cos, sin, interleaved, keys, values, pos, mask, 0.3)
    close(out, expected.reshape(b, heads * d), 1e-5, "attention output")
    transposed = qkv.T.contiguous().T  # as oneDNN returns 5-16 rows
    out = kernels.attend(transposed, heads, kv_heads, cos, sin, interleaved, keys, values, pos, mask, 0.3)
    close(out, expected.reshape(b, heads * d), 1e-5, "attention output, column-major qkv")
    torch.testing.assert_close(keys, ref_keys, rtol=1e-6, atol=1e-6)  # k rotated and written at pos, rest kept
    assert torch.equal(values, ref_values)


@needs_kernels
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("d", (128, 80))
@pytest.mark.parametrize("masking", ("none", "window", "padded"))
def test_attend_kernel_past_a_chunk_through_block_tables(dtype, d, masking, threads):
    """kernels.attend splits the positions into chunks of 256 and merges them: rows 700, 256 and 31 positions in,
    through a paged cache's block tables (blocks in shuffled order), fp32 or bf16 cache, give softmax attention over
    each row's positions in order; a chunk with no position allowed (a sliding window, left padding) adds nothing."""
    from moelm.inference.attention import decode_attention
    from moelm.nn.rope import rotate_interleaved

    g = torch.Generator().manual_seed(d + len(masking))
    heads, kv_heads, size = 8, 2, 16
    positions = torch.tensor([700, 256, 31])
    b, pos = len(positions), int(positions.max())
    per_row = pos // size + 1
    keys = torch.randn(b * per_row + 3, kv_heads, size, d, generator=g).to(dtype)
    values = torch.randn(b * per_row + 3, kv_heads, size, d, generator=g).to(dtype)
    table = torch.randperm(len(keys), generator=g)[:b * per_row].view(b, per_row).contiguous()
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g)
    angles = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    mask = None
    if masking == "window":  # row 0 sees 401..700: its first chunk not at all
        mask = torch.arange(pos + 1)[None] > positions[:, None] - 300
    elif masking == "padded":
        mask = torch.ones(b, pos + 1, dtype=torch.bool)
        mask[0, :300] = False
        mask[2, :10] = False
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = rotate_interleaved(q.view(b, 1, heads, d).transpose(1, 2), cos[:, None], sin[:, None]).to(dtype).float()
    k = rotate_interleaved(k.view(b, 1, kv_heads, d).transpose(1, 2), cos[:, None], sin[:, None]).to(dtype)
    v = v.view(b, 1, kv_heads, d).transpose(1, 2).to(dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = []
    for row, p in enumerate(positions.tolist()):
        block, at = table[row, p // size], p % size
        ref_keys[block, :, at], ref_values[block, :, at] = k[row, :, 0], v[row, :, 0]
        order = table[row, :p // size + 1]
        rk, rv = (c[order].transpose(0, 1).reshape(kv_heads, -1, d)[None, :, :p + 1].float()
                  for c in (ref_keys, ref_values))
        m = None if mask is None else mask[row:row + 1, None, None, :p + 1]
        expected.append(decode_attention(q[row:row + 1], rk, rv, m, 0.3).to(dtype).float().reshape(heads * d))
    out = kernels.attend(qkv, heads, kv_heads, cos, sin, True, keys, values, pos, mask, 0.3, table, positions)
    close(out, torch.stack(expected), 1e-5 if dtype == torch.float32 else 1e-2, f"{masking} attention output")
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # a rotated k rounds to bf16: a tie may go either way
    torch.testing.assert_close(keys.float(), ref_keys.float(), rtol=tol, atol=tol)  # written at each row's position
    assert torch.equal(values.float(), ref_values.float())

@needs_kernels
@needs_kernels
def test_decode_attention_step_used_and_matches_past_a_sliding_window(monkeypatch):
    """PhiMoE with a sliding window shorter than the cached sequence: the decode steps run in one C call a layer
    (kernels.decode_layer) or a step (kernels.decode_layers), or with the layers op by op kernels.attend, each with
    the window's mask, and give the reference path's logits."""
    config = tiny_config("phimoe")
    config.sliding_window = 5
    ref = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False).eval()
    randomise(ref, seed=3)
    fast = moelm.AutoModelForCausalLM.from_config(config).eval()
    fast.load_state_dict(ref.state_dict())  # copied into the fused tensors' views
    calls = []
    attend, layer, layers = kernels.attend, kernels.decode_layer, kernels.decode_layers
    monkeypatch.setattr(kernels, "attend", lambda *a: calls.append(("attend", a[9] is not None)) or attend(*a))
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(("layer", a[7] is not None)) or layer(*a))
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: calls.append(("layers", a[6] is not None)) or layers(*a))
    ids, mask = prompts(batch=2, seq=6, pads=(2, 0), seed=21)
    new = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(22))
    b = prefill_then_decode(ref, ids, mask, new, DynamicCache())
    # the first step runs each layer's call (they are measured first; here forced), the whole step in one after
    for forced, want in (("gemv", [("layer", True)] * config.num_hidden_layers + [("layers", True)] * 4),
                         ("gemv,decode_layer=torch", [("attend", True)] * 5 * config.num_hidden_layers)):
        calls.clear()
        with kernels_forced(forced):
            a = prefill_then_decode(fast, ids, mask, new, static_cache(fast, 2, 16))
        assert calls == want, f"MOELM_KERNELS={forced}: decode steps' C calls {calls}"
        close(a, b, 1e-5, f"sliding-window decode, MOELM_KERNELS={forced}")


def fp32_scales(quantize):
    """quantize() with int4 scales that are no fp16 values (as a checkpoint's fp32 ones may be): the modules they
    load into keep fp32 scales."""
    def wrapped(w, mode, group_size=64):
        q, s = quantize(w, mode, group_size)
        return (q, s.float() * (1 + 2 ** -20)) if mode == "int4" else (q, s)
    return wrapped


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
@pytest.mark.parametrize("mode", (None, "int8", "int4", "int4-fp32"), ids=("fp32", "int8", "int4", "int4-fp32"))
@pytest.mark.parametrize("family", ("ernie4_5", "ernie4_5_moe", "phimoe"))
def test_decode_layer_used_and_matches_the_per_op_path(family, mode, monkeypatch):
    """Decode steps run each decoder layer as one kernels.decode_layer call (the dense SwiGLU or the MoE block
    inside it) for up to 16 rows when that is the path chosen for the layer (here forced; forced the other way,
    the layer goes op by op), with padding: the RMSNorm families, and PhiMoE with its LayerNorms (with biases).
    Each layer's step equals the same layer run op by op; whole decodes equal the op-by-op model (and in fp32 the
    reference path). int4 scales are fp16 (what moelm quantizes to), or fp32 (int4-fp32)."""
    if mode == "int4-fp32":
        with monkeypatch.context() as m:
            m.setattr(quantization, "quantize", fp32_scales(quantization.quantize))
            model = load(family, fresh=True, quantization="int4")
        scales = {m.scale.dtype for m in model.modules() if isinstance(m, QuantizedLinear)}
        assert scales == {torch.float32}
        mode = "int4"
    else:
        model = load(family, quantization=mode) if mode else load(family)
    ref = load(family, fast=False)
    layers = model.config.num_hidden_layers
    dense = sum(isinstance(getattr(layer, layer.mlp_name), MLP) for layer in model.model.layers)
    assert (0 < dense, dense < layers) == {"ernie4_5": (True, False), "ernie4_5_moe": (True, True),
                                           "phimoe": (False, True)}[family]
    calls = []
    count_layer_calls(monkeypatch, lambda spec, x: calls.append(bool(spec.gate_up)))
    limit = kernels.MAX_ROWS  # the gemv kernel is forced wherever it applies
    # Whole decodes: the C SiLU and PyTorch's differ in the last bit, and with int8/int4 weights that can move an
    # activation across an int16 rounding boundary (see check_gemv) in a later layer or step: then the bound of
    # test_quantized_decode_matches_prefill_and_fallback applies. The per-layer check below is exact to 1e-5.
    rel = {None: 1e-5, "int8": 5e-4, "int4": 1.5e-3}[mode]
    for batch, pads in ((1, (0,)), (3, (2, 0, 4)), (6, (1, 0, 0, 3, 0, 2)), (10, (0, 2) + (0,) * 7 + (5,))):
        ids, mask = prompts(batch=batch, seq=7, pads=pads, seed=31 + batch)
        new = torch.randint(3, VOCAB, (batch, 4), generator=torch.Generator().manual_seed(32 + batch))
        calls.clear()
        cache = static_cache(model, batch, 16)
        fast = prefill_then_decode(model, ids, mask, new, cache)
        if batch <= limit:
            assert len(calls) == 4 * layers and sum(calls) == 4 * dense, f"decode_layer calls for {batch} rows"
        calls.clear()
        with kernels_forced("decode_layer=torch"):  # the op-by-op layer chosen: no decode_layer call
            prefill_then_decode(model, ids, mask, new, static_cache(model, batch, 16))
        assert not calls, f"{batch} rows: the op-by-op layer was chosen, yet decode_layer ran"
        with monkeypatch.context() as m:
            op_by_op(m)
            per_op = prefill_then_decode(model, ids, mask, new, static_cache(model, batch, 16))
        close(fast, per_op, rel, f"{family} {mode} batch {batch}: decode_layer vs op by op")
        if mode is None:
            close(fast, prefill_then_decode(ref, ids, mask, new, DynamicCache()), 1e-5, f"{family} vs reference")
        if batch <= limit:
            _check_layer_steps(model, cache, F.pad(mask, (0, new.shape[1]), value=1), seed=batch)


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
@pytest.mark.parametrize("family, mode", [(f, m) for f in ("ernie4_5", "ernie4_5_moe")
                                          for m in (None, "int4", "bfloat16")] + [("phimoe", None), ("phimoe", "int4")])
def test_decode_layer_checks_several_tokens_per_row(family, mode, monkeypatch):
    """A step of S tokens per row after the prompt (a speculative check) runs each layer as one decode_layer call of
    B * S rows, token j of row b at position past + j attending causally, with left padding; its logits and the
    step after it (from the cache it wrote) equal the layer op by op."""
    kwargs = {"dtype": torch.bfloat16} if mode == "bfloat16" else {"quantization": mode} if mode else {}
    model = load(family, **kwargs)
    rows = []
    count_layer_calls(monkeypatch, lambda spec, x: rows.append(x.shape[0]))
    rel = {None: 1e-5, "int4": 1.5e-3, "bfloat16": 3e-2}[mode]
    for batch, pads, s in ((1, (0,), 2), (1, (0,), 5), (3, (2, 0, 4), 3), (2, (0, 3), 8)):
        ids, mask = prompts(batch=batch, seq=7, pads=pads, seed=40 + s)
        new = torch.randint(3, VOCAB, (batch, s + 1), generator=torch.Generator().manual_seed(41 + s))

        @torch.no_grad()
        def run():
            cache = static_cache(model, batch, 24)
            out = model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache, use_cache=True)
            m = F.pad(mask, (0, s), value=1)
            pos = positions(m)[:, -s:]
            check = model(new[:, :s], attention_mask=m, position_ids=pos, past_key_values=out.past_key_values,
                          use_cache=True).logits
            m = F.pad(m, (0, 1), value=1)
            after = model(new[:, s:], attention_mask=m, position_ids=pos[:, -1:] + 1, past_key_values=cache,
                          use_cache=True).logits
            return torch.cat([check, after], 1).float()

        rows.clear()
        fast = run()
        assert batch * s in rows, f"no decode_layer call of {batch} x {s} rows: {rows}"
        with monkeypatch.context() as m:
            op_by_op(m)
            per_op = run()
        close(fast, per_op, rel, f"{family} {mode}: {batch} rows x {s} tokens, decode_layer vs op by op")


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
@pytest.mark.parametrize("family, mode", [(f, m) for f in ("ernie4_5", "ernie4_5_moe")
                                          for m in (None, "int8", "int4", "bfloat16")]
                         + [("phimoe", m) for m in (None, "int8", "int4")])
def test_whole_step_in_one_call_is_the_layers_calls(family, mode, monkeypatch):
    """A decoding step through every layer in one kernels.decode_layers call gives bit for bit what the layers'
    own decode_layer calls give (MOELM_KERNELS=decode_step=layers): each step's logits and router logits and the
    cache, one token per row with padding, then several per row (a speculative check). A hook on a layer takes the
    step back to the layers' own calls (the hook runs); removed, the whole step returns."""
    kwargs = {"dtype": torch.bfloat16} if mode == "bfloat16" else {"quantization": mode} if mode else {}
    model = load(family, **kwargs)
    whole = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: whole.append(a[2].shape[0]) or real(*a))
    ids, mask = prompts(batch=3, seq=7, pads=(2, 0, 4), seed=61)
    new = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(62))
    moe = family != "ernie4_5"

    @torch.no_grad()
    def run(new=new):
        cache = static_cache(model, 3, 24)
        out = model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache, use_cache=True)
        m, logits, routers = mask, [], []
        for t in range(3):
            m = F.pad(m, (0, 1), value=1)
            out = model(new[:, t:t + 1], attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True, output_router_logits=moe)
            logits.append(out.logits)
            routers += list(out.router_logits or ())
        m = F.pad(m, (0, 3), value=1)
        out = model(new[:, 3:], attention_mask=m, position_ids=positions(m)[:, -3:], past_key_values=cache,
                    use_cache=True, output_router_logits=moe)
        logits.append(out.logits)
        routers += list(out.router_logits or ())
        return torch.cat(logits, 1), routers, [cache.keys[i].clone() for i in range(len(cache.keys))]

    run(new.flip(0))  # the layers' paths chosen (forced: gemv) at the first steps, on other tokens
    whole.clear()
    one = run()
    assert whole == [3] * 3 + [9], f"steps in one decode_layers call: {whole}"
    with kernels_forced("gemv,decode_step=layers"):
        whole.clear()
        each = run()
        assert not whole
    for a, b in zip([one[0], *one[1], *one[2]], [each[0], *each[1], *each[2]], strict=True):
        assert torch.equal(a, b)
    assert len(one[1]) == 4 * sum(hasattr(getattr(layer, layer.mlp_name), "experts") for layer in model.model.layers)
    hooked = []
    handle = model.model.layers[1].register_forward_hook(lambda *a: hooked.append(1))
    try:
        whole.clear()
        with_hook = run()
        assert not whole and len(hooked) == 5
    finally:
        handle.remove()
    assert torch.equal(with_hook[0], one[0])
    whole.clear()
    run()
    assert whole == [3] * 3 + [9]


def test_optimized_model_pickles_and_copies():
    """optimize() makes the base model a FastDecoderModel subclass kept in moelm.inference.modules (under the
    family's class name, as type(model).__name__ and the repr show it): a model pickles (torch.save), copies and
    unpickles to the same class and outputs."""
    import io
    import pickle

    model = load("ernie4_5_moe")
    assert isinstance(model.model, moelm.inference.modules.FastDecoderModel)
    assert type(model.model).__name__ == "Ernie4_5_MoeModel" and "(model): Ernie4_5_MoeModel(" in repr(model)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(twin.model) is type(model.model)
        with torch.no_grad():
            close(twin(ids).logits, model(ids).logits, 1e-6, "a copy")


def _close_fp32(a: torch.Tensor, b: torch.Tensor, what: str):
    close(a, b, 1e-5, what)


def _close_bf16(a: torch.Tensor, b: torch.Tensor, what: str):
    """Two bf16 computations with the same rounding points: equal but where an fp32 value before a rounding differs
    in its last bits (summation order) and lands on the other side of a bf16 step: a few elements, one step."""
    a, b = a.float(), b.float()
    step = b.abs().clamp(min=1e-30) * 2**-7  # one bf16 step is at most 2^-7 of the value
    differ = a != b
    assert float(differ.float().mean()) <= 0.01, f"{what}: {float(differ.float().mean()):.1%} of elements differ"
    assert bool(((a - b).abs() <= step + 1e-6 * float(b.abs().max())).all()), f"{what}: more than one bf16 step"


@torch.no_grad()
def _check_layer_steps(model, cache: StaticCache, mask: torch.Tensor, seed: int, same=_close_fp32):
    """One more position for every layer from random hidden states: decode_layer_step == the layer op by op (the
    output, the post-attention norm for MoE layers run after the call, the router logits of those run in it, the
    cache rows written)."""
    pos = cache.get_seq_length()
    batch = mask.shape[0]
    mask = F.pad(mask, (0, 1), value=1)
    dtype = model.get_input_embeddings().weight.dtype
    x = (torch.randn(batch, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    cos_sin = model.model.rotary(x, mask.sum(-1, keepdim=True) - 1)
    mask4 = mask.bool()[:, None, None, :]
    for layer in model.model.layers:
        i = layer.self_attn.layer_idx
        twin = copy.deepcopy(cache)
        y, h, logits = decode.decode_layer_step(layer, x, cos_sin, mask4, cache)
        a, _ = layer.self_attn(layer.input_layernorm(x), cos_sin, mask4, twin)
        expected = x + a
        normed = layer.post_attention_layernorm(expected)
        if h is None:  # the dense MLP or the MoE block in the call
            out = getattr(layer, layer.mlp_name)(normed)
            assert isinstance(out, tuple) == (logits is not None)
            if logits is not None:
                out, want = out
                assert logits.dtype == want.dtype
                if logits.dtype == torch.bfloat16:  # PhiMoE's bf16 Linear: its sums in another order, then rounded
                    same(logits, want, f"layer {i} router logits")
                else:  # fp32: ERNIE's fp32 router in bf16 models too
                    close(logits, want, 1e-5, f"layer {i} router logits")
            expected = expected + out
        else:
            same(h, normed, f"layer {i} post-attention norm")
        assert y.dtype == expected.dtype == dtype
        same(y, expected, f"layer {i} output")
        same(cache.keys[i][:, :, :pos + 1], twin.keys[i][:, :, :pos + 1], f"layer {i} keys")
        assert torch.equal(cache.values[i][:, :, :pos + 1], twin.values[i][:, :, :pos + 1])


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
@pytest.mark.parametrize("family", ("ernie4_5", "ernie4_5_moe", "phimoe"))
def test_decode_layer_bf16_rounds_where_pytorch_does(family, monkeypatch):
    """bf16 models decode through decode_layer_bf16, which rounds to bf16 after every step PyTorch's bf16 ops round
    (norm, its weight, projections, rotation, attention output, residual adds, SiLU, the gate product): each layer
    gives the op-by-op result but for rare one-step differences (_close_bf16), and whole decodes pick the same
    tokens as the op-by-op model."""
    model = load(family, dtype="bfloat16")
    layers = model.config.num_hidden_layers
    calls = []
    count_layer_calls(monkeypatch, lambda spec, x: calls.append(x.dtype))
    for batch, pads in ((1, (0,)), (3, (2, 0, 4))):
        ids, mask = prompts(batch=batch, seq=7, pads=pads, seed=51 + batch)
        new = torch.randint(3, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(52 + batch))
        calls.clear()
        cache = static_cache(model, batch, 16)
        fast = prefill_then_decode(model, ids, mask, new, cache)
        assert calls == [torch.bfloat16] * 6 * layers
        with monkeypatch.context() as m:
            op_by_op(m)
            per_op = prefill_then_decode(model, ids, mask, new, static_cache(model, batch, 16))
        assert torch.equal(fast.argmax(-1), per_op.argmax(-1))
        close(fast, per_op, 2e-2, f"{family} bf16 batch {batch}: decode_layer vs op by op")
        _check_layer_steps(model, cache, F.pad(mask, (0, new.shape[1]), value=1), seed=batch, same=_close_bf16)


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
def test_decode_layer_follows_replaced_weights():
    """The pointers handed to C are rebuilt when a parameter is replaced (a new Parameter, or new .data) or a
    module swapped; weights changed in place need nothing. Model copies carry no pointers."""
    model, ref = load("ernie4_5", fresh=True), load("ernie4_5", fresh=True, fast=False)
    ids, mask = prompts(batch=2, seq=5, pads=(1, 0), seed=41)
    new = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(42))
    prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 12))  # plans built
    g = torch.Generator().manual_seed(43)
    with torch.no_grad():
        for m in (model, ref):
            layers = m.model.layers
            layers[0].self_attn.o_proj.weight = nn.Parameter(torch.randn(64, 64, generator=g.manual_seed(1)))
            layers[1].post_attention_layernorm.weight.data = torch.rand(64, generator=g.manual_seed(2)) + 0.5
            layers[1].mlp.down_proj.weight.mul_(-1.5)
            replaced = nn.Linear(64, 128, bias=True)
            replaced.weight.copy_(layers[1].mlp.up_proj.weight)
            replaced.bias.copy_(layers[1].mlp.up_proj.bias)
            layers[0].mlp.down_proj, layers[1].mlp.down_proj = layers[1].mlp.down_proj, layers[0].mlp.down_proj
    a = prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 12))
    close(a, prefill_then_decode(ref, ids, mask, new, DynamicCache()), 1e-5, "after replacing weights")
    twin = copy.deepcopy(model)
    close(prefill_then_decode(twin, ids, mask, new, static_cache(twin, 2, 12)), a, 1e-6, "deep copy")


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
def test_decode_layer_not_used_with_eager_attention(monkeypatch):
    """attn_implementation="eager" keeps the reference's explicit attention (bf16 scores are bf16 matmuls there),
    as the attention-only C step does."""
    model = load("ernie4_5", attn_implementation="eager")
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: pytest.fail("decode_layer used with eager attention"))
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: pytest.fail("decode_layers used with eager attention"))
    ids, mask = prompts(batch=2, seq=5, pads=(1, 0), seed=44)
    new = torch.randint(3, VOCAB, (2, 2), generator=torch.Generator().manual_seed(45))
    prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 8))


# ------------------------------------------------------------------ 4. StaticCache vs DynamicCache

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_static_cache_generate_matches_dynamic(family):
    model = load(family)
    ids, mask = prompts(batch=2, seq=8, pads=(2, 0), seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, return_dict_in_generate=True,
              output_scores=True)
    runs = {impl: model.generate(ids, cache_implementation=impl, do_sample=False, **kw)
            for impl in ("static", "dynamic")}
    assert isinstance(runs["static"].past_key_values, StaticCache)
    assert isinstance(runs["dynamic"].past_key_values, DynamicCache)
    assert torch.equal(runs["static"].sequences, runs["dynamic"].sequences)
    for s, d in zip(runs["static"].scores, runs["dynamic"].scores, strict=True):
        close(s, d, 1e-5, "scores")
    default = model.generate(ids, do_sample=False, **kw)
    assert isinstance(default.past_key_values, StaticCache), "generate's default cache should be the static one"

    beams = {impl: model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, num_beams=3,
                                  num_return_sequences=2, cache_implementation=impl) for impl in ("static", "dynamic")}
    assert torch.equal(beams["static"], beams["dynamic"])

    one = model.generate(ids[1:], max_new_tokens=10, cache_implementation="static", do_sample=False)
    assert torch.equal(one, model.generate(ids[1:], max_new_tokens=10, cache_implementation="dynamic",
                                           do_sample=False))

    sampled = []
    for impl in ("static", "dynamic"):
        torch.manual_seed(99)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, do_sample=True,
                                      top_k=20, cache_implementation=impl))
    assert torch.equal(*sampled)


def test_invalid_cache_implementation_rejected():
    model = load("ernie4_5")
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, cache_implementation="paged")


def test_static_cache_update_beyond_max_length_raises():
    config = tiny_config("ernie4_5")
    cache = StaticCache(config, 2, 5, torch.float32)
    shape = (2, config.num_key_value_heads, 3, config.head_size)
    k, v = torch.randn(shape), torch.randn(shape)
    for layer in range(config.num_hidden_layers):
        cache.update(k, v, layer)
    with pytest.raises(ValueError, match=r"holds 5 positions; 6 were asked for"):
        cache.update(k, v, 0)
    # a failed update changes nothing: 2 more positions still fit
    assert cache.get_seq_length(0) == 3
    k2, v2 = cache.update(k[:, :, :2], v[:, :, :2], 0)
    assert k2.shape[-2] == 5 and torch.equal(k2[:, :, 3:], k[:, :, :2]) and torch.equal(v2[:, :, :3], v)


def _filled_caches(config, batch: int, steps: list[int], seed: int = 0):
    static, dynamic = StaticCache(config, batch, 32, torch.float32), DynamicCache()
    g = torch.Generator().manual_seed(seed)
    for n in steps:
        for layer in range(config.num_hidden_layers):
            shape = (batch, config.num_key_value_heads, n, config.head_size)
            k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            ks, vs = static.update(k, v, layer)
            kd, vd = dynamic.update(k, v, layer)
            assert torch.equal(ks, kd) and torch.equal(vs, vd)
    return static, dynamic


def _assert_same_cache(static, dynamic, config, batch, seed=1):
    """Both caches give the same keys/values after one more update."""
    assert static.get_seq_length() == dynamic.get_seq_length()
    g = torch.Generator().manual_seed(seed)
    for layer in range(config.num_hidden_layers):
        shape = (batch, config.num_key_value_heads, 1, config.head_size)
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ks, vs = static.update(k, v, layer)
        kd, vd = dynamic.update(k, v, layer)
        assert torch.equal(ks, kd) and torch.equal(vs, vd), layer


def test_static_cache_crop_and_reorder_match_dynamic():
    config = tiny_config("ernie4_5")
    static, dynamic = _filled_caches(config, 3, [4, 1, 1])
    assert static.get_seq_length() == 6 and len(static) == config.num_hidden_layers
    static.crop(4)
    dynamic.crop(4)
    assert static.get_seq_length() == 4
    _assert_same_cache(static, dynamic, config, 3)
    static.crop(10)  # longer than the cache: nothing changes
    dynamic.crop(10)
    assert static.get_seq_length() == 5

    beam_idx = torch.tensor([2, 0, 0])
    static.reorder_cache(beam_idx)
    dynamic.reorder_cache(beam_idx)
    _assert_same_cache(static, dynamic, config, 3, seed=2)
    assert static.get_seq_length() == 6


def test_static_cache_negative_crop_matches_dynamic():
    """DynamicCache.crop(-n) drops the last n positions (as transformers' caches do, for assisted decoding); the
    StaticCache, generate's default, must do the same rather than store a negative length."""
    config = tiny_config("ernie4_5")
    static, dynamic = _filled_caches(config, 2, [5])
    dynamic.crop(-2)
    assert dynamic.get_seq_length() == 3
    static.crop(-2)
    assert static.get_seq_length() == 3
    _assert_same_cache(static, dynamic, config, 2)


# ------------------------------------------------------------------ 5. fused projections

def _fused_pairs(model):
    """(module, Fused, [projections]) for every Attention and MLP."""
    pairs = []
    for module in model.modules():
        if isinstance(module, Attention):
            pairs.append((module, getattr(module, "fused_qkv", None), [module.q_proj, module.k_proj, module.v_proj]))
        elif isinstance(module, MLP):
            pairs.append((module, getattr(module, "fused_gate_up", None), [module.gate_proj, module.up_proj]))
    return pairs


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_projections_view_one_weight(family):
    model, ref = load(family), load(family, fast=False)
    pairs = _fused_pairs(model)
    assert pairs and all(fused is not None for _, fused, _ in pairs)
    assert all(fused is None for _, fused, _ in _fused_pairs(ref))  # the plain modules have none
    has_bias = family != "ernie4_5_moe"
    x = torch.randn(1, 2, model.config.hidden_size)
    for module, fused, projections in pairs:
        fw = fused.module.weight
        with torch.no_grad():
            assert linears.fused_ready(fused, x)
        assert not linears.fused_ready(fused, x)  # gradients enabled: the separate projections
        start = fw.data_ptr()
        names = ["weight"] + (["bias"] if has_bias else [])
        assert (projections[0].bias is not None) == has_bias
        offset = {name: 0 for name in names}
        for proj in projections:
            for name in names:
                whole, part = getattr(fused.module, name), getattr(proj, name)
                assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr(), "not a view"
                assert part.data_ptr() == whole.data_ptr() + offset[name] * part.element_size(), name
                offset[name] += part.numel()
            assert isinstance(proj.weight, nn.Parameter)
        assert offset["weight"] == fw.numel() and fw.data_ptr() == start
    # the same numbers as the unfused model: state_dict keys and tensors unchanged
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    for key in sd:
        assert torch.equal(sd[key], sd_ref[key]), key


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_model_save_round_trip(family, tmp_path):
    model, ref = load(family), load(family, fast=False)
    model.save_pretrained(tmp_path)
    back = moelm.AutoModelForCausalLM.from_pretrained(tmp_path, fast=False)
    ids, mask = prompts(seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    for (key, a), (key_b, b) in zip(back.state_dict().items(), ref.state_dict().items(), strict=True):
        assert key == key_b and torch.equal(a, b), key


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_load_state_dict_updates_the_fused_weight(family):
    """The projections are views of the fused weight: loading new values into them reaches the fused matmul."""
    model = load(family, fresh=True)
    other = moelm.AutoModelForCausalLM.from_config(tiny_config(family), seed=1, fast=False)
    randomise(other, seed=1)
    model.load_state_dict(other.state_dict())
    ids, mask = prompts(seed=4)
    with torch.no_grad():
        assert all(linears.fused_ready(f, ids) for _, f, _ in _fused_pairs(model))
        close(model(ids, attention_mask=mask).logits[mask.bool()],
              other(ids, attention_mask=mask).logits[mask.bool()], 1e-5, "after load_state_dict")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cast_model_stops_using_the_fused_weight(family):
    ids, mask = prompts(seed=5)
    valid = mask.bool()
    model = load(family, fresh=True).to(torch.float64)
    ref = load(family, fresh=True, fast=False).to(torch.float64)
    with torch.no_grad():
        x = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.float64)
        assert not any(linears.fused_ready(f, x) for _, f, _ in _fused_pairs(model))
        a, b = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        assert a.dtype == torch.float64
        close(a[valid], b[valid], 1e-10, "float64")
        new = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
        decoded = prefill_then_decode(model, ids, mask, new, DynamicCache())
        # the same row counts as the reference's own decode: every matmul has the same shapes, so float64 holds
        close(decoded, prefill_then_decode(ref, ids, mask, new, DynamicCache()), 1e-9, "float64 decode")
        # against one forward over the whole sequence: ERNIE's router is fp32 in any dtype (as the reference), and
        # an fp32 matmul may sum in another order for 2 rows than for 30 (MKL picks kernels by shape and CPU): its
        # H-term dot products then differ by up to H * 2^-24 of their size, and so may the routing weights
        rel = model.config.hidden_size * 2.0**-24 if family == "ernie4_5_moe" else 1e-9
        close(decoded, full_logits(ref, ids, mask, new), rel, "float64 decode vs full forward")

    model, ref = model.half(), ref.half()
    with torch.no_grad():
        x = torch.zeros(1, 1, model.config.hidden_size, dtype=torch.float16)
        assert not any(linears.fused_ready(f, x) for _, f, _ in _fused_pairs(model))
        a, b = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        assert a.dtype == torch.float16 and torch.isfinite(a[valid]).all()
        close(a[valid], b[valid], 2e-2, "float16")
        if family == "ernie4_5":  # no routing that a float16 perturbation could flip
            fp32 = load(family, fast=False)(ids, attention_mask=mask).logits
            close(a[valid], fp32[valid], 5e-2, "float16 vs float32")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_model_trains(family):
    """Fusion is inference-only: with gradients the separate projections run and their weights get gradients,
    the same as without the fast paths."""
    ids, mask = prompts(batch=2, seq=6, pads=(0, 0), seed=6)  # 12 rows: few enough for the decode kernel
    grads = []
    for fast in (True, False):
        model = load(family, fresh=True, fast=fast)
        with torch.enable_grad():
            out = model(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
        layer = model.model.layers[0]
        attn, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
        assert attn.q_proj.weight.grad is not None and bool(attn.q_proj.weight.grad.abs().sum() > 0)
        assert attn.v_proj.weight.grad is not None
        named = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if isinstance(mlp, MLP):
            assert mlp.up_proj.weight.grad is not None
        grads.append(named)
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        close(grads[0][name], grads[1][name], 1e-4, name)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_model_gradients_reach_trainable_weights_behind_frozen_layers(family):
    """Fine-tuning only some weights (here the LM head and the last layer's q_proj) with a short batch: the hidden
    states do not require grad, the weights do. The decode kernel (no autograd) must not be used then."""
    ids = prompts(batch=1, seq=8, pads=(0,), seed=8)[0]  # 8 rows: within the kernel's row limit
    trainable = ("lm_head.weight", f"model.layers.{tiny_config(family).num_hidden_layers - 1}.self_attn.q_proj.weight")
    grads = []
    for fast in (True, False):
        model = load(family, fresh=True, fast=fast)
        if getattr(model.config, "tie_word_embeddings", False):
            trainable_here = trainable[1:]
        else:
            trainable_here = trainable
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable_here)
        with torch.enable_grad():
            loss = model(ids, labels=ids).loss
            assert loss.requires_grad, f"fast={fast}: the loss has no grad_fn"
            loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if n in trainable_here}
        assert all(g is not None for g in got.values()), f"fast={fast}: {got}"
        grads.append(got)
    for name in grads[0]:
        close(grads[0][name], grads[1][name], 1e-4, name)


# ------------------------------------------------------------------ 6. quantization while loading

def _assert_quantized(model, ref, mode: str):
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == [], f"nn.Linear left after {mode} quantization: {linears}"
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    ref_linears = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
    assert ref_linears <= set(qlinears), ref_linears - set(qlinears)
    assert "lm_head" in qlinears
    for name, m in qlinears.items():
        assert m.mode == mode
        assert m.qweight.dtype == (torch.int8 if mode == "int8" else torch.uint8), name
        assert m.scale.dtype == (torch.float32 if mode == "int8" else torch.float16), name
    ref_experts = [n for n, m in ref.named_modules() if isinstance(m, Experts)]
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    assert experts == ref_experts and not any(isinstance(m, Experts) for m in model.modules())
    # routers (and everything else that is not a Linear / experts) are untouched
    ref_params = dict(ref.named_parameters())
    gates = [n for n in ref_params if n.endswith("gate.weight")]
    assert bool(gates) == (ref.config.model_type != "ernie4_5")
    params = dict(model.named_parameters())
    for name in gates + [n for n in ref_params if "norm" in n or "embed" in n or "e_score" in n]:
        assert params[name].dtype == ref_params[name].dtype and torch.equal(params[name], ref_params[name]), name
    assert model.quantization.mode == mode


@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_loading_replaces_linears_and_experts(family, mode):
    model, ref = load(family, quantization=mode), load(family, fast=False)
    _assert_quantized(model, ref, mode)
    # the quantized weights are those of the checkpoint's
    group = model.model.layers[0].self_attn.q_proj.group_size
    q, s = quantize(ref.model.layers[0].self_attn.o_proj.weight, mode, group)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.qweight, q)
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.scale, s)
    if not getattr(ref.config, "tie_word_embeddings", False):
        q, s = quantize(ref.lm_head.weight, mode, model.lm_head.group_size or 64)
        assert torch.equal(model.lm_head.qweight, q)
    if model.lm_head.bias is not None:
        assert torch.equal(model.lm_head.bias, ref.lm_head.bias)
    for layer, ref_layer in zip(model.model.layers, ref.model.layers):
        block = getattr(layer, layer.mlp_name)
        if isinstance(getattr(block, "experts", None), QuantizedExperts):
            qe, fe = block.experts, getattr(ref_layer, ref_layer.mlp_name).experts
            gq, gs = qe.stacked("gate_up_proj")
            q, s = quantize(fe.gate_up_proj, mode, qe.group_size or 64)
            assert torch.equal(gq, q) and torch.equal(gs, s)
            dq, ds = qe.stacked("down_proj")
            q, s = quantize(fe.down_proj, mode, qe.group_size or 64)
            assert torch.equal(dq, q) and torch.equal(ds, s)


# Mean KL(fp32 || quantized) bounds, about 3-10x what was measured (dense / ERNIE MoE / PhiMoE: int8 5e-5 / 8e-5 /
# 2e-3, int4 1.6e-2 / 2.9e-2 / 2.9e-2). The MoE families are higher: a slightly different hidden state can pick
# another expert (PhiMoE's sparsemixer especially), a discrete change that no weight format avoids.
KL_BOUNDS = {"ernie4_5": {"int8": 5e-4, "int4": 5e-2}, "ernie4_5_moe": {"int8": 1e-3, "int4": 0.1},
             "phimoe": {"int8": 1e-2, "int4": 0.1}}


@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_next_token_distribution_close_to_fp32(family, mode):
    bound = KL_BOUNDS[family][mode]
    model, ref = load(family, quantization=mode), load(family, fast=False)
    ids, mask = prompts(batch=4, seq=16, pads=(0, 2, 0, 5), seed=11)
    valid = mask.bool()
    with torch.no_grad():
        kl = mean_kl(ref(ids, attention_mask=mask).logits[valid], model(ids, attention_mask=mask).logits[valid])
        # the decode path (gemv on the packed weights) too
        new = torch.randint(3, VOCAB, (4, 4), generator=torch.Generator().manual_seed(12))
        kl_decode = mean_kl(full_logits(ref, ids, mask, new),
                            prefill_then_decode(model, ids, mask, new, static_cache(model, 4, 24)))
    assert 0 < kl < bound, f"{family} {mode}: mean KL {kl:.2e}"
    assert 0 < kl_decode < bound, f"{family} {mode}: decode mean KL {kl_decode:.2e}"


def _dequantized_copy(model, ref):
    """ref (the float model of the same checkpoint) with every quantized weight of `model` put in dequantized."""
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantizedExperts):
                for proj in ("gate_up_proj", "down_proj"):
                    getattr(mods[name], proj).copy_(dequantize(*m.stacked(proj), m.group_size))
            elif isinstance(m, QuantizedLinear) and name in mods and isinstance(mods[name], nn.Linear):
                # a new parameter: a tied LM head is quantized apart from the embedding
                mods[name].weight = nn.Parameter(dequantize(m.qweight, m.scale, m.group_size))
    return ref


@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_forward_with_gradients_keeps_no_dequantized_weight(family, mode):
    """A forward that tracks gradients (model(...) outside no_grad) holds no dequantized weight for the backward:
    it makes it again there (at full size the copies were 12 GB: a 21B-A3B int4 process was killed), and the
    gradients are those of the float model with the dequantized weights."""
    model, ref = load(family, fresh=True, quantization=mode), load(family, fresh=True, fast=False)
    _dequantized_copy(model, ref)
    weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)}
    weights |= {tuple(m.shapes[p]) for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.shapes}
    saved = []

    def pack(t):
        if t.is_floating_point():
            saved.append(tuple(t.shape))
        return t
    ids = prompts(batch=1, seq=7, pads=(0,), seed=21)[0]  # 7 rows: no activation has a weight's shape
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    kept = [shape for shape in saved if shape in weights]
    assert saved and not kept, f"dequantized weights kept for the backward: {kept}"
    loss.backward()
    with torch.enable_grad():
        ref(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got and set(got) <= set(grads), set(got) - set(grads)
    assert any("norm" in n for n in got) and any("embed" in n for n in got)
    for name in got:
        close(got[name], grads[name], 1e-4, name)


@pytest.mark.usefixtures("gemv_forced")
@needs_kernels
@pytest.mark.parametrize("mode", ("int8", "int4"))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_decode_matches_prefill_and_fallback(family, mode, monkeypatch):
    """One-token steps (gemv on packed weights, experts by `select`) == one long forward (dequantized matmul,
    > 16 rows and > 64 expert pairs) == the same steps without the kernels."""
    model = load(family, quantization=mode)
    ids, mask = prompts(batch=2, seq=4, pads=(1, 0), seed=13)
    new = torch.randint(3, VOCAB, (2, 36), generator=torch.Generator().manual_seed(14))
    # Both integer kernels round each group of activations to int16 (see check_gemv): measured after all the
    # layers, ~1e-4 of the logit scale for int8 and ~3e-4 for int4 (the prefill and the fallback are fp32).
    rel = 5e-4 if mode == "int8" else 1.5e-3
    full = full_logits(model, ids, mask, new)  # 80 rows
    with count_gemv() as calls:
        steps = prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 48))
    assert calls[0] > 0
    close(steps, full, rel, f"{family} {mode} decode vs prefill")
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)

    monkeypatch.setattr(kernels, "_lib", None)  # as with MOELM_NO_KERNELS=1
    assert not kernels.available()
    fallback = prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 48))
    close(steps, fallback, rel, f"{family} {mode} kernels vs fallback")
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                              pad_token_id=PAD))


@pytest.mark.usefixtures("gemv_forced")  # both models on the same path
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_fused_projections(family):
    """q/k/v and gate/up of a quantized model are fused too: packed weights and scales concatenated, the
    projections' buffers views of them."""
    model = load(family, quantization="int8")
    pairs = _fused_pairs(model)
    assert pairs
    x = torch.zeros(1, 1, model.config.hidden_size)
    for _, fused, projections in pairs:
        assert fused is not None and fused.quantized
        with torch.no_grad():
            assert linears.fused_ready(fused, x)
        offset = 0
        for proj in projections:
            assert isinstance(proj, QuantizedLinear)
            assert proj.qweight.untyped_storage().data_ptr() == fused.module.qweight.untyped_storage().data_ptr()
            assert proj.qweight.data_ptr() == fused.module.qweight.data_ptr() + offset
            offset += proj.qweight.numel()
    unfused = load(family, quantization="int8", fast=False)
    ids, mask = prompts(seed=15)
    new = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(15))
    # the plain modules' attention and SiLU differ from the fast ones in the last bit, which can move an int8
    # activation across an int16 rounding step: the bound of test_quantized_decode_matches_prefill_and_fallback
    close(prefill_then_decode(model, ids, mask, new, DynamicCache()),
          prefill_then_decode(unfused, ids, mask, new, DynamicCache()), 5e-4, "fused vs unfused int8")


def test_int4_group_sizes():
    """group_size 64 where it divides the inputs, 32 where only that does (the MoE's 32-wide experts)."""
    model = load("ernie4_5_moe", quantization="int4")
    assert model.model.layers[0].self_attn.q_proj.group_size == 64
    assert model.lm_head.group_size == 64
    experts = model.model.layers[1].mlp.experts
    assert experts.group_size == 32
    assert experts.stacked("down_proj")[1].shape[-1] == model.config.moe_intermediate_size // 32
    g32 = load("ernie4_5", quantization=quantization.QuantizationConfig("int4", group_size=32))
    assert g32.model.layers[0].self_attn.q_proj.scale.shape == (64, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantization.QuantizationConfig("int4", group_size=48)


def test_tied_head_quantized_from_the_embedding():
    ref = load("ernie4_5", fast=False)
    assert ref.config.tie_word_embeddings and ref.lm_head.weight is ref.model.embed_tokens.weight
    for mode in ("int8", "int4"):
        model = load("ernie4_5", quantization=mode)
        assert isinstance(model.lm_head, QuantizedLinear)
        assert isinstance(model.model.embed_tokens, nn.Embedding)
        assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
        q, s = quantize(ref.model.embed_tokens.weight, mode, model.lm_head.group_size or 64)
        assert torch.equal(model.lm_head.qweight, q) and torch.equal(model.lm_head.scale, s)


def _quant_mode(spec=None, **kwargs):
    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint("ernie4_5"), quantization_config=spec, **kwargs)
    return model.lm_head.mode if isinstance(model.lm_head, QuantizedLinear) else None


def test_bitsandbytes_configs_map_to_moelm_modes():
    bnb = quantization.BitsAndBytesConfig
    assert _quant_mode(bnb(load_in_4bit=True)) == "int4"
    assert _quant_mode(bnb(load_in_8bit=True)) == "int8"
    assert _quant_mode({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "quant_method": "bitsandbytes"}) == "int4"
    assert _quant_mode({"load_in_8bit": True}) == "int8"
    assert _quant_mode(quantization.QuantizationConfig("int8")) == "int8"
    model = moelm.AutoModelForCausalLM.from_pretrained(
        checkpoint("phimoe"), quantization_config=bnb(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]))
    assert type(model.lm_head) is not QuantizedLinear and isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_transformers_bitsandbytes_config_maps_to_moelm_modes():
    transformers = pytest.importorskip("transformers")
    for kwargs, mode in (({"load_in_4bit": True}, "int4"), ({"load_in_8bit": True}, "int8")):
        try:
            spec = transformers.BitsAndBytesConfig(**kwargs)
        except Exception as e:  # noqa: BLE001 - transformers may insist on bitsandbytes being installed
            pytest.skip(f"transformers.BitsAndBytesConfig({kwargs}) cannot be built here: {e}")
        assert _quant_mode(spec) == mode


@pytest.mark.parametrize("kwargs,match", (
    (dict(quantization="int3"), "int3"),
    (dict(quantization_config={"load_in_4bit": True, "load_in_8bit": True}), "only one"),
    (dict(quantization_config={"bnb_4bit_quant_type": "nf4"}), "load_in_8bit=True or load_in_4bit=True"),
    (dict(quantization="int8", quantization_config={"load_in_8bit": True}), "either"),
    (dict(quantization=8), "unsupported"),
))
def test_invalid_quantization_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moelm.AutoModelForCausalLM.from_pretrained(checkpoint("ernie4_5"), **kwargs)


def test_both_bitsandbytes_bits_rejected():
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        quantization.BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_quantized_model_saves_as_compressed_tensors(mode, tmp_path):
    """Saved in the compressed-tensors format and read back as stored (tests/test_compressed.py: with transformers)."""
    model = load("phimoe", quantization=mode)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    again = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_classifier_keeps_its_score_head(tmp_path):
    model = moelm.AutoModelForSequenceClassification.from_pretrained(checkpoint("phimoe"), quantization="int8",
                                                                      id2label={0: "a", 1: "b", 2: "c"},
                                                                      pad_token_id=PAD)
    assert isinstance(model.score, nn.Linear) and model.score.weight.dtype == torch.float32
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["score"]
    ids, mask = prompts(seed=16)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)  # the score head saved unquantized, ignored by the quantization_config
    assert "score" in json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    again = moelm.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(again.score, nn.Linear)
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantized_bf16_model(family):
    """quantization with dtype=bfloat16: scales stay fp32, activations / biases bf16; the decode path (kernels,
    fp32 inside) and the prefill path (weights dequantized to bf16) agree to bf16 rounding."""
    model = load(family, quantization="int8", dtype="bfloat16")
    proj = model.model.layers[0].self_attn.q_proj
    assert proj.scale.dtype == torch.float32 and proj.qweight.dtype == torch.int8
    assert proj.bias is None or proj.bias.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids, mask = prompts(seed=17)
    new = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(17))
    steps = prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 40))
    full = full_logits(model, ids, mask, new)
    assert torch.isfinite(steps).all() and torch.isfinite(full).all()
    assert mean_kl(full, steps) < 2e-3, mean_kl(full, steps)
    # bf16 rounding, not an error: the typical position's logits within 4 bf16 ulps of the largest logit (measured
    # 1-3). Not every position: where rounding swaps the top-k experts a token is routed to, its logits move further
    # (12-41 ulps, the argmax then differed at 3-5 of 42 positions on Intel AMX), and so do that sequence's next
    # steps a little, through its cache (4-7 ulps).
    ulps = (steps.float() - full.float()).abs().amax(-1) / (torch.finfo(torch.bfloat16).eps * full.float().abs().max())
    assert float(ulps.median()) <= 4, ulps
    ref = load(family, fast=False)
    assert mean_kl(full_logits(ref, ids, mask, new), steps) < KL_BOUNDS[family]["int8"] + 5e-3


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_quantized_model_cast_keeps_decode_correct(dtype):
    """Casting a quantized model (model.to(dtype) / .half()) casts its float buffers, the fp32 scales included.
    It must either refuse clearly or keep computing the same numbers; reading the cast scales as fp32 in the
    kernel gives garbage."""
    model = load("ernie4_5_moe", fresh=True, quantization="int8")
    ids, mask = prompts(seed=18)
    new = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(18))
    before = prefill_then_decode(model, ids, mask, new, DynamicCache())
    try:
        model = model.half() if dtype == torch.float16 else model.to(dtype)
    except (TypeError, ValueError, RuntimeError) as e:  # refusing is fine
        assert any(w in str(e).lower() for w in ("quantiz", "int8", "dtype")), str(e)
        return
    after = prefill_then_decode(model, ids, mask, new, DynamicCache())
    assert torch.isfinite(after).all(), "non-finite logits after casting a quantized model"
    # loading with dtype= instead gives KL 2e-4 (bf16) / 1e-6 (fp16) and the same argmax here
    assert mean_kl(before, after) < 5e-3
    assert float((after.argmax(-1) == before.argmax(-1)).float().mean()) >= 0.9


# ------------------------------------------------------------------ 7. memory of quantized loading

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import moelm
    from moelm import inference, loading  # everything loading imports, before measuring
    from moelm.io import weights
    from moelm.loading import checkpoint, pretrained

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    torch.set_num_threads(1)
    path, mode, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
    quant = None if mode == "none" else mode
    # the same load of a tiny checkpoint first: library code paged in and one-off allocations are not counted
    moelm.AutoModelForCausalLM.from_pretrained(tiny, quantization=quant)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS:")
    model = moelm.AutoModelForCausalLM.from_pretrained(path, quantization=quant)
    peak = status("VmHWM:")
    print(json.dumps({"increase": peak - before, "reset": reset,
                      "linear": type(model.model.layers[0].mlp.down_proj).__name__}))
""")


def _load_peak(path: Path, mode: str) -> dict:
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", _MEMORY_SCRIPT, str(path), mode, str(checkpoint("ernie4_5"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_quantized_loading_never_materialises_the_fp32_model(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status")
    config = moelm.Ernie4_5Config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                  tie_word_embeddings=False, max_position_embeddings=512)
    model = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 100e6 < size < 160e6
    model.save_pretrained(tmp_path)
    del model
    int8 = _load_peak(tmp_path, "int8")
    assert int8["linear"] == "QuantizedLinear"
    assert int8["increase"] < 0.6 * size, (
        f"peak RSS grew by {int8['increase'] / 1e6:.0f} MB loading int8 from a {size / 1e6:.0f} MB fp32 checkpoint")
    # the measurement itself sees a full-precision load
    fp32 = _load_peak(tmp_path, "none")
    assert fp32["increase"] > 0.8 * size, fp32
    assert int8["increase"] < 0.6 * fp32["increase"], (int8, fp32)


# ------------------------------------------------------------------ 8. bf16 weights on CPU

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_fast_matches_reference(family):
    """40 tokens (> 16 rows: the tiled fp32 compute of bf16 weights) and one-token decode steps (the bf16 gemv)."""
    fast, ref = load(family, dtype="bfloat16"), load(family, dtype="bfloat16", fast=False)
    assert fast.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = prompts(batch=1, seq=40, pads=(0,), seed=19)[0]
    with torch.no_grad():
        a, b = fast(ids).logits.float(), ref(ids).logits.float()
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) < 5e-2 * scale, (float((a - b).abs().max()), scale)
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert agree >= 0.9, agree
    fp32 = load(family, fast=False)
    with torch.no_grad():
        c = fp32(ids).logits
    # computing in fp32 from the bf16 weights is no further from the fp32 model than bf16 matmuls are
    assert mean_kl(c, a) <= 1.5 * mean_kl(c, b) + 1e-4, (mean_kl(c, a), mean_kl(c, b))

    mask = torch.ones_like(ids[:, :8])
    new = ids[:, 8:16]
    d1 = prefill_then_decode(fast, ids[:, :8], mask, new, static_cache(fast, 1, 20))
    d2 = prefill_then_decode(ref, ids[:, :8], mask, new, DynamicCache())
    assert float((d1 - d2).abs().max()) < 5e-2 * float(d2.abs().max())
    assert float((d1.argmax(-1) == d2.argmax(-1)).float().mean()) >= 0.8


@pytest.mark.parametrize("rows", (3, 17, 40))
def test_tiled_bf16_linear_equals_fp32_linear(rows, monkeypatch):
    monkeypatch.setattr(matmul, "TILE_ROWS", 5)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(37, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(37, generator=g).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, generator=g)
    with torch.no_grad():
        for bias in (None, b):
            ref = F.linear(x, w.float(), None if bias is None else bias.float())
            y = matmul.linear(x, w, bias)
            assert y.dtype == torch.float32 and y.shape == (2, rows, 37)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            # bf16 activations: the same up to the final rounding to bf16
            yb = matmul.linear(x.to(torch.bfloat16), w, bias)
            assert yb.dtype == torch.bfloat16
            refb = F.linear(x.to(torch.bfloat16).float(), w.float(), None if bias is None else bias.float())
            torch.testing.assert_close(yb.float(), refb.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler for moelm's kernels")
@pytest.mark.parametrize("rows", (1, 3, 16))
def test_rmsnorm_kernel_matches_the_reference_formula(rows):
    """kernels.rmsnorm (used by RMSNorm for few fp32 rows without gradients) == weight * x * rsqrt(mean(x^2) + eps)."""
    from moelm.inference.modules import FastRMSNorm as RMSNorm

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 1, 96, generator=g) * 3, torch.randn(96, generator=g)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    close(kernels.rmsnorm(x, w, 1e-5), expected, 1e-6, "rmsnorm kernel")
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        close(norm(x), expected, 1e-6, "RMSNorm module")
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        norm(xg).sum().backward()  # with gradients: the PyTorch formula, which has a backward
    assert xg.grad is not None


@pytest.mark.skipif(not kernels.available(), reason="no C compiler for moelm's kernels")
@pytest.mark.parametrize("rows", (1, 3, 16))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no-bias"))
def test_layernorm_kernel_matches_torch(rows, bias):
    """kernels.layernorm (PhiMoE's norms for few rows without gradients, FastLayerNorm) == nn.LayerNorm, on rows
    with a large mean (the variance taken about it): fp32 to 1e-5; a bf16 norm on bf16 rows (a bf16 PhiMoE) computed
    in fp32 and rounded once, as PyTorch's, so at most a rare element one bf16 step away (the sums' order); bf16 rows
    under fp32 weights and gradients take PyTorch's."""
    from moelm.inference.norms import FastLayerNorm

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=g) * 3 + torch.randn(rows, 1, 1, generator=g) * 50
    plain, fast = nn.LayerNorm(96, eps=1e-5, bias=bias), FastLayerNorm(96, eps=1e-5, bias=bias)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        fast.load_state_dict(plain.state_dict())
        want = plain(x)
        close(kernels.layernorm(x, plain.weight, plain.bias, 1e-5), want, 1e-5, "layernorm kernel")
        with mock.patch.object(kernels, "layernorm", wraps=kernels.layernorm) as used:
            close(fast(x), want, 1e-5, "FastLayerNorm")
            assert used.call_count == 1
            assert torch.equal(fast(x.bfloat16()), plain(x.bfloat16())) and used.call_count == 1
            plain.bfloat16(), fast.bfloat16()
            y = fast(x.bfloat16())
            assert y.dtype == torch.bfloat16 and used.call_count == 2
            _close_bf16(y, plain(x.bfloat16()), "bf16 FastLayerNorm")
            fast.float()
    xg = x.clone().requires_grad_(True)
    fast(xg).sum().backward()  # with gradients: PyTorch's LayerNorm, which has a backward
    assert xg.grad is not None


@pytest.mark.skipif(not kernels.available(), reason="no C compiler for moelm's kernels")
def test_rmsnorm_kernel_on_bf16_is_rmsnorm_on_bf16():
    """On bf16 (the final norm and the MTP head's norms of a bf16 model while decoding): the fp32 normalisation
    rounded to bf16, times the bf16 weight, rounded again, as PyTorch's RMSNorm on bf16 computes it; only the sum of
    squares is added in another order, so at most a rare element is one bf16 step away."""
    from moelm.inference.modules import FastRMSNorm
    from moelm.nn.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(50, 3, 192, generator=g) * 3).bfloat16(), torch.randn(192, generator=g).bfloat16()
    plain, fast = RMSNorm(192, 1e-5).bfloat16(), FastRMSNorm(192, 1e-5).bfloat16()
    with torch.no_grad():
        plain.weight.copy_(w)
        fast.weight.copy_(w)
        want = torch.cat([plain(x[i:i + 1]) for i in range(50)])
        got = torch.cat([fast(x[i:i + 1]) for i in range(50)])
    assert torch.equal(kernels.rmsnorm(x[:1], w, 1e-5), got[:1]) and got.dtype == torch.bfloat16
    differ = want != got
    assert differ.float().mean() < 1e-3, differ.sum()
    step = (want.float().abs() * 2 ** -7).clamp(min=2 ** -126)  # one bf16 step at the value
    assert ((want.float() - got.float()).abs() <= step * 1.01).all()


# ------------------------------------------------------------------ 7. bitsandbytes weights

def _resolved(spec, device, monkeypatch, installed: bool):
    from moelm.inference import bnb
    monkeypatch.setattr(bnb, "installed", lambda: installed)
    return resolve(quantization_config=spec, device=device)


def test_bitsandbytes_config_selects_bitsandbytes_on_cuda_when_installed(monkeypatch, capsys):
    spec = quantization.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["x"],
                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    config = _resolved(spec, "cuda:0", monkeypatch, installed=True)
    assert (config.backend, config.mode, config.quant_type, config.compute_dtype) == (
        "bitsandbytes", "int4", "nf4", torch.bfloat16)
    assert config.modules_to_not_convert == ("x",)
    err = capsys.readouterr().err
    assert "bitsandbytes nf4 weights" in err and "double_quant is not applied" in err
    config = _resolved({"load_in_8bit": True, "llm_int8_threshold": 4.0}, torch.device("cuda"), monkeypatch, True)
    assert (config.backend, config.mode, config.llm_int8_threshold) == ("bitsandbytes", "int8", 4.0)
    assert "LLM.int8" in capsys.readouterr().err
    # otherwise moelm's own weights, and the message says why
    for device, installed, why in (("cuda", False, "bitsandbytes is not installed"),
                                   ("cpu", True, "CUDA models only"), (None, True, "CUDA models only")):
        config = _resolved(spec, device, monkeypatch, installed)
        assert (config.backend, config.mode, config.group_size) == ("moelm", "int4", 64)
        err = capsys.readouterr().err
        assert "moelm int4 weights" in err and why in err, err


def test_bitsandbytes_backend_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        moelm.AutoModelForCausalLM.from_pretrained(
            checkpoint("ernie4_5"), quantization_config=quantization.QuantizationConfig("int4", backend="bitsandbytes"))
    with pytest.raises(ValueError, match="backend"):
        quantization.QuantizationConfig("int4", backend="bnb")
    with pytest.raises(ValueError, match="nf4"):
        quantization.QuantizationConfig("int4", backend="bitsandbytes", quant_type="int4")


BNB_CASES = (("int4", "nf4"), ("int4", "fp4"), ("int8", "fp4"))


def _bnb_model(family: str, mode: str, quant_type: str, **kwargs):
    spec = quantization.QuantizationConfig(mode, backend="bitsandbytes", quant_type=quant_type)
    return load(family, quantization_config=spec, **kwargs)


def _bnb_dequantized(w: torch.Tensor, quant_type: str) -> torch.Tensor:
    """w [O, I] through bitsandbytes' 4-bit blocks of 64 and back."""
    functional = pytest.importorskip("bitsandbytes.functional")
    q, state = functional.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type=quant_type)
    return functional.dequantize_4bit(q, state)


@pytest.mark.parametrize("mode,quant_type", BNB_CASES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bitsandbytes_weights_replace_linears_and_experts(family, mode, quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    from moelm.inference.bnb import BnbExperts, BnbLinear
    model, ref = _bnb_model(family, mode, quant_type), load(family, fast=False)
    assert not [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear, Experts))]
    linears = {n for n, m in model.named_modules() if isinstance(m, BnbLinear) and not n.endswith((".gate_up", ".down"))}
    assert linears == {n for n, m in ref.named_modules() if isinstance(m, nn.Linear)} and "lm_head" in linears
    assert [n for n, m in model.named_modules() if isinstance(m, BnbExperts)] == \
        [n for n, m in ref.named_modules() if isinstance(m, Experts)]
    ref_params, params = dict(ref.named_parameters()), dict(model.named_parameters())
    for name in [n for n in ref_params if "norm" in n or "embed" in n or "e_score" in n or n.endswith("gate.weight")]:
        assert torch.equal(params[name], ref_params[name]), name
    # each Linear computes what bitsandbytes' own module computes with the checkpoint's weight and bias
    x = torch.randn(5, ref.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x[:, :3] *= 10  # outlier columns for LLM.int8's threshold of 6
    for name in ("model.layers.0.self_attn.q_proj", "lm_head"):
        ours, dense = model.get_submodule(name), ref.get_submodule(name)
        if mode == "int4":
            theirs = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                       compute_dtype=torch.float32, compress_statistics=False, quant_type=quant_type)
            theirs.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, blocksize=64,
                                              compress_statistics=False, quant_type=quant_type)
        else:
            theirs = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                         has_fp16_weights=False, threshold=6.0)
            theirs.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if dense.bias is not None:
            theirs.bias = nn.Parameter(dense.bias.data.clone())
        theirs = theirs.to("cpu").eval()
        with torch.no_grad():
            expected = theirs(x if mode == "int4" else x.half()).float()
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="cannot be cast"):
        model.lm_head.to(torch.bfloat16)


def _emulated_bf16_route(monkeypatch):
    """bitsandbytes' AVX512-BF16 CPU route on any CPU: Linear4bit and moelm both believe the CPU has it, and its
    kernel (bitsandbytes.functional.gemv_4bit on the repacked codes) is emulated: bf16 activations times the codes
    scaled by the bf16 block maxima, summed in fp32, rounded to bf16."""
    functional = pytest.importorskip("bitsandbytes.functional")
    from moelm.inference import bnb as moelm_bnb

    def gemv_4bit(a, b, out=None, transposed_A=False, transposed_B=False, state=None):
        assert state.packing_format_for_cpu and b.dtype == torch.uint8 and b.dim() == 2
        codes, _ = functional._convert_weight_packed_for_cpu_inverse(b, copy.deepcopy(state))
        plain = functional.QuantState(absmax=state.absmax.T.reshape(-1).float(), shape=state.shape,
                                      code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                      dtype=torch.float32)
        w = functional.dequantize_4bit(codes, plain)  # [N, K]
        return (a.to(torch.bfloat16).float() @ w.T).to(torch.bfloat16).to(a.dtype)

    monkeypatch.setattr(functional, "gemv_4bit", gemv_4bit)
    monkeypatch.setattr(functional, "has_avx512bf16", lambda: True)
    moelm_bnb.cpu_bf16_route.cache_clear()
    monkeypatch.setattr(moelm_bnb, "cpu_bf16_route", lambda: True)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_bitsandbytes_4bit_takes_bitsandbytes_cpu_route(monkeypatch, quant_type):
    """Where bitsandbytes' Linear4bit repacks its weight for its bf16 CPU kernel (AVX512-BF16), moelm's 4-bit
    Linear and experts take the same route and give the same result (the kernel emulated here, on any CPU); a
    product that needs gradients, or new weights loaded, go back to the standard layout."""
    bnb = pytest.importorskip("bitsandbytes")
    from moelm.inference.bnb import BnbLinear
    _emulated_bf16_route(monkeypatch)
    model = _bnb_model("ernie4_5_moe", "int4", quant_type, fresh=True)
    ref = load("ernie4_5_moe", fast=False)
    x = torch.randn(5, ref.config.hidden_size, generator=torch.Generator().manual_seed(4))

    def theirs(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        m = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type=quant_type)
        m.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=64, compress_statistics=False,
                                     quant_type=quant_type)
        if bias is not None:
            m.bias = nn.Parameter(bias.clone())
        m = m.to("cpu").eval()
        m.support_avx512bf16_for_cpu = True
        return m

    dense = ref.model.layers[0].self_attn.q_proj
    ours = model.model.layers[0].self_attn.q_proj
    plain = ours(x.clone().requires_grad_()).detach()  # an input that needs gradients: the fp32 route
    assert not ours.cpu_packed
    with torch.no_grad():
        expected = theirs(dense.weight.data, dense.bias)(x)
        assert torch.equal(ours(x), expected) and ours.cpu_packed
        assert not torch.equal(plain, expected)
    # experts: each chosen expert's rows are repacked on their own, as a Linear4bit of that expert
    experts, dense_experts = model.model.layers[1].mlp.experts, ref.model.layers[1].mlp.experts
    with torch.no_grad():
        for e in (0, 3):
            two_i = dense_experts.gate_up_proj.shape[1]
            got = experts.gate_up.matmul(x, rows=slice(e * two_i, (e + 1) * two_i))
            torch.testing.assert_close(got, theirs(dense_experts.gate_up_proj[e], None)(x), rtol=0, atol=0)
        assert set(experts.gate_up.cpu_packed) == {(0, two_i), (3 * two_i, 4 * two_i)}
    # gradients: the standard layout and bitsandbytes' fp32 route again
    xg = x.clone().requires_grad_()
    out = ours(xg)
    out.sum().backward()
    assert not ours.cpu_packed and xg.grad is not None
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
    # loading new weights after repacking writes the standard layout
    with torch.no_grad():
        ours(x)
        ours.load_weight(dense.weight.data * 2)
        assert not ours.cpu_packed
        torch.testing.assert_close(ours(x), theirs(dense.weight.data * 2, dense.bias)(x), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bitsandbytes_4bit_model_equals_its_dequantized_weights(family, quant_type):
    """The 4-bit model == the fp32 model whose every Linear / expert weight went through bitsandbytes' 4-bit blocks
    (experts one at a time), for prefill, cached decoding and greedy generation. Where bitsandbytes computes 4-bit
    in bf16 (its AVX512-BF16 CPU route) the two differ by bf16 rounding, and are held to the int8 KL bound instead
    (each product is compared exactly with Linear4bit by test_bitsandbytes_4bit_takes_bitsandbytes_cpu_route)."""
    from moelm.inference import bnb
    pytest.importorskip("bitsandbytes")
    _check_bnb_4bit_model(family, quant_type, bnb.cpu_bf16_route())


def test_bitsandbytes_4bit_model_on_the_bf16_cpu_route(monkeypatch):
    _emulated_bf16_route(monkeypatch)
    _check_bnb_4bit_model("ernie4_5_moe", "nf4", bf16_route=True)


def _check_bnb_4bit_model(family: str, quant_type: str, bf16_route: bool):
    model, ref = _bnb_model(family, "int4", quant_type, fresh=True), load(family, fresh=True, fast=False)
    with torch.no_grad():
        for module in list(ref.modules()):
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(_bnb_dequantized(module.weight, quant_type))
            elif isinstance(module, Experts):
                for stacked in (module.gate_up_proj, module.down_proj):
                    stacked.copy_(torch.stack([_bnb_dequantized(w, quant_type) for w in stacked]))
    ids, mask = prompts(batch=2, seq=8, pads=(2, 0), seed=21)
    new = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(22))
    expected = full_logits(ref, ids, mask, new)
    prefill = full_logits(model, ids, mask, new)
    decode = prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 16))
    if bf16_route:
        kls = mean_kl(expected, prefill), mean_kl(expected, decode)
        assert all(0 < kl < KL_BOUNDS[family]["int8"] for kl in kls), kls
        return
    close(prefill, expected, 1e-4, f"{family} {quant_type} prefill")
    close(decode, expected, 1e-4, f"{family} {quant_type} decode")
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **greedy), ref.generate(ids, **greedy))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bitsandbytes_8bit_close_to_fp32(family):
    """LLM.int8 (int8 weights and activations, outlier columns in fp16): next-token distributions close to fp32,
    prefill and cached decoding."""
    pytest.importorskip("bitsandbytes")
    model, ref = _bnb_model(family, "int8", "fp4"), load(family, fast=False)
    ids, mask = prompts(batch=2, seq=8, pads=(2, 0), seed=23)
    new = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(24))
    expected = full_logits(ref, ids, mask, new)
    kl = mean_kl(expected, full_logits(model, ids, mask, new))
    kl_decode = mean_kl(expected, prefill_then_decode(model, ids, mask, new, static_cache(model, 2, 16)))
    bound = KL_BOUNDS[family]["int8"]
    assert 0 < kl < bound and 0 < kl_decode < bound, (kl, kl_decode)


def test_bitsandbytes_4bit_bf16_model_generates():
    pytest.importorskip("bitsandbytes")
    model = _bnb_model("ernie4_5_moe", "int4", "nf4", dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.bias is None or \
        model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    ids, mask = prompts(batch=2, seq=6, pads=(1, 0), seed=25)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 10)
    assert model(ids, attention_mask=mask).logits.dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("family", ("ernie4_5", "ernie4_5_moe"))
def test_decode_layer_choice_measures_without_disturbing_the_cache(family, monkeypatch, tmp_path):
    """The first decoding step of a layer shape times the one-call layer and the op-by-op layer (each on the real
    step, the cache rewound after each) and takes the faster; the decode then equals the reference's exactly as a
    forced one does, and the choice is remembered for the later steps."""
    monkeypatch.setenv("MOELM_CACHE", str(tmp_path))
    monkeypatch.delenv("MOELM_KERNELS", raising=False)
    cpu.reset()
    model, ref = load(family, fresh=True), load(family, fast=False)
    ids, mask = prompts(batch=3, seq=7, pads=(2, 0, 4), seed=40)
    new = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(41))
    try:
        measured = prefill_then_decode(model, ids, mask, new, static_cache(model, 3, 16))
        made = {k: v for k, v in cpu.choices().items() if k.startswith("decode_layer|")}
        assert made and set(made.values()) <= {"gemv", "torch"}
        assert len(made) == (2 if family == "ernie4_5_moe" else 1)  # dense and MoE layers measured apart
        close(measured, prefill_then_decode(ref, ids, mask, new, DynamicCache()), 1e-5, f"{family} measured")
    finally:
        cpu.reset()


@needs_kernels
@pytest.mark.parametrize("mode", ("int8", "int4"))
def test_quantized_linear_paths_agree(mode, monkeypatch):
    """Every path a QuantizedLinear can take gives the dequantized weight's product: PyTorch's matmul, the tiles
    dequantized into a reused buffer (16 rows a tile here: 3 tiles, the last short) and (int8)
    torch._weight_int8pack_mm to fp32 rounding, the gemv kernel within its int16 activation rounding."""
    monkeypatch.setattr(quantization, "TILE_ROWS", 16)
    g = torch.Generator().manual_seed(7)
    m = QuantizedLinear(64, 40, True, mode, 32)
    with torch.no_grad():
        m.load_weight(torch.randn(40, 64, generator=g))
        m.bias.copy_(torch.randn(40, generator=g))
    for rows in (1, 5, 16, 40):
        x = torch.randn(rows, 64, generator=g)
        want = F.linear(x, dequantize(m.qweight, m.scale, m.group_size), m.bias)
        with torch.no_grad():
            close(m._dense(x), want, 1e-6, f"{mode} torch")
            close(m._tiles(x), want, 1e-6, f"{mode} tiles")
            close(m._tiles(x.bfloat16()).float(), want, 2e-2, f"{mode} tiles, bf16 activations")
            if mode == "int8":
                close(m._int8pack(x), want, 1e-5, "int8pack")
            if rows <= kernels.MAX_ROWS:
                close(m._gemv(x), want, 2e-4, f"{mode} gemv")
            for forced in ("torch", "gemv", "tiles"):
                with kernels_forced(f"quantized={forced}"):
                    close(m(x), want, 2e-4, f"{mode} forced {forced}")


@needs_kernels
def test_gemm_matches_linear_for_every_edge():
    """csrc/gemm.c against float64 F.linear: rows not a multiple of its 16-row panels, outputs not a multiple of its
    12-row (AVX-512) or 6-row tiles, inputs across and not a multiple of its 512-wide k blocks; with and without
    bias; the result a view of its transposed buffer that the next layer can take as is."""
    g = torch.Generator().manual_seed(9)
    for rows, out, inp in ((1, 5, 7), (7, 13, 300), (16, 6, 768), (37, 50, 1700), (300, 97, 96)):
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((rows, inp), (out, inp), (out,)))
        for bias in (None, b):
            y = kernels.gemm(x, w, bias)
            want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert y.shape == (rows, out)
            close(y, want, 1e-6, f"gemm {rows}x{inp} @ {out}x{inp}")
    y3 = kernels.gemm(torch.randn(2, 9, 64, generator=g), torch.randn(40, 64, generator=g))
    assert y3.shape == (2, 9, 40) and torch.isfinite(kernels.gemm(y3, torch.randn(8, 40, generator=g))).all()


def test_prefill_attention_gives_sdpa_rows_in_order(monkeypatch):
    """A projection computed with the roles swapped (oneDNN's w @ x.T, the float32 path chosen for fused q/k/v on
    the EPYC) leaves v as a [D, S] view; SDPA's flash kernel needs each row of D in order and would otherwise fall
    back to its math path (3x slower at 1024 tokens). FastAttention.attend hands SDPA rows in order, same result."""
    from moelm.inference.modules import FastAttention

    config = moelm.named_config("ernie4_5_moe-tiny")
    attn = FastAttention(config, 0, False, lambda t, cos, sin: t)
    g = torch.Generator().manual_seed(0)
    b, s, d = 1, 12, attn.head_dim
    q = torch.randn(b, attn.num_heads, s, d, generator=g)
    k = torch.randn(b, attn.num_kv_heads, s, d, generator=g)
    v = torch.randn(b, attn.num_kv_heads, d, s, generator=g).transpose(2, 3)  # rows of D not in order
    assert v.stride(-1) != 1
    want = F.scaled_dot_product_attention(q, k, v.contiguous(), scale=attn.scaling, is_causal=True,
                                          enable_gqa=True)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append([t.stride(-1) for t in a[:3]]) or real(*a, **kw))
    with torch.no_grad():
        got = attn.attend(q, k, v, None, 0.0)
    assert seen == [[1, 1, 1]]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
