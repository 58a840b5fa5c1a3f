"""GenerationConfig: transformers' generation settings (generation_config.json), validated."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import read_config_json, read_json_object
from ..io.files import atomic_write_text, make_dir
from ..io.hub import resolve_model_dir, takes_hub_options
from . import processors
from .sampling import Sampling

GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_NEW_TOKENS = 20  # transformers 5.x: with neither max_length nor max_new_tokens set, 20 new tokens

# transformers 5.23's GenerationConfig fields that moelm does not implement: those that change the tokens, with the
# values that leave them as without the field (transformers' defaults), ...
UNIMPLEMENTED = {
    "use_mtp": (None, False), "top_h": (None,), "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0), "token_healing": (None, False), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "assistant_early_exit": (None,), "assistant_ensemble_weight": (None,), "speculation_type": (None,),
    "penalty_alpha": (None, 0), "dola_layers": (None,), "diversity_penalty": (None, 0), "num_beam_groups": (None, 1),
    "constraints": (None,), "force_words_ids": (None,),
}
SAMPLING_ONLY = {"top_h"}  # a warper: no effect on greedy search
# ... and those that never do (caching, compilation, drafting heuristics, encoder-decoder models, metadata)
INERT = {"cache_config", "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size",
         "continuous_batching_config", "low_memory", "is_assistant", "assistant_confidence_threshold",
         "assistant_lookbehind", "target_lookbehind", "decoder_start_token_id", "transformers_version",
         "_from_model_config", "_commit_hash"}


@dataclass
class GenerationConfig:
    """transformers' field names with their effective defaults (the subset moelm implements).

    `max_length=None` means 20 new tokens capped at max_position_embeddings, which is what transformers 5.x does when
    neither max_length nor max_new_tokens is set. Other generation_config.json keys (and attributes set that are not
    fields) are kept in `extra`; generate() refuses those of UNIMPLEMENTED set to a value that changes the output.
    As generate()'s generation_config, only its set fields (is_set) override the model's, as transformers' do."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    # transformers' other logits processors (moelm.generation.processors), off at these values
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: dict | list | None = None         # {(ids...): bias} or [[[ids...], bias], ...]
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    exponential_decay_length_penalty: tuple | list | None = None  # (start, factor)
    remove_invalid_values: bool = False
    renormalize_logits: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    max_time: float | None = None  # seconds from the call's start, after which every row stops (MaxTimeCriteria)
    output_scores: bool = False
    output_logits: bool = False
    output_hidden_states: bool = False  # each step's forward's, with return_dict_in_generate
    output_attentions: bool = False
    return_dict_in_generate: bool = False
    use_cache: bool = True
    cache_implementation: str | None = None  # moelm: "static" (the default here) or "dynamic"
    # speculative decoding (moelm.generation.speculative): n-gram lookup, or drafts of generate(assistant_model=)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None   # None: 2
    num_assistant_tokens: int | None = None      # None: 5 (transformers: 20)
    num_assistant_tokens_schedule: str | None = None  # "heuristic" (None) or "constant"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    def __setattr__(self, name, value):  # not a field: kept in extra, as transformers keeps unknown attributes
        if name in FIELDS:
            super().__setattr__(name, plain(name, value))
            if "_given" in self.__dict__:
                self.__dict__["_given"] = self._given | {name}
        elif name == "extra":
            super().__setattr__(name, value)
        else:
            self.extra[name] = value

    def __getattr__(self, name):
        extra = self.__dict__.get("extra", {})
        if name.startswith("__") or name not in extra:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return extra[name]

    def __delattr__(self, name):
        if name in self.__dict__.get("extra", {}):
            del self.extra[name]
        else:
            super().__delattr__(name)

    def is_set(self, name: str) -> bool:
        """Whether field `name` was given a value other than None (to the constructor or since), as transformers'
        GenerationConfig tells its set fields from those that generate() fills from the model's."""
        return name in self.__dict__.get("_given", FIELDS) and getattr(self, name) is not None

    def unimplemented(self) -> dict:
        """The extra keys that moelm does not implement and whose values would change the output."""
        return {k: v for k, v in self.extra.items()
                if k in UNIMPLEMENTED and not no_op(k, v) and (self.do_sample or k not in SAMPLING_ONLY)}

    def validate(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        def count(name: str, low: int, value=None):
            value = getattr(self, name) if value is None else value
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                  f"{name} must be an integer >= {low}, got {value!r}")

        for name, low in (("max_length", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
            if getattr(self, name) is not None:
                count(name, low)
        count("min_length", 0)
        processors.check(self)
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens"):
            if getattr(self, name) is not None:
                count(name, 1)
        check(self.num_assistant_tokens_schedule in (None, "heuristic", "constant"),
              "num_assistant_tokens_schedule must be 'heuristic' or 'constant', got "
              f"{self.num_assistant_tokens_schedule!r}")
        check(self.max_time is None or isinstance(self.max_time, (int, float)) and not isinstance(self.max_time, bool)
              and self.max_time >= 0, f"max_time must be a number of seconds >= 0, got {self.max_time!r}")
        count("num_beams", 1)
        check(isinstance(self.use_cache, bool), f"use_cache must be True or False, got {self.use_cache!r}")
        check(self.num_beams == 1 or isinstance(self.length_penalty, (int, float)) and not isinstance(
            self.length_penalty, bool), f"length_penalty must be a number, got {self.length_penalty!r}")
        count("num_return_sequences", 1)
        check(self.cache_implementation in (None, "static", "dynamic"),
              f"cache_implementation must be 'static' or 'dynamic', got {self.cache_implementation!r}")
        check(isinstance(self.early_stopping, bool) or self.early_stopping == "never",
              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams == 1:
            check(self.do_sample or self.num_return_sequences == 1,
                  f"num_return_sequences={self.num_return_sequences} needs do_sample=True or num_beams > 1 "
                  "(greedy decoding returns one sequence per prompt)")
        else:
            check(self.num_return_sequences <= self.num_beams,
                  f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        check(not self.do_sample or self.temperature > 0, f"temperature must be > 0 when sampling, got "
              f"{self.temperature} (for greedy decoding set do_sample=False)")
        check(not self.do_sample or not isinstance(self.top_p, (int, float)) or 0 <= self.top_p <= 1,
              f"top_p must be in [0, 1], got {self.top_p!r}")
        self.sampling()  # the sampler's own checks
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):  # negative ids are allowed, as transformers
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            check(value is None or (len(ids) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)),
                  f"{name} must be an integer{' or a list of them' if name == 'eos_token_id' else ''}, got {value!r}")
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
        check(stops is None or (isinstance(stops, (list, tuple)) and len(stops) > 0
                                and all(isinstance(s, str) and s for s in stops)),
              f"stop_strings must be a non-empty string or a list of them, got {self.stop_strings!r}")

    def sampling(self) -> Sampling:
        """The sampler's knobs: greedy (temperature 0, no warpers) unless do_sample."""
        if not self.do_sample:
            return Sampling(temperature=0.0, repetition_penalty=self.repetition_penalty)
        # transformers takes top_p 0 (the best token only); the sampler's top_p is > 0: the smallest float drops the
        # same tokens (1 - top_p is 1.0 either way)
        top_p = self.top_p if self.top_p != 0 else 5e-324
        return Sampling(temperature=self.temperature, top_k=self.top_k or 0, top_p=top_p,
                        min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty)

    # --- dict / json ---
    @classmethod
    def from_dict(cls, data: dict) -> "GenerationConfig":
        known = {k: v for k, v in data.items() if k in FIELDS and v is not None}
        extra = {k: v for k, v in data.items() if k not in FIELDS and k != "transformers_version"}
        return cls(**known, extra=copy.deepcopy(extra))

    def to_dict(self) -> dict:
        """The fields that differ from the defaults, the special tokens that are set, and the extra keys."""
        out = copy.deepcopy(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value != f.default or f.name.endswith("_token_id") and value is not None):
                out[f.name] = copy.deepcopy(value)
        if isinstance(out.get("sequence_bias"), dict):  # JSON has no tuple keys: transformers' list form
            out["sequence_bias"] = [[list(k), v] for k, v in out["sequence_bias"].items()]
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def update(self, **kwargs) -> dict:
        """Set the fields named in kwargs; returns the kwargs that are not fields."""
        for key in FIELDS & kwargs.keys():
            setattr(self, key, kwargs[key])
        return {k: v for k, v in kwargs.items() if k not in FIELDS}

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """Defaults with the model config's (an object or a config.json dict) generation keys, as transformers'
        from_model_config: the special tokens, and what older config.json files carry (temperature, top_k,
        do_sample, max_length, ...); not the output switches (output_hidden_states ... are the forward's)."""
        data = config if isinstance(config, dict) else config.to_dict()
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None and not k.startswith("output_")})

    @classmethod
    @takes_hub_options
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        """generation_config.json of a checkpoint directory (or hub id in the local cache); without one, the
        defaults with config.json's special tokens."""
        directory = resolve_model_dir(path)
        file = directory / GENERATION_CONFIG_NAME
        if not file.is_file():
            return cls.from_model_config(read_config_json(directory))
        return cls.from_dict(read_json_object(file))

    def save_pretrained(self, directory: str | os.PathLike):
        atomic_write_text(make_dir(directory) / GENERATION_CONFIG_NAME, self.to_json_string())


def plain(name: str, value):
    """Special token ids given as a tensor, numpy value or tuple as Python ints / a list, as transformers takes them."""
    if not name.endswith("_token_id") or isinstance(value, (int, list)):
        return value
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def no_op(key: str, value) -> bool:
    """Whether value of an UNIMPLEMENTED key leaves the output as without it."""
    return any(value is n or value == n and not isinstance(value, bool) for n in UNIMPLEMENTED[key])


FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"}


def _recording(init):
    """GenerationConfig.__init__ that records the fields it is given (is_set)."""
    names = [f.name for f in dataclasses.fields(GenerationConfig)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.__dict__["_given"] = frozenset(names[:len(args)]) | kwargs.keys() & FIELDS
    return __init__


GenerationConfig.__init__ = _recording(GenerationConfig.__init__)
