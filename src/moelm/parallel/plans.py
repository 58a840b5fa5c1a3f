"""The sharding plans of each family, as data in the vocabulary of transformers' `base_model_tp_plan` /
`base_model_ep_plan` (module patterns relative to the causal LM, `*` a layer index), and the checks of a layout."""
from __future__ import annotations

import fnmatch

ATTENTION = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
}
DENSE_MLP = {
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}
def experts_tp(block: str) -> dict[str, str]:
    """The stacked experts under TP (`block`: the MoE block's hub name: mlp for ERNIE, block_sparse_moe for PhiMoE)."""
    return {f"model.layers.*.{block}.experts.gate_up_proj": "packed_colwise",  # [E, 2I, H]: gate, up halves sliced
            f"model.layers.*.{block}.experts.down_proj": "rowwise"}           # [E, H, I]: the input dim sliced


def experts_ep(block: str) -> dict[str, str]:
    """The stacked experts under EP: whole experts, sliced by expert id."""
    return {f"model.layers.*.{block}.experts.gate_up_proj": "grouped_gemm",
            f"model.layers.*.{block}.experts.down_proj": "grouped_gemm"}


ENDS = {
    "model.embed_tokens": "vocab_parallel",
    "lm_head": "colwise_gather_output",
}
TP_PLANS = {
    "ernie4_5": {**ATTENTION, **DENSE_MLP, **ENDS},
    "ernie4_5_moe": {**ATTENTION, **DENSE_MLP, **experts_tp("mlp"), **ENDS,
                     "model.layers.*.mlp.shared_experts.gate_proj": "colwise",
                     "model.layers.*.mlp.shared_experts.up_proj": "colwise",
                     "model.layers.*.mlp.shared_experts.down_proj": "rowwise"},
    # the reference shards only PhiMoE's experts; moelm's plan shards its attention too (q/k/v/o carry biases:
    # colwise biases are sliced, the rowwise o_proj bias is added once)
    "phimoe": {**ATTENTION, **experts_tp("block_sparse_moe"), **ENDS},
}
EP_PLANS = {"ernie4_5": {}, "ernie4_5_moe": experts_ep("mlp"), "phimoe": experts_ep("block_sparse_moe")}


def plan_for(config, tp: int, ep: int) -> dict[str, str]:
    """The rules that apply with these sizes: the TP plan when tp > 1, the EP plan's rules over it when ep > 1."""
    plan = dict(TP_PLANS[config.model_type]) if tp > 1 else {}
    if ep > 1:
        plan.update(EP_PLANS[config.model_type])
    return plan


def rule(plan: dict[str, str], module: str) -> str | None:
    """The plan's rule for a module name (an exact pattern match, `*` standing for a layer index)."""
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(module, pattern):
            return style
    return None


def check_sizes(config, tp: int, ep: int):
    """ValueError naming the numbers for a layout the model cannot take: tp must divide the attention and kv heads,
    ep the experts; ep > 1 must be a multiple of tp, as transformers' DistributedConfig requires."""
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be at least 1, got tp={tp}, ep={ep}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp or kv % tp:
        raise ValueError(f"tp={tp} must divide the attention heads ({heads}) and the key/value heads ({kv})")
    experts = getattr(config, "num_experts", None)
    if ep > 1:
        if not experts:
            raise ValueError(f"ep={ep}: {config.model_type} has no experts to shard")
        if experts % ep:
            raise ValueError(f"ep={ep} must divide the experts ({experts})")
        if ep % tp:
            raise ValueError(f"ep={ep} must be a multiple of tp={tp}")
