"""PretrainedConfig: the fields every family has, config.json reading and writing (4.x and 5.x spellings), rope
validation, and the model_type registry that AutoConfig reads (each family class registers itself)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..io.files import atomic_write_text, make_dir
from ..io.hub import resolve_gguf, resolve_model_dir, takes_hub_options, with_revision
from ..io.weights import CheckpointError, CheckpointNotFoundError

CONFIG_CLASSES: dict[str, type["PretrainedConfig"]] = {}  # model_type -> class, filled as families are defined
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float": torch.float32,
          "half": torch.float16}


def dtype_from_str(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of float32, bfloat16, float16")
    return DTYPES[name]


@dataclass(init=False)
class PretrainedConfig:
    """Common fields and the config.json reading/writing shared by all families."""

    model_type: ClassVar[str] = ""
    default_theta: ClassVar[float] = 10000.0
    default_architecture: ClassVar[str] = ""
    attribute_map: ClassVar[dict[str, str]] = {}
    top_level_original_max_wins: ClassVar[bool] = True
    hub_architectures: ClassVar[tuple[str, ...]] = ()  # config.json `architectures` names that mean this family
    # Keys of the hub's config.json files that this family reads when present but are not fields (absent unless
    # given, so config.json files without them are written unchanged): set, they are kept in `extra` and saved.
    # transformers' output switches every config has (from_pretrained(path, output_hidden_states=True))
    optional_keys: ClassVar[tuple[str, ...]] = ("output_attentions", "output_hidden_states")

    architectures: list[str] | None = None
    dtype: str | None = None
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    attn_implementation: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_type:
            CONFIG_CLASSES[cls.model_type] = cls

    def __init__(self, **kwargs):
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, copy.deepcopy(default))
        kwargs = _normalise_keys(self, kwargs)
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in kwargs.items():
            key = self.attribute_map.get(key, key)
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value
        self.__post_init__()

    def has_field(self, name: str) -> bool:
        """Whether `name` is a field, an alias of one, one of the family's optional_keys, or a key this config.json
        carried (from_pretrained may set it)."""
        return name in {f.name for f in dataclasses.fields(self)} or name in type(self).attribute_map \
            or name in type(self).optional_keys or name in self.extra

    def __setattr__(self, name, value):  # aliases (num_experts, ...) write their field; extra and optional keys
        name = type(self).attribute_map.get(name, name)  # go to extra (so config.json has them)
        if name in self.__dict__.get("extra", {}) or name in type(self).optional_keys:
            self.extra[name] = value
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name):  # attribute_map aliases (num_experts, ...) and extra keys
        if name.startswith("__") or name in ("extra", "attribute_map"):
            raise AttributeError(name)
        amap = type(self).attribute_map
        if name in amap:
            return getattr(self, amap[name])
        if name in self.__dict__.get("extra", {}):
            return self.extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        else:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_sizes()  # before deriving anything from them (head_dim = hidden_size // heads, ...)
        self._derive()
        if self.dtype is not None:
            self.dtype = str(self.dtype).removeprefix("torch.")
        self.rope_parameters = _standardise_rope(self)
        self.validate()

    # --- derived ---
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @property
    def head_size(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def moe_layers(self) -> list[int]:
        """The layers whose MLP is a block of routed experts."""
        return []

    def summary(self) -> dict[str, str]:
        """The architecture in a few lines, as `moelm info` prints it: family, sizes, attention, context, MoE."""
        out = {"family": f"{self.model_type} ({(self.architectures or [self.default_architecture])[0]})",
               "layers": f"{self.num_hidden_layers}, hidden {self.hidden_size}, vocab {self.vocab_size}",
               "attention": f"{self.num_attention_heads} heads, {self.num_key_value_heads} kv heads, "
                            f"head_dim {self.head_size}",
               "context": f"{self.max_position_embeddings} positions, rope {self.rope_parameters['rope_type']} "
                          f"(theta {self.rope_theta:g})"}
        if self.moe_summary():
            out["moe"] = self.moe_summary()
        return out

    def moe_summary(self) -> str | None:
        """The MoE layers and experts in a line (None: a dense family)."""
        return None

    def _derive(self):
        """Fill fields computed from others (subclasses)."""

    # --- validation ---
    def _check_sizes(self):
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "intermediate_size"]
        positive += [k for k in ("moe_intermediate_size", "moe_num_experts", "moe_k", "num_local_experts",
                                 "num_experts_per_tok", "head_dim") if hasattr(self, k)]
        for key in positive:
            value = getattr(self, key)
            if value is None and key == "head_dim":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{key} must be a positive integer, got {value!r}")

    def validate(self):
        self._check_sizes()
        for f in dataclasses.fields(self):  # a null or a string where a number goes fails here, not in a forward
            value = getattr(self, f.name)
            if f.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"{type(self).__name__}.{f.name} must be a number, got {value!r}")
        shared = getattr(self, "moe_num_shared_experts", 0)
        if not isinstance(shared, int) or isinstance(shared, bool):
            raise ValueError(f"{type(self).__name__}.moe_num_shared_experts must be an integer, got {shared!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_size % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_size}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        _validate_rope(self)

    # --- dict / json ---
    @classmethod
    def from_dict(cls, data: dict) -> "PretrainedConfig":
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if cls is not PretrainedConfig and model_type not in (cls.model_type, None):
            raise ValueError(f"config model_type {model_type!r} does not match {cls.__name__} ({cls.model_type!r})")
        return cls(**data)

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type}  # architectures as set: None until a model is saved, as transformers
        for f in dataclasses.fields(self):
            if f.name in ("extra", "attn_implementation"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = self.label2id
        rope = out["rope_parameters"]
        # Written for both transformers 5.x (rope_parameters, dtype) and 4.x (rope_theta, rope_scaling, torch_dtype).
        # rope_scaling says "rope_type", which 4.x reads too: a v4 "type" key would be copied by 5.x (which
        # prefers rope_scaling) into rope_parameters as an extra key.
        out["rope_theta"] = rope["rope_theta"]
        out["rope_scaling"] = None if rope["rope_type"] == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"}
        out["torch_dtype"] = out["dtype"]
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    @takes_hub_options
    def from_pretrained(cls, path: str | os.PathLike, gguf_file=None, revision: str | None = None
                        ) -> "PretrainedConfig":
        """Read config.json from a directory, a config.json path, or a hub id in the local HF cache (at `revision`),
        or, with gguf_file=, the config a GGUF's metadata describes: config/gguf.py."""
        data = read_config_json(with_revision(path, revision), gguf_file)
        if cls is PretrainedConfig:
            return config_class_for(data).from_dict(data)
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike):
        atomic_write_text(make_dir(directory) / "config.json", self.to_json_string())

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return dtype_from_str(self.dtype) if self.dtype else None


