"""Routed experts at inference on CPU: the chosen experts one after another, each reading only its own weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.moe import Experts, needs_grad, sort_by_expert
from . import cpu, kernels


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ w [out, in].T -> [M, out] on CPU, no autograd; x and w contiguous; by the path chosen for this
    CPU and shape: PyTorch's F.linear, the gemv kernel for few rows (w read once at close to memory bandwidth),
    csrc/gemm.c, oneDNN with the roles swapped (w @ x.T, w read in its own layout: 1.6x the MKL sgemm behind F.linear
    for the tens of rows an expert gets at prefill on the EPYC), or half-precision weights computed in fp32."""
    op = "experts" if w.dtype == torch.float32 else f"experts.{str(w.dtype).removeprefix('torch.')}"
    n = cpu.probe_rows(*w.shape, x.shape[0])  # measured on n rows of w at a time
    key = (str(x.dtype), cpu.rows_bucket(x.shape[0]), n, w.shape[1], torch.get_num_threads())
    path = cpu.pick(op, key, lambda: cpu.probes(paths(x, w), w.shape[0], n,
                                                lambda name, r: PATHS[name](x, w[r])))
    return PATHS[path](x, w)


def paths(x: torch.Tensor, w: torch.Tensor) -> list[str]:
    out = ["torch"]
    if cpu.rows_bucket(x.shape[0]) <= kernels.MAX_ROWS and w.dtype in (torch.float32, torch.bfloat16) \
            and kernels.usable(x):
        out.append("gemv")
    if x.dtype == w.dtype and kernels.onednn_works(x, w):
        out.append("onednn_swap")
    if w.dtype in (torch.bfloat16, torch.float16):
        out.append("fp32")
    if x.dtype == w.dtype == torch.float32 and kernels.available():
        out.append("gemm")
    return out


def _fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One half-precision expert in fp32 (~10x bf16 F.linear on CPUs without bf16 matmuls)."""
    xf, wf = x.float(), w.float()
    out = kernels.onednn_linear(xf, wf, swap=True) if kernels.onednn_works(xf, wf) else F.linear(xf, wf)
    return out.to(x.dtype)


PATHS = {"torch": F.linear, "gemv": lambda x, w: kernels.gemv(x, w).to(x.dtype), "gemm": kernels.gemm,
         "onednn_swap": lambda x, w: kernels.onednn_linear(x, w, swap=True), "fp32": _fp32}
cpu.register("experts", PATHS)


def each_expert(x: torch.Tensor, token: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                expert_weights, linear=None) -> torch.Tensor:
    """The chosen experts one after another (gate_up, SwiGLU, down, weighted sum into the output), each reading its
    weights once. x [T, H]; token, w, counts from moe.sort_by_expert; expert_weights(e) -> (gate_up [2I, H],
    down [H, I]), multiplied by linear(x, weight) (default expert_linear)."""
    linear = linear or expert_linear
    out = x.new_zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))  # summed in fp32, rounded once
    hit = counts.nonzero().squeeze(1)
    start = 0
    for e, c in zip(hit.tolist(), counts[hit].tolist()):
        rows = token[start:start + c]
        gate_up, down = expert_weights(e)
        gate, up = linear(x[rows], gate_up).chunk(2, dim=-1)
        y = linear(F.silu(gate).mul_(up), down)  # [c, H]
        out.index_add_(0, rows, y.mul_(w[start:start + c].to(y.dtype)).to(x.dtype).to(out.dtype))
        start += c
    return out.to(x.dtype)


class FastExperts(Experts):
    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """On CPU without gradients: the chosen experts one at a time (each_expert)."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if x.device.type == "cpu" and not kernels.plain_only(x) and gate_up.is_contiguous() \
                and down.is_contiguous() and not needs_grad(x, weights, gate_up, down):
            return each_expert(x, *sort_by_expert(index, weights, self.num_experts), lambda e: (gate_up[e], down[e]))
        return super().forward(x, index, weights)
