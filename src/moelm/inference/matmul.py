"""x @ weight.T on CPU by the fastest of the paths that apply, measured once per CPU and shape (cpu.choose):
PyTorch's F.linear, the csrc/gemv.c kernel (a few rows of activations: the weight read once), csrc/gemm.c (fp32,
many rows), oneDNN's inner product (or w @ x.T), and for half-precision weights fp32 one tile at a time (CPUs
without fast bf16 matmuls are ~5x slower in bf16; an fp32 copy of the model is never held).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu, kernels

TILE_ROWS = 8192  # weight rows converted to fp32 at a time for a long bf16 input
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
HALF = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) on CPU without gradients by the path chosen for this CPU, shape and dtype among
    those that apply (paths()): the same result up to rounding; PyTorch's own op is always one of them."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows == 0 or kernels.plain_only(x) or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.linear(x, weight, bias)
    return PATHS[path_for(x, weight, bias)](x, weight, bias)


def path_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The chosen path for x [..., I] times weight [O, I]; measured the first time for its shape class, on x and
    cpu.probe_rows() rows of the weight at a time."""
    rows = x.numel() // x.shape[-1]
    op = "linear" if weight.dtype == torch.float32 else f"linear.{str(weight.dtype).removeprefix('torch.')}"
    n = cpu.probe_rows(*weight.shape, rows)
    key = (str(x.dtype), cpu.rows_bucket(rows), n, weight.shape[1], weight.is_contiguous(), bias is not None,
           torch.get_num_threads())
    return cpu.pick(op, key, lambda: cpu.probes(paths(x, weight), weight.shape[0], n, lambda name, r: PATHS[name](
        x, weight[r], None if bias is None else bias[r])))


def paths(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """The paths that can compute x @ weight.T on this machine (rows of x: its bucket's largest, so that one
    choice serves the whole bucket)."""
    rows = cpu.rows_bucket(x.numel() // x.shape[-1])
    out = ["torch"]
    if rows <= kernels.MAX_ROWS and weight.dtype in KERNEL_DTYPES and x.shape[-1] % 32 == 0 \
            and weight.is_contiguous() and kernels.available():
        out.append("gemv")
    if weight.dtype in HALF:
        out.append("fp32_tiles")
    if weight.dtype == x.dtype == torch.float32 and weight.is_contiguous() and kernels.available():
        out.append("gemm")
    if weight.is_contiguous() and x.dtype == weight.dtype and kernels.onednn_works(x, weight):
        out += ["onednn", "onednn_swap"]
    return out


def _torch(x, weight, bias):
    """PyTorch's op (on x's dtype when the weight's differs: a copy of the weight, as plain PyTorch needs)."""
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _gemv(x, weight, bias):
    out = kernels.gemv(x, weight, bias=None if bias is None else bias.float())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _fp32_tiles(x, weight, bias):
    """Half-precision weights computed in fp32 one tile of TILE_ROWS weight rows at a time (never an fp32 copy of
    the whole weight), each tile by the fp32 path chosen for its shape: for CPUs without fast half-precision
    matmuls."""
    xf = x.float()
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # each tile written in x's dtype: no fp32 copy of it all
    for r in range(0, weight.shape[0], TILE_ROWS):
        out[..., r:r + TILE_ROWS] = linear(xf, weight[r:r + TILE_ROWS].float(),
                                           None if bias is None else bias[r:r + TILE_ROWS].float())
    return out


def _gemm(x, weight, bias):
    return kernels.gemm(x, weight, None if bias is None else bias.float().contiguous())


def _onednn(x, weight, bias, swap: bool = False):
    """x [..., I] @ weight [O, I].T (+ bias, added in fp32) with oneDNN's inner product; swap: as w @ x.T."""
    rows = x.numel() // x.shape[-1]
    out = kernels.onednn_linear(x.reshape(rows, x.shape[-1]).contiguous(), weight, swap=swap)
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else (out.float() + bias.float()).to(out.dtype)


PATHS = {"torch": _torch, "gemv": _gemv, "gemm": _gemm, "fp32_tiles": _fp32_tiles, "onednn": _onednn,
         "onednn_swap": functools.partial(_onednn, swap=True)}
cpu.register("linear", PATHS)


