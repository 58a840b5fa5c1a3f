"""pipeline("text-generation"): prompts or chat messages in, [{"generated_text": ...}] out, as transformers'
TextGenerationPipeline (its call parameters, its generation defaults, batching with left padding)."""
from __future__ import annotations

import dataclasses
import enum

import torch

GENERATE_ARGS = {"generation_config", "streamer"}  # generate()'s own arguments besides GenerationConfig fields
PIPELINE_ARGS = {  # transformers' text-generation parameters that are not generation parameters
    "return_full_text", "return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces", "prefix",
    "handle_long_generation", "stop_sequence", "truncation", "padding", "add_special_tokens", "max_length",
    "continue_final_message", "skip_special_tokens", "tokenizer_encode_kwargs", "tools", "documents"}
DEFAULTS = {"do_sample": True, "max_new_tokens": 256, "temperature": 0.7}  # transformers' pipeline defaults
SAMPLING = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}


class ReturnType(enum.Enum):  # transformers.pipelines.text_generation.ReturnType's values
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


def check_generate_kwargs(kwargs: dict, where: str) -> dict:
    """kwargs, if every name is a GenerationConfig field or a generate() argument; else a TypeError naming them."""
    from .generation import GenerationConfig

    known = {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"} | GENERATE_ARGS
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: not "
                        "generation parameters (GenerationConfig fields) nor text-generation pipeline parameters")
    return kwargs


def split_kwargs(kwargs: dict, where: str) -> tuple[dict, dict]:
    """(pipeline parameters with return_type resolved, generation parameters); max_length is both."""
    params = {k: v for k, v in kwargs.items() if k in PIPELINE_ARGS}
    generate = check_generate_kwargs({k: v for k, v in kwargs.items() if k not in PIPELINE_ARGS}, where)
    if params.get("max_length") is not None:
        generate["max_length"] = params["max_length"]
    full, tensors, text = (params.pop(k, None) for k in ("return_full_text", "return_tensors", "return_text"))
    kind = params.pop("return_type", None)
    if kind is None and full is not None:
        if text is not None or tensors is not None:
            raise ValueError(f"`{'return_text' if text is not None else 'return_tensors'}` is mutually exclusive "
                             "with `return_full_text`")
        kind = ReturnType.FULL_TEXT if full else ReturnType.NEW_TEXT
    if kind is None and tensors is not None:
        if text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
        kind = ReturnType.TENSORS
    if kind is not None:
        params["return_type"] = ReturnType(getattr(kind, "value", kind))
    if params.get("handle_long_generation") not in (None, "hole"):
        raise ValueError(f"{params['handle_long_generation']} is not a valid value for `handle_long_generation` "
                         "parameter expected [None, 'hole']")
    return params, generate


