"""Tokenizers that load, encode, decode, render chat templates and save as transformers 5.23's TokenizersBackend does.
Encoding and decoding run in the `tokenizers` library; a directory with only `tokenizer.model` is converted by
`sentencepiece.py`, chat templates render in `chat_template.py`."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from ..config import read_json_object
from ..io.files import atomic_write_files, make_dir
from ..io.hub import resolve_gguf, resolve_model_dir, takes_hub_options, with_revision
from ..io.weights import CheckpointError
from .chat_template import render_chat_template
from .gguf import read_gguf_tokenizer
from .sentencepiece import sentencepiece_backend

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
_LOADER_KWARGS = ("use_fast", "trust_remote_code", "_from_auto")  # moelm's tokenizer is the fast one; no remote code


class TokenizerFilesNotFoundError(FileNotFoundError):
    """A model directory has neither tokenizer.json nor tokenizer.model."""


class BatchEncoding(dict):
    """`input_ids` / `attention_mask` as a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device, non_blocking: bool = False) -> BatchEncoding:
        for k, v in self.items():
            if hasattr(v, "to"):
                self[k] = v.to(device=device, non_blocking=non_blocking)
        return self

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0):
        """The index of the token holding a character of the text (of sequence `batch_or_char_index` when
        char_index is given), None for none; as transformers' BatchEncoding.char_to_token."""
        encodings = self.__dict__.get("_encodings")
        if encodings is None:
            raise ValueError("char_to_token() is only available on what the tokenizer's __call__ returns")
        batch, char = (0, batch_or_char_index) if char_index is None else (batch_or_char_index, char_index)
        return encodings[batch].char_to_token(char, sequence_index)


def _as_list(ids):
    return ids.tolist() if hasattr(ids, "tolist") else ids


def _check_text(text, what: str = "text"):
    """A ValueError for text the tokenizers library cannot take: not a string, or a lone surrogate (not UTF-8)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string or a list of strings, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} is not encodable as UTF-8: it holds the lone surrogate "
                             f"U+{ord(text[e.start]):04X} at index {e.start}") from None


def _added_tokens(obj):
    """{"__type": "AddedToken", ...} dicts (at any depth) -> AddedToken, as transformers reads them."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in obj.items() if k != "__type"})
    if isinstance(obj, (list, tuple)):
        return [_added_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _added_tokens(v) for k, v in obj.items()}
    return obj


def _encode_batch(backend: _Backend, inputs: list, add_special_tokens: bool):
    """backend.encode_batch; the library's bare Exceptions (a pair too short to truncate) and panics (a stride not
    below the length truncated to) as ValueErrors."""
    try:
        return backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
    except BaseException as e:
        if type(e) is not Exception and type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"the tokenizers library cannot encode this: {str(e).splitlines()[0]}") from None


def _split_pairs(batch) -> tuple[list, list]:
    """A batch of (text, text_pair) tuples -> the texts and the pairs, as transformers reads it."""
    if not all(len(t) == 2 for t in batch):
        raise ValueError("a batch of tuples must hold (text, text_pair) pairs; pretokenized input "
                         "(is_split_into_words) is not supported")
    return [t[0] for t in batch], [t[1] for t in batch]


