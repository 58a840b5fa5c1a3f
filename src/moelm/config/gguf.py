"""The config a GGUF's metadata describes, as llama.cpp's convert_hf_to_gguf.py writes it for ERNIE 4.5, ERNIE 4.5
MoE and PhiMoE (general.architecture -> model_type: ARCH)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

ARCH = {"ernie4_5": "ernie4_5", "ernie4_5_moe": "ernie4_5-moe", "phimoe": "phimoe"}  # model_type -> GGUF arch
SPM_DEFAULTS = {"bos_token_id": 1, "eos_token_id": 2}  # llama.cpp's special ids of a "llama" vocabulary naming none


def model_type_of(arch: str) -> str:
    """GGUF general.architecture -> moelm model_type; an architecture moelm has no family for is a ValueError."""
    for kind, name in ARCH.items():
        if name == arch:
            return kind
    raise ValueError(f"GGUF architecture {arch!r} is not one moelm reads (it reads {', '.join(ARCH.values())})")


def _decimal(x) -> float:
    """A float32 from the file as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def config_dict(meta: dict, shapes: dict[str, list[int]], read: Callable[[str], np.ndarray]) -> dict:
    """config.json's fields from a GGUF's metadata (key -> value), its tensors' numpy shapes and read(name) -> the
    float32 data of a small tensor (rope factors, a bias to test for zeros).

    What llama.cpp's converter writes: {arch}.block_count, embedding_length, feed_forward_length,
    attention.head_count(_kv), attention.key_length, attention.layer_norm_rms_epsilon, rope.freq_base (llama.cpp's
    default when absent: 10000), context_length; ERNIE MoE: expert_count, expert_used_count,
    expert_feed_forward_length, expert_shared_count, leading_dense_block_count, interleave_moe_layer_step; PhiMoE:
    expert_count, expert_used_count, attention.sliding_window, rope.scaling.original_context_length and attn_factor
    with the rope_factors tensors (LongRoPE). The vocabulary size is the token embedding's; tied embeddings: no
    output.weight. Head counts and feed_forward_length may be per-layer arrays (one value); rope.scaling.factor (or
    rope.scale_linear) is ERNIE's linear rope scaling (_rope_scaling)."""
    kind = model_type_of(meta["general.architecture"])
    arch = ARCH[kind]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata has no {arch}.{key}")
        if isinstance(value, list):  # per layer, as llama.cpp reads head counts and feed_forward_length too
            if not value or value.count(value[0]) != len(value):
                raise ValueError(f"GGUF {arch}.{key} differs per layer ({value}): moelm has one value for all layers")
            value = value[0]
        if isinstance(value, (str, bool)):
            raise ValueError(f"GGUF {arch}.{key} must be a number, got {value!r}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if heads < 1:
        raise ValueError(f"GGUF {arch}.attention.head_count must be at least 1, got {heads}")
    out = {"model_type": kind, "vocab_size": shapes["token_embd.weight"][0], "hidden_size": hidden,
           "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
           "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
           "rms_norm_eps": _decimal(get("attention.layer_norm_rms_epsilon")),
           "max_position_embeddings": int(get("context_length")),
           "tie_word_embeddings": "output.weight" not in shapes,
           "rope_parameters": {"rope_type": "default", "rope_theta": _decimal(get("rope.freq_base", 10000.0))}}
    defaults = SPM_DEFAULTS if meta.get("tokenizer.ggml.model") == "llama" else {}
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        out[field] = meta.get(f"tokenizer.ggml.{key}", defaults.get(key))
    head_dim = int(get("attention.key_length", hidden // heads))
    for key, what in (("attention.value_length", "value heads of another size"),
                      ("rope.dimension_count", "a rotary part of each head")):  # llama.cpp's ernie4_5: asserted
        if int(get(key, head_dim)) != head_dim:
            raise ValueError(f"GGUF {arch}.{key} {get(key)} is not the key length {head_dim}: {what} is not read")
    out["rope_parameters"].update(_rope_scaling(meta, arch, kind))
    if kind == "phimoe":
        if head_dim * heads != hidden:
            raise ValueError("PhiMoE GGUF with key_length * head_count != embedding_length is not read")
        out.update(num_local_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                   attention_bias="blk.0.attn_q.bias" in shapes,
                   lm_head_bias="output.bias" in shapes and bool(np.any(read("output.bias"))))
        window = int(get("attention.sliding_window", 0))
        out["sliding_window"] = window or None
        if "rope_factors_long.weight" in shapes:
            orig = int(get("rope.scaling.original_context_length"))
            mscale = get("rope.scaling.attn_factor", 1.0)  # llama.cpp's when absent (its converter writes it)
            out["rope_parameters"].update(
                rope_type="longrope", original_max_position_embeddings=orig, short_mscale=_decimal(mscale),
                long_mscale=_decimal(mscale), long_factor=[_decimal(x) for x in read("rope_factors_long.weight")],
                short_factor=[_decimal(x) for x in read("rope_factors_short.weight")])
        return out
    out.update(head_dim=head_dim, use_bias="blk.0.attn_q.bias" in shapes)
    if kind == "ernie4_5_moe":
        n = out["num_hidden_layers"]
        lead = int(get("leading_dense_block_count", 0))
        step = int(get("interleave_moe_layer_step", 1))
        if step < 1:
            raise ValueError(f"GGUF {arch}.interleave_moe_layer_step must be at least 1, got {step}")
        out.update(moe_num_experts=int(get("expert_count")), moe_k=int(get("expert_used_count")),
                   moe_intermediate_size=int(get("expert_feed_forward_length")),
                   moe_num_shared_experts=int(get("expert_shared_count", 0)), moe_layer_start_index=lead,
                   moe_layer_end_index=n - 1, moe_layer_interval=step)
        has = [f"blk.{i}.ffn_gate_inp.weight" in shapes for i in range(n)]
        want = [i >= lead and (i + 1) % step == 0 for i in range(n)]
        if has != want:
            raise ValueError(f"GGUF MoE blocks {[i for i in range(n) if has[i]]} do not follow its "
                             f"leading_dense_block_count {lead} and interleave_moe_layer_step {step}")
    return out


def _rope_scaling(meta: dict, arch: str, kind: str) -> dict:
    """rope_parameters for llama.cpp's rope scaling keys: rope.scaling.factor (or the older rope.scale_linear),
    rope.scaling.type ("linear" when absent; "none" turns the factor off). ERNIE reads linear scaling; any other
    scaling with a factor is refused by name (PhiMoE's LongRoPE comes from its rope_factors tensors)."""
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 0.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "linear")
    if scaling == "none" or factor in (0.0, 1.0):
        return {}
    if kind == "phimoe" or scaling != "linear":
        raise ValueError(f"GGUF rope scaling {scaling!r} with factor {factor} ({arch}.rope.scaling.*) is not read for "
                         f"{kind}" + (" (ERNIE: linear only)" if kind != "phimoe" else ""))
    return {"rope_type": "linear", "factor": _decimal(factor)}


def gguf_config(g) -> dict:
    """config_dict of an open GGUFFile; an unknown architecture, missing or inconsistent metadata is a
    CheckpointError naming the file."""
    from ..io.weights import CheckpointError

    try:
        return config_dict(g.meta, g.shapes, g.floats)
    except CheckpointError:
        raise
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{g.path}: {e}") from None


def read_gguf_config(path) -> dict:
    """config_dict of a GGUF file."""
    from ..io.gguf import GGUFFile

    return gguf_config(GGUFFile(path))
