"""from_pretrained's distributed options -> the layout and the device of this rank, with transformers' rules."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import DistributedConfig, init_process_group


def distributed_layout(tp_plan, tp_size, device_mesh, distributed_config, device_map, device):
    """(DistributedConfig, this rank's device) for from_pretrained(tp_plan=, tp_size=, device_mesh=,
    distributed_config=), at least one of them given (distributed_config may be a dict; tp_plan, tp_size and the
    mesh's tp size beside it must agree with it); torch.distributed is initialised from torchrun's variables when it
    is not yet."""
    replicas = None
    if device_mesh is not None:
        names = device_mesh.mesh_dim_names or ()
        if device_mesh.ndim != 1 and "tp" not in names:
            raise ValueError(f"device_mesh: a 1-D mesh, or one with a 'tp' dimension, is needed; got dimensions "
                             f"{names or device_mesh.ndim}")
        if device_mesh.size() != dist.get_world_size():
            raise NotImplementedError(f"device_mesh over {device_mesh.size()} of the {dist.get_world_size()} ranks: "
                                      "moelm lays a model over the whole world (use DistributedConfig for data "
                                      "parallel groups)")
        mesh_tp = device_mesh.size() if device_mesh.ndim == 1 else device_mesh["tp"].size()
        if tp_size is not None and tp_size != mesh_tp:
            raise ValueError(f"tp_size={tp_size} disagrees with the device_mesh's tp size {mesh_tp}")
        tp_size = mesh_tp
        replicas = replicas_of(device_mesh, mesh_tp)
        device = device if device is not None else device_mesh.device_type
    if distributed_config is None:
        config = DistributedConfig(tp_size=tp_size, tp_plan=tp_plan if tp_plan is not None else "auto",
                                   dp_replicate_size=replicas)
    else:
        config = DistributedConfig(**distributed_config) if isinstance(distributed_config, dict) else distributed_config
        if not isinstance(config, DistributedConfig):
            raise TypeError(f"distributed_config must be a DistributedConfig or a dict, got {type(config).__name__}")
        for name, value in (("tp_plan", tp_plan), ("tp_size", tp_size)):
            if value is not None and getattr(config, name) != value:
                raise ValueError(f"from_pretrained({name}={value!r}) disagrees with distributed_config.{name}="
                                 f"{getattr(config, name)!r}; give it once")
    # transformers refuses any device_map beside tp > 1; moelm lets "auto" through (it asks for nothing TP does
    # not do: each rank on its own device), so the documented `device_map="auto", tp_plan="auto"` example runs
    if device_map is not None and device_map != "auto" and config.tp_size > 1:
        raise ValueError(f"tp_size={config.tp_size} with device_map={device_map!r}: tensor parallelism places each "
                         "rank on its own device; pass one or the other, not both")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    init_process_group(device)
    return config, device


def replicas_of(device_mesh, tp: int) -> int:
    """The data-parallel replicas of a mesh with a 'tp' dimension (transformers shards over its tp groups only),
    whose tp groups must be the consecutive ranks moelm's own mesh groups."""
    if device_mesh.ndim == 1:
        return 1
    names = list(device_mesh.mesh_dim_names)
    groups = device_mesh.mesh.movedim(names.index("tp"), -1).reshape(-1, tp)
    if not torch.equal(groups.cpu(), torch.arange(device_mesh.size()).reshape(-1, tp)):
        raise NotImplementedError(f"device_mesh: its tp groups {groups.tolist()} are not consecutive ranks, as moelm "
                                  "lays them out; use a mesh whose last dimension is 'tp'")
    return device_mesh.size() // tp
