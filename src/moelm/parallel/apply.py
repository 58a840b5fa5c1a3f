"""Applying a family's plans to an unchanged model on torch.distributed: the meshes of a DistributedConfig, torch's
ColwiseParallel / RowwiseParallel (DTensor parameters) for the linear layers and embeddings, moelm's expert forms
(parallel/experts.py) for the stacked experts; then what loading and saving need to know of each parameter."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..inference.linear import FastLinear, Fused, hook_dicts
from ..inference.modules import optimize
from ..nn.layers import Attention
from ..nn.moe import Experts
from .config import DistributedConfig
from .experts import full_tensor, shard_experts
from .plans import check_plan, check_rules_match, check_sizes, plan_for, sharded_modules

LINEAR_STYLES = {"colwise": lambda: ColwiseParallel(), "rowwise": lambda: RowwiseParallel(),
                 "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
                 "vocab_parallel": lambda: RowwiseParallel(input_layouts=Replicate())}


class ParallelState:
    """What a parallelized model carries as `model.parallel`: the layout, its meshes, and each sharded parameter's
    layout, for loading (local_view) and saving (full)."""

    def __init__(self, config: DistributedConfig, dense: DeviceMesh, experts: DeviceMesh, plan: dict[str, str]):
        self.config, self.dense_mesh, self.expert_mesh, self.plan = config, dense, experts, plan
        self.tp_mesh, self.ep_mesh = dense["tp"], experts["ep"]
        self.tp_size, self.ep_size = config.tp_size, config.ep_size
        self.layouts: dict[str, tuple] = {}  # expert parameters: (kind, dim, mesh)
        self.shares_batch = config.ep_size == config.tp_size  # an expert group is a TP group: one batch

    @property
    def is_writer(self) -> bool:
        return dist.get_rank() == 0

    def align_rng(self):
        """The TP group's first rank's random state on every rank of the group: their sampled tokens must agree,
        and nothing else keeps the ranks' random streams together (one process's seed gives the same state)."""
        group = self.tp_mesh.get_group()
        if self.tp_size == 1:
            return
        device, first = self.tp_mesh.device_type, dist.get_global_rank(group, 0)
        states = [(torch.get_rng_state, torch.set_rng_state)]
        if device == "cuda":
            states.append((torch.cuda.get_rng_state, torch.cuda.set_rng_state))
        for get, put in states:  # sent on the mesh's device (nccl sends CUDA tensors only)
            state = get().to(device)
            dist.broadcast(state, first, group=group)
            put(state.cpu())

    def generation_sync(self) -> ParallelState | None:
        """Self when ranks of one expert group decode different batches (all-to-all over data-parallel ranks):
        generate then keeps them in step (all_done, idle_forward)."""
        return self if self.ep_size > 1 and not self.shares_batch else None

    def all_done(self, done: bool) -> bool:
        """Whether every rank of this rank's expert group is done (a collective)."""
        flag = torch.tensor([int(done)], device=self.ep_mesh.device_type)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.ep_mesh.get_group())
        return bool(flag)

    def idle_forward(self, model):
        """One forward of one token, without cache, joining the collectives of the others' decode step."""
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)

    def from_writer(self, value):
        """Rank 0's `value` on every rank (a collective)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The whole parameter `name` (a collective: every rank calls it, in the same order)."""
        if isinstance(tensor, DTensor):  # FSDP's shards, or TP's; then the expert layout (EP experts under FSDP)
            tensor = tensor.full_tensor()
        layout = self.layouts.get(name)
        return tensor if layout is None else full_tensor(tensor, layout)

    def local_view(self, name: str, param: torch.Tensor, expert: int | None, part: int | None, num_parts: int):
        """Where a hub tensor goes on this rank: (target view, index into the hub tensor or None for all of it,
        the hub tensor's whole shape); the target is None when it belongs to other ranks (its shape still checked)."""
        if isinstance(param, DTensor):
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            return local, index, tuple(param.shape)
        layout = self.layouts.get(name)
        if expert is None or layout is None:  # whole on every rank: the expert's part, as one process loads it
            target = param if expert is None else param[expert].chunk(num_parts, dim=0)[part]
            return target, None, tuple(target.shape)
        kind, dim, mesh = layout
        if dim == 0:  # whole experts per rank
            first = mesh.get_local_rank() * param.shape[0]
            if not first <= expert < first + param.shape[0]:
                return None, None, tuple(param[0].chunk(num_parts, dim=0)[part].shape)
            target = param[expert - first].chunk(num_parts, dim=0)[part]
            return target, None, tuple(target.shape)
        target = param[expert].chunk(num_parts, dim=0)[part]  # [I/tp, H] of gate or up, or down's [H, I/tp]
        axis = 0 if kind == "packed" else 1
        n, rank = mesh.size(), mesh.get_local_rank()
        width = target.shape[axis]
        index = [slice(None), slice(None)]
        index[axis] = slice(rank * width, (rank + 1) * width)
        shape = list(target.shape)
        shape[axis] *= n
        return target, tuple(index), tuple(shape)


def waited(module, args, out):
    """A collective's result as a plain tensor (torch's styles hand back one still pending, whose data pointer is
    not valid yet for moelm's C kernels). Not where gradients flow: wait() leaves the graph, and no C kernel runs
    there."""
    return out.wait() if isinstance(out, AsyncCollectiveTensor) and not out.requires_grad else out


