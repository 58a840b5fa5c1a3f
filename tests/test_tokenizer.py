"""moelm's tokenizer, chat templates and streamers against transformers 5.23 on tokenizers trained in-test."""
from __future__ import annotations

import datetime
import json
import shutil
import threading

import jinja2
import pytest
import torch

from moelm.io.hub import ModelNotFoundError
from moelm.text.sentencepiece import read_sentencepiece_model
from moelm.text.streamers import TextIteratorStreamer, TextStreamer, _is_cjk
from moelm.text.tokenizer import AutoTokenizer
from tokenizer_fixtures import ERNIE_TEMPLATE, PHI_TEMPLATE, build_bpe_tokenizer_dir, build_sentencepiece_dir

transformers = pytest.importorskip("transformers")
try:
    import google.protobuf  # noqa: F401  (transformers reads tokenizer.model with protobuf)
    HAS_PROTOBUF = True
except ImportError:
    HAS_PROTOBUF = False

TEXTS = [
    "Hello world!", "Hello world! This is a test.", " leading space", "trailing space ", "  two  spaces  ",
    "line one\nline two\n\n", "\n", "你好，世界！今天天气很好。", "こんにちは、世界。", "emoji 😀🎉🚀 👍🏽 🇫🇷",
    "mixed 中文 and English 😀 together", "<s>inside</s> text <unk>", "<|begin_of_sentence|>User: hi\n",
    "<|user|>\nhi<|end|>\n<|assistant|>\n", "<|placeholder1|> word", "don't , stop ! isn't it ?", "tabs\tand\rreturns",
    "ｆｕｌｌ　ｗｉｄｔｈ", "",
]
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there", "tool_calls": None}],
]
KINDS = ["ernie", "phi", "spm", "spm_bpe"]


class _Pairs(dict):
    """kind -> (moelm tokenizer, transformers tokenizer), loaded on first use."""

    def __init__(self, dirs):
        super().__init__()
        self.dirs = dirs

    def __missing__(self, kind):
        if kind.startswith("spm") and not HAS_PROTOBUF:
            pytest.skip("transformers needs protobuf to read tokenizer.model")
        self[kind] = (AutoTokenizer.from_pretrained(self.dirs[kind]),
                      transformers.AutoTokenizer.from_pretrained(self.dirs[kind]))
        return self[kind]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "ernie": build_bpe_tokenizer_dir(root / "ernie"),
        "phi": build_bpe_tokenizer_dir(root / "phi", PHI_TEMPLATE, style="phi"),
        "spm": build_sentencepiece_dir(root / "spm"),
        "spm_bpe": build_sentencepiece_dir(root / "spm_bpe", PHI_TEMPLATE, model_type="bpe", add_dummy_prefix=True,
                                           clean_up=True, config_model_type="phimoe"),
    }


@pytest.fixture(scope="module")
def pairs(dirs):
    return _Pairs(dirs)


def _backend_json(tok):
    """The backend without padding / truncation, which transformers leaves as the last call set them."""
    return {k: v for k, v in json.loads(tok.backend_tokenizer.to_str()).items() if k not in ("padding", "truncation")}


def _same(ours, ref):
    """Same ids / masks: ours is a BatchEncoding (dict), ref transformers' (UserDict); tensors or lists."""
    assert set(ours) == set(ref.keys())
    for k in ours:
        a, b = ours[k], ref[k]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), k
        else:
            assert a == b, k


@pytest.mark.parametrize("kind", KINDS)
def test_loads_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    assert _backend_json(ours) == _backend_json(ref)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "bos_token_id",
                 "eos_token_id", "pad_token_id", "unk_token_id", "all_special_tokens", "all_special_ids",
                 "special_tokens_map", "vocab_size", "padding_side", "model_max_length", "chat_template",
                 "clean_up_tokenization_spaces"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()


