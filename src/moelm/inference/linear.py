"""FastLinear and the fused projections.

- FastLinear: nn.Linear (same parameters) computed on CPU by the fastest of the paths that apply, measured once per
  CPU and shape (cpu.choose): PyTorch's F.linear, the csrc/gemv.c kernel (a few rows of activations: the weight read
  once), oneDNN's inner product (or w @ x.T), and for half-precision weights fp32 one tile at a time (CPUs without
  fast bf16 matmuls are ~5x slower in bf16; an fp32 copy of the model is never held).
- fuse_projections: q/k/v and gate/up concatenated into one weight per layer (the original parameters become views
  of it, so memory is not doubled and state_dict / save_pretrained are unchanged); used when no gradients are needed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MLP, Attention
from . import cpu, kernels
from .quantization import QuantizedLinear

TILE_ROWS = 8192  # weight rows converted to fp32 at a time for a long bf16 input


class FastLinear(nn.Linear):
    """nn.Linear computed by the fastest path measured on this CPU for its shapes (see linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


KERNEL_DTYPES = (torch.float32, torch.bfloat16)
HALF = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) on CPU without gradients by the path chosen for this CPU, shape and dtype among
    those that apply (paths()): the same result up to rounding; PyTorch's own op is always one of them."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows == 0 or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.linear(x, weight, bias)
    return PATHS[path_for(x, weight, bias)](x, weight, bias)


def path_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The chosen path for x [..., I] times weight [O, I]; measured on these inputs the first time."""
    rows = x.numel() // x.shape[-1]
    op = "linear" if weight.dtype == torch.float32 else f"linear.{str(weight.dtype).removeprefix('torch.')}"
    key = (str(x.dtype), cpu.rows_bucket(rows), *weight.shape, bias is not None, torch.get_num_threads())
    path = cpu.chosen(op, key)
    if path is None:
        path = cpu.choose(op, key, {name: functools.partial(PATHS[name], x, weight, bias)
                                    for name in paths(x, weight)})
    return path


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
    if weight.is_contiguous() and x.dtype == weight.dtype and kernels.onednn_works(x, weight):
        out.append("onednn")
        if rows <= 64:
            out.append("onednn_swap")
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
    the whole weight): for CPUs without fast half-precision matmuls."""
    xf = x.float()
    tiles = [_onednn_fp32(xf, weight[r:r + TILE_ROWS].float(), None if bias is None else bias[r:r + TILE_ROWS])
             for r in range(0, weight.shape[0], TILE_ROWS)]
    return torch.cat(tiles, dim=-1).to(x.dtype)


def _onednn_fp32(x, weight, bias):
    return _onednn(x, weight, bias) if kernels.onednn_works(x, weight) else F.linear(x, weight, bias)


def _onednn(x, weight, bias, swap: bool = False):
    """x [..., I] @ weight [O, I].T (+ bias, added in fp32) with oneDNN's inner product; swap: as w @ x.T."""
    rows = x.numel() // x.shape[-1]
    out = kernels.onednn_linear(x.reshape(rows, x.shape[-1]).contiguous(), weight, swap=swap)
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else (out.float() + bias.float()).to(out.dtype)


PATHS = {"torch": _torch, "gemv": _gemv, "fp32_tiles": _fp32_tiles, "onednn": _onednn,
         "onednn_swap": functools.partial(_onednn, swap=True)}
cpu.register("linear", PATHS)


class Fused:
    """Several projections of the same input as one: `weight` [sum O, I] (or a quantized module's buffers),
    `splits` the output sizes."""

    def __init__(self, modules: list[nn.Module]):
        self.splits = [m.out_features for m in modules]
        self.quantized = not isinstance(modules[0], nn.Linear)
        self.first = modules[0]
        self.module = _fuse(modules)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.module(x).split(self.splits, dim=-1))


def _fuse(modules: list[nn.Module]) -> nn.Module:
    """One module computing all of `modules`; their tensors are re-pointed to views of the fused ones."""
    first = modules[0]
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            fused = FastLinear(first.in_features, sum(m.out_features for m in modules), bias=first.bias is not None,
                               device="meta")
            fused.weight = nn.Parameter(torch.cat([m.weight for m in modules]), requires_grad=False)
            if first.bias is not None:
                fused.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
            names = ["weight"] + (["bias"] if first.bias is not None else [])
        else:  # QuantizedLinear: one over the concatenated packed rows and scales
            fused = type(first)(first.in_features, sum(m.out_features for m in modules), first.bias is not None,
                                first.mode, first.group_size, device="meta")
            fused.qweight = torch.cat([m.qweight for m in modules])
            fused.scale = torch.cat([m.scale for m in modules])
            if first.bias is not None:
                fused.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
            names = ["qweight", "scale"] + (["bias"] if first.bias is not None else [])
        start = 0
        for m in modules:
            rows = slice(start, start + m.out_features)
            for name in names:
                view = getattr(fused, name)[rows]
                old = getattr(m, name)
                if isinstance(old, nn.Parameter):
                    setattr(m, name, nn.Parameter(view, requires_grad=old.requires_grad))
                else:
                    setattr(m, name, view)
            start += m.out_features
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Attention q/k/v and SwiGLU gate/up as one matmul each (inference only: see Attention / MLP forward)."""
    def fusable(m: nn.Module) -> bool:  # bitsandbytes' packing has no concatenation of rows
        return isinstance(m, nn.Linear) or type(m) is QuantizedLinear

    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_qkv", None) is None and fusable(module.q_proj):
            module.fused_qkv = Fused([module.q_proj, module.k_proj, module.v_proj])
        elif isinstance(module, MLP) and getattr(module, "fused_gate_up", None) is None and \
                fusable(module.gate_proj):
            module.fused_gate_up = Fused([module.gate_proj, module.up_proj])
    return model


def fused_ready(fused: Fused | None, x: torch.Tensor) -> bool:
    """Use the fused projection: it exists, no gradients are needed, and the projections still view its tensor
    (moving or casting the model afterwards replaces them, and the separate projections are used)."""
    if fused is None or torch.is_grad_enabled():
        return False
    name = "qweight" if fused.quantized else "weight"
    return getattr(fused.first, name).data_ptr() == getattr(fused.module, name).data_ptr()