def gather_heads(module, args, out, mesh: DeviceMesh):
    """Attention weights [B, H, Q, K] of every head (output_attentions), from this rank's heads."""
    out, weights = out
    if weights is None:
        return None
    return out, DTensor.from_local(weights.contiguous(), mesh, [Shard(1)]).full_tensor()


def meshes(config: DistributedConfig, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The dense mesh (dp_replicate, dp_shard, tp) and the expert mesh (dp_replicate, efsdp, ep) over the same
    ranks: an EP group is ep consecutive ranks, whole TP groups."""
    world = dist.get_world_size()
    if world != config.world_size:
        raise ValueError(f"the world has {world} processes but the layout needs dp_replicate_size * fsdp_size * "
                         f"tp_size = {config.dp_replicate_size} * {config.fsdp_size} * {config.tp_size} = "
                         f"{config.world_size}")
    dense = init_device_mesh(device_type, (config.dp_replicate_size, config.fsdp_size, config.tp_size),
                             mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    ranks = torch.arange(world).reshape(config.dp_replicate_size, config.efsdp_size, config.ep_size)
    experts = DeviceMesh(device_type, ranks, mesh_dim_names=("dp_replicate", "efsdp", "ep"))
    return dense, experts


def parallelize(model: nn.Module, config: DistributedConfig, device_type: str = "cpu") -> nn.Module:
    """Shard `model` (built on meta, or whole and identical on every rank) in place over the current process group
    as `config` lays it out; sets model.parallel."""
    cfg = model.config
    check_sizes(cfg, config.tp_size, config.ep_size)
    plan = plan_for(cfg, config.tp_size, config.ep_size, config.tp_plan, config.ep_plan)
    check_plan(model, plan, config.tp_size)
    check_rules_match(model, user_rules(config))
    dense, experts_mesh = meshes(config, device_type)
    state = ParallelState(config, dense, experts_mesh, plan)
    shares_batch = state.shares_batch
    dispatcher = getattr(getattr(model, "backend", None), "dispatcher", "torch")  # NeMo's BackendConfig
    how = dispatcher if config.ep_implementation == "auto" and dispatcher != "torch" else config.ep_implementation
    if how == "all_reduce" and config.ep_size > 1 and not shares_batch:
        raise ValueError(f"the all_reduce expert dispatch needs ep_size == tp_size, got ep_size={config.ep_size}, "
                         f"tp_size={config.tp_size}")
    on_meta = any(p.is_meta for p in model.parameters())
    for name, module, style in list(sharded_modules(model, plan)):
        if isinstance(module, Experts):
            layouts = shard_experts(module, style, state.tp_mesh, state.ep_mesh, how, shares_batch)
            state.layouts.update({f"{name}.{k}": v for k, v in layouts.items()})
        else:
            parallel_style = LINEAR_STYLES[style]()
            parallel_style.src_data_rank = None if on_meta else 0
            parallelize_module(module, state.tp_mesh, parallel_style)
            module.register_forward_hook(waited)
    model.tie_weights()
    for module in model.modules():  # attention computes this rank's heads
        if isinstance(module, Attention) and isinstance(module.q_proj.weight, DTensor):
            module.num_heads //= config.tp_size
            module.num_kv_heads //= config.tp_size
            module.register_forward_hook(functools.partial(gather_heads, mesh=state.tp_mesh))
    model.parallel = state
    return model


def user_rules(config: DistributedConfig) -> dict[str, str]:
    """The rules of the plans a user gave (a dict tp_plan, an ep_plan) that apply at these sizes."""
    rules = dict(config.tp_plan) if isinstance(config.tp_plan, dict) and config.tp_size > 1 else {}
    return {**rules, **(config.ep_plan or {})} if config.ep_size > 1 else rules


def optimize_sharded(model: nn.Module) -> nn.Module:
    """moelm's inference fast paths on a sharded model: the fast modules, but the sharded linear layers stay
    torch's; q/k/v and gate/up fused over this rank's shards, so a decoding step's attention runs in moelm's C
    kernel on the local heads."""
    def sharded(module) -> bool:
        return isinstance(getattr(module, "weight", None), DTensor)

    return optimize(model, keep=lambda m: isinstance(m, nn.Linear) and sharded(m),
                    make=lambda parts: fuse_shards(parts) if sharded(parts[0]) else Fused(parts))


def fuse_shards(modules: list[nn.Linear]) -> Fused:
    """One FastLinear over the local shards of colwise projections of the same input; each DTensor's local shard
    becomes a view of it (no second copy; saving gathers the same values)."""
    names = ["weight"] + (["bias"] if modules[0].bias is not None else [])
    fused = Fused.__new__(Fused)
    fused.quantized, fused.first, fused.hooks = False, modules[0], hook_dicts(modules)
    # the sharding's own hooks (torch's styles: inputs and outputs redistributed; waited): the fused call over the
    # local shards needs none of them, so only hooks added later keep the projections apart
    fused.own_hooks = {k for d in fused.hooks for k in d}
    fused.splits = [m.weight.to_local().shape[0] for m in modules]
    fused.module = FastLinear(modules[0].in_features, sum(fused.splits), bias=len(names) == 2, device="meta")
    with torch.no_grad():
        for name in names:
            whole = torch.cat([getattr(m, name).to_local() for m in modules])
            setattr(fused.module, name, nn.Parameter(whole, requires_grad=False))
            for m, view in zip(modules, whole.split(fused.splits)):
                getattr(m, name)._local_tensor = view
    return fused