def _normalise_keys(config: PretrainedConfig, kwargs: dict) -> dict:
    """Fold config.json spellings of transformers 4.x and 5.x into our fields."""
    kwargs = copy.deepcopy(kwargs)
    kwargs.pop("model_type", None)
    kwargs.pop("label2id", None)
    for key in ("transformers_version", "_name_or_path", "_attn_implementation_autoset"):
        kwargs.pop(key, None)
    if "_attn_implementation" in kwargs:
        kwargs["attn_implementation"] = kwargs.pop("_attn_implementation") or "sdpa"
    torch_dtype = kwargs.pop("torch_dtype", None)
    if kwargs.get("dtype") is None and torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    num_labels = kwargs.pop("num_labels", None)
    if num_labels is not None and kwargs.get("id2label") is None:
        kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
    for key in ("rope_scaling", "rope_parameters"):
        value = kwargs.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{key} must be a dict (a JSON object of rope_type, rope_theta, ...), got "
                             f"{type(value).__name__} {value!r}")
    rope = dict(kwargs.pop("rope_scaling", None) or kwargs.get("rope_parameters") or {})
    theta = kwargs.pop("rope_theta", None)
    if theta is not None:
        rope.setdefault("rope_theta", theta)
    kwargs["rope_parameters"] = rope
    return kwargs