@pytest.mark.parametrize("kind", KINDS)
def test_encode_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    for text in TEXTS:
        _same(ours(text), ref(text))
        _same(ours(text, add_special_tokens=False), ref(text, add_special_tokens=False))
        assert ours.encode(text) == ref.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text)
    _same(ours("first part", "second part"), ref("first part", "second part"))
    _same(ours(TEXTS[:4], return_attention_mask=False), ref(TEXTS[:4], return_attention_mask=False))
    _same(ours([TEXTS[0]], return_tensors="pt"), ref([TEXTS[0]], return_tensors="pt"))
    _same(ours(TEXTS[7], return_tensors="pt"), ref(TEXTS[7], return_tensors="pt"))
    tokens = ref.tokenize(TEXTS[10])
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not-a-token-xyz") == ref.convert_tokens_to_ids("not-a-token-xyz")


@pytest.mark.parametrize("kind", KINDS)
def test_decode_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    batch = [ref(t)["input_ids"] for t in TEXTS]
    for ids in batch:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            assert ours.convert_ids_to_tokens(ids, skip) == ref.convert_ids_to_tokens(ids, skip)
        for clean in (False, True):
            assert (ours.decode(ids, clean_up_tokenization_spaces=clean)
                    == ref.decode(ids, clean_up_tokenization_spaces=clean))
        assert ours.decode(torch.tensor(ids)) == ref.decode(torch.tensor(ids))
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)
    assert ours.decode(batch[0][0]) == ref.decode(batch[0][0])
    assert ours.convert_ids_to_tokens(batch[0][0]) == ref.convert_ids_to_tokens(batch[0][0])
    padded = ref(TEXTS[:3], padding=True, return_tensors="pt")["input_ids"] if ref.pad_token else None
    if padded is not None:
        assert ours.batch_decode(padded, skip_special_tokens=True) == ref.batch_decode(padded, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_and_truncation_like_transformers(dirs, pairs, kind):
    ours, ref = pairs[kind]
    if ref.pad_token is None:  # the sentencepiece configs set no pad token
        assert ours.pad_token_id is None
        with pytest.raises(ValueError, match="padding token"):
            ours(TEXTS[:2], padding=True)
        ours = AutoTokenizer.from_pretrained(dirs[kind], pad_token="<unk>")
        ref = transformers.AutoTokenizer.from_pretrained(dirs[kind], pad_token="<unk>")
    batch = [TEXTS[1], TEXTS[7], TEXTS[9], TEXTS[0]]
    cases = [dict(padding=True), dict(padding="longest", padding_side="left"), dict(padding=True, padding_side="right"),
             dict(padding="max_length", max_length=24, truncation=True), dict(max_length=5),
             dict(padding=True, truncation=True, max_length=6), dict(padding="max_length"),
             dict(padding=True, pad_to_multiple_of=8), dict(truncation=True)]
    for kwargs in cases:
        for tensors in (None, "pt") if kwargs.get("padding") else (None,):
            _same(ours(batch, return_tensors=tensors, **kwargs), ref(batch, return_tensors=tensors, **kwargs))
        _same(ours(TEXTS[1], **kwargs), ref(TEXTS[1], **kwargs))
    left = AutoTokenizer.from_pretrained(dirs[kind], padding_side="left", pad_token=ours.pad_token)
    assert left.padding_side == "left"
    enc = left(batch, padding=True, return_tensors="pt").to("cpu")
    assert enc.input_ids[:, -1].tolist() == [ids[-1] for ids in ours(batch).input_ids]
    assert enc.attention_mask.sum(1).tolist() == [len(ids) for ids in ours(batch).input_ids]
    with pytest.raises(ValueError, match="tensor"):
        ours(batch, return_tensors="pt")


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    for chat in CHATS:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert dict(ours.apply_chat_template(chat, add_generation_prompt=gen)) == dict(
                ref.apply_chat_template(chat, add_generation_prompt=gen))  # a dict by default, as transformers 5
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
            assert ids == ref.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
            assert ids == ours(text, add_special_tokens=False).input_ids
    chat = CHATS[2]
    assert torch.equal(ours.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=False),
                       ref.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=False))
    _same(ours.apply_chat_template(chat, return_dict=True, return_tensors="pt"),
          ref.apply_chat_template(chat, return_dict=True, return_tensors="pt"))
    assert (ours.apply_chat_template(CHATS, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(CHATS, tokenize=False, add_generation_prompt=True))
    assert ours.apply_chat_template(CHATS, return_dict=False) == ref.apply_chat_template(CHATS, return_dict=False)
    if ours.pad_token is not None:
        _same(ours.apply_chat_template(CHATS, padding=True, return_tensors="pt", return_dict=True),
              ref.apply_chat_template(CHATS, padding=True, return_tensors="pt", return_dict=True))
    partial = CHATS[3][:1] + [{"role": "assistant", "content": "Hello th"}]
    assert (ours.apply_chat_template(partial, continue_final_message=True, tokenize=False)
            == ref.apply_chat_template(partial, continue_final_message=True, tokenize=False))


def test_chat_template_globals_and_errors(pairs):
    ours, ref = pairs["ernie"]
    bad = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(jinja2.TemplateError, match="system message must come first"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="system message must come first"):
        ours.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="unknown role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    template = ("{{ strftime_now('%Y') }}|{{ tools | tojson }}|{{ documents | tojson(indent=2) }}|{{ sys_start_token }}"
                "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% if loop.index > 0 %}"
                "{% break %}{% endif %}{% endfor %}{% set ns = namespace(n=1) %}{{ ns.n }}{{ dict(a=1) | tojson }}"
                "{{ extra_var }}")
    tools = [{"type": "function", "function": {"name": "天气", "parameters": {"type": "object"}}}]
    kwargs = dict(tools=tools, documents=[{"title": "t", "text": "文"}], chat_template=template, tokenize=False,
                  extra_var="!")
    text = ours.apply_chat_template(CHATS[1], **kwargs)
    assert text == ref.apply_chat_template(CHATS[1], **kwargs)
    assert text.startswith(str(datetime.datetime.now().year)) and "天气" in text and "<mask:4>" in text
    bad_ns = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], chat_template=bad_ns, tokenize=False)
    for escape in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):  # sandboxed, immutable
        with pytest.raises(jinja2.exceptions.SecurityError):
            ours.apply_chat_template(CHATS[0], chat_template=escape, tokenize=False)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(CHATS[0], add_generation_prompt=True, continue_final_message=True)


