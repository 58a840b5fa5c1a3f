"""A SentencePiece vocabulary in GGUF metadata, both ways: written as llama.cpp's convert_hf_to_gguf.py writes it
(tokenizer.ggml.model "llama": tokens, scores, token types, special token ids, add_bos/add_eos, the chat template)
and read back for a moelm Tokenizer: AutoTokenizer.from_pretrained(path, gguf_file=...).

Read as llama.cpp tokenizes a "llama" vocabulary: a BPE model over the pieces (merges recovered from the vocabulary's
order), byte fallback when there are byte tokens, control (3) and user-defined (4) pieces added as tokens, a space
before every run of text when tokenizer.ggml.add_space_prefix is true or absent (llama.cpp's default; decoding drops
the first token's leading space), no normalizer (tokenizer.ggml.precompiled_charsmap is not applied), unused
pieces decoded as nothing, bos 1 and eos 2 when the file names none. Not read: a "gpt2" (byte-level BPE) or other
tokenizer model (refused by name), and the cls token (GGUF has no key for it).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from tokenizers import Regex, decoders, normalizers

from ..config.gguf import SPM_DEFAULTS
from ..io.gguf import GGUFFile
from .sentencepiece import read_sentencepiece_model, spec_backend

ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
UNUSED = 5  # SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


SYNTHETIC_KEY = "moelm.synthetic_vocabulary"  # written with a placeholder vocabulary (bench.gguf)


def write_sentencepiece(w, directory: str | os.PathLike, vocab_size: int) -> bool:
    """The directory's tokenizer.model vocabulary (padded to vocab_size with unused pieces, as the converter does),
    special tokens and chat template into GGUFWriter w; False (nothing written) when there is no tokenizer.model."""
    import gguf

    directory = Path(directory)
    if not (directory / "tokenizer.model").is_file():
        return False
    spec = read_sentencepiece_model(directory / "tokenizer.model")
    pieces = spec["pieces"]
    if len(pieces) > vocab_size:
        raise ValueError(f"tokenizer.model has {len(pieces)} pieces, more than vocab_size {vocab_size}")
    pieces = pieces + [(f"[PAD{i}]", -10000.0, UNUSED) for i in range(len(pieces), vocab_size)]
    config = directory / "tokenizer_config.json"
    added = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config.is_file() else {}
    for tid, token in added.items():  # the converter's rule: special -> control (3), else user-defined (4)
        if int(tid) < vocab_size:
            pieces[int(tid)] = (token["content"], -1000.0, 3 if token.get("special") else 4)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([float(s) for _, s, _ in pieces])
    w.add_token_types([int(t) for _, _, t in pieces])
    w.add_add_space_prefix(spec["add_dummy_prefix"])
    gguf.SpecialVocab(directory, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    if (directory / "chat_template.jinja").is_file():
        w.add_chat_template((directory / "chat_template.jinja").read_text(encoding="utf-8"))
    return True


def read_gguf_tokenizer(path: str | os.PathLike, **kwargs):
    """(tokenizers backend, tokenizer config) of the vocabulary a GGUF's metadata describes, for text.Tokenizer;
    kwargs update the config (as for a directory)."""
    meta = GGUFFile(path).meta
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{Path(path).name}: GGUF tokenizer model {model!r} is not read by moelm (it reads "
                         "SentencePiece 'llama' vocabularies)")
    missing = [k for k in ARRAYS if k not in meta]
    if missing:
        raise ValueError(f"{Path(path).name}: GGUF tokenizer without {', '.join(missing)}")
    if SYNTHETIC_KEY in meta:
        warnings.warn(f"{Path(path).name}: a placeholder vocabulary ({meta[SYNTHETIC_KEY]}): token ids are right, "
                      "text is not", stacklevel=2)
    tokens = meta["tokenizer.ggml.tokens"]
    pieces = list(zip(tokens, meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]))

    def special(key):
        tid = meta.get(f"tokenizer.ggml.{key}", SPM_DEFAULTS.get(key))
        return tid if tid is not None and 0 <= tid < len(tokens) else None

    unknown = [i for i, (_, _, t) in enumerate(pieces) if t == 2]  # llama.cpp's default unk: the UNKNOWN piece
    unk = special("unknown_token_id")
    unk = unk if unk is not None else unknown[0] if unknown else None
    ids = {"unk": unk, "bos": special("bos_token_id"), "eos": special("eos_token_id")}
    spec = {"pieces": pieces, "model_type": 2, "byte_fallback": any(t == 6 for _, _, t in pieces),
            "precompiled_charsmap": b""}  # llama.cpp's SPM tokenizer does not normalize
    for name, tid in ids.items():
        spec[f"{name}_id"], spec[f"{name}_piece"] = (tid, tokens[tid]) if tid is not None else (-1, None)
    cfg = {"add_bos_token": meta.get("tokenizer.ggml.add_bos_token", True),
           "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False)}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id"), ("sep", "seperator_token_id"), ("mask", "mask_token_id")):
        tid = unk if name == "unk" else special(key)
        if tid is not None:
            cfg[f"{name}_token"] = tokens[tid]
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    cfg.update(kwargs)
    backend = spec_backend(spec, cfg)
    steps = [backend.decoder]
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default: a space before each text run,
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), backend.normalizer])
        steps = [decoders.Metaspace(prepend_scheme="always", split=False)]  # and none on the first token's text
        if spec["byte_fallback"]:
            steps += [decoders.ByteFallback(), decoders.Fuse()]
    unused = [re.escape(p) for p, _, t in pieces if t == UNUSED]
    if unused:  # llama.cpp renders unused pieces (the converter's [PAD{i}] padding) as nothing
        steps.insert(0, decoders.Replace(Regex(f"^(?:{'|'.join(unused)})$"), ""))
    backend.decoder = decoders.Sequence(steps)
    return backend, cfg
