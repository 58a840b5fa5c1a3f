"""`moelm new`: a randomly initialised checkpoint of a named config, with a small trained tokenizer and a chat
template, so everything downstream (generate, chat, the server) works offline."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import named_config
from ..io.files import atomic_write_text
from ..text.chat_template import ERNIE_TEMPLATE, PHI_TEMPLATE

# Special tokens per family: ids 0.. in this order; the config's pad/bos/eos ids point into it.
SPECIALS = {
    "ernie": ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"],
    "phimoe": ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}
CORPUS = """\
Hello! How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog.
Mixture-of-experts models route each token to a few experts. ERNIE 4.5 and Phi-3.5-MoE are such models.
User: What is the capital of France? Assistant: The capital of France is Paris.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
数学 语言 模型 你好 世界 今天 天气 很好 。 こんにちは 世界 。 안녕하세요 😀 🚀 ✨ café naïve résumé
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2026-11-23 {"key": "value"} [1, 2, 3] <tag> & | ~ ^ % $ # @ !
"""


def train_tokenizer(vocab_size: int, specials: list[str], corpus=None):
    """A byte-level BPE tokenizer with `specials` at ids 0..; trained on `corpus` (an iterable of strings; default:
    the built-in sample text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4 if corpus is None else corpus, trainer)
    return tok


def new_checkpoint(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    from .auto import AutoModelForCausalLM

    config = named_config(name)
    family = family_of(config)
    specials = SPECIALS[family]
    if config.vocab_size < 300:
        raise ValueError(f"vocab_size {config.vocab_size} of {name!r} is too small for a byte-level tokenizer")
    out = Path(out_dir)
    model = AutoModelForCausalLM.from_config(config, seed=seed)
    stop = specials.index("<|end_of_sentence|>" if family == "ernie" else "<|end|>")
    model.generation_config.update(eos_token_id=[config.eos_token_id, stop], do_sample=True, temperature=0.8,
                                   top_p=0.8)  # sample by default, as the real ERNIE 4.5 generation configs do
    model.save_pretrained(out)
    save_tokenizer(train_tokenizer(config.vocab_size, specials), config, out)
    return out


def family_of(config) -> str:
    """The SPECIALS / chat template family of a config."""
    return "phimoe" if config.model_type == "phimoe" else "ernie"


def save_tokenizer(tok, config, out_dir: str | Path) -> Path:
    """tokenizer.json and tokenizer_config.json (special tokens, the family's chat template) of a tokenizer trained
    by train_tokenizer for `config`, into out_dir."""
    family = family_of(config)
    specials = SPECIALS[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    template = ERNIE_TEMPLATE if family == "ernie" else PHI_TEMPLATE
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": specials[config.pad_token_id]
        if config.pad_token_id is not None else "<unk>", "chat_template": template,
        "clean_up_tokenization_spaces": False,
    }
    if family == "ernie":
        tok_config |= {"cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return out
