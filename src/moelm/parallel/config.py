"""transformers' DistributedConfig (same fields, same resolution and rules) and the process group it runs on:
torch.distributed initialised from torchrun's variables, gloo on CPU and nccl on CUDA."""
from __future__ import annotations

import atexit
import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

EP_IMPLEMENTATIONS = ("auto", "all_to_all", "all_reduce")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedConfig:
    """The layout of a distributed model. world = dp_replicate_size * fsdp_size * tp_size; the experts are laid
    over the fsdp x tp ranks as efsdp x ep (efsdp = fsdp * tp / ep), so ep must be a multiple of tp and divide
    fsdp * tp. tp_size None with a tp_plan takes the world size left by the other sizes."""

    tp_size: int | None = None
    tp_plan: dict[str, str] | str | None = None
    fsdp_size: int | None = None
    dp_replicate_size: int | None = None
    ep_size: int | None = None
    ep_plan: dict[str, str] | None = None
    ep_implementation: str = "auto"
    pp_size: int | None = None
    enable_sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp_size", "fsdp_size", "dp_replicate_size", "pp_size", "ep_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DistributedConfig: {name} must be an integer >= 1, got {value!r}")
        self.fsdp_size = self.fsdp_size or 1
        self.dp_replicate_size = self.dp_replicate_size or 1
        self.pp_size = self.pp_size or 1
        self.ep_size = self.ep_size or 1
        if self.tp_size is None:
            if self.tp_plan is not None:
                world, other = int(os.environ.get("WORLD_SIZE", 1)), self.dp_replicate_size * self.fsdp_size
                if world % other:
                    raise ValueError(f"DistributedConfig: WORLD_SIZE ({world}) must be divisible by "
                                     f"dp_replicate_size * fsdp_size ({other}) to derive tp_size")
                self.tp_size = world // other
            else:
                self.tp_size = 1
        if self.tp_plan is not None and self.tp_plan != "auto" and not isinstance(self.tp_plan, dict):
            raise ValueError(f"DistributedConfig: tp_plan must be 'auto', a dict or None, got {self.tp_plan!r}")
        if self.ep_plan is not None and not isinstance(self.ep_plan, dict):
            raise ValueError("DistributedConfig: ep_plan must be a dict or None")
        if self.ep_implementation not in EP_IMPLEMENTATIONS:
            raise ValueError(f"DistributedConfig: ep_implementation must be one of {EP_IMPLEMENTATIONS}, got "
                             f"{self.ep_implementation!r}")
        if self.pp_size > 1:
            raise NotImplementedError(f"DistributedConfig(pp_size={self.pp_size}): pipeline parallelism is not "
                                      "implemented in moelm")
        if self.enable_sequence_parallel:
            raise NotImplementedError("DistributedConfig(enable_sequence_parallel=True): not implemented in moelm "
                                      "(nor wired up in transformers)")
        if self.ep_size > 1:
            if self.ep_size % self.tp_size:
                raise ValueError(f"DistributedConfig: ep_size ({self.ep_size}) must be a multiple of tp_size "
                                 f"({self.tp_size})")
            if (self.fsdp_size * self.tp_size) % self.ep_size:
                raise ValueError(f"DistributedConfig: ep_size ({self.ep_size}) must divide fsdp_size * tp_size "
                                 f"({self.fsdp_size} * {self.tp_size} = {self.fsdp_size * self.tp_size})")
        if self.ep_implementation == "all_reduce" and self.ep_size > 1 and self.ep_size != self.tp_size:
            raise ValueError(f"DistributedConfig: ep_implementation='all_reduce' needs every rank of an expert group "
                             f"to hold the same batch (ep_size == tp_size), got ep_size={self.ep_size}, "
                             f"tp_size={self.tp_size}")

    @property
    def world_size(self) -> int:
        return self.dp_replicate_size * self.fsdp_size * self.tp_size

    @property
    def efsdp_size(self) -> int:
        return self.fsdp_size * self.tp_size // self.ep_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def init_process_group(device: torch.device | None = None) -> None:
    """torch.distributed as torchrun launched it: nothing to do when already initialised, else the env:// rendezvous
    with gloo for CPU and nccl for CUDA. Without torchrun's variables, an error saying how to launch."""
    if dist.is_initialized():
        return
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(f"tensor/expert parallelism runs one process per rank, launched by torchrun (e.g. "
                           f"`torchrun --nproc-per-node 2 script.py`); {', '.join(missing)} not set in the "
                           "environment")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy)


def _destroy() -> None:
    """At exit, the process group that init_process_group opened: closed while the interpreter still runs. gloo's
    threads free a finished collective's tensors after its caller has returned, which takes the GIL; one still doing
    that when the interpreter finalises is ended mid-destructor and aborts the process ("terminate called without an
    active exception", 1 exit in 7-14 of the EP example on 2 cores). So first a moment without the GIL for them."""
    if dist.is_initialized():
        time.sleep(0.05)
        dist.destroy_process_group()
