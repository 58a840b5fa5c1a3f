"""A moelm (hub) checkpoint written as a GGUF file llama.cpp loads, in f32, bf16, q8_0 or q4_0. Needs the `gguf`
package only (no llama-cpp-python).

    write_gguf(checkpoint_dir, "model.gguf", "q8_0")       # f32 | bf16 | q8_0 | q4_0
    FORMATS["int4"]                                        # moelm's dtype or quantization -> its GGUF ftype: "q4_0"

The names, shapes and types are moelm.loading.gguf's table (shared with the reader, from_pretrained(gguf_file=)).
The vocabulary is the checkpoint's SentencePiece tokenizer.model when it has one (moelm.text.gguf), else synthetic
(the bench models have random weights and feed token ids).

What llama.cpp cannot express is refused:
- ernie4_5: llama.cpp loads but ignores attn_output.bias and has no MLP or lm_head biases: use_bias=True is refused.
- ernie4_5_moe: llama.cpp makes every layer from leading_dense_block_count on a MoE layer; a moe_layer_interval > 1
  or a moe_layer_end_index before the last layer is refused. Its weight normalisation clamps the sum at 6.1e-5
  (the reference at moe_norm_min), the same result since a top-k sum of softmax probabilities is >= k/E.
- phimoe: llama.cpp normalises with RMSNorm + bias (the reference: LayerNorm with bias) and routes by softmax top-2
  renormalised (the reference: sparsemixer), and attends to the whole context whatever sliding_window says (written,
  as its converter writes it), so its logits differ from moelm's (written all the same). LongRoPE:
  llama.cpp picks the long factors by context size (n_ctx, which it pads to a multiple of 256, > original) and keeps
  one attention factor (written: the short mscale); the reference keeps the short factors and switches the mscale by
  sequence length.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..io.files import fsync_file, make_dir, writing
from ..loading.gguf import (
    ARCH,
    FORMATS,  # noqa: F401 - re-exported: the bench and its tests name them here
    FTYPES,  # noqa: F401
    _flat,
    _one,
    _stack,
    ggml_types,
    gguf_plan,
    moe_layers,
    q4_0_blocks,  # noqa: F401 - the bench's writers of moelm's codes name them here
    q8_0_blocks,  # noqa: F401
    tensor_qtype,
)
from ..text.gguf import SYNTHETIC_KEY, write_sentencepiece

# ---------------------------------------------------------------- checkpoint -> GGUF tensors

class _Checkpoint:
    """Hub safetensors (one file or sharded), read one tensor at a time as float32 numpy. A compressed-tensors
    weight (moelm's int8 / int4, loading.compressed) shows as its X.weight: get() dequantizes it, codes() gives
    moelm's (q, scale)."""

    def __init__(self, directory: Path, stack: ExitStack):
        from safetensors import safe_open

        from ..loading.compressed import stored_groups

        index = directory / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else sorted(p.name for p in directory.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{directory}: no safetensors checkpoint")
        self.files = {}  # every stored key -> its file
        for name in files:
            f = stack.enter_context(safe_open(directory / name, framework="pt"))
            self.files.update({k: f for k in f.keys()})  # noqa: SIM118 - safe_open is not iterable
        self.packed = {}  # X.weight -> (its stored keys, mode, group size, [O, I])
        for weight, keys in stored_groups(self).items():
            if "weight_packed" in keys:
                o, i = (int(d) for d in self._raw(keys["weight_shape"]).tolist())
                mode = "int4" if self._shape(keys["weight_packed"])[1] * 8 == i else "int8"
            else:
                (o, i), mode = self._shape(keys["weight"]), "int8"
            group = i // self._shape(keys["weight_scale"])[1] if mode == "int4" else 0
            self.packed[weight] = (keys, mode, group, [o, i])
        hidden = {k for keys, *_ in self.packed.values() for k in keys.values()}
        self.where = {k: f for k, f in self.files.items() if k not in hidden} | dict.fromkeys(self.packed)

    def _raw(self, key: str):
        return self.files[key].get_tensor(key)

    def _shape(self, key: str) -> list[int]:
        return list(self.files[key].get_slice(key).get_shape())

    def _dtype(self, key: str):
        from ..io.weights import _DTYPES

        return _DTYPES[self.files[key].get_slice(key).get_dtype()]

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self):
        return list(self.files)

    def shape(self, key: str) -> list[int]:
        return list(self.packed[key][3]) if key in self.packed else self._shape(key)

    def get(self, key: str) -> np.ndarray:
        if key in self.packed:
            from ..inference.quantization import dequantize

            q, scale = self.codes(key)
            return dequantize(q, scale, self.packed[key][2]).numpy()
        return self._raw(key).float().numpy()

    def codes(self, key: str):
        """moelm's (q, scale) of a compressed-tensors weight."""
        from types import SimpleNamespace

        from ..loading.compressed import read_codes

        keys, mode, group, shape = self.packed[key]
        stored = SimpleNamespace(get=self._raw, shape=self._shape, dtype=self._dtype)
        return read_codes(stored, keys, SimpleNamespace(mode=mode, group_size=group), tuple(shape))

    def blocks(self, keys: list[str], qtype):
        """The GGUF bytes of these compressed-tensors weights stacked as they come (int4 group 32 -> Q4_0, int8 ->
        Q8_0: moelm's codes as they are, each scale rounded to fp16, the type of GGUF's block scales), or None
        where the codes do not fit qtype."""
        from gguf import GGMLQuantizationType as Q

        if not keys or any(k not in self.packed for k in keys):
            return None
        out = []
        for k in keys:
            _, mode, group, _ = self.packed[k]
            if (mode, group, qtype) not in (("int4", 32, Q.Q4_0), ("int8", 0, Q.Q8_0)):
                return None
            q, scale = self.codes(k)
            scale = scale.half().float().numpy()
            out.append(q4_0_blocks(q.numpy(), scale) if mode == "int4" else q8_0_blocks(q.numpy(), scale))
        return out[0] if len(out) == 1 else np.stack(out)


def _read(plan_item, ckpt: _Checkpoint) -> np.ndarray:
    """The float32 data of one GGUF tensor; stacked experts are filled in place, one expert read at a time."""
    _, keys, combine = plan_item
    if combine is not _stack:
        return combine([ckpt.get(k) for k in keys])
    out = np.empty([len(keys)] + ckpt.shape(keys[0]), dtype=np.float32)  # [E, out, in]
    for e, k in enumerate(keys):
        out[e] = ckpt.get(k)
    return out


def _shape(plan_item, ckpt: _Checkpoint) -> list[int]:
    _, keys, combine = plan_item
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


def _metadata(w, config, ftype: str, checkpoint_dir: Path) -> None:
    import gguf

    kind = config.model_type
    head = config.head_size
    rope = config.rope_parameters
    w.add_name(f"moelm {kind}")
    w.add_file_type(int(ggml_types(ftype)[1]))
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
    elif rope["rope_type"] == "linear":  # as llama.cpp's converter writes a linear rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] != "default":
        raise ValueError(f"ERNIE rope_type {rope['rope_type']!r} is not converted (default, linear are)")
    if kind == "ernie4_5_moe":
        w.add_expert_count(config.moe_num_experts)
        w.add_expert_used_count(config.moe_k)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_interleave_moe_layer_step(1)
        w.add_leading_dense_block_count(moe_layers(config)[1])
        w.add_expert_shared_count(config.moe_num_shared_experts)
        if config.moe_num_shared_experts:  # one MLP of width shared * moe_intermediate_size, as the reference
            w.add_expert_shared_feed_forward_length(config.moe_num_shared_experts * config.moe_intermediate_size)
    if kind == "phimoe" and config.sliding_window:
        w.add_sliding_window(config.sliding_window)
    if write_sentencepiece(w, checkpoint_dir, config.vocab_size):
        return
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    unk = getattr(config, "unk_token_id", None)
    unk = unk if unk is not None else 0
    tokens, types = _vocab(config.vocab_size, unk, config.bos_token_id, eos, config.pad_token_id)
    w.add_tokenizer_model("llama")
    w.add_string(SYNTHETIC_KEY, "written by moelm's bench: the checkpoint has no SentencePiece model")
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
    ggml_types(ftype)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    with ExitStack() as stack, writing(out_path):
        ckpt = _Checkpoint(checkpoint_dir, stack)
        plan = gguf_plan(config, set(ckpt.where))
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=make_dir(out_path.parent))
        os.close(fd)
        stack.callback(Path(tmp).unlink, missing_ok=True)  # gone once renamed; on failure, no partial file left
        w = gguf.GGUFWriter(tmp, ARCH[config.model_type])
        _metadata(w, config, ftype, checkpoint_dir)
        for item in plan:
            shape = _shape(item, ckpt)
            qtype = tensor_qtype(item[0], len(shape), ftype)
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
            w.add_tensor_info(item[0], shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for item in plan:
            qtype = tensor_qtype(item[0], len(_shape(item, ckpt)), ftype)
            data = ckpt.blocks(item[1], qtype) if item[2] in (_one, _stack) else None
            if data is None:
                x = _read(item, ckpt)
                data = quantize(x, qtype)
                del x
            w.write_tensor_data(data)
            del data
        w.close()
        fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)  # atomic: the old file, or the whole new one
    return out_path


def stored_types(checkpoint_dir: str | Path, ftype: str) -> dict:
    """Hub key -> the GGMLQuantizationType write_gguf(checkpoint_dir, ..., ftype) stores its data in (the keys the
    GGUF leaves out, ERNIE's MTP tensors, are absent). A stacked expert tensor's blocks run along rows, so each
    expert's own key quantizes to the rows the GGUF stores."""
    from ..models.auto import AutoConfig

    checkpoint_dir = Path(checkpoint_dir)
    ggml_types(ftype)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    out = {}
    with ExitStack() as stack:
        ckpt = _Checkpoint(checkpoint_dir, stack)
        for name, keys, combine in gguf_plan(config, set(ckpt.where)):
            for k in keys:
                ndim = len(ckpt.shape(k))
                ndim = ndim + 1 if combine is _stack else 1 if combine is _flat else ndim
                out[k] = tensor_qtype(name, ndim, ftype)
    return out