class TextGenerationPipeline:
    """`pipeline("text-generation")`: parameters given to pipeline() are defaults that those given at call time
    override (a call's generation_config replaces pipeline()'s generation parameters, as transformers does)."""

    def __init__(self, model, tokenizer, batch_size: int | None = None, **kwargs):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.params, self.generate_kwargs = split_kwargs(kwargs, "pipeline()")

    def __call__(self, text_inputs, batch_size: int | None = None, **kwargs):
        """A string, a list of chat messages, a list of either, or an iterator of either (results as an iterator)
        -> one result list per input."""
        params, generate_kwargs = split_kwargs(kwargs, "the text-generation pipeline")
        params = {**self.params, **params}
        if "generation_config" not in generate_kwargs:
            generate_kwargs = {**self.generate_kwargs, **generate_kwargs}
        size = batch_size or self.batch_size or 1
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {size!r}")
        if isinstance(text_inputs, str) or _is_chat(text_inputs):
            return self._batch([text_inputs], params, generate_kwargs)[0]
        if isinstance(text_inputs, (list, tuple)):
            return [r for i in range(0, len(text_inputs), size)
                    for r in self._batch(text_inputs[i:i + size], params, generate_kwargs)]
        return (r for x in text_inputs for r in self._batch([x], params, generate_kwargs))

    def generation_kwargs(self, generate_kwargs: dict) -> dict:
        """generate_kwargs plus transformers' pipeline defaults for what neither they, their generation_config nor
        the model's generation config set (the sampling ones only when sampling), and the tokenizer's pad token."""
        given = generate_kwargs.get("generation_config")
        set_params = {**self.model.generation_config.to_dict(), **_set_fields(given), **generate_kwargs}
        defaults = dict(DEFAULTS, **({"pad_token_id": self.tokenizer.pad_token_id}
                                     if self.tokenizer.pad_token_id is not None else {}))
        added = {k: v for k, v in defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING}
        return {**generate_kwargs, **added}

    def _encode(self, prompt, params: dict, generate_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's ids and mask [1, S], as transformers' preprocess (handle_long_generation="hole" included)."""
        tok_kwargs = {k: params[k] for k in ("add_special_tokens", "truncation", "padding", "max_length")
                      if params.get(k) is not None}
        tok_kwargs.update(params.get("tokenizer_encode_kwargs") or {})
        if _is_chat(prompt):
            tok_kwargs.pop("add_special_tokens", None)
            cont = _continues(prompt, params)
            enc = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=not cont, continue_final_message=cont, return_dict=True,
                return_tensors="pt", tools=params.get("tools"), documents=params.get("documents"), **tok_kwargs)
        else:
            enc = self.tokenizer((params.get("prefix") or "") + prompt, return_tensors="pt", **tok_kwargs)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if params.get("handle_long_generation") == "hole":
            new = generate_kwargs.get("max_new_tokens", self.model.generation_config.max_new_tokens)
            if new is None:
                new = generate_kwargs.get("max_length", self.model.generation_config.max_length or 20) - ids.shape[1]
                if new < 0:
                    raise ValueError("We cannot infer how many new tokens are expected")
            if ids.shape[1] + new > self.tokenizer.model_max_length:
                keep = self.tokenizer.model_max_length - new
                if keep <= 0:
                    raise ValueError("We cannot use `hole` to handle this generation the number of desired tokens "
                                     "exceeds the models max length")
                ids, mask = ids[:, -keep:], mask[:, -keep:]
        return ids, mask

    def _batch(self, prompts, params: dict, generate_kwargs: dict) -> list[list[dict]]:
        """Results of prompts generated as one left-padded batch (one at a time where a prompt is empty)."""
        generate_kwargs = self.generation_kwargs(generate_kwargs)
        if params.get("prefix"):  # a total length counts the prefix's tokens too
            prefix = self.tokenizer(params["prefix"], add_special_tokens=bool(params.get("add_special_tokens")))
            set_params = {**self.model.generation_config.to_dict(),
                          **_set_fields(generate_kwargs.get("generation_config")), **generate_kwargs}
            for length, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in set_params and new not in set_params:
                    generate_kwargs[length] = set_params[length] + len(prefix["input_ids"])
        if params.get("stop_sequence") is not None:
            stop = params["stop_sequence"]
            generate_kwargs["stop_strings"] = [stop] if isinstance(stop, str) else stop
        encoded = [self._encode(p, params, generate_kwargs) for p in prompts]
        if len(encoded) > 1 and any(ids.shape[1] == 0 for ids, _ in encoded):
            return [r for p in prompts for r in self._batch([p], params, generate_kwargs)]
        if len(encoded) > 1 and self.tokenizer.pad_token_id is None:
            raise ValueError("Pipeline with tokenizer without pad_token cannot do batching. You can try to set it "
                             "with `pipe.tokenizer.pad_token_id = model.config.eos_token_id`.")
        width = max(ids.shape[1] for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.cat([torch.nn.functional.pad(i, (width - i.shape[1], 0), value=pad or 0) for i, _ in encoded])
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in encoded])
        device = self.model.device
        ids, mask = (None, None) if width == 0 else (ids.to(device), mask.to(device))
        out = self.model.generate(ids, attention_mask=mask, tokenizer=self.tokenizer, **generate_kwargs)
        extra = {}
        if not isinstance(out, torch.Tensor):  # return_dict_in_generate: its tensors go into the records
            extra = {f.name: _per_row(getattr(out, f.name), out.sequences.shape[0])
                     for f in dataclasses.fields(out) if f.name not in ("sequences", "past_key_values")}
            extra = {k: v for k, v in extra.items() if v is not None}
            out = out.sequences
        rows = out.shape[0] // len(prompts)
        return [[self._record(prompt, out[i * rows + j], width, params, {k: v[i * rows + j] for k, v in extra.items()})
                 for j in range(rows)] for i, prompt in enumerate(prompts)]

    def _record(self, prompt, row: torch.Tensor, width: int, params: dict, extra: dict) -> dict:
        kind = params.get("return_type", ReturnType.FULL_TEXT)
        if kind is ReturnType.TENSORS:
            return {"generated_token_ids": row.tolist()}
        skip = params.get("skip_special_tokens")
        text = self.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True if skip is None else skip,
                                     clean_up_tokenization_spaces=params.get("clean_up_tokenization_spaces"))
        if kind is ReturnType.FULL_TEXT and isinstance(prompt, str):
            text = prompt + text
        elif kind is ReturnType.FULL_TEXT and _continues(prompt, params):
            text = list(prompt[:-1]) + [{"role": prompt[-1]["role"], "content": prompt[-1]["content"] + text}]
        elif kind is ReturnType.FULL_TEXT:
            text = list(prompt) + [{"role": "assistant", "content": text}]
        return {"generated_text": text, **{k: v.tolist() for k, v in extra.items()}}


def _set_fields(config) -> dict:
    """The generation parameters a generate(generation_config=) argument sets: moelm's, transformers' or a dict."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if v is not None}
    if hasattr(config, "is_set"):  # moelm's: the fields it was given
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if config.is_set(f.name)}
    return config.to_diff_dict()


