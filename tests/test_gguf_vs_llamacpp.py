"""moelm's GGUF tokenizer (moelm.text.gguf) against llama.cpp's on the same file: the vocabulary as moelm's writer
writes it and as llama.cpp's convert_hf_to_gguf.py does (_set_vocab_sentencepiece: no add_space_prefix key, so
llama.cpp's default, a space before each run of text; [PAD{i}] unused pieces; no normalizer).

Without llama-cpp-python the rules llama.cpp follows are checked on their own (test_llamacpp_vocabulary_rules).
"""
from __future__ import annotations

import ctypes
import json
import random
import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402

from llamacpp_harness import tiny_checkpoint, write_tensors  # noqa: E402
from moelm import AutoConfig, AutoTokenizer  # noqa: E402
from moelm.bench import llamacpp  # noqa: E402
from moelm.bench.gguf import write_gguf  # noqa: E402
from moelm.text.sentencepiece import read_sentencepiece_model  # noqa: E402
from tokenizer_fixtures import CORPUS, build_sentencepiece_dir  # noqa: E402

SPECIALS = {3: "<|begin_of_sentence|>", 4: "<|end_of_sentence|>"}  # user-defined pieces, special as in ERNIE 4.5
PIECES = ["<s>", "</s>", "<unk>", *SPECIALS.values(), "[PAD500]", "<0x41>", "\u2581", "ﬁ", "Ａ", "，", "①", "\u00a0",
          "\u3000", "😀", "🇫🇷", "e\u0301", "你好", "12345", "3.14", " ", "  ", "\t", "\n", "\n\n", "\r\n", "hello",
          " world", "The", "dog"]


