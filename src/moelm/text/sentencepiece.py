"""`tokenizer.model` (a SentencePiece ModelProto, read without protobuf) -> a `tokenizers` backend, converted the way
transformers converts it for ERNIE 4.5 / PhiMoE checkpoints: the SentencePiece vocabulary into a Unigram (or BPE)
model with a `" " -> "▁"` normalizer, no pre-tokenizer and no dummy prefix."""
from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as _Backend


def _proto_fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            val, i = _varint(buf, i)
        elif kind == 1:
            val, i = buf[i:i + 8], i + 8
        elif kind == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif kind == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
        yield key >> 3, val


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    val = shift = 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return (val - (1 << 64) if val >= 1 << 63 else val), i


def read_sentencepiece_model(path) -> dict:
    """The fields of a SentencePiece `tokenizer.model` that transformers' conversion reads."""
    spec = {"pieces": [], "model_type": 1, "byte_fallback": False, "unk_id": 0, "bos_id": 1, "eos_id": 2,
            "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "precompiled_charsmap": b"",
            "add_dummy_prefix": True}
    trainer = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id",
               45: "unk_piece", 46: "bos_piece", 47: "eos_piece"}
    for num, val in _proto_fields(Path(path).read_bytes()):
        if num == 1:  # SentencePiece {piece = 1, score = 2, type = 3}
            piece = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_proto_fields(val))
            spec["pieces"].append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
        elif num == 2:  # TrainerSpec
            for k, v in _proto_fields(val):
                if k in trainer:
                    spec[trainer[k]] = v.decode("utf-8") if isinstance(v, bytes) else v
        elif num == 3:  # NormalizerSpec
            normalizer = dict(_proto_fields(val))
            spec["precompiled_charsmap"] = normalizer.get(2, b"")
            spec["add_dummy_prefix"] = bool(normalizer.get(3, 1))
    spec["byte_fallback"] = bool(spec["byte_fallback"])
    if not spec["pieces"]:
        raise ValueError(f"{path} is not a SentencePiece model (no pieces)")
    return spec


def _generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for merge, rank in vocab.items():
        local = [(merge[:i], merge[i:], rank) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(a, b) for a, b, _ in merges]


def sentencepiece_backend(path: Path, cfg: dict) -> _Backend:
    """Build the backend as TokenizersBackend._convert_from_sentencepiece does; fills cfg's token defaults."""
    backend = spec_backend(read_sentencepiece_model(path), cfg)
    return _Backend.from_str(backend.to_str())  # transformers deep-copies it so: some scores move by one ulp


def spec_backend(spec: dict, cfg: dict) -> _Backend:
    """sentencepiece_backend of read_sentencepiece_model's fields (or a GGUF's vocabulary in that form)."""
    pieces = spec["pieces"]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = _generate_merges(vocab) if spec["model_type"] != 1 else None
    extras = [AddedToken(p, normalized=False, special=t == 3) for p, _, t in pieces if t in (3, 4)]
    names = set(vocab)
    for token_id, token in sorted((cfg.get("added_tokens_decoder") or {}).items()):  # placeholders renamed
        new = str(token)
        if 0 <= token_id < len(pieces) and pieces[token_id][0] != new and new not in names:
            names.discard(pieces[token_id][0])
            names.add(new)
            pieces[token_id] = (new,) + pieces[token_id][1:]
    if merges is None:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=spec["unk_id"],
                               byte_fallback=spec["byte_fallback"])
    else:
        model = models.BPE(vocab={p: i for i, (p, _, _) in enumerate(pieces)}, merges=merges,
                           unk_token=spec["unk_piece"], fuse_unk=True, byte_fallback=spec["byte_fallback"],
                           dropout=None)
    backend = _Backend(model)
    norms = [normalizers.Replace(" ", "▁")]
    if spec["precompiled_charsmap"]:
        norms.insert(0, normalizers.Precompiled(spec["precompiled_charsmap"]))
    backend.normalizer = normalizers.Sequence(norms)
    steps = [decoders.Replace("▁", " ")]
    if spec["byte_fallback"]:
        steps += [decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps)
    # control (3) and user-defined (4) pieces become extra special tokens unless the config lists its own
    cfg.pop("additional_special_tokens", None)
    if "extra_special_tokens" not in cfg:
        cfg["extra_special_tokens"] = extras
    for name in ("bos", "eos", "unk"):
        if spec[f"{name}_id"] >= 0 and f"{name}_token" not in cfg:
            cfg[f"{name}_token"] = spec[f"{name}_piece"] or {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}[name]
    return backend