def test_chat_template_files_and_lists(dirs, tmp_path):
    src = dirs["ernie"]
    jinja_dir = tmp_path / "jinja"
    shutil.copytree(src, jinja_dir)
    (jinja_dir / "chat_template.jinja").write_text(PHI_TEMPLATE, encoding="utf-8")  # overrides the config's
    list_dir = tmp_path / "list"
    shutil.copytree(src, list_dir)
    cfg = json.loads((list_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": ERNIE_TEMPLATE}, {"name": "tool_use", "template": "T"}]
    (list_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    none_dir = tmp_path / "none"
    shutil.copytree(src, none_dir)
    del cfg["chat_template"]
    (none_dir / "tokenizer_config.json").write_text(json.dumps(cfg))

    ours, ref = AutoTokenizer.from_pretrained(jinja_dir), transformers.AutoTokenizer.from_pretrained(jinja_dir)
    assert ours.chat_template == PHI_TEMPLATE == ref.chat_template
    assert ours.apply_chat_template(CHATS[2], tokenize=False) == ref.apply_chat_template(CHATS[2], tokenize=False)
    ours, ref = AutoTokenizer.from_pretrained(list_dir), transformers.AutoTokenizer.from_pretrained(list_dir)
    assert ours.chat_template == ref.chat_template
    assert ours.apply_chat_template(CHATS[1], tokenize=False) == ref.apply_chat_template(CHATS[1], tokenize=False)
    assert ours.apply_chat_template(CHATS[1], tools=[], tokenize=False) == "T"
    assert ours.apply_chat_template(CHATS[1], chat_template="tool_use", tokenize=False) == "T"
    with pytest.raises(ValueError, match="no chat template"):
        AutoTokenizer.from_pretrained(none_dir).apply_chat_template(CHATS[0])


MASKED = ("{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}{{ eos_token }}"
          "{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}")


def test_assistant_tokens_mask_and_tokenizer_kwargs_like_transformers(pairs):
    ours, ref = pairs["ernie"]
    chats = [CHATS[2] + [{"role": "assistant", "content": "Six."}], CHATS[3]]
    for chat, kw in ((chats, {}), (chats, dict(padding=True, return_tensors="pt")), (chats[1], {}),
                     (chats[1], dict(return_tensors="pt")), (chats, dict(truncation=True, max_length=12))):
        kw = dict(chat_template=MASKED, return_assistant_tokens_mask=True, **kw)
        a, b = ours.apply_chat_template(chat, **kw), ref.apply_chat_template(chat, **kw)
        _same(a, b)
        masks = a["assistant_masks"]
        assert "1" in str(masks.tolist() if isinstance(masks, torch.Tensor) else masks)
    kw = dict(chat_template=MASKED, tokenizer_kwargs={"return_attention_mask": False})
    _same(ours.apply_chat_template(CHATS[3], **kw), ref.apply_chat_template(CHATS[3], **kw))
    with pytest.raises(TypeError, match="bogus"):
        ours.apply_chat_template(CHATS[3], tokenizer_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="return_dict=True and tokenize=True"):
        ours.apply_chat_template(CHATS[3], return_assistant_tokens_mask=True, tokenize=False)
    with pytest.raises(ValueError, match="return_assistant_tokens_mask"):
        ours.apply_chat_template(CHATS[3], return_assistant_tokens_mask=True, continue_final_message=True)
    with pytest.warns(UserWarning, match="generation"):
        plain = ours.apply_chat_template(CHATS[3], return_assistant_tokens_mask=True)
    assert plain["assistant_masks"] == [0] * len(plain["input_ids"])
    with pytest.raises(ValueError, match="sanitize_control_tokens"):
        ours.apply_chat_template(CHATS[3], sanitize_control_tokens=True)


def test_text_that_is_not_utf8_is_a_value_error(pairs):
    ours, _ = pairs["ernie"]
    chat = [{"role": "user", "content": "\ud800"}]
    for call in (lambda: ours("ab\ud800"), lambda: ours(["ok", "\udcff"]), lambda: ours.encode("x", "y\ud800"),
                 lambda: ours.tokenize("\ud800"), lambda: ours.apply_chat_template(chat)):
        with pytest.raises(ValueError, match="not encodable as UTF-8.*U\\+D"):
            call()
    with pytest.raises(ValueError, match="must be a string"):
        ours(["ok", None])


def test_broken_files_and_templates_are_named(dirs, tmp_path):
    bad = {}
    for name, file, text in (("tok", "tokenizer.json", "{oops"), ("cfg", "tokenizer_config.json", '{"a": 1,'),
                             ("kind", "tokenizer.json", '{"model": {"type": "Nope"}}'),
                             ("syntax", "chat_template.jinja", "{% for m in messages %}{{ m.content "),
                             ("undefined", "chat_template.jinja", "{{ messages[5].content }}")):
        bad[name] = tmp_path / name
        shutil.copytree(dirs["ernie"], bad[name])
        (bad[name] / file).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{bad['tok'] / 'tokenizer.json'} is not valid JSON"):
        AutoTokenizer.from_pretrained(bad["tok"])
    with pytest.raises(ValueError, match=f"{bad['cfg'] / 'tokenizer_config.json'} is not valid JSON"):
        AutoTokenizer.from_pretrained(bad["cfg"])
    with pytest.raises(ValueError, match=f"{bad['kind'] / 'tokenizer.json'} is not a tokenizer"):
        AutoTokenizer.from_pretrained(bad["kind"])
    syntax = AutoTokenizer.from_pretrained(bad["syntax"])
    with pytest.raises(ValueError, match=f"chat template in {bad['syntax'] / 'chat_template.jinja'} does not compile: "
                                         "unexpected end of template.*line 1"):
        syntax.apply_chat_template(CHATS[0])
    with pytest.raises(jinja2.TemplateError, match="^the chat template does not compile"):  # not the file's
        syntax.apply_chat_template(CHATS[0], chat_template="{% if %}")
    with pytest.raises(jinja2.exceptions.UndefinedError, match=f"chat template in {bad['undefined']}.* failed: "
                                                                "UndefinedError: list object has no element 5"):
        AutoTokenizer.from_pretrained(bad["undefined"]).apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="chat template in .*tokenizer_config.json failed: TypeError"):
        AutoTokenizer.from_pretrained(dirs["ernie"]).apply_chat_template([{"role": "user", "content": 5}])


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(pairs, kind, tmp_path):
    ours, ref = pairs[kind]
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    assert (tmp_path / "ours" / "special_tokens_map.json").is_file()
    assert "chat_template" in json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    ref.save_pretrained(tmp_path / "ref")
    reloaded = [AutoTokenizer.from_pretrained(tmp_path / "ours"),
                transformers.AutoTokenizer.from_pretrained(tmp_path / "ours"),
                AutoTokenizer.from_pretrained(tmp_path / "ref")]
    for tok in reloaded:
        assert _backend_json(tok) == _backend_json(ref)
        for text in TEXTS:
            assert tok(text).input_ids == ref(text).input_ids
            assert tok.decode(ref(text).input_ids, skip_special_tokens=True) == ref.decode(
                ref(text).input_ids, skip_special_tokens=True)
        assert tok.apply_chat_template(CHATS[2], tokenize=False) == ref.apply_chat_template(CHATS[2], tokenize=False)
        assert sorted(tok.all_special_ids) == sorted(ref.all_special_ids)  # saved configs have sorted keys
        for attr in ("special_tokens_map", "padding_side", "model_max_length", "clean_up_tokenization_spaces"):
            assert getattr(tok, attr) == getattr(ref, attr), attr


def test_sentencepiece_model_reader(dirs):
    spm = pytest.importorskip("sentencepiece")
    for kind in ("spm", "spm_bpe"):
        path = dirs[kind] / "tokenizer.model"
        spec, sp = read_sentencepiece_model(path), spm.SentencePieceProcessor(model_file=str(path))
        assert [p for p, _, _ in spec["pieces"]] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert [s for _, s, _ in spec["pieces"]] == [sp.get_score(i) for i in range(sp.get_piece_size())]
        assert [t == 3 for _, _, t in spec["pieces"]] == [sp.is_control(i) for i in range(sp.get_piece_size())]
        assert [t == 6 for _, _, t in spec["pieces"]] == [sp.is_byte(i) for i in range(sp.get_piece_size())]
        assert spec["byte_fallback"] and spec["precompiled_charsmap"] and spec["unk_id"] == sp.unk_id() == 0
        assert spec["model_type"] == (1 if kind == "spm" else 2)
    ours = AutoTokenizer.from_pretrained(dirs["spm"])  # add_dummy_prefix=False: sentencepiece agrees on plain text
    sp = spm.SentencePieceProcessor(model_file=str(dirs["spm"] / "tokenizer.model"))
    for text in ("Hello world! This is a test.", "你好，世界！", "emoji 😀🎉", "ｆｕｌｌ"):
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text)


def test_missing_files_and_special_token_setters(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "missing")
    tok = AutoTokenizer.from_pretrained(dirs["spm"])
    assert tok.pad_token is None and tok.pad_token_id is None
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    enc = tok(["a", "a b c"], padding=True)
    assert enc.input_ids[0][-1] == tok.eos_token_id and enc.attention_mask[0][-1] == 0
    assert tok.name_or_path == str(dirs["spm"])


def _pieces(streamer_cls, tok, prompt, generated, **kwargs):
    pieces = []

    class Capture(streamer_cls):
        def on_finalized_text(self, text, stream_end=False):
            pieces.append((text, stream_end))

    streamer = Capture(tok, **kwargs)
    streamer.put(torch.tensor([prompt]))
    for i in generated:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return pieces


@pytest.mark.parametrize("kind", ["ernie", "spm"])
def test_text_streamer_never_splits_characters(pairs, kind):
    ours, ref = pairs[kind]
    prompt = ours.encode("Say hi:")
    text = " 你好，世界！ emoji 😀🎉 👍🏽 🦀 done.\nnext line 天气很好龍 答案"
    generated = ours.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in generated)  # some tokens are partial UTF-8 sequences
    for skip in (False, True):
        pieces = _pieces(TextStreamer, ours, prompt, generated, skip_prompt=skip, skip_special_tokens=True)
        text = "".join(p for p, _ in pieces)
        expected = ours.decode(generated if skip else prompt + generated, skip_special_tokens=True)
        assert text == expected
        assert not any("\ufffd" in p for p, _ in pieces)
        assert pieces[-1][1] and not any(end for _, end in pieces[:-1])
        ref_pieces = _pieces(transformers.TextStreamer, ref, prompt, generated, skip_prompt=skip,
                             skip_special_tokens=True)
        assert pieces == ref_pieces
    assert any(p.endswith("你") or p.endswith("好") for p, _ in pieces)  # CJK goes out at once


