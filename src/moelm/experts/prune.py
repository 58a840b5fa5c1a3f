"""`moelm prune`: fewer routed experts per MoE layer, chosen from an expert report, written as a hub checkpoint
that transformers loads as a normal model: each layer's router rows, ERNIE's correction bias and the stacked experts
sliced to the kept experts (in their old order), the config's expert count updated. The same number of experts is
kept in every layer: config.json has one expert count for all layers."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..models.modeling import moe_blocks

BY = ("reap", "frequency")
EXPERT_COUNT = {"ernie4_5_moe": "moe_num_experts", "phimoe": "num_local_experts"}


def chosen(report: dict, keep: float, by: str = "reap") -> dict[int, list[int]]:
    """decoder layer -> the experts kept (ascending): the ceil(keep x E) of largest REAP saliency (`reap`) or of most
    tokens (`frequency`) in the report; ties go to the lower expert id."""
    if by not in BY:
        raise ValueError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    if isinstance(keep, bool) or not 0 < keep < 1:
        raise ValueError(f"--keep must be a fraction of the experts between 0 and 1 (exclusive), got {keep!r}")
    e, k = report["num_experts"], report["top_k"]
    n = math.ceil(keep * e - 1e-9)
    if n >= e:
        raise ValueError(f"--keep {keep} keeps all {e} experts (ceil({keep} x {e}) = {n}): nothing would be pruned")
    if n < k:
        raise ValueError(f"--keep {keep} keeps {n} of {e} experts, fewer than the {k} each token is routed to")
    out = {}
    for x in report["layers"]:
        score = x["reap"] if by == "reap" else x["tokens"]
        order = sorted(range(e), key=lambda j: (-score[j], j))
        out[x["layer"]] = sorted(order[:n])
    return out


def check(model, report: dict, name: str):
    """The report is of this model: the same MoE layers and expert count; and its experts are not quantized."""
    layers = [i for i, _ in moe_blocks(model)]
    experts = {b.experts.num_experts for _, b in moe_blocks(model)}
    theirs = [x["layer"] for x in report["layers"]]
    if report.get("model_type") != model.config.model_type or theirs != layers or experts != {report["num_experts"]}:
        raise ValueError(f"{name}: the report is of a {report.get('model_type')} with MoE layers {theirs} of "
                         f"{report['num_experts']} experts, not this model ({model.config.model_type}, MoE layers "
                         f"{layers} of {sorted(experts)} experts)")
    for layer, block in moe_blocks(model):
        if not isinstance(getattr(block.experts, "gate_up_proj", None), torch.Tensor):
            raise ValueError(f"layer {layer}'s experts are {type(block.experts).__name__}: pruning needs the "
                             "unquantized checkpoint (prune it first, then quantize the pruned one)")


@torch.no_grad()
def prune(model, keep: dict[int, list[int]]) -> nn.Module:
    """Slice the model's MoE layers in place to the experts in keep (decoder layer -> expert ids) and update its
    config; returns the model."""
    config = model.config
    field = EXPERT_COUNT.get(config.model_type)
    if field is None:
        raise ValueError(f"pruning experts is not supported for model_type {config.model_type!r}")
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    n = counts.pop()
    top_k = config.num_experts_per_tok
    if n < top_k:
        raise ValueError(f"keeping {n} experts per layer leaves fewer than the {top_k} each token is routed to")
    for layer, block in moe_blocks(model):
        rows = torch.tensor(keep[layer])
        block.gate.weight = nn.Parameter(block.gate.weight[rows].clone(), requires_grad=False)
        statics = getattr(block, "moe_statics", None)
        if statics is not None:
            bias = statics.e_score_correction_bias
            statics.e_score_correction_bias = nn.Parameter(bias[:, rows].clone(), requires_grad=False)
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(getattr(experts, name)[rows].clone()))
        experts.num_experts = n
    setattr(config, field, n)
    return model


def save(model, out, tokenizer_from, files: dict[str, str] | None = None) -> Path:
    """The model as a hub checkpoint at `out` with the tokenizer (and chat template) of `tokenizer_from` and the
    text `files` (name -> text), written to a temporary directory and renamed into place."""
    from ..train.state import write_checkpoint

    return write_checkpoint(model, out, [tokenizer_from], files)
