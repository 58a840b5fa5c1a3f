"""Small tokenizer directories trained in-process (no downloads), in the styles of ERNIE 4.5 and Phi-3.5 / PhiMoE."""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Hello world! This is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it?",
    "Mixture-of-experts models route every token to a few experts.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "机器学习和自然语言处理是人工智能的重要分支。",
    "こんにちは、世界。日本語のテキストも少し。",
    "Emoji are fun 😀🎉🚀 and flags 🇫🇷 too 👍🏽",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345, 3.14159 and symbols #@!$%^&*()",
    "  leading spaces, trailing spaces  \n\nand blank lines\n",
    "User: what is two plus two?\nAssistant: four.",
] * 8

ERNIE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:1>",
                  "<mask:4>", "<mask:5>"]
PHI_SPECIALS = ["<unk>", "<s>", "</s>"]

# ERNIE 4.5 style: the conversation opens with the begin-of-sentence token, the system message first.
ERNIE_TEMPLATE = (
    "{%- if not cls_token is defined -%}{%- set cls_token = '<|begin_of_sentence|>' -%}{%- endif -%}\n"
    "{%- if not sep_token is defined -%}{%- set sep_token = '<|end_of_sentence|>' -%}{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'system' -%}\n"
    "    {%- if not loop.first -%}{{- raise_exception('the system message must come first') -}}{%- endif -%}\n"
    "    {{- message['content'] + '\\n' -}}\n"
    "  {%- elif message['role'] == 'user' -%}\n"
    "    {{- 'User: ' + message['content'] + '\\n' -}}\n"
    "  {%- elif message['role'] == 'assistant' -%}\n"
    "    {{- 'Assistant: ' + message['content'] + sep_token -}}\n"
    "  {%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}\n"
)

# Phi-3.5 style: <|role|>\n content <|end|>\n, eos when no generation prompt.
PHI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": rstrip, "single_word": False,
            "special": special}


def build_bpe_tokenizer_dir(path, chat_template: str | None = ERNIE_TEMPLATE, style: str = "ernie",
                            vocab_size: int = 500, model_type: str | None = None) -> Path:
    """A byte-level BPE tokenizer.json with a bos-adding post-processor, in the ERNIE ("ernie") or Phi ("phi")
    style. ERNIE: tokenizer_config.json without added_tokens_decoder plus special_tokens_map.json (the legacy
    layout); Phi: added tokens with rstrip and a non-special one, listed in added_tokens_decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ERNIE_SPECIALS if style == "ernie" else PHI_SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if style == "phi":
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)]
                               + [AddedToken(t, special=True, normalized=False, rstrip=True)
                                  for t in ("<|assistant|>", "<|end|>", "<|system|>", "<|user|>")])
        tok.add_tokens([AddedToken("<|placeholder1|>", special=False, normalized=False)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(path / "tokenizer.json"))

    if style == "ernie":
        config = {"tokenizer_class": "Ernie4_5_Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": "<unk>", "cls_token": "<|begin_of_sentence|>",
                  "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>", "sys_start_token": "<mask:4>",
                  "sys_end_token": "<mask:5>", "model_max_length": 131072, "add_bos_token": False,
                  "clean_up_tokenization_spaces": False}
        _write_json(path / "special_tokens_map.json", {
            "bos_token": _token("<s>"), "eos_token": _token("</s>"), "unk_token": _token("<unk>"),
            "pad_token": _token("<unk>"), "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
            "mask_token": "<mask:1>"})
    else:
        decoder = {str(i): t.__getstate__() for i, t in tok.get_added_tokens_decoder().items()}
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
                  "unk_token": "<unk>", "pad_token": "<|endoftext|>", "model_max_length": 4096,
                  "padding_side": "left", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                  "clean_up_tokenization_spaces": False, "added_tokens_decoder": decoder}
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "config.json", {"model_type": model_type or ("ernie4_5" if style == "ernie" else "phimoe")})
    return path


def build_sentencepiece_dir(path, chat_template: str | None = ERNIE_TEMPLATE, model_type: str = "unigram",
                            vocab_size: int = 420, add_dummy_prefix: bool = False, clean_up: bool = False,
                            config_model_type: str = "ernie4_5") -> Path:
    """Only tokenizer.model (SentencePiece, byte fallback) with a LlamaTokenizer-style tokenizer_config.json."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path / "tokenizer"), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        user_defined_symbols=["<|begin_of_sentence|>", "<|end_of_sentence|>"], add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (path / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "legacy": False,
              "model_max_length": 2048, "sp_model_kwargs": {}, "clean_up_tokenization_spaces": clean_up}
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "config.json", {"model_type": config_model_type})
    return path
