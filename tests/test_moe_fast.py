"""The routed experts' CPU paths against a plain per-expert loop: the decode kernel (kernels.gemv, few rows per
expert), oneDNN (many rows), plain F.linear (neither available), the autograd path (padded bmm), and the grouped_mm
path; fp32 to 1e-5, bf16 more loosely. Routing leaves some experts without tokens and sends every token to expert 0.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelm.inference import cpu, experts, kernels
from moelm.inference.modules import FastExperts
from moelm.nn import moe
from moelm.nn.moe import Experts

E, H, I = 12, 64, 32
EMPTY = (3, 7, 10)  # experts no token picks
PATHS = ("gemv", "onednn", "plain", "fp32", "gemm", "grad", "grouped_mm")


@pytest.fixture(autouse=True)
def _forget_choices():
    yield
    cpu.reset()  # the forced paths (MOELM_KERNELS is restored by monkeypatch first) are not remembered


def routing(t: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """index [T, K] distinct per row, expert 0 in every row; weights [T, K] in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(1, E) if e not in EMPTY])
    rows = []
    for _ in range(t):
        rest = allowed[torch.randperm(len(allowed), generator=g)[:k - 1]]
        row = torch.cat([torch.zeros(1, dtype=torch.long), rest])
        rows.append(row[torch.randperm(k, generator=g)])
    return torch.stack(rows), torch.rand(t, k, generator=g)


def make(seed: int, t: int, dtype=torch.float32) -> tuple[Experts, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ex = FastExperts(E, H, I)  # its CPU inference paths, and Experts' own grouped ones (gradients, grouped_mm)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
        ex.down_proj.copy_(torch.randn(E, H, I, generator=g) / I ** 0.5)
    return ex.to(dtype), torch.randn(t, H, generator=g).to(dtype)


def oracle(x, gate_up, down, index, weights):
    """sum_k weights[t, k] * expert_{index[t, k]}(x[t]), one expert at a time, in fp32."""
    x, gate_up, down, weights = x.float(), gate_up.float(), down.float(), weights.float()
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = (index == e).nonzero(as_tuple=True)
        if len(token):
            gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down[e])
            out = out.index_add(0, token, y * weights[token, slot, None])
    return out


def run(path: str, ex: Experts, x, index, weights, monkeypatch):
    """Experts.forward forced onto one path; the grad path also returns the gradients."""
    if path == "gemv" and not kernels.available():
        pytest.skip("no C compiler for the decode kernels")
    forced = {"gemv": "gemv", "onednn": "onednn_swap", "plain": "torch", "fp32": "fp32", "gemm": "gemm"}.get(path)
    if forced:  # that path for every expert where it applies, PyTorch's op elsewhere
        monkeypatch.setenv("MOELM_KERNELS", f"experts={forced}")
        cpu.reset()
    if path == "grad":
        x = x.clone().requires_grad_()
        out = ex(x, index, weights)
        out.square().sum().backward()
        return out.detach(), (x.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    if path == "grouped_mm":
        with torch.no_grad():
            works = moe._grouped_mm_works(x, ex.gate_up_proj)
        if not works:
            pytest.skip("torch._grouped_mm unavailable")
        # the per-expert CPU loop takes contiguous stacked weights only; a transposed copy goes to grouped_mm
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(ex, name)
                setattr(ex, name, torch.nn.Parameter(p.transpose(1, 2).contiguous().transpose(1, 2)))
    with torch.inference_mode():
        return ex(x, index, weights), None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", (1, 2, 6))
@pytest.mark.parametrize("t", (1, 2, 8, 64))
def test_paths_match_per_expert_loop_fp32(path, t, k, monkeypatch):
    ex, x = make(t * 10 + k, t)
    index, weights = routing(t, k, seed=t + k)
    out, grads = run(path, ex, x, index, weights, monkeypatch)
    assert out.dtype == torch.float32 and out.shape == (t, H)
    torch.testing.assert_close(out, oracle(x, ex.gate_up_proj, ex.down_proj, index, weights), atol=1e-5, rtol=1e-5)
    if grads is not None:
        params = [x.clone().requires_grad_(), ex.gate_up_proj.detach().clone().requires_grad_(),
                  ex.down_proj.detach().clone().requires_grad_()]
        oracle(*params, index, weights).square().sum().backward()
        for got, want in zip(grads, params):
            torch.testing.assert_close(got, want.grad, atol=1e-5, rtol=1e-5)
        for e in EMPTY:
            assert not grads[1][e].any() and not grads[2][e].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", (2, 6))
@pytest.mark.parametrize("t", (1, 8, 64))
def test_paths_match_per_expert_loop_bf16(path, t, k, monkeypatch):
    ex, x = make(t * 10 + k, t, torch.bfloat16)
    index, weights = routing(t, k, seed=t + k)
    weights = weights.bfloat16()
    out, _ = run(path, ex, x, index, weights, monkeypatch)
    assert out.dtype == torch.bfloat16
    want = oracle(x, ex.gate_up_proj, ex.down_proj, index, weights)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("t", (1, 8, 64))
def test_unchosen_experts_are_not_read(t):
    """NaN weights in experts no token chose must not reach the output (the default, unforced paths)."""
    ex, x = make(0, t)
    index, weights = routing(t, 6, seed=1)
    with torch.no_grad():
        for e in EMPTY:
            ex.gate_up_proj[e] = float("nan")
            ex.down_proj[e] = float("nan")
    with torch.inference_mode():
        out = ex(x, index, weights)
    assert torch.isfinite(out).all()


def test_expert_linear_paths_agree():
    """Every path expert_linear can choose, on both sides of the kernel's row limit, for in sizes that are and are
    not multiples of 32 (no decode kernel), gives F.linear's result."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for rows in (1, 6, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 100):
            for features in (64, 40):
                x = torch.randn(rows, features, generator=g).to(dtype)
                w = torch.randn(72, features, generator=g).to(dtype)
                paths = experts.paths(x, w)
                assert "torch" in paths and ("fp32" in paths) == (dtype != torch.float32)
                assert ("gemm" in paths) == (dtype == torch.float32 and kernels.available())
                assert ("gemv" in paths) == (rows <= kernels.MAX_ROWS and features % 32 == 0 and kernels.available())
                want = F.linear(x.float(), w.float())
                for path in paths:
                    with torch.inference_mode():
                        got = experts.PATHS[path](x, w)
                    assert got.dtype == dtype, path
                    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{path}: {m}")
