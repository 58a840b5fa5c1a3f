"""Building a model: random weights (from_config) or a hub checkpoint (from_pretrained), then quantization while
loading and the inference fast paths, all applied to the unchanged model classes of moelm.models."""
from __future__ import annotations

import os

import torch

from .checkpoint import load_checkpoint
from .configs import AutoConfig, PretrainedConfig, dtype_from_str, read_config_json
from .generation import GENERATION_CONFIG_NAME, GenerationConfig, GenerationMixin
from .hub import resolve_model_dir
from .inference import optimize
from .inference.quantize import fill_tied_head, quantize_modules, resolve
from .weights import SafetensorsCheckpoint


def from_config(cls, config: PretrainedConfig, dtype=None, device=None, seed: int | None = None, fast: bool = True):
    """cls(config) initialised like the reference (normal(0, initializer_range)), in `dtype` on `device`;
    fast=False leaves out the inference fast paths."""
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config)
    model.init_weights()
    model._cast(dtype_from_str(dtype) if dtype else torch.float32)
    model = model.to(device) if device else model
    return optimize(model) if fast else model


def from_pretrained(cls, path: str | os.PathLike, dtype="auto", device=None, progress: bool | None = None,
                    config: PretrainedConfig | None = None, attn_implementation: str | None = None,
                    torch_dtype=None, quantization=None, quantization_config=None, fast: bool = True,
                    **config_overrides):
    """Load a hub-format checkpoint directory (or a hub id in the local cache) into cls.

    The model is built on the meta device and each tensor is read straight into place, so the peak memory is about
    the model's size plus one tensor. quantization="int8" | "int4" (or quantization_config=
    BitsAndBytesConfig(load_in_4bit=True) and the like) quantizes each weight as it is read. fast=False leaves out
    the inference fast paths (moelm.inference.optimize: decode kernels, fused projections)."""
    qconfig = resolve(quantization, quantization_config, device)
    directory = resolve_model_dir(path)
    if config is None:
        data = read_config_json(directory)
        config = cls.config_class.from_dict(data) if cls.config_class is not PretrainedConfig else \
            AutoConfig.from_dict(data)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if attn_implementation:
        config.attn_implementation = attn_implementation
    config.validate()
    ckpt = SafetensorsCheckpoint(directory)
    try:
        dtype = torch_dtype if torch_dtype is not None and dtype == "auto" else dtype
        if dtype == "auto" or dtype is None:
            dtype = config.torch_dtype or _checkpoint_dtype(ckpt)
        dtype = dtype_from_str(dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        model._cast(dtype)
        if qconfig is not None:
            quantize_modules(model, qconfig)
        model.to_empty(device=device)
        model.tie_weights()
        model.kept_aside = load_checkpoint(model, ckpt, progress=progress)
        fill_tied_head(model)
    finally:
        ckpt.close()
    if fast:
        optimize(model)
    if isinstance(model, GenerationMixin) and (directory / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.name_or_path = str(path)
    return model.eval()


def _checkpoint_dtype(ckpt) -> torch.dtype:
    for key in ckpt.keys():
        dt = ckpt.dtype(key)
        if dt.is_floating_point and not key.endswith("e_score_correction_bias"):
            return dt
    return torch.float32