# ---- the tokenizer ----------------------------------------------------------------------------------------------

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, padding and chat template of a Hugging Face directory."""

    def __init__(self, backend: _Backend, config: dict | None = None, name_or_path: str = "",
                 vocab_file: str | None = None):
        cfg = dict(config or {})
        self._backend = backend
        self.name_or_path = str(name_or_path)
        self.vocab_file = vocab_file
        explicit_bos_eos = "add_bos_token" in cfg or "add_eos_token" in cfg
        self._add_bos = bool(cfg.pop("add_bos_token", False))
        self._add_eos = bool(cfg.pop("add_eos_token", False))
        padding, truncation = backend.padding, backend.truncation
        if padding is not None:
            cfg.setdefault("pad_token", padding["pad_token"])
            cfg.setdefault("padding_side", padding["direction"])
        if truncation is not None:
            cfg.setdefault("truncation_side", truncation["direction"])
        backend.no_padding()
        backend.no_truncation()

        if "additional_special_tokens" in cfg and "extra_special_tokens" not in cfg:
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
        named, auto = {}, {}
        self._extra: list[str | AddedToken] = []
        for key, value in cfg.items():
            if key in SPECIAL_TOKENS:
                if isinstance(value, dict) and "content" in value:  # transformers wants "__type" here
                    value = AddedToken(**{k: v for k, v in value.items() if k != "__type"})
                if value is not None and not isinstance(value, (str, AddedToken)):
                    raise TypeError(f"special token {key} must be a string or an AddedToken, got {type(value)}")
                if value is not None:
                    named[key] = value
            elif key == "extra_special_tokens":
                if isinstance(value, dict):
                    auto.update(value)
                elif value is not None:
                    self._extra = list(value)
            elif key.endswith("_token") and isinstance(value, (str, AddedToken)):
                auto[key] = value
        # named tokens, then model-specific ones (`sys_start_token`, ...) in transformers' order
        self._special: dict[str, str | AddedToken] = {k: named[k] for k in SPECIAL_TOKENS if k in named}
        self._special.update({**auto, **(cfg.get("model_specific_special_tokens") or {})})

        max_len = cfg.get("model_max_length", cfg.get("max_len"))
        self.model_max_length = int(max_len) if max_len is not None else VERY_LARGE_INTEGER
        self.padding_side = cfg.get("padding_side", "right")
        self.truncation_side = cfg.get("truncation_side", "right")
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding/truncation side must be 'left' or 'right', got {side!r}")
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.split_special_tokens = bool(cfg.get("split_special_tokens", False))
        self.model_input_names = list(cfg.get("model_input_names") or MODEL_INPUT_NAMES)
        template = cfg.get("chat_template")
        if isinstance(template, (list, tuple)):
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template
        self._template_files: dict[str, str] = {}  # template text -> the file it was read from (for errors)

        # register added / special tokens in the backend exactly as TokenizersBackend.__init__ does
        existing = set(backend.get_added_tokens_decoder().values())
        decoder = cfg.get("added_tokens_decoder") or {}
        to_add = [t for _, t in sorted(decoder.items()) if t not in existing]
        encoder = [t.content for t in backend.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
        for token in [*self._special.values(), *self._extra]:
            if str(token) not in encoder and token not in to_add:
                to_add.append(token)
        named_strs = [str(t) for t in self._special.values()]
        tokens = []
        for token in to_add:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and str(token) in named_strs:
                token.special = True
            tokens.append(token)
        if tokens:
            backend.add_tokens(tokens)
        backend.encode_special_tokens = self.split_special_tokens
        if explicit_bos_eos or backend.post_processor is None:
            self._update_post_processor()

    # -- special tokens --
    def _token_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self.convert_tokens_to_ids(str(token))

    def __getattr__(self, name: str):
        special = self.__dict__.get("_special", {})
        if name.endswith("_token_id") and name[:-3] in special:
            return self._token_id(name[:-3])
        if name.endswith("_token") and name in special:
            return None if special[name] is None else str(special[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value):
        token = name.removesuffix("_id")
        if token.endswith("_token") and token in self.__dict__.get("_special", {}) and token not in SPECIAL_TOKENS:
            if token != name and value is not None:  # a model-specific token (sys_start_token, ...) by id
                value = self.convert_ids_to_tokens(int(value))
            self._set_special(token, value)
        else:
            super().__setattr__(name, value)

    def _set_special(self, name: str, value):
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise ValueError(f"cannot set a non-string value as the {name}")
        self._special[name] = value
        # the named tokens first, in transformers' order, then the model-specific ones
        self._special = {k: self._special[k] for k in (*SPECIAL_TOKENS, *self._special) if k in self._special}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._special.items() if v is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(str(t) for t in [*self._special.values(), *self._extra] if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos

    def _update_post_processor(self):
        bos, eos = self.bos_token, self.eos_token
        self._add_bos = self._add_bos and bos is not None
        self._add_eos = self._add_eos and eos is not None
        single = f"{(bos + ':0 ') if self._add_bos else ''}$A:0{(' ' + eos + ':0') if self._add_eos else ''}"
        pair = (f"{single}{(' ' + bos + ':1') if self._add_bos else ''} $B:1"
                f"{(' ' + eos + ':1') if self._add_eos else ''}")
        specials = [(bos, self.bos_token_id)] * self._add_bos + [(eos, self.eos_token_id)] * self._add_eos
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=specials)

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """transformers' add_tokens: the tokens (str or AddedToken) not yet in the vocabulary get the next ids
        (len(tokenizer) grows; resize the model's embeddings to match); returns how many were added."""
        if not new_tokens:
            return 0
        tokens = list(new_tokens) if isinstance(new_tokens, (list, tuple)) else [new_tokens]
        bad = [t for t in tokens if not isinstance(t, (str, AddedToken))]
        if bad:
            raise TypeError(f"add_tokens takes strings or AddedTokens, got {type(bad[0]).__name__} {bad[0]!r}")
        return self._backend.add_special_tokens(tokens) if special_tokens else self._backend.add_tokens(tokens)

    def add_special_tokens(self, special_tokens_dict: dict, replace_extra_special_tokens: bool = True) -> int:
        """transformers' add_special_tokens: {bos_token / eos_token / ... / extra_special_tokens (or
        additional_special_tokens): token(s)} set as the tokenizer's and added as special tokens; returns how many
        were new to the vocabulary."""
        if not special_tokens_dict:
            return 0
        given = dict(special_tokens_dict)
        if "additional_special_tokens" in given and not given.get("extra_special_tokens"):
            given["extra_special_tokens"] = given.pop("additional_special_tokens")
        allowed = (*SPECIAL_TOKENS, "extra_special_tokens")
        new = []
        for key, value in given.items():
            if key not in allowed:
                raise ValueError(f"Key {key} is not a valid special token. Valid keys are: {', '.join(allowed)}")
            values = value if key == "extra_special_tokens" else [value]
            if not isinstance(values, (list, tuple)) or not all(isinstance(t, (str, AddedToken)) for t in values):
                raise ValueError(f"Tokens {value!r} for key {key} should all be str or AddedToken instances")
            tokens = [AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=True)
                      if isinstance(t, str) else t for t in values]
            if key != "extra_special_tokens":
                self._set_special(key, tokens[0])
            elif replace_extra_special_tokens:
                self._extra = tokens or self._extra
            else:
                tokens = [t for t in tokens if str(t) not in self.extra_special_tokens]
                self._extra += tokens
            new += tokens
        return self.add_tokens(new, special_tokens=True)

    # -- vocabulary --
    @property
    def backend_tokenizer(self) -> _Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._backend.get_added_tokens_decoder()

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            if index is None and self._special.get("unk_token") is not None:
                index = self._backend.token_to_id(str(self._special["unk_token"]))
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        ids = _as_list(ids)
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # -- encoding --
    def _configure(self, padding, truncation, max_length, padding_side, pad_to_multiple_of, stride=0):
        """Padding / truncation strategies as transformers resolves them, set on the backend."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        padding = {True: "longest", False: "do_not_pad"}.get(padding, padding)
        truncation = {True: "longest_first", False: "do_not_truncate", None: "do_not_truncate"}.get(truncation,
                                                                                                     truncation)
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in ("longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(f"unknown truncation strategy {truncation!r}")
        if max_length is None:
            if padding == "max_length":
                padding = "do_not_pad" if self.model_max_length > LARGE_INTEGER else padding
                max_length = None if padding == "do_not_pad" else self.model_max_length
            if truncation != "do_not_truncate":
                if self.model_max_length > LARGE_INTEGER:
                    truncation = "do_not_truncate"
                else:
                    max_length = self.model_max_length
        if padding != "do_not_pad" and (self.pad_token is None or self.pad_token_id is None or self.pad_token_id < 0):
            raise ValueError("Asking to pad but the tokenizer does not have a padding token; set "
                             "`tokenizer.pad_token = tokenizer.eos_token` (for example)")
        if (truncation != "do_not_truncate" and padding != "do_not_pad" and pad_to_multiple_of is not None
                and max_length is not None and max_length % pad_to_multiple_of != 0):
            raise ValueError(f"Truncation and padding are both activated but truncation length ({max_length}) is not "
                             f"a multiple of pad_to_multiple_of ({pad_to_multiple_of}).")
        if truncation == "do_not_truncate":
            self._backend.no_truncation()
        else:
            self._backend.enable_truncation(max_length, stride=stride, strategy=truncation,
                                            direction=self.truncation_side)
        if padding == "do_not_pad":
            self._backend.no_padding()
        else:
            self._backend.enable_padding(direction=padding_side or self.padding_side, pad_id=self.pad_token_id,
                                         pad_token=self.pad_token, pad_type_id=0, pad_to_multiple_of=pad_to_multiple_of,
                                         length=max_length if padding == "max_length" else None)

    def __call__(self, text: str | list[str], text_pair: str | list[str] | None = None,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, padding_side: str | None = None,
                 pad_to_multiple_of: int | None = None, split_special_tokens: bool | None = None,
                 stride: int = 0) -> BatchEncoding:
        batched = isinstance(text, (list, tuple))
        if batched and text_pair is None and text and all(isinstance(t, (list, tuple)) for t in text):
            text, text_pair = _split_pairs(text)
        if batched:
            if isinstance(text_pair, str) or (text_pair is not None and len(text_pair) != len(text)):
                raise ValueError("text_pair must be a list as long as text when text is a batch")
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
            pairs = list(text_pair or [])
        elif not isinstance(text, str):
            raise ValueError("text must be a string or a list of strings")
        else:
            inputs = [(text, text_pair)] if text_pair else [text]
            pairs = [text_pair] if text_pair else []
        for t in (text if batched else [text]):
            _check_text(t)
        for t in pairs:
            _check_text(t, "text_pair")
        self._configure(padding, truncation, max_length, padding_side, pad_to_multiple_of, stride)
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        self._backend.encode_special_tokens = split
        encodings = _encode_batch(self._backend, inputs, add_special_tokens)
        data = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in self.model_input_names:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask or (return_attention_mask is None and "attention_mask" in self.model_input_names):
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        out = BatchEncoding(_to_tensors(data, return_tensors))
        out._encodings = encodings
        return out

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs):
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        _check_text(text)
        if pair is not None:
            _check_text(pair, "pair")
        self._configure(False, False, None, None, None)
        self._backend.encode_special_tokens = self.split_special_tokens
        return self._backend.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._backend.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    # -- decoding --
    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        ids = _as_list(ids)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        if isinstance(ids, int):
            ids = [ids]
        if ids and (isinstance(ids[0], (list, tuple)) or getattr(ids[0], "ndim", 0) > 0):  # a batch (of tensors)
            return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in ids]
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        if clean and (type(self._backend.model).__name__ != "BPE" or self._clean_up_bpe):
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        out = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)
        return [out] if isinstance(out, str) else out

    # -- chat --
    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" not in templates:
                    raise ValueError("this tokenizer has several chat templates and none is 'default'; pass "
                                     f"chat_template= one of {sorted(templates)}")
                return templates["default"]
        if chat_template is None:
            if self.chat_template is None:
                raise ValueError("this tokenizer has no chat template (tokenizer.chat_template is not set and no "
                                 "chat_template argument was passed)")
            return self.chat_template
        return chat_template

    def template_origin(self, template: str) -> str:
        """How errors name `template`: "the chat template in FILE" for one this tokenizer read from FILE."""
        file = self._template_files.get(template)
        return f"the chat template in {file}" if file else "the chat template"

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, sanitize_control_tokens: bool = False, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = True,
                            return_assistant_tokens_mask: bool = False, tokenizer_kwargs: dict | None = None,
                            **template_kwargs):
        """Render (and by default tokenize) chats; a list of conversations gives a list. As transformers:
        return_assistant_tokens_mask adds `assistant_masks` (1 for the tokens of the template's {% generation %}
        blocks), tokenizer_kwargs go to the tokenizer's call."""
        if sanitize_control_tokens:
            raise ValueError("apply_chat_template: sanitize_control_tokens=True is not supported by moelm")
        if not tokenize:
            return_dict = False
        if return_assistant_tokens_mask and not return_dict:
            raise ValueError("return_assistant_tokens_mask=True requires return_dict=True and tokenize=True")
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        chats = conversation if batched else [conversation]
        chats = [[{k: v for k, v in m.items() if v is not None} for m in getattr(c, "messages", c)] for c in chats]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")
        if return_assistant_tokens_mask and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
            warnings.warn("return_assistant_tokens_mask=True but the chat template has no {% generation %} block: "
                          "the mask is all 0", stacklevel=2)
        spans = [] if return_assistant_tokens_mask else None
        rendered = render_chat_template(template, chats, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        variables={**self.special_tokens_map, **template_kwargs},
                                        name=self.template_origin(template), spans=spans)
        if not batched:
            rendered = rendered[0]
        if not tokenize:
            return rendered
        out = self(rendered, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
                   return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        if not return_dict:
            return out["input_ids"]
        if spans is not None:
            ids = out["input_ids"] if batched or return_tensors else [out["input_ids"]]
            masks = []
            for i, found in enumerate(spans):
                mask = [0] * len(ids[i])
                for start, end in found:  # transformers' loop, its bounds included
                    first, last = out.char_to_token(i, start), out.char_to_token(i, end - 1)
                    if first is None:
                        break
                    for t in range(first, last + 1 if last else len(ids[i])):
                        mask[t] = 1
                masks.append(mask)
            if return_tensors:
                out["assistant_masks"] = _to_tensors({"m": masks}, return_tensors)["m"]
            else:
                out["assistant_masks"] = masks if batched else masks[0]
        return out

    # -- saving --
    def save_pretrained(self, directory) -> tuple[str, ...]:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        directory = make_dir(directory)
        special = self.special_tokens_map
        config = {"tokenizer_class": "TokenizersBackend", **special,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                  "split_special_tokens": self.split_special_tokens, "model_max_length": self.model_max_length,
                  "padding_side": self.padding_side, "truncation_side": self.truncation_side}
        if self._extra:
            config["extra_special_tokens"] = self.extra_special_tokens
        if tuple(self.model_input_names) != MODEL_INPUT_NAMES:
            config["model_input_names"] = self.model_input_names
        template = self.chat_template
        if isinstance(template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in template.items()]
        elif template is not None:
            config["chat_template"] = template
        smap = {**special, **({"extra_special_tokens": self.extra_special_tokens} if self._extra else {})}
        self._backend.no_padding()  # calls set these; the saved file carries none
        self._backend.no_truncation()
        files = {"tokenizer.json": self._backend.to_str(pretty=True)}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", smap)):
            files[name] = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        names = list(files)
        if isinstance(template, str) and (directory / "chat_template.jinja").is_file():  # it would take priority
            files["chat_template.jinja"] = template  # over the config's
        if self.vocab_file and Path(self.vocab_file).is_file():
            target = directory / "tokenizer.model"
            if not target.exists() or not target.samefile(self.vocab_file):
                files["tokenizer.model"] = Path(self.vocab_file).read_bytes()
            names.append("tokenizer.model")
        atomic_write_files(directory, files)  # all or none: a full disk leaves the old files whole
        return tuple(str(directory / name) for name in names)

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})")


