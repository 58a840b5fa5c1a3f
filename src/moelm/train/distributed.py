"""Training over torch.distributed, applied to an unchanged model: experts split over the expert mesh (EP with
all-to-all, moelm.parallel), then FSDP2 (fully_shard) of each decoder layer and of the root over the data-parallel
mesh, and of each rank's experts over the expert-FSDP mesh when several ranks hold the same experts. Gradients are
reduced with SUM (gloo has no PREMUL_SUM/AVG): the loss is already divided by the global label-token count."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..models.modeling import Router
from ..nn.moe import Experts
from ..parallel.apply import parallelize
from ..parallel.config import DistributedConfig
from ..parallel.plans import check_sizes


@dataclass
class Layout:
    world: int = 1
    rank: int = 0
    fsdp: int = 1  # data-parallel ranks (each its own micro-batches); the dense weights are sharded over them
    ep: int = 1
    replicated: list = field(default_factory=list)  # trainable parameters whole on every rank (the routers)

    @property
    def distributed(self) -> bool:
        return self.world > 1


def layout_for(section, world: int, rank: int, config, source: str) -> Layout:
    """The recipe's distributed section checked against the world size and the model."""
    if section.tp != 1:
        raise NotImplementedError(f"{source}: distributed.tp={section.tp}: tensor parallelism is not implemented "
                                  "for training (it is for inference); use fsdp and ep")
    fsdp = section.fsdp or world
    if fsdp != world:
        raise ValueError(f"{source}: distributed.fsdp={fsdp} must equal the number of processes ({world}): every "
                         "rank is a data-parallel rank sharding the dense weights")
    try:
        check_sizes(config, 1, section.ep)
    except ValueError as e:
        raise ValueError(f"{source}: distributed.{e}") from None
    if world == 1 and section.ep > 1:
        raise ValueError(f"{source}: distributed.ep={section.ep} needs {section.ep} processes or a multiple: launch "
                         f"with `torchrun --nproc-per-node {section.ep} -m moelm finetune ...`")
    if world % section.ep:
        raise ValueError(f"{source}: distributed.ep={section.ep} must divide the number of processes ({world})")
    return Layout(world=world, rank=rank, fsdp=fsdp, ep=section.ep)


def split_experts(model: nn.Module, layout: Layout) -> nn.Module:
    """model.parallel with the meshes; with ep > 1 each rank keeps its E/ep experts (all-to-all dispatch)."""
    return parallelize(model, DistributedConfig(fsdp_size=layout.fsdp, ep_size=layout.ep,
                                                ep_implementation="all_to_all"), device_type="cpu")


def shard(model: nn.Module, layout: Layout) -> nn.Module:
    """FSDP2 over the meshes of split_experts. The correction biases stay whole on every rank (updated in place,
    identically, from loads summed over the ranks); experts alone on their rank stay plain local tensors; routers
    stay whole too (their gradients summed by reduce_replicated)."""
    state = model.parallel
    dense, expert_fsdp = state.dense_mesh["dp_shard"], state.expert_mesh["efsdp"]
    ignored = {p for n, p in model.named_parameters() if n.endswith("e_score_correction_bias")}
    for module in model.modules():
        if isinstance(module, Router):  # replicated: read as a weight, not called (no FSDP hook), and kept fp32
            layout.replicated.extend(p for p in module.parameters() if p.requires_grad)
            ignored |= set(module.parameters())
        if isinstance(module, Experts) and layout.ep > 1:
            if expert_fsdp.size() > 1:
                fully_shard(module, mesh=expert_fsdp)
            else:
                ignored |= set(module.parameters())
    for layer in model.model.layers:
        fully_shard(layer, mesh=dense, ignored_params=ignored)
    fully_shard(model, mesh=dense, ignored_params=ignored)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is a share of the global mean already
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM), divided by 1
    return model


def all_sum(values: list[float], layout: Layout) -> list[float]:
    """Scalars summed over the ranks (one collective)."""
    if not layout.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def reduce_replicated(layout: Layout) -> None:
    """The gradients of the parameters whole on every rank, summed over the ranks (as FSDP sums the others)."""
    grads = [p.grad for p in layout.replicated if p.grad is not None]
    if layout.distributed and grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, layout: Layout) -> float:
    """The global gradient norm (each element counted once: FSDP shards, EP experts, the replicated ones on rank 0),
    clipped to max_norm as torch.nn.utils.clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6), at most 1)."""
    grads = [p for p in params if p.grad is not None]
    whole = {id(p) for p in layout.replicated}  # counted on rank 0 only
    counted = [local(p.grad).float().pow(2).sum() for p in grads if layout.rank == 0 or id(p) not in whole]
    squares = torch.stack(counted).sum() if counted else torch.zeros(())
    if layout.distributed:
        dist.all_reduce(squares)
    norm = squares.sqrt()
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in grads:
            local(p.grad).mul_(coef.to(p.grad.dtype))
    return float(norm)
