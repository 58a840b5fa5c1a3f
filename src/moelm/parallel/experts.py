"""The stacked experts under tensor and expert parallelism. The model's Experts module is kept; its class is
swapped for one of these subclasses, holding this rank's slice as plain local parameters, and the collectives
wrap the unchanged grouped expert compute:

- ExpertsTP: every expert sliced along its intermediate width (gate_up_proj [E, 2I/tp, H]: this rank's gate rows
  then its up rows; down_proj [E, H, I/tp]); each rank's partial outputs are summed over the TP group.
- ExpertsEP: whole experts E/ep per rank (ids [r*E/ep, (r+1)*E/ep)), reached by
  all_reduce: every rank of the group holds the same batch (ep == tp), runs its experts on the routes they own,
  and the outputs are summed; or all_to_all: the (token, expert) pairs are sent to the experts' ranks, run there
  and sent back (each TP rank sends its own slice of the rows it shares)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..nn.moe import Experts


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) of partial results; identity backward (what follows is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumBackward(torch.autograd.Function):
    """Identity forward on a replicated input; all-reduce (sum) of its partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


class _Wait(torch.autograd.Function):
    """Wait for a functional collective's result; identity backward."""

    @staticmethod
    def forward(ctx, x):
        return funcol.wait_tensor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def exchange(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
    """all_to_all_single with autograd (the backward sends the gradients back the same way)."""
    return _Wait.apply(funcol.all_to_all_single_autograd(x.contiguous(), out_sizes, in_sizes, group))


def run_local(experts: Experts, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Experts.forward on rows [N, H] each routed to one local expert (ids, weights [N]) -> [N, H]. With no row, a
    zero-weight dummy row keeps the parameters in the graph, so that every rank joins the backward collectives."""
    if rows.shape[0] == 0:
        dummy = rows.new_zeros(1, rows.shape[1]) + rows.sum()
        return Experts.forward(experts, dummy, ids.new_zeros(1, 1), weights.new_zeros(1, 1))[:0]
    return Experts.forward(experts, rows, ids[:, None], weights[:, None])


class ExpertsTP(Experts):
    """Each expert's intermediate width sliced over the TP group."""

    def forward(self, x, index, weights):
        group = self.tp_mesh.get_group()
        x, weights = _SumBackward.apply(x, group), _SumBackward.apply(weights, group)
        return _SumForward.apply(super().forward(x, index, weights), group)


class ExpertsEP(Experts):
    """Whole experts per rank of the EP group; `ep_implementation` picks how their tokens reach them ("auto":
    all_reduce when the group shares its batch and no gradient is needed, else all_to_all)."""

    def forward(self, x, index, weights):
        shares = self.shares_batch
        how = self.ep_implementation
        if how == "auto":
            how = "all_reduce" if shares and not (torch.is_grad_enabled() and x.requires_grad) else "all_to_all"
        return self.all_reduce(x, index, weights) if how == "all_reduce" else self.all_to_all(x, index, weights)

    def all_reduce(self, x, index, weights):
        """x [T, H], index/weights [T, K] (global expert ids) -> [T, H]."""
        group = self.ep_mesh.get_group()
        x, weights = _SumBackward.apply(x, group), _SumBackward.apply(weights, group)
        first = self.ep_mesh.get_local_rank() * self.num_experts
        mine = (index >= first) & (index < first + self.num_experts)  # [T, K]
        token, choice = mine.nonzero(as_tuple=True)
        out = run_local(self, x[token], index[token, choice] - first, weights[token, choice])
        partial = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
        return _SumForward.apply(partial, group)

    def all_to_all(self, x, index, weights):
        tokens, hidden = x.shape
        tp = self.tp_mesh
        if tp.size() > 1:  # this rank's slice of the rows its TP group shares; their gradients summed over TP
            mine = shard_rows(tokens, tp)
            x, index, weights = (t[mine] for t in (
                _SumBackward.apply(x, tp.get_group()), index, _SumBackward.apply(weights, tp.get_group())))
        group, ep, local = self.ep_mesh.get_group(), self.ep_mesh.size(), self.num_experts
        k = index.shape[1]
        flat = index.reshape(-1)  # [N*K]
        order = flat.argsort(stable=True)  # by expert, hence by owner rank
        send_counts = torch.bincount(flat, minlength=ep * local).view(ep, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_sizes, recv_sizes = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        rows = exchange(x[order // k], recv_sizes, send_sizes, group)
        ids = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
        out = run_local(self, rows, ids, torch.ones(ids.shape[0], dtype=rows.dtype, device=rows.device))
        back = exchange(out, send_sizes, recv_sizes, group)
        pairs = torch.empty_like(back).index_copy_(0, order, back).view(-1, k, hidden)  # [N, K, H]
        out = (pairs * weights.to(pairs.dtype)[..., None]).sum(1).to(x.dtype)
        if tp.size() == 1:
            return out
        return DTensor.from_local(out.contiguous(), tp, [Shard(0)], shape=(tokens, hidden),
                                  stride=(hidden, 1)).full_tensor()


def shard_rows(rows: int, mesh) -> slice:
    """This rank's rows of `rows` as DTensor's Shard(0) lays them out (as torch.chunk: ceil(rows / n) each, the
    last ones short or empty), so that gathering them back as a DTensor puts each where it came from."""
    (size,), (start,) = compute_local_shape_and_global_offset((rows,), mesh, [Shard(0)])
    return slice(start, start + size)


def shard_experts(experts: Experts, style: str, tp_mesh, ep_mesh, ep_implementation: str = "auto",
                  shares_batch: bool = False):
    """Swap `experts` (an Experts module, parameters full or on meta) for its TP ("packed_colwise") or EP
    ("grouped_gemm") form, keeping this rank's slice. Returns the layouts {parameter: (kind, dim, mesh)}."""
    if style == "grouped_gemm":
        n, rank = ep_mesh.size(), ep_mesh.get_local_rank()
        local = experts.num_experts // n
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, torch.nn.Parameter(full.data[rank * local:(rank + 1) * local].clone(),
                                                      requires_grad=full.requires_grad))
        experts.__class__ = ExpertsEP
        experts.num_experts, experts.ep_mesh, experts.tp_mesh = local, ep_mesh, tp_mesh
        experts.ep_implementation, experts.shares_batch = ep_implementation, shares_batch
        return {"gate_up_proj": ("shard", 0, ep_mesh), "down_proj": ("shard", 0, ep_mesh)}
    n, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    gate_up, down = experts.gate_up_proj, experts.down_proj
    width = down.shape[2] // n
    halves = [h[:, rank * width:(rank + 1) * width] for h in gate_up.data.chunk(2, dim=1)]
    experts.gate_up_proj = torch.nn.Parameter(torch.cat(halves, dim=1), requires_grad=gate_up.requires_grad)
    experts.down_proj = torch.nn.Parameter(down.data[:, :, rank * width:(rank + 1) * width].clone(),
                                           requires_grad=down.requires_grad)
    experts.__class__ = ExpertsTP
    experts.tp_mesh = tp_mesh
    return {"gate_up_proj": ("packed", 1, tp_mesh), "down_proj": ("shard", 2, tp_mesh)}


def full_tensor(local: torch.Tensor, layout) -> torch.Tensor:
    """The whole parameter from this rank's slice (a collective: every rank of the layout's mesh calls it)."""
    kind, dim, mesh = layout
    if kind == "packed":
        return torch.cat([full_tensor(h.contiguous(), ("shard", dim, mesh)) for h in local.chunk(2, dim=dim)], dim)
    return DTensor.from_local(local.contiguous(), mesh, [Shard(dim)]).redistribute(mesh, [Replicate()]).to_local()