def _special_property(name: str) -> property:
    def get(self):
        token = self._special.get(name)
        return None if token is None else str(token)

    def set_(self, value):
        self._set_special(name, value)

    return property(get, set_)


def _special_id_property(name: str) -> property:
    def get(self):
        return self._token_id(name)

    def set_(self, value):
        setattr(self, name, None if value is None else self.convert_ids_to_tokens(int(value)))

    return property(get, set_)


for _name in SPECIAL_TOKENS:
    setattr(Tokenizer, _name, _special_property(_name))
    setattr(Tokenizer, _name + "_id", _special_id_property(_name))


def clean_up_tokenization(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _to_tensors(data: dict, return_tensors: str | None) -> dict:
    if return_tensors is None:
        return data
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    if return_tensors == "np":
        return {k: _as_numpy(v) for k, v in data.items()}
    import torch
    if any(_ragged(v) for v in data.values()):  # torch.tensor([[], [5]]) would silently give an empty tensor
        raise ValueError("Unable to create tensor: sequences have different lengths; use padding=True")
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in data.items()}


def _ragged(value) -> bool:
    return bool(value) and isinstance(value[0], list) and len({len(v) for v in value}) > 1


def _as_numpy(value):
    """An int64 array; sequences of different lengths become an object array of arrays, as transformers makes."""
    import numpy as np
    if _ragged(value):
        return np.asarray([np.asarray(v) for v in value], dtype=object)
    return np.asarray(value, dtype=np.int64)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path_or_hub_id)` -> `Tokenizer`."""

    def __init__(self):
        raise OSError("use AutoTokenizer.from_pretrained(path_or_hub_id)")

    @staticmethod
    @takes_hub_options
    def from_pretrained(path_or_hub_id, revision: str | None = None, **kwargs) -> Tokenizer:
        """A tokenizer directory, hub id or (gguf_file=) GGUF file; revision and the hub arguments as the model's."""
        if revision is not None:
            path_or_hub_id = with_revision(path_or_hub_id, revision)
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:  # the vocabulary in a llama.cpp file's metadata (text/gguf.py)
            for k in _LOADER_KWARGS:
                kwargs.pop(k, None)
            file = resolve_gguf(path_or_hub_id, gguf_file)
            backend, cfg = read_gguf_tokenizer(file, **kwargs)
            name = os.fspath(path_or_hub_id) if path_or_hub_id is not None else str(file)
            tokenizer = Tokenizer(backend, cfg, name_or_path=name, vocab_file=str(file))
            if isinstance(cfg.get("chat_template"), str):
                tokenizer._template_files = {cfg["chat_template"]: str(file)}
            return tokenizer
        directory = resolve_model_dir(path_or_hub_id)
        return load_tokenizer(directory, name_or_path=os.fspath(path_or_hub_id), **kwargs)


def load_tokenizer(directory, name_or_path: str | None = None, **kwargs) -> Tokenizer:
    """Read a tokenizer directory as transformers' `TokenizersBackend.from_pretrained` reads it."""
    directory = Path(directory)
    for k in _LOADER_KWARGS:
        kwargs.pop(k, None)
    json_file, spm_file = directory / "tokenizer.json", directory / "tokenizer.model"
    if not json_file.is_file() and not spm_file.is_file():
        raise TokenizerFilesNotFoundError(f"no tokenizer.json or tokenizer.model in {directory}")
    cfg_file = directory / "tokenizer_config.json"
    cfg = read_json_object(cfg_file) if cfg_file.is_file() else {}
    _check_config(cfg, cfg_file)
    cfg.pop("tokenizer_class", None)
    if json_file.is_file():  # the post-processor in tokenizer.json decides about bos/eos
        cfg.pop("add_bos_token", None)
        cfg.pop("add_eos_token", None)
    files = {}  # template text -> the file it came from, for errors
    own = cfg.get("chat_template")
    for text in [t.get("template") for t in own if isinstance(t, dict)] if isinstance(own, list) else [own]:
        if isinstance(text, str):
            files[text] = str(cfg_file)
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = text = _read_text(directory / "chat_template.jinja")
        files[text] = str(directory / "chat_template.jinja")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = text = _read_text(f)
            files.setdefault(text, str(f))
    if templates:
        cfg["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
    cfg.update(kwargs)
    if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
        cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
    specific = {k: cfg.pop(k) for k in list(cfg)
                if k not in SPECIAL_TOKENS and k.endswith("_token") and isinstance(cfg[k], str)}
    if isinstance(cfg.get("extra_special_tokens"), dict):
        specific.update(cfg.pop("extra_special_tokens"))

    decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in cfg:
        for idx, token in cfg["added_tokens_decoder"].items():
            token = AddedToken(**{k: v for k, v in token.items() if k != "__type"}) if isinstance(token, dict) \
                else token
            if not isinstance(token, AddedToken):
                raise TypeError(f"added_tokens_decoder entries must be dicts, got {type(token)}")
            decoder[int(idx)] = token
    else:  # legacy: special_tokens_map.json and tokenizer.json's added tokens
        smap_file = directory / "special_tokens_map.json"
        smap = read_json_object(smap_file) if smap_file.is_file() else {}
        _check_config(smap, smap_file)
        for key, value in smap.items():
            if kwargs.get(key):
                continue
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k not in ("special", "__type")}, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                existing = list(cfg.get("extra_special_tokens") or [])
                for tok in value:
                    tok = AddedToken(**tok, special=True) if isinstance(tok, dict) else tok
                    if tok not in existing:
                        existing.append(tok)
                value = existing
            cfg[key] = value
        if isinstance(cfg.get("extra_special_tokens"), dict):
            specific.update(cfg.pop("extra_special_tokens"))
        if json_file.is_file():
            for tok in read_json_object(json_file).get("added_tokens", []):
                tok = dict(tok)
                idx = tok.pop("id")
                decoder[idx] = AddedToken(**tok)
    cfg = _added_tokens(cfg)
    cfg["model_specific_special_tokens"], cfg["added_tokens_decoder"] = _added_tokens(specific), decoder
    by_content = {str(t): t for t in decoder.values()}
    for key in SPECIAL_TOKENS:
        if cfg.get(key) is not None and by_content:
            cfg[key] = by_content.get(str(cfg[key]), cfg[key])

    if json_file.is_file():
        try:
            backend = _Backend.from_file(str(json_file))
        except Exception as e:  # the library raises a bare Exception for a file it cannot read
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{json_file} is not a tokenizer the tokenizers library reads: {message}") from None
    else:
        try:
            backend = sentencepiece_backend(spm_file, cfg)
        except Exception as e:  # a truncated or corrupt protobuf fails anywhere in the reading
            raise CheckpointError(f"{spm_file} is not a SentencePiece model moelm reads: {type(e).__name__}: "
                                  f"{str(e).replace(str(spm_file), 'it')}") from None
    tokenizer = Tokenizer(backend, cfg, name_or_path=name_or_path or str(directory),
                          vocab_file=str(spm_file) if spm_file.is_file() else None)
    tokenizer._template_files = files
    return tokenizer


def _check_config(cfg: dict, file: Path):
    """A CheckpointError naming `file` for a value of the wrong kind in tokenizer_config.json or
    special_tokens_map.json (rather than a TypeError from deep inside the loading)."""
    def token(v):
        return v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))

    def template(v):
        return v is None or isinstance(v, str) or (isinstance(v, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in v))

    checks = {
        "model_max_length": (lambda v: v is None or isinstance(v, (int, float)), "a number"),
        "padding_side": (lambda v: v in ("left", "right"), "'left' or 'right'"),
        "truncation_side": (lambda v: v in ("left", "right"), "'left' or 'right'"),
        "chat_template": (template, "a string or a list of {name, template} objects"),
        "model_input_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                              "a list of strings"),
        "added_tokens_decoder": (lambda v: isinstance(v, dict) and all(
            k.isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str) for k, t in v.items()),
            "an object of token ids to {content, ...} objects"),
        "additional_special_tokens": (lambda v: v is None or (isinstance(v, list) and all(map(token, v))),
                                      "a list of tokens"),
        "extra_special_tokens": (lambda v: v is None or (isinstance(v, list) and all(map(token, v)))
                                 or (isinstance(v, dict) and all(map(token, v.values()))),
                                 "a list or object of tokens"),
        **{k: (token, "a string or a {content, ...} object") for k in SPECIAL_TOKENS},
    }
    for key, (ok, what) in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise CheckpointError(f"{file}: {key} must be {what}, got {json.dumps(cfg[key])[:80]}")


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text: {e}") from None