@pytest.mark.parametrize("kind", ["phi", "spm", "spm_strip"])
def test_text_streamer_pieces_equal_transformers_from_one_tokenizer_json(dirs, kind, tmp_path):
    """One token sequence, put a token at a time and in chunks of 1-3, through our TextStreamer and transformers' built from the
    same tokenizer.json: partial UTF-8 byte tokens, CJK runs, lines (a Strip decoder drops the space that starts
    one) and special tokens give the same pieces."""
    source = AutoTokenizer.from_pretrained(dirs["spm" if kind.startswith("spm") else kind]).backend_tokenizer
    spec = json.loads(source.to_str())
    if kind == "spm_strip":  # Llama's: "\n" a byte token, a dummy prefix that decoding strips
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        spec["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ours = AutoTokenizer.from_pretrained(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "Hi 你好，世界！今天天气很好 😀🦀 ok\n 龍 naïve 👍🏽\n\nend 答案</s> tail 🇫🇷"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids)
    ids += ours.encode("🎉", add_special_tokens=False)[:1]  # ends inside a character

    def pieces(streamer_cls, tok, chunks, **kwargs):
        out = []

        class Capture(streamer_cls):
            def on_finalized_text(self, text, stream_end=False):
                out.append((text, stream_end))

        streamer = Capture(tok, **kwargs)
        for chunk in chunks:
            streamer.put(torch.tensor([chunk]))
        streamer.end()
        return out

    ones, mixed = [[i] for i in ids], []
    while sum(map(len, mixed)) < len(ids):
        start = sum(map(len, mixed))
        mixed.append(ids[start:start + 1 + len(mixed) % 3])
    for chunks in (ones, mixed):
        for kwargs in ({}, {"skip_special_tokens": True}, {"skip_prompt": True}):
            mine = pieces(TextStreamer, ours, chunks, **kwargs)
            assert mine == pieces(transformers.TextStreamer, ref, chunks, **kwargs), kwargs
            assert any(p and _is_cjk(p[-1]) for p, _ in mine)
            assert any(p.endswith("\n") for p, _ in mine) or kind == "spm"  # its NFKC normalizer drops "\n"


def test_text_streamer_prints_and_rejects_batches(pairs, capsys):
    ours, _ = pairs["phi"]
    streamer = TextStreamer(ours, skip_prompt=True)
    streamer.put(torch.tensor([ours.encode("prompt")]))
    for i in ours.encode("one two three", add_special_tokens=False):
        streamer.put([i])
    streamer.end()
    assert capsys.readouterr().out == "one two three\n"
    with pytest.raises(ValueError, match="TextStreamer only supports batch size 1"):
        TextStreamer(ours).put(torch.tensor([[1, 2], [3, 4]]))


def test_text_iterator_streamer_from_a_thread(dirs):
    ours = AutoTokenizer.from_pretrained(dirs["spm"])
    prompt = ours.encode("Question:")
    generated = ours.encode("答案 is 🦀 four.\nThanks 龍", add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in generated)  # byte-fallback pieces
    streamer = TextIteratorStreamer(ours, skip_prompt=True, timeout=10)

    def generate():
        streamer.put(torch.tensor([prompt]))
        for i in generated:
            streamer.put(torch.tensor([i]))
        streamer.end()

    thread = threading.Thread(target=generate)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == ours.decode(generated)
    assert not any("\ufffd" in p for p in pieces)


def test_apply_chat_template_parameters_in_transformers_order():
    """The same parameters in the same order as transformers' (so positional calls mean the same)."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    from moelm.text.tokenizer import Tokenizer

    ours = list(inspect.signature(Tokenizer.apply_chat_template).parameters)
    theirs = list(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    assert ours[:-1] == theirs[:-1] and ours[-1] == "template_kwargs" and theirs[-1] == "kwargs"


def test_pad_to_multiple_of_must_divide_the_truncation_length(pairs):
    ours, ref = pairs["ernie"]
    kwargs = dict(padding=True, truncation=True, max_length=9, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match=r"truncation length \(9\) is not a multiple of pad_to_multiple_of \(8\)"):
        ours(TEXTS[:2], **kwargs)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ref(TEXTS[:2], **kwargs)
    _same(ours(TEXTS[:2], **{**kwargs, "max_length": 16}), ref(TEXTS[:2], **{**kwargs, "max_length": 16}))


def test_ragged_batches_as_tensors(pairs):
    """np: an object array of arrays as transformers makes; pt: an error, where torch.tensor([[], [5]]) would
    silently give an empty (2, 0) tensor (transformers returns that one)."""
    ours, ref = pairs["phi"]
    batch = ["", "Hello world!", "你好"]
    a = ours(batch, add_special_tokens=False, return_tensors="np")["input_ids"]
    b = ref(batch, add_special_tokens=False, return_tensors="np")["input_ids"]
    assert a.dtype == b.dtype == object and a.shape == b.shape
    assert all(x.dtype == y.dtype and x.tolist() == y.tolist() for x, y in zip(a, b))
    with pytest.raises(ValueError, match="tensor"):
        ours(batch, add_special_tokens=False, return_tensors="pt")


def test_a_stride_too_long_for_the_truncation_is_a_value_error(pairs):
    ours, _ = pairs["ernie"]
    with pytest.raises(ValueError, match="stride"):
        ours(["Hello world! This is a test."], truncation=True, max_length=4, stride=3)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_tokens_to_string_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    for text in TEXTS:
        tokens = ref.convert_ids_to_tokens(ref(text)["input_ids"])
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)


def test_setting_special_tokens_keeps_transformers_order(dirs):
    for kind, changes in (("spm", [("pad_token", "</s>"), ("eos_token", "<s>"), ("mask_token", None)]),
                          ("ernie", [("sys_start_token", "<mask:5>"), ("sys_end_token_id", 3), ("cls_token_id", 2),
                                     ("sys_start_token", None)])):
        ours, ref = AutoTokenizer.from_pretrained(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
        for name, value in changes:
            setattr(ours, name, value)
            setattr(ref, name, value)
            for attr in ("special_tokens_map", "all_special_tokens", "all_special_ids", name.removesuffix("_id")):
                assert getattr(ours, attr) == getattr(ref, attr), (kind, name, attr)


def test_sentencepiece_scores_like_transformers(tmp_path):
    """transformers deep-copies the converted backend (a JSON round trip that moves some scores by one ulp)."""
    if not HAS_PROTOBUF:
        pytest.skip("transformers needs protobuf to read tokenizer.model")
    path = build_sentencepiece_dir(tmp_path / "spm", add_dummy_prefix=True)
    assert _backend_json(AutoTokenizer.from_pretrained(path)) == _backend_json(
        transformers.AutoTokenizer.from_pretrained(path))


@pytest.mark.parametrize("kind", KINDS)
def test_batches_of_pairs_and_of_tensors_like_transformers(pairs, kind):
    ours, ref = pairs[kind]
    batch = [("Hello world!", "second part"), ["你好", ""]]
    _same(ours(batch), ref(batch))
    ids = [torch.tensor(ref(text)["input_ids"]) for text in TEXTS[:3]]
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == ref.decode(ids)
    with pytest.raises(ValueError, match="too short"):
        ours([("a b c d e", "c d e f")], truncation="only_second", max_length=6)


@pytest.mark.parametrize("names", [["input_ids", "token_type_ids", "attention_mask"], ["input_ids"]])
def test_model_input_names_like_transformers(dirs, names, tmp_path):
    ours = AutoTokenizer.from_pretrained(dirs["phi"], model_input_names=names)
    ref = transformers.AutoTokenizer.from_pretrained(dirs["phi"], model_input_names=names)
    for kwargs in (dict(padding=True), dict(return_attention_mask=True), dict(return_tensors="pt", padding=True)):
        _same(ours(TEXTS[:3], **kwargs), ref(TEXTS[:3], **kwargs))
    _same(ours("first part", "second part"), ref("first part", "second part"))
    _same(ours.apply_chat_template(CHATS[1]), ref.apply_chat_template(CHATS[1]))
    ours.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_input_names == names
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).model_input_names == names


def test_corrupt_sentencepiece_models_and_config_values_name_the_file(dirs, tmp_path):
    from moelm.io.weights import CheckpointError

    model = (dirs["spm"] / "tokenizer.model").read_bytes()
    for name, data in (("garbage", b"garbage\x00\x01\x02"), ("half", model[:len(model) // 2]), ("cut", model[:-3])):
        shutil.copytree(dirs["spm"], tmp_path / name)
        (tmp_path / name / "tokenizer.model").write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name / 'tokenizer.model'} is not a SentencePiece"):
            AutoTokenizer.from_pretrained(tmp_path / name)
    for i, (kind, file, key, value) in enumerate((
            ("phi", "tokenizer_config.json", "added_tokens_decoder", {"x": {"content": "a"}}),
            ("phi", "tokenizer_config.json", "added_tokens_decoder", {"3": "a"}),
            ("phi", "tokenizer_config.json", "model_max_length", "big"),
            ("phi", "tokenizer_config.json", "padding_side", "up"),
            ("phi", "tokenizer_config.json", "chat_template", 5),
            ("phi", "tokenizer_config.json", "chat_template", [{"name": "x"}]),
            ("phi", "tokenizer_config.json", "model_input_names", "input_ids"),
            ("phi", "tokenizer_config.json", "extra_special_tokens", 5),
            ("phi", "tokenizer_config.json", "eos_token", 5),
            ("ernie", "special_tokens_map.json", "bos_token", 5))):
        path = shutil.copytree(dirs[kind], tmp_path / f"cfg{i}")
        cfg = json.loads((path / file).read_text())
        cfg[key] = value
        (path / file).write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=f"{path / file}: {key} must be"):
            AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", KINDS)
def test_add_tokens_and_special_tokens_like_transformers(dirs, kind, tmp_path):
    """add_tokens / add_special_tokens (transformers' keys, additional_special_tokens, replace_extra_special_tokens)
    add what transformers adds and return the same counts; text with them encodes and decodes alike, before and
    after a save_pretrained that both read back."""
    from tokenizers import AddedToken

    ours, ref = AutoTokenizer.from_pretrained(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
    calls = [("add_tokens", (["hello_world", "foo"],), {}), ("add_tokens", ("<x>",), {"special_tokens": True}),
             ("add_special_tokens", ({"pad_token": "[PAD]", "additional_special_tokens": ["<a>", "<b>"]},), {}),
             ("add_special_tokens", ({"extra_special_tokens": ["<c>", "<a>"]},),
              {"replace_extra_special_tokens": False}),
             ("add_tokens", ([AddedToken(" zz", lstrip=True)],), {}), ("add_tokens", (["foo"],), {})]
    for name, args, kwargs in calls:
        assert getattr(ours, name)(*args, **kwargs) == getattr(ref, name)(*args, **kwargs), (name, args)
        assert len(ours) == len(ref)
    assert ours.pad_token_id == ref.pad_token_id and ours.all_special_tokens == ref.all_special_tokens
    assert ours.extra_special_tokens == ref.extra_special_tokens
    text = "say hello_world foo<x> [PAD] <a><b><c> zz end hello_worldfoo"
    for skip in (True, False):
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=skip) == \
            ref.decode(ref(text)["input_ids"], skip_special_tokens=skip)
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    ours.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)):
        assert again(text)["input_ids"] == ref(text)["input_ids"] and again.pad_token == "[PAD]"
    with pytest.raises(ValueError, match="Key bogus_token is not a valid special token"):
        ours.add_special_tokens({"bogus_token": "<y>"})
    with pytest.raises(TypeError, match="add_tokens takes strings or AddedTokens, got int"):
        ours.add_tokens([5])