def _standardise_rope(config: PretrainedConfig) -> dict:
    rope = dict(config.rope_parameters or {})
    rope_type = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or rope_type or "default"
    rope.setdefault("rope_theta", config.default_theta)
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        # A top-level original_max_position_embeddings (kept in `extra`) overrides the rope dict's for ERNIE and is
        # ignored for PhiMoE: that is what transformers 5.23 ends up doing for each family.
        top = config.extra.get("original_max_position_embeddings")
        if top is not None and config.top_level_original_max_wins:
            rope["original_max_position_embeddings"] = top
        rope.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return rope


def _validate_rope(config: PretrainedConfig):
    rope = config.rope_parameters
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope type {kind!r} in rope_parameters; expected one of {', '.join(ROPE_TYPES)}")
    required = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor"],
                "longrope": ["short_factor", "long_factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}.get(kind, [])
    for key in required:
        if rope.get(key) is None:
            raise ValueError(f"rope_parameters.{key} is required for rope type {kind!r}")
    if kind == "longrope":
        half = config.head_size // 2
        for key in ("short_factor", "long_factor"):
            value = rope[key]
            if not isinstance(value, (list, tuple)) or len(value) != half:
                n = len(value) if isinstance(value, (list, tuple)) else value
                raise ValueError(f"rope_parameters.{key} must be a list of head_dim/2 = {half} numbers, got {n}")


def config_class_for(data: dict) -> type[PretrainedConfig]:
    model_type = data.get("model_type")
    if model_type in CONFIG_CLASSES:
        return CONFIG_CLASSES[model_type]
    for arch in data.get("architectures") or []:
        for cls in CONFIG_CLASSES.values():
            if arch in cls.hub_architectures:
                return cls
    raise ValueError(f"unknown model_type {model_type!r} / architectures {data.get('architectures')!r}; "
                     f"moelm supports model_type {sorted(CONFIG_CLASSES)}")


def read_config_json(path: str | os.PathLike, gguf_file=None) -> dict:
    """config.json's contents. A missing file raises CheckpointNotFoundError (a FileNotFoundError and a
    CheckpointError); invalid JSON raises CheckpointError (a ValueError). gguf_file=: the config fields a GGUF's
    metadata describes instead (the file as from_pretrained(path, gguf_file=) finds it)."""
    if gguf_file is not None:
        from .gguf import read_gguf_config

        return read_gguf_config(resolve_gguf(path, gguf_file))
    p = Path(path)
    file = p if p.is_file() else resolve_model_dir(path) / "config.json"
    if not file.is_file():
        hint = ""
        if (file.parent / "adapter_config.json").is_file():
            hint = ("; it holds a LoRA adapter (adapter_config.json): load its base model and apply the adapter "
                    "(moelm eval --adapter, moelm merge, moelm serve --lora-modules, moelm.train.load_adapter)")
        raise CheckpointNotFoundError(f"no config.json in {file.parent}{hint}")
    return read_json_object(file)


def read_json_object(file: Path) -> dict:
    """A JSON file holding an object; anything else raises CheckpointError naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


class AutoConfig:
    @staticmethod
    @takes_hub_options
    def from_pretrained(path, gguf_file=None, revision: str | None = None) -> PretrainedConfig:
        data = read_config_json(with_revision(path, revision), gguf_file)
        return config_class_for(data).from_dict(data)

    @staticmethod
    def for_model(model_type: str, **kwargs) -> PretrainedConfig:
        if model_type not in CONFIG_CLASSES:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(CONFIG_CLASSES)}")
        return CONFIG_CLASSES[model_type](**kwargs)

    @staticmethod
    def from_dict(data: dict) -> PretrainedConfig:
        return config_class_for(data).from_dict(data)
