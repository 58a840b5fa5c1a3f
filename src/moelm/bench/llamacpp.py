"""llama.cpp as a benchmark peer: a hub checkpoint written as GGUF, and llama.cpp (llama-cpp-python) timed on it.

    write_gguf(checkpoint_dir, "model.gguf", "q8_0")       # f32 | bf16 | q8_0 | q4_0
    m = LlamaCppModel("model.gguf", threads=2)
    m.prefill(ids), m.decode(ids[:64], 16)                 # seconds, seconds per token
    parity("ernie4_5_moe", "f32")                          # llama.cpp vs moelm on a tiny random model

GGUF layout (what llama.cpp's llama-arch.cpp, models/ernie4-5*.cpp and models/phimoe.cpp load): numpy shapes are
written as they are ([out, in] for a linear weight; ggml reverses them to ne = {in, out}); the per-expert hub weights
are stacked into [E, out, in]; ERNIE's interleaved rotary pairs are llama.cpp's LLAMA_ROPE_TYPE_NORM and PhiMoE's
half-split rotary its NEOX type, so q/k need no permutation. Norms, 1-D tensors, routers and the ERNIE correction
bias stay f32 whatever the ftype, as in llama.cpp's convert_hf_to_gguf.py; every other weight (the token embedding
too) takes the ftype. The vocabulary is synthetic (the bench models have random weights and feed token ids).

Where llama.cpp differs from the reference (moelm / transformers):
- phimoe: llama.cpp normalises with RMSNorm + bias (the reference: LayerNorm with bias) and routes by softmax top-2
  renormalised (the reference: sparsemixer), so its logits differ; parity() checks PhiMoE against moelm with those
  two pieces swapped for llama.cpp's (`llamacpp_semantics`). LongRoPE: llama.cpp picks the long factors by context
  size (n_ctx > original) and keeps one attention factor (written: the short mscale); the reference switches both by
  sequence length.
- ernie4_5: llama.cpp loads but ignores attn_output.bias and has no MLP or lm_head biases: use_bias=True is refused.
- ernie4_5_moe: llama.cpp makes every layer from leading_dense_block_count on a MoE layer; a moe_layer_interval > 1
  or a moe_layer_end_index before the last layer is refused. Its weight normalisation clamps the sum at 6.1e-5
  (the reference at moe_norm_min), the same result since a top-k sum of softmax probabilities is >= k/E.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

FTYPES = ("f32", "bf16", "q8_0", "q4_0")
ARCH = {"ernie4_5": "ernie4_5", "ernie4_5_moe": "ernie4_5-moe", "phimoe": "phimoe"}
TINY = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}
ALWAYS_F32 = ("_norm.weight", "ffn_gate_inp.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _types(ftype: str):
    """ftype -> (GGMLQuantizationType of the big weights, LlamaFileType)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
             "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}
    if ftype not in table:
        raise ValueError(f"ftype must be one of {FTYPES}, got {ftype!r}")
    return table[ftype]


def tensor_qtype(name: str, ndim: int, ftype: str):
    """The GGML type a GGUF tensor is stored in: f32 for 1-D tensors, norms, routers, biases; else the ftype."""
    from gguf import GGMLQuantizationType as Q

    if ndim < 2 or not name.endswith(".weight") or name.endswith(ALWAYS_F32):
        return Q.F32
    return _types(ftype)[0]


# ---------------------------------------------------------------- checkpoint -> GGUF tensors

