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
    decode is tokens = logits = batch; a prefill keeps the last row's logits, and its last layer's MLP / MoE block
    runs on the kept rows only. all_to_all counts the K routes of this rank's TP slice of the tokens, sent out,
    plus the routes it receives, sent back (and the tiny per-expert counts): per rank that depends on the routing,
    the mean over the EP group is what is given."""
    h, size = config.hidden_size, dtype.itemsize
    layers, experts = config.num_hidden_layers, getattr(config, "num_experts", None) or 0
    moe_layers = set(config.moe_layers())
    shared = bool(moe_layers and getattr(config, "moe_num_shared_experts", 0))
    k = getattr(config, "num_experts_per_tok", 0)
    how = ep_implementation if ep_implementation != "auto" else ("all_reduce" if ep == tp else "all_to_all")
    out = Counter()
    if tp > 1:
        out["all_reduce"] += tokens * h * size * (1 + layers)  # the vocab-parallel embedding, each o_proj
        out["all_gather"] += logits * -(-config.vocab_size // tp) * size  # lm_head: colwise, gathered (padded)
    for i in range(layers):
        rows = min(logits, tokens) if i == layers - 1 else tokens  # the feed-forward's rows
        row = rows * h * size
        if i not in moe_layers:
            if tp > 1:
                out["all_reduce"] += row  # the dense MLP's down_proj
            continue
        if tp > 1 and shared:
            out["all_reduce"] += row  # the shared experts' down_proj
        if ep == 1 and tp > 1 or ep > 1 and how == "all_reduce":
            out["all_reduce"] += row  # each expert's slices summed
        elif ep > 1:
            local = -(-rows // tp)  # this rank's slice of its TP group's rows
            out["all_to_all"] += 2 * local * k * h * size + experts * 8  # rows there and back; counts
            if tp > 1:
                out["all_gather"] += local * h * size  # the slices gathered back over TP
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
