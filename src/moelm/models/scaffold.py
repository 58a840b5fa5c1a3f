"""`moelm new`: a randomly initialised checkpoint of a named config, with a small trained tokenizer and a chat
template, so everything downstream (generate, chat, the server) works offline."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import named_config
from ..inference.quantize import resolve
from ..io.files import atomic_write_text
from ..loading.quantized import quantized_meta_model, write_quantized
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


def new_checkpoint(name: str, out_dir: str | Path, seed: int = 0, quantization=None, layers: int | None = None
                   ) -> Path:
    """A random checkpoint of the named config in out_dir. quantization ("int8" | "int4" | a QuantizationConfig):
    written directly with moelm's quantized weights in the compressed-tensors format, one tensor at a time (each
    drawn as init_weights draws it, then quantized), so a full-size model never exists in memory or on disk.
    layers: only the first `layers` decoder layers (at most the config's), at full width."""
    from .auto import AutoModelForCausalLM

    config = named_config(name) if layers is None else first_layers(named_config(name), layers)
    family = family_of(config)
    specials = SPECIALS[family]
    if config.vocab_size < 300:
        raise ValueError(f"vocab_size {config.vocab_size} of {name!r} is too small for a byte-level tokenizer")
    out = Path(out_dir)
    mtp = int(getattr(config, "num_nextn_predict_layers", 0) or 0)  # ERNIE -PT checkpoints carry an MTP head
    if quantization is None:
        model = AutoModelForCausalLM.from_config(config, seed=seed)  # with the MTP head the config asks for
        if mtp:  # the head's tensors drawn as RandomCheckpoint draws them, from their own seed
            head = {n: p for n, p in model.model.named_parameters() if n.startswith("mtp_")}
            source = RandomCheckpoint(config, {n: (tuple(p.shape), p.dtype) for n, p in head.items()}, seed + 1, out)
            with torch.no_grad():
                for n, p in head.items():
                    p.copy_(source.get(n))
    else:
        qconfig = resolve(quantization)
        model, expected = quantized_meta_model(AutoModelForCausalLM.class_for(config), config, torch.float32, qconfig)
        if mtp:  # written as the real checkpoints store it: bf16, unquantized
            with torch.device("meta"):
                meta = AutoModelForCausalLM.class_for(config)(config)
                meta.add_mtp(mtp)
            expected.update({f"model.{n}": (tuple(p.shape), torch.bfloat16)
                             for n, p in meta.model.named_parameters() if n.startswith("mtp_")})
    stop = specials.index("<|end_of_sentence|>" if family == "ernie" else "<|end|>")
    model.generation_config.update(eos_token_id=[config.eos_token_id, stop], do_sample=True, temperature=0.8,
                                   top_p=0.8)  # sample by default, as the real ERNIE 4.5 generation configs do
    if quantization is None:
        model.save_pretrained(out)
    else:
        write_quantized(model, RandomCheckpoint(config, expected, seed, out), expected, out, model.saved_files())
    save_tokenizer(train_tokenizer(config.vocab_size, specials), config, out)
    return out


def first_layers(config, layers: int):
    """The config with only its first `layers` decoder layers (ERNIE's MoE layer range cut to them)."""
    from ..config import AutoConfig

    if not 0 < layers <= config.num_hidden_layers:
        raise ValueError(f"layers must be 1 to {config.num_hidden_layers} (the config's num_hidden_layers), "
                         f"not {layers}")
    data = config.to_dict()
    data["num_hidden_layers"] = layers
    if "moe_layer_end_index" in data and data["moe_layer_end_index"] >= layers:
        data["moe_layer_end_index"] = layers - 1
    return AutoConfig.for_model(data.pop("model_type"), **data)


class RandomCheckpoint:
    """A checkpoint read as init_weights would fill it: norms 1, biases and ERNIE's correction bias 0, the rest
    normal(0, initializer_range) (the embedding's padding row 0); each tensor drawn from its own seed."""

    def __init__(self, config, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int, where):
        self.config, self.tensors, self.seed, self.directory = config, tensors, seed, Path(where)
        self.files = [self.directory]
        self.index = {key: i for i, key in enumerate(tensors)}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key][1]

    def get(self, key: str) -> torch.Tensor:
        shape, dtype = self.tensors[key]
        module, _, leaf = key.rpartition(".")
        if leaf == "bias" or key.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=dtype)
        if any("norm" in part for part in module.split(".")[-2:]):  # mtp_emb_norm.0 too
            return torch.ones(shape, dtype=dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index[key])
        w = torch.empty(shape).normal_(0.0, self.config.initializer_range, generator=g).to(dtype)
        pad = self.config.pad_token_id
        if module.endswith("embed_tokens") and pad is not None and 0 <= pad < shape[0]:
            w[pad] = 0
        return w


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
