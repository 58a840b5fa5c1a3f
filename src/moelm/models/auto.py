"""AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification: the class for config.json's model_type."""
from __future__ import annotations

import os

from ..config import AutoConfig, PretrainedConfig, config_class_for, read_config_json
from ..io.hub import resolve_model_dir, takes_hub_options, with_revision
from .ernie4_5 import Ernie4_5ForCausalLM, Ernie4_5Model
from .ernie4_5_moe import Ernie4_5_MoeForCausalLM, Ernie4_5_MoeModel
from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel

CAUSAL_LM = {"ernie4_5": Ernie4_5ForCausalLM, "ernie4_5_moe": Ernie4_5_MoeForCausalLM, "phimoe": PhimoeForCausalLM}
SEQUENCE_CLASSIFICATION = {"phimoe": PhimoeForSequenceClassification}
BASE = {"ernie4_5": Ernie4_5Model, "ernie4_5_moe": Ernie4_5_MoeModel, "phimoe": PhimoeModel}


class _Auto:
    mapping: dict = {}

    @classmethod
    def class_for(cls, config: PretrainedConfig):
        """The model class for a config (its model_type)."""
        if config.model_type not in cls.mapping:
            raise ValueError(f"{cls.__name__} has no model for model_type {config.model_type!r}; "
                             f"supported: {sorted(cls.mapping)}")
        return cls.mapping[config.model_type]

    @classmethod
    def from_config(cls, config: PretrainedConfig, *nemo, **kwargs):
        return cls.class_for(config).from_config(config, *nemo, **kwargs)

    @classmethod
    @takes_hub_options
    def from_pretrained(cls, path, **kwargs):
        """config= (a config, or a path / hub id to read one from) replaces the checkpoint's config.json."""
        path = with_revision(path, kwargs.pop("revision", None))
        config = kwargs.pop("config", None)
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(config)
        elif config is None:
            gguf_file = kwargs.get("gguf_file")  # a GGUF's config is in its metadata
            directory = resolve_model_dir(path, kwargs.get("subfolder")) if gguf_file is None else path
            data = read_config_json(directory, gguf_file)
            config = config_class_for(data).from_dict(data)
        elif not isinstance(config, PretrainedConfig):
            raise TypeError(f"config must be a moelm config or a path to one, got {type(config).__name__}")
        return cls.class_for(config).from_pretrained(path, config=config, **kwargs)


class AutoModel(_Auto):
    """The base model of the family (the decoder without a head: last_hidden_state), as transformers' AutoModel;
    from a causal-LM checkpoint its head is left out."""

    mapping = BASE


class AutoModelForCausalLM(_Auto):
    mapping = CAUSAL_LM


class AutoModelForSequenceClassification(_Auto):
    mapping = SEQUENCE_CLASSIFICATION


__all__ = ["AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]
