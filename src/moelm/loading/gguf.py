"""GGUF names and formats, in one table for the writer (moelm.bench.gguf) and the reader (loading.gguf_load):
llama.cpp's tensor names for ERNIE 4.5, ERNIE 4.5 MoE and PhiMoE, as its convert_hf_to_gguf.py writes them (the
architectures and the config metadata: config/gguf.py; reading the file: io/gguf.py).

GGUF layout (what llama.cpp's llama-arch.cpp, models/ernie4-5*.cpp and models/phimoe.cpp load): numpy shapes are
written as they are ([out, in] for a linear weight; ggml reverses them to ne = {in, out}); the per-expert hub weights
are stacked into [E, out, in]; ERNIE's interleaved rotary pairs are llama.cpp's LLAMA_ROPE_TYPE_NORM and PhiMoE's
half-split rotary its NEOX type, so q/k need no permutation. Norms, 1-D tensors, routers and the ERNIE correction
bias stay f32 whatever the ftype, as in llama.cpp's convert_hf_to_gguf.py; every other weight (the token embedding
too) takes the ftype.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config.gguf import ARCH

FTYPES = ("f32", "bf16", "q8_0", "q4_0")
FORMATS = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # moelm dtype/quantization -> ftype
ALWAYS_F32 = ("_norm.weight", "ffn_gate_inp.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def ggml_types(ftype: str):
    """ftype -> (GGMLQuantizationType of the big weights, LlamaFileType)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
             "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "f16": (Q.F16, F.MOSTLY_F16)}  # f16: written, not benchmarked
    if ftype not in table:
        raise ValueError(f"ftype must be one of {', '.join(table)}, got {ftype!r}")
    return table[ftype]


def tensor_qtype(name: str, ndim: int, ftype: str):
    """The GGML type a GGUF tensor is stored in: f32 for 1-D tensors, norms, routers, biases; else the ftype."""
    from gguf import GGMLQuantizationType as Q

    if ndim < 2 or not name.endswith(".weight") or name.endswith(ALWAYS_F32):
        return Q.F32
    return ggml_types(ftype)[0]


# A GGUF tensor: (name, hub keys, combine: list of arrays -> array). One key copied, expert keys stacked [E, ...].
Plan = list[tuple[str, list[str], Callable[[list[np.ndarray]], np.ndarray]]]


def _one(xs):
    return xs[0]


def _stack(xs):
    return np.stack(xs)


def _flat(xs):
    return xs[0].reshape(-1)


def _zeros(n: int):
    return lambda xs: np.zeros(n, dtype=np.float32)


def _const(values):
    return lambda xs: np.asarray(values, dtype=np.float32)


def moe_layers(config) -> tuple[list[bool], int]:
    """Which layers are MoE, and llama.cpp's leading_dense_block_count; refuses layouts llama.cpp cannot express."""
    n = config.num_hidden_layers
    moe = [config.is_moe_layer(i) for i in range(n)]
    lead = moe.index(True) if any(moe) else n
    if moe != [i >= lead for i in range(n)]:
        raise ValueError(f"llama.cpp's ernie4_5-moe makes every layer from the first MoE layer on a MoE layer; this "
                         f"config's MoE layers are {[i for i in range(n) if moe[i]]} (moe_layer_interval "
                         f"{config.moe_layer_interval}, end index {config.moe_layer_end_index})")
    return moe, lead


