"""The per-rank memory of a tensor/expert-parallel layout, from the plan and the model's own parameter shapes
(a model built on the meta device will do, so any named config works): weights, KV cache per 1k tokens, largest
activation."""
from __future__ import annotations

import torch

from ..inference.quantization import QuantizationConfig, experts_group_for, group_for
from .plans import check_plan, check_sizes, parameter_styles, plan_for

SHARDED_DIM = {"colwise": 0, "vocab_parallel": 0, "colwise_gather_output": 0, "packed_colwise": 1}


def local_numel(shape: tuple[int, ...], style: str | None, tp: int, ep: int, bias: bool) -> int:
    """Elements of a parameter held by one rank under a plan rule."""
    shape = list(shape)
    if style == "grouped_gemm":
        shape[0] = -(-shape[0] // ep)
    elif style == "rowwise" and not bias:
        shape[-1] = -(-shape[-1] // tp)
    elif style in SHARDED_DIM:
        dim = 0 if bias else SHARDED_DIM[style]
        shape[dim] = -(-shape[dim] // tp)
    n = 1
    for s in shape:
        n *= s
    return n


def quantized_bytes(name: str, numel: int, shape: tuple[int, ...], mode: str) -> int:
    """moelm's int8 (a byte per weight, an fp32 scale per row) or int4 (half a byte, an fp16 scale per group; stacked
    experts [E, 2I, H] / [E, H, I] share one group size) for a weight of `shape` holding `numel` locally."""
    if mode == "int8":
        return numel + 4 * (numel // shape[-1])
    config = QuantizationConfig("int4")
    if len(shape) == 3:
        hidden, inter = (shape[2], shape[1] // 2) if name.endswith("gate_up_proj") else (shape[1], shape[2])
        group = experts_group_for(name, hidden, inter, config)
    else:
        group = group_for(name, shape[-1], config)
    return numel // 2 + 2 * (numel // group)


def memory_plan(model, tp: int = 1, ep: int = 1, dtype: torch.dtype = torch.bfloat16,
                quantization: str | None = None, tokens: int = 4096) -> dict:
    """Bytes per rank of `model` (whole, unquantized; meta will do): weights (dense and experts), KV cache per 1k
    tokens of one sequence, and the largest activation of a `tokens`-token prefill step, for tp x ep (world
    max(tp, ep): with ep > tp the dense parts are replicated in each of the ep / tp groups)."""
    config = model.config
    check_sizes(config, tp, ep)
    plan = plan_for(config, tp, ep)
    check_plan(model, plan, tp)
    styles = parameter_styles(model, plan)
    size = dtype.itemsize
    dense = experts = 0
    for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
        module, _, leaf = name.rpartition(".")
        stacked = leaf in ("gate_up_proj", "down_proj") and module.endswith(".experts")
        numel = local_numel(tuple(p.shape), styles.get(name), tp, ep, bias=leaf == "bias")
        target = quantization and (stacked or leaf == "weight" and p.dim() == 2 and "embed_tokens" not in name
                                   and not name.endswith(".gate.weight"))  # Linear weights and experts
        nbytes = quantized_bytes(name, numel, tuple(p.shape), quantization) if target else numel * size
        if stacked:
            experts += nbytes
        else:
            dense += nbytes
    if quantization and config.tie_word_embeddings:  # the tied head gets its own quantized copy
        head = model.lm_head.weight
        numel = local_numel(tuple(head.shape), styles.get("lm_head.weight"), tp, ep, bias=False)
        dense += quantized_bytes("lm_head.weight", numel, tuple(head.shape), quantization)
    layers, d = config.num_hidden_layers, config.head_size
    kv_heads, heads = config.num_key_value_heads // tp, config.num_attention_heads // tp
    kv = layers * 2 * kv_heads * d * size * 1000
    t, h = tokens, config.hidden_size
    candidates = {"hidden states": t * h * size, "q/k/v": t * (heads + 2 * kv_heads) * d * size,
                  "next-token logits (fp32)": config.vocab_size * 4}
    if len(config.moe_layers()) < layers:
        candidates["dense MLP gate/up"] = t * 2 * config.intermediate_size // tp * size
    if getattr(config, "num_experts", None):
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        k = config.num_experts_per_tok
        candidates["routed expert gate/up (all routes on one rank)"] = t * k * 2 * width // (tp if ep == 1 else 1) \
            * size
    what = max(candidates, key=candidates.get)
    return {"tp": tp, "ep": ep, "world": max(tp, ep), "dtype": str(dtype).removeprefix("torch."),
            "quantization": quantization, "dense": dense, "experts": experts, "weights": dense + experts,
            "kv_per_1k": kv, "activation": candidates[what], "activation_what": what, "tokens": tokens}