def _per_row(value, rows: int):
    """A GenerateOutput field as [rows, ...] (per-step tuples stacked on dim 1), None if it is not per row."""
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor) and len(value[0]) == rows:
        return torch.stack(value).swapaxes(0, 1)
    return value if isinstance(value, torch.Tensor) and value.shape[0] == rows else None


def _continues(chat, params: dict) -> bool:
    """continue_final_message: as given, else whether the chat ends with an assistant message (a prefill)."""
    cont = params.get("continue_final_message")
    return chat[-1]["role"] == "assistant" if cont is None else bool(cont)


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def pipeline(task: str, model=None, tokenizer=None, device=None, dtype="auto", torch_dtype=None, device_map=None,
             model_kwargs: dict | None = None, revision: str | None = None, trust_remote_code=None,
             batch_size: int | None = None, **kwargs):
    """Only "text-generation". `model` may be a loaded model or a path / hub id (loaded with device / device_map,
    dtype, revision and model_kwargs); `tokenizer` likewise. Other keyword arguments are the text-generation
    parameters (return_full_text, prefix, stop_sequence, ...) and generation parameters, the defaults of every call;
    anything else is a TypeError."""
    if task != "text-generation":
        raise ValueError(f"unsupported pipeline task {task!r}; moelm provides 'text-generation'")
    if model is None:
        raise ValueError("pipeline needs a model (a loaded model, a path or a hub id)")
    from .config import dtype_from_str
    from .models.auto import AutoModelForCausalLM
    from .text.tokenizer import AutoTokenizer

    split_kwargs(kwargs, "pipeline()")  # refused before loading anything
    if isinstance(device, int) and not isinstance(device, bool):  # transformers' convention: -1 is the CPU
        device = "cpu" if device < 0 else device
    dtype = torch_dtype or dtype
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device=device,
                                                     device_map=device_map, revision=revision,
                                                     **(model_kwargs or {}))
        tokenizer = tokenizer or model.name_or_path
    else:
        if model_kwargs or device_map is not None or revision is not None:
            raise ValueError("model_kwargs, device_map and revision apply when pipeline() loads the model; "
                             "this one is already loaded")
        if dtype not in ("auto", None) and dtype_from_str(dtype) != model.dtype:
            raise ValueError(f"dtype={dtype} applies when pipeline() loads the model; this one is already loaded "
                             f"in {model.dtype}: convert it first (model.to({dtype}))")
        if device is not None:  # as transformers: the loaded model moves to `device`
            model = model.to(device)
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if name is None:
            raise ValueError("pipeline needs a tokenizer when the model was not loaded from a path")
        tokenizer = name
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, batch_size=batch_size, **kwargs)