class _Checkpoint:
    """Hub safetensors (one file or sharded), read one tensor at a time as float32 numpy."""

    def __init__(self, directory: Path, stack: ExitStack):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else sorted(p.name for p in directory.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{directory}: no safetensors checkpoint")
        self.where = {}
        for name in files:
            f = stack.enter_context(safe_open(directory / name, framework="pt"))
            self.where.update({k: f for k in f.keys()})

    def shape(self, key: str) -> list[int]:
        return list(self.where[key].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self.where[key].get_tensor(key).float().numpy()


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


def _read(plan_item, ckpt: _Checkpoint) -> np.ndarray:
    """The float32 data of one GGUF tensor; stacked experts are filled in place, one expert read at a time."""
    name, keys, combine = plan_item
    if combine is not _stack:
        return combine([ckpt.get(k) for k in keys])
    out = np.empty([len(keys)] + ckpt.shape(keys[0]), dtype=np.float32)  # [E, out, in]
    for e, k in enumerate(keys):
        out[e] = ckpt.get(k)
    return out


def _shape(plan_item, ckpt: _Checkpoint) -> list[int]:
    name, keys, combine = plan_item
    if not keys:
        return list(combine([]).shape)
    first = ckpt.shape(keys[0])
    if combine is _stack:
        return [len(keys)] + first
    if combine is _flat:
        return [int(np.prod(first))]
    return first


# ---------------------------------------------------------------- metadata

def _vocab(n: int, unk: int, bos: int | None, eos: int | None, pad: int | None):
    """A SentencePiece-style ("llama") vocab of exactly n tokens: the special ids, 256 byte tokens, fillers."""
    from gguf import TokenType

    tokens: list[str | None] = [None] * n
    types = [TokenType.NORMAL] * n
    for tid, text, kind in ((unk, "<unk>", TokenType.UNKNOWN), (bos, "<s>", TokenType.CONTROL),
                            (eos, "</s>", TokenType.CONTROL), (pad, "<pad>", TokenType.CONTROL)):
        if tid is not None and 0 <= tid < n and tokens[tid] is None:
            tokens[tid], types[tid] = text, kind
    free = [i for i in range(n) if tokens[i] is None]
    if len(free) < 256:
        raise ValueError(f"vocab_size {n} is too small for 256 byte tokens")
    for b, i in enumerate(free[:256]):
        tokens[i], types[i] = f"<0x{b:02X}>", TokenType.BYTE
    for i in free[256:]:
        tokens[i] = f"\u2581t{i}"
    return tokens, [int(t) for t in types]


def _metadata(w, config, ftype: str) -> None:
    import gguf

    kind, arch = config.model_type, ARCH[config.model_type]
    head = config.head_size
    rope = config.rope_parameters
    w.add_name(f"moelm {kind}")
    w.add_file_type(int(_types(ftype)[1]))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_feed_forward_length(config.intermediate_size)
    if kind == "phimoe":
        if head * config.num_attention_heads != config.hidden_size:
            raise ValueError("llama.cpp's phimoe needs head_dim == hidden_size / num_attention_heads")
        w.add_expert_count(config.num_local_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if rope["rope_type"] == "longrope":
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            w.add_rope_scaling_attn_factors(rope["short_mscale"])
        elif rope["rope_type"] != "default":
            raise ValueError(f"phimoe rope_type {rope['rope_type']!r} is not converted (default, longrope are)")
    else:
        if rope["rope_type"] != "default":
            raise ValueError(f"ERNIE rope_type {rope['rope_type']!r} is not converted (only default)")
    if kind == "ernie4_5_moe":
        w.add_expert_count(config.moe_num_experts)
        w.add_expert_used_count(config.moe_k)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_interleave_moe_layer_step(1)
        w.add_leading_dense_block_count(moe_layers(config)[1])
        w.add_expert_shared_count(config.moe_num_shared_experts)
        if config.moe_num_shared_experts:  # one MLP of width shared * moe_intermediate_size, as the reference
            w.add_expert_shared_feed_forward_length(config.moe_num_shared_experts * config.moe_intermediate_size)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    unk = getattr(config, "unk_token_id", None)
    unk = unk if unk is not None else 0
    tokens, types = _vocab(config.vocab_size, unk, config.bos_token_id, eos, config.pad_token_id)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(unk)
    for add, tid in ((w.add_bos_token_id, config.bos_token_id), (w.add_eos_token_id, eos),
                     (w.add_pad_token_id, config.pad_token_id)):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)


# ---------------------------------------------------------------- writing

def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """float32 [..., n] -> the GGUF bytes of `qtype` (f32 stays float32). Quantized blocks run along the last axis."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype in (Q.Q8_0, Q.Q4_0) and x.shape[-1] % 32:
        raise ValueError(f"{qtype.name} needs an inner dimension that is a multiple of 32, got {x.shape}")
    return gguf_quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)


def write_gguf(checkpoint_dir: str | Path, out_path: str | Path, ftype: str = "f32") -> Path:
    """Write the hub checkpoint (config.json + safetensors) as a GGUF file llama.cpp loads; returns out_path.

    Streams: tensor infos first, then one tensor at a time (one stacked [E, out, in] expert tensor at most in memory).
    """
    import gguf

    from ..models.auto import AutoConfig

    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    _types(ftype)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    with ExitStack() as stack:
        ckpt = _Checkpoint(checkpoint_dir, stack)
        plan = gguf_plan(config, set(ckpt.where))
        w = gguf.GGUFWriter(out_path, ARCH[config.model_type])
        _metadata(w, config, ftype)
        for item in plan:
            shape = _shape(item, ckpt)
            qtype = tensor_qtype(item[0], len(shape), ftype)
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
            w.add_tensor_info(item[0], shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for item in plan:
            x = _read(item, ckpt)
            w.write_tensor_data(quantize(x, tensor_qtype(item[0], x.ndim, ftype)))
            del x
        w.close()
    return out_path


def roundtrip_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, ftype: str) -> Path:
    """A copy of the hub checkpoint whose weights are what the GGUF of `ftype` stores, dequantized to float32.

    Blocks run along rows, so quantizing each expert alone gives the rows of the stacked tensor. A moelm float32
    model of this copy computes with llama.cpp's exact weights: what is left is llama.cpp's rounding of activations.
    """
    import shutil

    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    from ..models.auto import AutoConfig

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    out = {}
    with ExitStack() as stack:
        ckpt = _Checkpoint(checkpoint_dir, stack)
        for name, keys, combine in gguf_plan(config, set(ckpt.where)):
            for k in keys:
                x = ckpt.get(k)
                ndim = x.ndim + 1 if combine is _stack else 1 if combine is _flat else x.ndim
                qtype = tensor_qtype(name, ndim, ftype)
                out[k] = np.ascontiguousarray(dequantize(quantize(x, qtype), qtype).reshape(x.shape),
                                              dtype=np.float32)
        out.update({k: ckpt.get(k) for k in ckpt.where if k not in out})
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(checkpoint_dir / "config.json", out_dir / "config.json")
    return out_dir


# ---------------------------------------------------------------- llama.cpp

def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - an ImportError or a broken shared library
        return False
    return True


def build_info() -> str:
    """The llama-cpp-python version and llama.cpp's system info (the CPU features it was built with)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}; {info.strip()}"


class LlamaCppModel:
    """One llama.cpp model + context. kv_type: "f16" (llama.cpp's default) or "f32" (for the parity check)."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512, n_batch: int = 256,
                 logits_all: bool = False, kv_type: str = "f16", flash_attn: bool = False):
        import llama_cpp

        kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all, type_k=kv,
                                   type_v=kv, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.logits_all = logits_all

    def _clear(self) -> None:
        import llama_cpp

        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def _last_argmax(self) -> int:
        import llama_cpp

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(row.argmax())

    def prefill(self, ids: list[int]) -> float:
        """Seconds to run `ids` through an empty KV cache (logits of the last position only)."""
        self._clear()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, ids_context: list[int], steps: int) -> float:
        """Seconds per token: the context and one step untimed, then `steps` greedy single-token steps timed."""
        self._clear()
        self.llm.eval(ids_context)
        self.llm.eval([self._last_argmax()])
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([self._last_argmax()])
        return (time.perf_counter() - t) / steps

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits at every position (needs logits_all=True)."""
        if not self.logits_all:
            raise ValueError("LlamaCppModel(logits_all=True) is needed for logits()")
        self._clear()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()


def measure(path: str | Path, threads: int, prompt_len: int = 256, context: int = 64, steps: int = 16,
            repeats: int = 3, vocab: int | None = None, seed: int = 0) -> dict:
    """llama.cpp prefill and batch-1 decode tok/s on a GGUF file (median of `repeats` after one warm-up)."""
    m = LlamaCppModel(path, threads, n_ctx=max(512, prompt_len, context + steps + 2), n_batch=prompt_len)
    rng = np.random.default_rng(seed)
    vocab = vocab or m.n_vocab
    prompt = rng.integers(0, vocab, prompt_len).tolist()
    ctx = rng.integers(0, vocab, context).tolist()
    m.prefill(prompt)
    prefill = statistics.median(m.prefill(prompt) for _ in range(repeats))
    m.decode(ctx, steps)
    decode = statistics.median(m.decode(ctx, steps) for _ in range(repeats))
    m.close()
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": 1 / decode}


# ---------------------------------------------------------------- parity with moelm

def tiny_checkpoint(model_type: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """moelm's tiny named config of the family with random weights, saved in hub format (float32). As the tests'
    reference.randomise: norms around 1, biases and the correction bias non-zero, so 0/1 defaults hide nothing."""
    import torch

    import moelm

    config = moelm.named_config(TINY[model_type])
    for k, v in overrides.items():
        setattr(config, k, v)
    model = moelm.AutoModelForCausalLM.from_config(config, seed=seed, fast=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = (1.0, 0.3) if "norm" in name and name.endswith("weight") else \
                (0.0, 0.05) if "e_score_correction_bias" in name else (0.0, 0.1) if name.endswith("bias") else \
                (0.0, 0.08)
            p.copy_(scale[0] + scale[1] * noise)
    model.save_pretrained(directory)
    return Path(directory)


def llamacpp_semantics(model) -> None:
    """Turn a moelm PhiMoE into what llama.cpp's phimoe computes: RMSNorm + bias instead of LayerNorm, softmax
    top-2 renormalised instead of sparsemixer. (ERNIE needs nothing: llama.cpp computes the reference.)"""
    import torch
    from torch import nn

    class RMSNormBias(nn.Module):
        def __init__(self, ln: nn.LayerNorm):
            super().__init__()
            self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return normed.to(x.dtype) * self.weight + self.bias

    def softmax_top2(block):
        def forward(x):  # x [B, S, H] -> ([B, S, H], router logits [T, E])
            b, s, h = x.shape
            flat = x.reshape(-1, h)
            logits = nn.functional.linear(flat, block.gate.weight)
            weights, index = logits.float().softmax(-1).topk(2, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)
            return block.experts(flat, index, weights).reshape(b, s, h), logits
        return forward

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, RMSNormBias(child))
        if hasattr(parent, "gate") and hasattr(parent, "experts"):
            parent.forward = softmax_top2(parent)


def _record_margins(model, margins: list) -> None:
    """On every MoE block, append per token [T] the margin by which the top-k choice holds: the k-th minus the
    (k+1)-th selection score (softmax probability, + the correction bias for ERNIE)."""
    import torch

    def hook(block, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        scores = (x @ block.gate.weight.float().T).softmax(-1)
        if hasattr(block, "moe_statics"):
            scores = scores + block.moe_statics.e_score_correction_bias.reshape(-1).float()
        k = getattr(block.config, "moe_k", None) or block.config.num_experts_per_tok
        top = scores.topk(k + 1, dim=-1).values
        margins.append((top[:, k - 1] - top[:, k]).numpy())

    for m in model.modules():
        if hasattr(m, "gate") and hasattr(m, "experts"):
            m.register_forward_pre_hook(hook)


def reference_logits(checkpoint_dir: str | Path, ids: list[int], as_llamacpp: bool = False,
                     margins: list | None = None) -> np.ndarray:
    """moelm float32 logits [len(ids), vocab] (plain PyTorch path). as_llamacpp: with llamacpp_semantics();
    margins: a list that receives one [len(ids)] array of router margins per MoE layer."""
    import torch

    import moelm

    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32, fast=False).eval()
    if as_llamacpp:
        llamacpp_semantics(model)
    if margins is not None:
        _record_margins(model, margins)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


# A q8_0/q4_0/bf16 run perturbs router scores by about 1/E * (a few % of |router logit| ~ 1) ~ 2.5e-3 (tiny models,
# E = 4..8): tokens whose top-k choice holds by less than twice that may legitimately pick another expert.
ROUTER_MARGIN = 5e-3


def parity(model_type: str, ftype: str = "f32", threads: int = 2, length: int = 32, seed: int = 0,
           workdir: str | Path | None = None, **overrides) -> dict:
    """llama.cpp vs moelm float32 on a tiny random model of the family, every position of a random prompt.

    f32: against the checkpoint itself. bf16/q8_0/q4_0: against the checkpoint with the GGUF's weights
    (roundtrip_checkpoint), so the difference left is llama.cpp rounding its activations (to bf16 for bf16 weights,
    to q8_0 blocks for q8_0/q4_0). PhiMoE: against moelm with llamacpp_semantics().

    Returns scale (RMS of the reference logits); max_abs, rel = max_abs / scale and rms_rel (RMS difference / scale)
    over the positions kept; kept: for ftypes other than f32, the positions whose router choice holds by at least
    ROUTER_MARGIN in every MoE layer (all positions for f32 and dense models); for PhiMoE also rel_to_reference,
    the max difference from unmodified moelm / scale (what llama.cpp's different norm and routing cost)."""
    with tempfile.TemporaryDirectory(prefix="moelm-llamacpp-") as tmp:
        work = Path(workdir or tmp)
        ckpt = tiny_checkpoint(model_type, work / "hub", seed, **overrides)
        path = write_gguf(ckpt, work / f"tiny-{ftype}.gguf", ftype)
        m = LlamaCppModel(path, threads, n_ctx=max(64, length), n_batch=max(32, length), logits_all=True,
                          kv_type="f32")
        ids = np.random.default_rng(seed).integers(0, m.n_vocab, length).tolist()
        got = m.logits(ids)
        m.close()
        ref_dir = ckpt if ftype == "f32" else roundtrip_checkpoint(ckpt, work / f"hub-{ftype}", ftype)
        phi = model_type == "phimoe"
        margins: list = []
        ref = reference_logits(ref_dir, ids, as_llamacpp=phi, margins=margins)
        keep = np.ones(length, dtype=bool)
        if margins and ftype != "f32":
            keep = np.min(margins, axis=0) >= ROUTER_MARGIN
        scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        diff = np.abs(got - ref)[keep]
        out = {"scale": scale, "max_abs": float(diff.max()), "rel": float(diff.max()) / scale,
               "rms_rel": float(np.sqrt(np.mean(diff.astype(np.float64) ** 2))) / scale, "kept": int(keep.sum()),
               "positions": length}
        if phi:
            out["rel_to_reference"] = float(np.abs(got - reference_logits(ref_dir, ids)).max()) / scale
    return out