def random_text(rng: random.Random) -> str:
    parts = [rng.choice(PIECES) if rng.random() < 0.6 else rng.choice(CORPUS[:11])[rng.randrange(30):][:20]
             for _ in range(rng.randrange(8))]
    return "".join(parts)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """moelm's GGUF of a tiny ERNIE 4.5 with a SentencePiece BPE vocabulary, and the same file with the vocabulary
    written as llama.cpp's converter writes it."""
    root = tmp_path_factory.mktemp("vocab")
    ck = tiny_checkpoint("ernie4_5", root / "hub")
    tok = build_sentencepiece_dir(root / "tok", model_type="bpe")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for i, t in SPECIALS.items()}
    (ck / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(tok / "tokenizer.model", ck / "tokenizer.model")
    ours = write_gguf(ck, root / "moelm.gguf", "f32")
    return {"moelm": ours, "converter": converter_vocab(ours, ck, root / "converter.gguf")}


def converter_vocab(src, directory, dst, drop=(), **keys):
    """A copy of GGUF src whose vocabulary is what convert_hf_to_gguf.py's _set_vocab_sentencepiece writes for the
    checkpoint `directory`; keys: tokenizer.ggml.* entries to add (e.g. add_space_prefix=False); drop: keys to
    leave out."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for key, f in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture", "tokenizer.")) and key not in drop:
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    n = reader.fields[f"{arch}.vocab_size"].contents()
    spec = read_sentencepiece_model(directory / "tokenizer.model")
    pieces = spec["pieces"] + [(f"[PAD{i}]", -10000.0, 5) for i in range(len(spec["pieces"]), n)]
    added = json.loads((directory / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    for i, t in added.items():
        pieces[int(i)] = (t["content"], -1000.0, 3 if t.get("special") else 4)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    gguf.SpecialVocab(directory, n_vocab=n).add_to_gguf(w, quiet=True)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    write_tensors(w, reader)
    return dst


def test_llamacpp_vocabulary_rules(files, tmp_path):
    """What llama.cpp does with a "llama" vocabulary, checked without it: no add_space_prefix key means a space before
    every run of text (after a special token too) and the first one dropped when decoding; no bos/eos ids mean 1
    and 2 (for the model's config too), no rope.freq_base 10000; a precompiled_charsmap is not applied; unused
    pieces decode to nothing."""
    spec = read_sentencepiece_model(files["moelm"].parent / "hub" / "tokenizer.model")
    plain = AutoTokenizer.from_pretrained(None, gguf_file=converter_vocab(
        files["moelm"], files["moelm"].parent / "hub", tmp_path / "plain.gguf", add_space_prefix=False))
    tok = AutoTokenizer.from_pretrained(None, gguf_file=converter_vocab(
        files["moelm"], files["moelm"].parent / "hub", tmp_path / "charsmap.gguf",
        precompiled_charsmap=spec["precompiled_charsmap"]))
    assert tok.encode("Hello world") == [1, *plain.encode(" Hello world", add_special_tokens=False)]
    assert tok.encode("a<|begin_of_sentence|>b", add_special_tokens=False) == [
        *plain.encode(" a", add_special_tokens=False), 3, *plain.encode(" b", add_special_tokens=False)]
    assert tok.decode(tok.encode("Hello  world", add_special_tokens=False)) == "Hello  world"

    bare = tmp_path / "bare"  # a checkpoint directory without token ids: the converter writes none
    bare.mkdir()
    shutil.copy(files["moelm"].parent / "hub" / "tokenizer.model", bare / "tokenizer.model")
    (bare / "tokenizer_config.json").write_text("{}")
    bare_file = converter_vocab(files["moelm"], bare, tmp_path / "b.gguf", drop=["ernie4_5.rope.freq_base"])
    defaults = AutoTokenizer.from_pretrained(None, gguf_file=bare_file)
    assert (defaults.bos_token_id, defaults.eos_token_id) == (1, 2)
    assert defaults.encode("x")[0] == 1
    config = AutoConfig.from_pretrained(None, gguf_file=bare_file)  # llama.cpp's defaults: rope base 10000 too
    assert (config.bos_token_id, config.eos_token_id, config.rope_parameters["rope_theta"]) == (1, 2, 10000.0)

    fi = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "ﬁ".encode()]  # not NFKC'd into "fi"
    assert tok.encode("ﬁ", add_special_tokens=False)[-3:] == fi
    pad = tok.convert_tokens_to_ids("[PAD500]")
    assert tok.decode([pad]) == "" and tok.decode(tok.encode("a b")[1:] + [pad]) == "a b"
    assert tok.decode([pad] + tok.encode("a b")[1:]) == " a b"  # llama.cpp strips the first token's space only


def detokenize(vocab, ids: list[int], special: bool) -> str | None:
    """llama_detokenize's text (None where its bytes are not UTF-8: a cut byte sequence)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids), buf, len(buf), False,
                                   special)
    try:
        return buf.raw[:n].decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (llama_cpp) is not importable")
@pytest.mark.parametrize("kind", ["moelm", "converter"])
def test_tokenizer_matches_llamacpp(files, kind):
    """Random text of mixed Unicode, whitespace runs, digits, emoji and special-token text: moelm's ids are llama.cpp's
    (special text parsed, with and without bos); decoding llama.cpp's ids (special tokens shown or skipped) gives its
    text, but where specials are skipped and ids start with one (llama.cpp then keeps the text's leading space)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(files[kind]), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(None, gguf_file=files[kind])
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng)
        for add in (True, False):
            ids = llm.tokenize(text.encode(), add_bos=add, special=True)
            assert tok.encode(text, add_special_tokens=add) == ids, (text, add)
        for special in (True, False):
            want = detokenize(llm._model.vocab, ids, special)
            if want is not None and (special or ids[:1] == [] or ids[0] not in tok.all_special_ids):
                assert tok.decode(ids, skip_special_tokens=not special) == want, (ids, special)
    assert tok.chat_template == llm.metadata["tokenizer.chat_template"]


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (llama_cpp) is not importable")
@pytest.mark.parametrize("family, ftype", [("ernie4_5", "f32"), ("ernie4_5_moe", "f32"), ("phimoe", "f32"),
                                           ("ernie4_5", "q4_0")])
def test_logits_match_llamacpp_on_the_same_file(family, ftype, tmp_path):
    """from_pretrained(gguf_file=...) against llama.cpp running that file. PhiMoE as llama.cpp computes it
    (llamacpp_harness.llamacpp_semantics) and with its sliding window off: llama.cpp's phimoe attends to the whole
    context whatever attention.sliding_window says. q4_0 (dense, so no routing near-ties): both round activations
    their own way (measured RMS 1.4-2.2% of the logits' RMS on such models)."""
    import torch

    from llamacpp_harness import llamacpp_semantics
    from moelm import AutoModelForCausalLM

    extra = {"attention_bias": True, "lm_head_bias": True, "sliding_window": 7} if family == "phimoe" else {}
    path = write_gguf(tiny_checkpoint(family, tmp_path / "hub", **extra), tmp_path / "m.gguf", ftype)
    ids = np.random.default_rng(0).integers(0, 512, 24).tolist()
    cpp = llamacpp.LlamaCppModel(path, threads=2, n_ctx=32, n_batch=32, logits_all=True, kv_type="f32")
    try:
        want = cpp.logits(ids)
    finally:
        cpp.close()
    window = {"sliding_window": None} if family == "phimoe" else {}
    model = AutoModelForCausalLM.from_pretrained(None, gguf_file=path, fast=False, **window)
    if family == "phimoe":
        assert AutoConfig.from_pretrained(None, gguf_file=path).sliding_window == 7
        llamacpp_semantics(model)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    scale = np.sqrt(np.mean(want.astype(np.float64) ** 2))
    if ftype == "f32":
        assert np.abs(got - want).max() < 1e-3 * scale
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
    else:
        assert np.sqrt(np.mean((got - want) ** 2)) < 0.05 * scale
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
