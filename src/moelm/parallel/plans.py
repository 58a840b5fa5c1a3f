"""The sharding plans of each family, as data in the vocabulary of transformers' `base_model_tp_plan` /
`base_model_ep_plan` (module patterns relative to the causal LM, `*` a layer index), the one resolution of which
rule shards which module, and the checks of a layout."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

from ..nn.layers import MLP, Attention
from ..nn.moe import Experts

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
LINEAR_STYLES = ("colwise", "rowwise", "colwise_gather_output", "vocab_parallel")  # nn.Linear / nn.Embedding
EXPERT_STYLES = ("packed_colwise", "grouped_gemm")  # stacked Experts, by their gate_up_proj's rule


def plan_for(config, tp: int, ep: int, tp_plan: dict | str | None = None,
             ep_plan: dict | None = None) -> dict[str, str]:
    """The rules that apply with these sizes: the family's TP plan when tp > 1 (a dict tp_plan in its place, {}
    dropping every rule), the EP plan's rules over it when ep > 1 (then ep_plan's); an unknown style is a
    ValueError."""
    plan = {}
    if tp > 1:
        plan = dict(tp_plan) if isinstance(tp_plan, dict) else dict(TP_PLANS[config.model_type])
    if ep > 1:
        plan.update(EP_PLANS[config.model_type])
        plan.update(ep_plan or {})
    known = (*LINEAR_STYLES, *EXPERT_STYLES)  # "rowwise" also names the experts' down_proj under TP
    for pattern, style in plan.items():
        if style not in known:
            raise ValueError(f"plan rule {pattern!r}: unknown style {style!r}; moelm knows {', '.join(known)}")
    return plan


def rule(plan: dict[str, str], module: str) -> str | None:
    """The plan's rule for a module name (an exact pattern match, `*` standing for a layer index)."""
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(module, pattern):
            return style
    return None


def sharded_modules(model: nn.Module, plan: dict[str, str]) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, style) of each module `plan` shards: an nn.Linear / nn.Embedding by its own name's rule,
    stacked Experts by their gate_up_proj's (down_proj follows: rowwise under packed_colwise, grouped_gemm under
    grouped_gemm). A style that does not fit its module is a ValueError."""
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            style = rule(plan, f"{name}.gate_up_proj")
            if style is not None and style not in EXPERT_STYLES:
                raise ValueError(f"plan rule for {name}.gate_up_proj: experts take packed_colwise (TP) or "
                                 f"grouped_gemm (EP), not {style!r}")
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            style = rule(plan, name)
            if style is not None and style not in LINEAR_STYLES:
                raise ValueError(f"plan rule for {name}: {style!r} does not apply to a {type(module).__name__}")
        else:
            continue
        if style is not None:
            yield name, module, style


BLOCKS = {Attention: {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
          MLP: {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}}


def check_plan(model: nn.Module, plan: dict[str, str], tp: int):
    """ValueError naming the module for a plan the model cannot run as one process does: an attention block or an
    MLP sharded in part or otherwise than q/k/v (gate/up) colwise and o (down) rowwise; the embedding other than
    vocab_parallel, the LM head other than colwise_gather_output, or only one of them when they are tied; any other
    nn.Linear; an MLP or experts sliced along an intermediate width that tp does not divide."""
    styles, done = {}, set()
    for name, module, style in sharded_modules(model, plan):
        if isinstance(module, Experts):
            if style == "packed_colwise" and module.down_proj.shape[2] % tp:
                raise ValueError(f"tp={tp} must divide the intermediate size of {name} ({module.down_proj.shape[2]})")
        else:
            styles[name] = style
    for name, module in model.named_modules():
        want = next((v for k, v in BLOCKS.items() if isinstance(module, k)), None)
        if want is None:
            continue
        got = {leaf: styles.get(f"{name}.{leaf}") for leaf in want}
        if any(got.values()) and got != want:
            raise ValueError(f"plan for {name}: {_listed(got)}; moelm shards it as {_listed(want)}, or not at all")
        if isinstance(module, MLP) and any(got.values()) and module.gate_proj.out_features % tp:
            raise ValueError(f"tp={tp} must divide the intermediate size of {name} ({module.gate_proj.out_features})")
        done.update(f"{name}.{leaf}" for leaf in want)
    ends = {_name_of(model, model.get_input_embeddings()): "vocab_parallel",
            _name_of(model, model.get_output_embeddings()): "colwise_gather_output"}
    ends.pop(None, None)
    for name, style in ends.items():
        if styles.get(name, style) != style:
            raise ValueError(f"plan for {name}: {styles[name]!r}; moelm shards it as {style!r}, or not at all")
    if getattr(model.config, "tie_word_embeddings", False) and len({n in styles for n in ends}) > 1:
        raise ValueError(f"plan: {' and '.join(ends)} are tied (tie_word_embeddings); shard both or neither")
    rest = sorted(set(styles) - done - set(ends))
    if rest:
        raise ValueError(f"plan rule for {rest[0]}: moelm does not shard it (attention, MLPs, experts, the "
                         "embedding and the LM head only)")


def check_rules_match(model: nn.Module, rules: dict[str, str]):
    """ValueError for a rule of a user's plan that names no module of the model (a rule for stacked experts names
    their gate_up_proj or down_proj): it would shard nothing. The family's own rules may (an MoE-only model has no
    dense MLP)."""
    kind = model.config.model_type
    family = {**TP_PLANS.get(kind, {}), **EP_PLANS.get(kind, {})}
    names = set()
    for name, module in model.named_modules():
        names.add(name)
        if isinstance(module, Experts):
            names.update({f"{name}.gate_up_proj", f"{name}.down_proj"})
    for pattern in rules:
        if pattern not in family and not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"plan rule {pattern!r} names no module of {type(model).__name__}; moelm's patterns are "
                             "relative to the causal LM, e.g. 'model.layers.*.self_attn.q_proj'")


def _listed(styles: dict[str, str | None]) -> str:
    return ", ".join(f"{leaf} {style or 'unsharded'}" for leaf, style in styles.items())


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def parameter_styles(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """{parameter name: style} of every parameter `plan` shards (sharded_modules, each parameter's share)."""
    out = {}
    for name, module, style in sharded_modules(model, plan):
        for leaf, _ in module.named_parameters(recurse=False):
            out[f"{name}.{leaf}"] = "rowwise" if style == "packed_colwise" and leaf == "down_proj" else style
    return out


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
