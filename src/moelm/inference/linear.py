"""FastLinear and the fused projections.

- FastLinear: nn.Linear (same parameters) computed by matmul.linear, the fastest path measured for its shapes.
- fuse_projections: q/k/v and gate/up concatenated into one weight per layer (the original parameters become views
  of it, so memory is not doubled and state_dict / save_pretrained are unchanged); used when no gradients are needed.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..nn.layers import MLP, Attention
from .kernels import plain_only
from .matmul import linear
from .quantization import QuantizedLinear


class FastLinear(nn.Linear):
    """nn.Linear computed by the fastest path measured on this CPU for its shapes (see linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def hooked(modules) -> bool:
    """Whether any of `modules` has a forward hook or pre-hook (a path that does not call them must not run)."""
    return any(hook_dicts(modules))


def hook_dicts(modules) -> list[dict]:
    """The dicts `modules` keep their forward hooks and pre-hooks in (registering a hook adds to them): any() of
    them is hooked(modules) in one C loop, for checks made at every decoding step."""
    return [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]


def global_hooks() -> bool:
    """Whether a global module hook is registered (torch.nn.modules.module.register_module_forward_hook): every
    module call must then happen as the model op by op makes it."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class Fused:
    """Several projections of the same input as one: `weight` [sum O, I] (or a quantized module's buffers),
    `splits` the output sizes."""

    def __init__(self, modules: list[nn.Module]):
        self.splits = [m.out_features for m in modules]
        self.quantized = not isinstance(modules[0], nn.Linear)
        self.first, self.hooks = modules[0], hook_dicts(modules)
        self.own_hooks: set = set()  # ids of the parts' hooks the fused call may skip (moelm.parallel's)
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


def fuse_projections(model: nn.Module, make=Fused) -> nn.Module:
    """Attention q/k/v and SwiGLU gate/up as one matmul each, made by `make` (inference only: see Attention / MLP
    forward)."""
    def fusable(ms: list[nn.Module]) -> bool:
        """Projections stored alike: all nn.Linear of one dtype, or all QuantizedLinear of one mode, group size and
        scale dtype (a checkpoint may quantize q and not k/v); biases on all or none. bitsandbytes' packing has no
        concatenation of rows."""
        def kind(m: nn.Module) -> tuple | None:
            if isinstance(m, nn.Linear):
                return nn.Linear, m.weight.dtype, m.weight.device, m.bias is None
            if type(m) is QuantizedLinear:
                return QuantizedLinear, m.mode, m.group_size, m.scale.dtype, m.qweight.device, m.bias is None
            return None

        same = [kind(m) for m in ms]
        return same[0] is not None and same.count(same[0]) == len(same)

    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_qkv", None) is None:
            projections = [module.q_proj, module.k_proj, module.v_proj]
            if fusable(projections):
                module.fused_qkv = make(projections)
        elif isinstance(module, MLP) and getattr(module, "fused_gate_up", None) is None:
            projections = [module.gate_proj, module.up_proj]
            if fusable(projections):
                module.fused_gate_up = make(projections)
    return model


def fused_ready(fused: Fused | None, x: torch.Tensor) -> bool:
    """Use the fused projection: it exists, no gradients are needed, the projections still view its tensor
    (moving or casting the model afterwards replaces them, and the separate projections are used), and no hook
    waits for a projection's own call (nor a global one)."""
    if fused is None or torch.is_grad_enabled() or plain_only(x) or global_hooks() \
            or any(fused.hooks) and any(k not in fused.own_hooks for d in fused.hooks for k in d):
        return False
    name = "qweight" if fused.quantized else "weight"
    first = getattr(fused.first, name)
    first = first.to_local() if hasattr(first, "to_local") else first  # a sharded projection: this rank's shard
    return first.data_ptr() == getattr(fused.module, name).data_ptr()

