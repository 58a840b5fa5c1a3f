"""device_map beyond one device: whole decoder layers offloaded to disk, loaded for their forward and dropped after
it, the rest resident on the compute device. The placement is computed on the meta-built model, so a layer that goes
to disk is never whole in memory with the others, not even while loading."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.files import parse_size

LAYER = re.compile(r"^(model\.)?layers\.(\d+)$")  # a base model's are layers.N
POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")


def needs_placement(device_map, max_memory) -> bool:
    """Whether a device_map asks for more than one device (or a memory budget that may)."""
    return max_memory is not None or isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def plan(model: nn.Module, device_map, device: torch.device, max_memory, offload_folder) -> dict[str, str]:
    """{module name: device or "disk"} for a model built on meta. A dict device_map is checked (disk only for
    whole decoder layers, every parameter placed; place() has refused several compute devices); a policy ("auto",
    ...) with max_memory keeps the embeddings, final norm and head resident, then the decoder layers in order while
    they fit the compute device's budget, and sends the rest to disk."""
    layers = [n for n, _ in model.named_modules() if LAYER.match(n)]
    if isinstance(device_map, dict):
        placed = {str(k): ("disk" if str(v) == "disk" else str(torch.device(f"cuda:{v}" if isinstance(v, int) else v)))
                  for k, v in device_map.items()}
        names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        unknown = [k for k in placed if k not in names]
        if unknown:
            raise ValueError(f"device_map: {unknown} name no module or parameter of {type(model).__name__}")
        bad = [k for k, v in placed.items() if v == "disk" and not LAYER.match(k)]
        if bad:
            raise ValueError(f"device_map: only whole decoder layers (model.layers.N) go to disk, not {bad}")
        inside = [k for k in placed for d in placed if placed[d] == "disk" and k.startswith(d + ".")]
        if inside:
            raise ValueError(f"device_map: {inside} lie in a decoder layer it sends to disk (whole layers go there)")
        if "disk" in placed.values() and offload_folder is None:
            raise ValueError("device_map sends layers to 'disk': pass offload_folder= (a directory for them)")
        names = [n for n, _ in model.named_parameters()]
        uncovered = [n for n in names if not any(k == "" or n == k or n.startswith(k + ".") for k in placed)]
        if uncovered:
            raise ValueError(f"device_map does not place {len(uncovered)} parameter(s): {', '.join(uncovered[:6])}")
        return placed
    if device_map not in POLICIES:
        raise ValueError(f"max_memory needs device_map='auto' (or 'balanced', 'sequential'), got {device_map!r}")
    budgets = {str(k): parse_size(v) for k, v in max_memory.items()}
    key = "cpu" if device.type == "cpu" else str(device.index or 0)
    if key not in budgets and str(device) not in budgets:
        raise ValueError(f"max_memory gives no budget for the compute device {device} (keys: {sorted(budgets)})")
    budget = budgets.get(key, budgets.get(str(device)))
    # named_parameters counts a tied head once
    resident = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if not any(n.startswith(layer + ".") for layer in layers))
    if resident > budget:
        raise ValueError(f"max_memory[{key!r}] = {budget} bytes cannot hold the embeddings, final norm and head "
                         f"({resident} bytes)")
    placed, used = {"": str(device)}, resident
    for name in layers:
        size = _nbytes(model.get_submodule(name))
        if used + size <= budget and all(v != "disk" for v in placed.values()):
            used += size
        else:
            placed[name] = "disk"
    if "disk" in placed.values() and offload_folder is None:
        raise ValueError(f"max_memory[{key!r}] = {budget} bytes holds {used} bytes of the model; the other "
                         f"{sum(_nbytes(model.get_submodule(n)) for n, v in placed.items() if v == 'disk')} bytes "
                         "need disk offload: pass offload_folder=")
    return placed


def _set(module: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)


def materialize(module: nn.Module, device: torch.device, skip=lambda name: False) -> None:
    """Allocate a meta module's parameters (uninitialised) on `device`, but those whose name `skip` picks."""
    for name, p in list(module.named_parameters()):
        if p.is_meta and not skip(name):
            _set(module, name, torch.empty_like(p, device=device), p.requires_grad)


def disk_layers(placed: dict[str, str]) -> list[str]:
    return [n for n, v in placed.items() if v == "disk"]


def offload(module: nn.Module, name: str, folder: str | os.PathLike, device: torch.device) -> None:
    """Write `module`'s parameters to folder/name.safetensors, free them, and load them back on `device` around
    each of its forwards (for inference: they are not trained there)."""
    path = Path(folder) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {k: (p.shape, p.dtype) for k, p in module.named_parameters()}
    tmp = path.with_suffix(".tmp")
    save_file({k: p.detach().contiguous() for k, p in module.named_parameters()}, tmp)
    os.replace(tmp, path)
    # read through this handle: a later load into the same folder replaces the file, not what this one reads
    stored = safe_open(path, framework="pt", device=str(device))

    def drop(*_):
        for k, (shape, dtype) in shapes.items():
            _set(module, k, torch.empty(shape, dtype=dtype, device="meta"), False)

    def load(*_):
        for k in shapes:
            _set(module, k, stored.get_tensor(k), False)

    drop()
    module.register_forward_pre_hook(load)
    module.register_forward_hook(drop)
