"""Bytes a rank hands to collectives in one forward, from the plan (comm_plan), and counted in a real run
(CountCollectives): the payload of each all_reduce / all_gather / all_to_all, by kind. Wire bytes follow from the
payload: a ring all-reduce sends 2(n-1)/n of it, an all-gather (n-1)/n of its output, an all-to-all the part
addressed to other ranks."""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = {"all_reduce": "all_reduce", "allreduce_": "all_reduce", "all_gather_into_tensor": "all_gather",
         "allgather_into_tensor_coalesced": "all_gather", "_allgather_base_": "all_gather",
         "all_to_all_single": "all_to_all", "alltoall_base_": "all_to_all", "reduce_scatter_tensor": "reduce_scatter"}


def comm_plan(config, tp: int, ep: int, tokens: int, logits: int, dtype: torch.dtype = torch.bfloat16,
              ep_implementation: str = "auto") -> dict[str, int]:
    """Payload bytes per rank for a forward of `tokens` tokens (per TP group) computing `logits` rows of logits:
    decode is tokens = logits = batch; a prefill keeps the last row's logits. all_to_all counts the K routes of
    this rank's TP slice of the tokens, sent out, plus the routes it receives, sent back (and the tiny per-expert
    counts): per rank that depends on the routing, the mean over the EP group is what is given."""
    h, size = config.hidden_size, dtype.itemsize
    row = tokens * h * size
    experts = getattr(config, "num_experts", None) or 0
    moe = len(config.moe_layers())
    shared = bool(moe and getattr(config, "moe_num_shared_experts", 0))
    out = Counter()
    if tp > 1:
        out["all_reduce"] += row * (1 + config.num_hidden_layers)  # the vocab-parallel embedding, each o_proj
        out["all_reduce"] += row * (config.num_hidden_layers - moe)  # each dense MLP's down_proj
        out["all_reduce"] += row * moe * shared  # the shared experts' down_proj
        out["all_gather"] += logits * (config.vocab_size // tp) * size  # lm_head: colwise, output gathered
    if moe and ep == 1 and tp > 1:
        out["all_reduce"] += row * moe  # each expert's slices summed
    elif moe and ep > 1:
        how = ep_implementation if ep_implementation != "auto" else ("all_reduce" if ep == tp else "all_to_all")
        if how == "all_reduce":
            out["all_reduce"] += row * moe
        else:
            local = -(-tokens // tp)  # this rank's slice of its TP group's rows
            k = config.num_experts_per_tok
            out["all_to_all"] += moe * (2 * local * k * h * size + experts * 8)  # rows there and back; counts
            if tp > 1:
                out["all_gather"] += moe * local * h * size  # the slices gathered back over TP
    return dict(out)


class CountCollectives(TorchDispatchMode):
    """Counts the payload bytes (the input tensors) of the collectives run inside it, by kind."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        kind = KINDS.get(name)
        if kind is not None and func.namespace in ("_c10d_functional", "c10d"):
            first = args[0]
            tensors = first if isinstance(first, (list, tuple)) else [first]
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return func(*args, **(kwargs or {}))