def gguf_plan(config, keys: set[str]) -> Plan:
    """The GGUF tensors of a hub checkpoint with `keys`, in writing order (numpy shapes; H hidden, V vocab, I/Ie
    dense/expert intermediate, E experts; p = model.layers.{i}., b = blk.{i}.):

        model.embed_tokens.weight [V, H]            -> token_embd.weight (lm_head.weight -> output.weight if untied)
        model.norm.weight/.bias [H]                 -> output_norm.weight/.bias; lm_head.bias -> output.bias
        p input_layernorm / post_attention_layernorm -> b attn_norm / ffn_norm (.weight, PhiMoE also .bias)
        p self_attn.{q,k,v,o}_proj.weight/.bias     -> b attn_{q,k,v,output}.weight/.bias
        p mlp.{gate,up,down}_proj.weight (dense)    -> b ffn_{gate,up,down}.weight
        p mlp.gate.weight [E, H]                    -> b ffn_gate_inp.weight (PhiMoE: block_sparse_moe.gate)
        p mlp.moe_statics.e_score_correction_bias [1, E] -> b exp_probs_b.bias [E]
        p mlp.experts.{e}.{gate,up}_proj [Ie, H] x E -> b ffn_{gate,up}_exps.weight [E, Ie, H] (PhiMoE: w1, w3)
        p mlp.experts.{e}.down_proj [H, Ie] x E     -> b ffn_down_exps.weight [E, H, Ie] (PhiMoE: w2)
        p mlp.shared_experts.{gate,up,down}_proj    -> b ffn_{gate,up,down}_shexp.weight
        PhiMoE longrope factors (config) [head/2]   -> rope_factors_{long,short}.weight
    PhiMoE's missing attn_output / output biases (llama.cpp requires them) are written as zeros; ERNIE's MTP
    tensors (model.mtp_*) are left out, as llama.cpp's converter does."""
    kind = config.model_type
    if kind not in ARCH:
        raise ValueError(f"llama.cpp has no architecture for model_type {kind!r}")
    if kind.startswith("ernie") and getattr(config, "use_bias", False):
        raise ValueError("ERNIE with use_bias=True: llama.cpp's ernie4_5 graph ignores attn_output.bias and has no "
                         "MLP or lm_head biases")
    h = config.hidden_size
    plan: Plan = [("token_embd.weight", ["model.embed_tokens.weight"], _one)]
    if not config.tie_word_embeddings:
        plan.append(("output.weight", ["lm_head.weight"], _one))
    plan.append(("output_norm.weight", ["model.norm.weight"], _one))
    if kind == "phimoe":
        plan.append(("output_norm.bias", ["model.norm.bias"], _one))
        plan.append(("output.bias", ["lm_head.bias"], _one) if "lm_head.bias" in keys
                    else ("output.bias", [], _zeros(config.vocab_size)))
        rope = config.rope_parameters
        if rope["rope_type"] == "longrope":
            plan.append(("rope_factors_long.weight", [], _const(rope["long_factor"])))
            plan.append(("rope_factors_short.weight", [], _const(rope["short_factor"])))
    moe = moe_layers(config)[0] if kind == "ernie4_5_moe" else [kind == "phimoe"] * config.num_hidden_layers
    for i in range(config.num_hidden_layers):
        hub, blk = f"model.layers.{i}.", f"blk.{i}."
        plan.append((blk + "attn_norm.weight", [hub + "input_layernorm.weight"], _one))
        for p, g in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            plan.append((f"{blk}{g}.weight", [f"{hub}self_attn.{p}_proj.weight"], _one))
            if f"{hub}self_attn.{p}_proj.bias" in keys:
                plan.append((f"{blk}{g}.bias", [f"{hub}self_attn.{p}_proj.bias"], _one))
            elif kind == "phimoe" and p == "o":  # llama.cpp's phimoe requires attn_output.bias
                plan.append((f"{blk}{g}.bias", [], _zeros(h)))
        plan.append((blk + "ffn_norm.weight", [hub + "post_attention_layernorm.weight"], _one))
        if kind == "phimoe":
            plan.append((blk + "attn_norm.bias", [hub + "input_layernorm.bias"], _one))
            plan.append((blk + "ffn_norm.bias", [hub + "post_attention_layernorm.bias"], _one))
            moe_hub, n_exp = hub + "block_sparse_moe.", config.num_local_experts
            parts = (("gate", "w1"), ("up", "w3"), ("down", "w2"))
        else:
            moe_hub, n_exp = hub + "mlp.", getattr(config, "moe_num_experts", 0)
            parts = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
        if not moe[i]:
            for g, p in parts:
                plan.append((f"{blk}ffn_{g}.weight", [f"{hub}mlp.{p}.weight"], _one))
            continue
        plan.append((blk + "ffn_gate_inp.weight", [moe_hub + "gate.weight"], _one))
        if kind == "ernie4_5_moe":
            plan.append((blk + "exp_probs_b.bias", [moe_hub + "moe_statics.e_score_correction_bias"], _flat))
        for g, p in parts:
            plan.append((f"{blk}ffn_{g}_exps.weight", [f"{moe_hub}experts.{e}.{p}.weight" for e in range(n_exp)],
                         _stack))
        if kind == "ernie4_5_moe" and config.moe_num_shared_experts:
            for g, p in parts:
                plan.append((f"{blk}ffn_{g}_shexp.weight", [f"{moe_hub}shared_experts.{p}.weight"], _one))
    used = {k for _, ks, _ in plan for k in ks}
    missing = sorted(used - keys)
    left = sorted(k for k in keys - used if not k.startswith("model.mtp_"))  # ERNIE MTP: unused by llama.cpp too
    if missing or left:
        raise ValueError(f"checkpoint does not fit llama.cpp's {ARCH[kind]}: missing {missing[:5]}, "
                         f"no place for {left[:5]}")
    return plan


# ---------------------------------------------------------------- Q4_0 / Q8_0 <-> moelm's int4 (group 32) / int8

def q4_0_blocks(qweight: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """moelm int4 with group size 32 (uint8 [O, I/2], scale [O, I/32]) -> the Q4_0 bytes of the same weights
    ([O, I/32 * 18]: an fp16 scale, then the group's 16 bytes as they are: element j in the low nibble, j + 16 in
    the high one, value (n - 8) * scale, as moelm packs them), or None where a scale is not exact in fp16."""
    o, half = qweight.shape
    groups = half // 16
    if scale.shape != (o, groups):
        return None
    d = scale.astype(np.float16)
    if not np.array_equal(d.astype(np.float32), scale.astype(np.float32)):
        return None
    blocks = np.empty((o, groups, 18), dtype=np.uint8)
    blocks[..., :2] = d.reshape(o, groups, 1).view(np.uint8)
    blocks[..., 2:] = qweight.reshape(o, groups, 16)
    return blocks.reshape(o, groups * 18)


def q8_0_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """moelm int8 (int8 [O, I], one fp32 scale per row [O]) -> the Q8_0 bytes of the same weights ([O, I/32 * 34]:
    each block carries its row's scale in fp16), or None where a scale is not exact in fp16 or I % 32."""
    o, i = q.shape
    d = scale.astype(np.float16)
    if i % 32 or not np.array_equal(d.astype(np.float32), scale):
        return None
    blocks = np.empty((o, i // 32, 34), dtype=np.uint8)
    blocks[..., :2] = np.repeat(d.reshape(o, 1, 1), i // 32, axis=1).view(np.uint8)
    blocks[..., 2:] = q.reshape(o, i // 32, 32).view(np.uint8)
    return blocks.reshape(o, i // 32 * 34)


def q4_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 bytes [O, I/32 * 18] -> moelm int4 group 32 (uint8 [O, I/2], fp16 scale [O, I/32]) of the same weights,
    exactly: the inverse of q4_0_blocks (the fp16 scale and the 16 nibble bytes as they are)."""
    o = blocks.shape[0]
    b = blocks.reshape(o, -1, 18)
    scale = b[..., :2].copy().view(np.float16)[..., 0]
    return np.ascontiguousarray(b[..., 2:]).reshape(o, -1), scale
