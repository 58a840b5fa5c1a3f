"""Quantizing a model while it loads: which modules become int8/int4 (moelm's or bitsandbytes'), and where each
checkpoint tensor goes."""
from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from ..nn.moe import Experts
from . import bnb
from .bnb import BnbExperts, BnbLinear
from .mixed import MixedExperts, hot_experts
from .quantization import (
    BitsAndBytesConfig,
    PackedLinear,
    QuantizationConfig,
    QuantizedExperts,
    QuantizedLinear,
    experts_group_for,
    group_for,
    kept_as_float,
)


def resolve(quantization=None, quantization_config=None, device=None) -> QuantizationConfig | None:
    """from_pretrained's `quantization="int8"|"int4"` or `quantization_config=` (a QuantizationConfig, a
    BitsAndBytesConfig or its dict) -> a QuantizationConfig, or None. A BitsAndBytesConfig uses bitsandbytes when
    the model goes to CUDA and bitsandbytes is installed, and moelm's own int8 / int4 otherwise (said on stderr).
    A dict with a key of QuantizationConfig's OWN_KEYS is a QuantizationConfig's (only those keys), e.g.
    {"experts": "int4", "hot_experts": "int8", "report": DIR, "hot_fraction": 0.2}."""
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass either quantization= or quantization_config=, not both")
    spec = quantization if quantization is not None else quantization_config
    if spec is None or isinstance(spec, QuantizationConfig):
        if spec is not None and spec.backend == "bitsandbytes":
            bnb.require()  # a clear ImportError now rather than while loading
        return spec
    if isinstance(spec, str):
        return QuantizationConfig(spec)
    if isinstance(spec, dict) and spec.keys() & OWN_KEYS:
        unknown = sorted(map(str, spec.keys() - OWN_KEYS))
        if unknown:
            raise ValueError(f"unknown quantization key(s) {', '.join(map(repr, unknown))}: a moelm quantization "
                             f"dict takes {', '.join(OWN_KEYS)}")
        return QuantizationConfig(**spec)
    if isinstance(spec, dict):
        spec = bnb_config(spec)
    if not (isinstance(spec, BitsAndBytesConfig) or type(spec).__name__ == "BitsAndBytesConfig"):
        raise ValueError(f"unsupported quantization spec {spec!r}: use 'int8', 'int4' or a BitsAndBytesConfig")
    four, eight = getattr(spec, "load_in_4bit", False), getattr(spec, "load_in_8bit", False)
    if not (four or eight):
        raise ValueError("BitsAndBytesConfig needs load_in_8bit=True or load_in_4bit=True")
    mode, what = ("int4", "load_in_4bit") if four else ("int8", "load_in_8bit")
    skip = tuple(getattr(spec, "llm_int8_skip_modules", None) or ())
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and bnb.installed():
        quant_type = getattr(spec, "bnb_4bit_quant_type", "fp4")
        if four and getattr(spec, "bnb_4bit_use_double_quant", False):
            print("moelm: bnb_4bit_use_double_quant is not applied (the 4-bit block maxima stay fp32)",
                  file=sys.stderr)
        others = unapplied(spec, four, ("bnb_4bit_quant_storage", "llm_int8_has_fp16_weight",
                                        "llm_int8_enable_fp32_cpu_offload"))
        print(f"moelm: BitsAndBytesConfig({what}=True) -> bitsandbytes "
              f"{quant_type if four else 'LLM.int8'} weights{others}", file=sys.stderr)
        return QuantizationConfig(mode, modules_to_not_convert=skip, backend="bitsandbytes", quant_type=quant_type,
                                  compute_dtype=getattr(spec, "bnb_4bit_compute_dtype", None),
                                  llm_int8_threshold=getattr(spec, "llm_int8_threshold", 6.0))
    why = "bitsandbytes is not installed" if cuda else "bitsandbytes is used for CUDA models only"
    kind = "int4 weights (group size 64)" if four else "int8 weights (per-row scales)"
    print(f"moelm: BitsAndBytesConfig({what}=True) -> moelm {kind}: {why}{unapplied(spec, four, BNB_DEFAULTS)}",
          file=sys.stderr)
    return QuantizationConfig(mode, modules_to_not_convert=skip)


# transformers' BitsAndBytesConfig settings that moelm's int4 / int8 do not apply, with their no-op values (those of
# a transformers BitsAndBytesConfig() included); the bnb_4bit_ ones count with load_in_4bit only, llm_int8_threshold and
# llm_int8_has_fp16_weight with load_in_8bit only
BNB_DEFAULTS = {"bnb_4bit_quant_type": ("fp4",), "bnb_4bit_compute_dtype": (torch.float32, "float32"),
                "bnb_4bit_use_double_quant": (False,), "bnb_4bit_quant_storage": (torch.uint8, "uint8"),
                "llm_int8_threshold": (6.0,), "llm_int8_has_fp16_weight": (False,),
                "llm_int8_enable_fp32_cpu_offload": (False,)}
# keys of transformers' BitsAndBytesConfig.to_dict() that are not settings
BNB_META = {"quant_method", "_load_in_4bit", "_load_in_8bit"}


def unapplied(spec, four: bool, names) -> str:
    """'; not applied: name=value, ...' for the settings of spec among names that are set to something else than
    their no-op values (None: not set) and that count for its bits (see BNB_DEFAULTS)."""
    out = []
    for name in names:
        value = getattr(spec, name, None)
        counts = name.startswith("bnb_4bit_") == four or name == "llm_int8_enable_fp32_cpu_offload"
        if counts and value is not None and not any(value is v or value == v for v in BNB_DEFAULTS[name]):
            out.append(f"{name}={value!r}")
    return f"; not applied: {', '.join(out)}" if out else ""


def bnb_config(spec: dict):
    """A BitsAndBytesConfig dict (transformers' to_dict() included) -> moelm's BitsAndBytesConfig; an unknown key or
    another quant_method is an error naming it."""
    method = spec.get("quant_method", "bitsandbytes")
    if str(getattr(method, "value", method)).lower() != "bitsandbytes":  # transformers' to_dict(): an enum
        raise ValueError(f"quantization_config quant_method={method!r} is not supported by moelm: it quantizes "
                         "while loading with a BitsAndBytesConfig (load_in_4bit / load_in_8bit) or "
                         "quantization='int8' / 'int4'")
    unknown = sorted(map(str, spec.keys() - _BNB_FIELDS - BNB_DEFAULTS.keys() - BNB_META))
    if unknown:
        raise ValueError(f"unknown quantization_config key(s) {', '.join(map(repr, unknown))}: a BitsAndBytesConfig "
                         f"dict takes {', '.join(sorted(_BNB_FIELDS | BNB_DEFAULTS.keys()))}")
    config = BitsAndBytesConfig(**{k: v for k, v in spec.items() if k in _BNB_FIELDS})
    for key in ("load_in_4bit", "load_in_8bit"):  # transformers' to_dict() writes both forms
        if spec.get(f"_{key}") and not getattr(config, key):
            setattr(config, key, True)
    for key in BNB_DEFAULTS.keys() - _BNB_FIELDS:  # transformers' settings moelm's dataclass has no field for
        if key in spec:
            setattr(config, key, spec[key])
    config.__post_init__()
    return config


_BNB_FIELDS = {f.name for f in dataclasses.fields(BitsAndBytesConfig)}
OWN_KEYS = ("mode", "group_size", "experts", "hot_experts", "report", "hot_fraction")  # a dict of QuantizationConfig


def per_expert(spec) -> bool:
    """Whether a quantization spec (as from_pretrained takes it) gives experts modes of their own."""
    if isinstance(spec, dict):
        return bool(spec.keys() & {"experts", "hot_experts", "report", "hot_fraction"})
    return isinstance(spec, QuantizationConfig) and (spec.experts or spec.hot_experts) is not None


def quantize_modules(model: nn.Module, config: QuantizationConfig) -> nn.Module:
    """Replace every nn.Linear (LM head included; routers are not Linear) and every Experts module by its quantized
    form, on whatever device the model is (the meta device while loading: nothing is allocated twice). The routed
    experts are in config.experts (default config.mode); with config.hot_experts, each MoE layer's hot experts
    (mixed.hot_experts, from config.report) and the shared experts are in that mode."""
    device = next(model.parameters()).device
    bnb = config.backend == "bitsandbytes"
    hot = hot_experts(model, config) if config.hot_experts is not None else {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            skip = config.modules_to_not_convert + ("score",)  # a classifier's new head stays trainable
            if kept_as_float(full, skip):
                continue
            if config.modules is not None:  # from a compressed-tensors checkpoint: its modules, its schemes
                if isinstance(child, (nn.Linear, Experts)) and full in config.modules:
                    mode, group = config.modules[full]
                    setattr(module, child_name, QuantizedLinear(child.in_features, child.out_features,
                                                                child.bias is not None, mode, group,
                                                                dtype=child.weight.dtype, device=device)
                            if isinstance(child, nn.Linear) else QuantizedExperts(child, mode, group))
                continue
            if isinstance(child, nn.Linear) and bnb:
                setattr(module, child_name, BnbLinear(child.in_features, child.out_features, child.bias is not None,
                                                      config, dtype=child.weight.dtype, device=device))
            elif isinstance(child, nn.Linear):
                shared = config.hot_experts is not None and "shared_experts" in full.split(".")
                mode = config.hot_experts if shared else config.mode
                group = group_for(full, child.in_features, config, mode)
                setattr(module, child_name, QuantizedLinear(child.in_features, child.out_features,
                                                            child.bias is not None, mode, group,
                                                            dtype=child.weight.dtype, device=device))
            elif isinstance(child, Experts) and bnb:
                setattr(module, child_name, BnbExperts(child, config))
            elif isinstance(child, Experts):
                setattr(module, child_name, quantized_experts(child, full, config, hot.get(full)))
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(getattr(model, "lm_head", None),
                                                                          PackedLinear):
        model.quantized_tied_head = True  # lm_head is filled from the embedding after loading
    model.quantization = config
    return model


def quantized_experts(experts: Experts, name: str, config: QuantizationConfig, hot: list[int] | None) -> nn.Module:
    """An Experts module's quantized form: QuantizedExperts in the routed experts' mode, or in hot_experts' when all
    are hot; MixedExperts when some are hot in another mode."""
    hidden, inter = experts.down_proj.shape[1:]
    cold = config.experts or config.mode
    if hot is not None and len(hot) == experts.num_experts:
        cold = config.hot_experts
    if hot is None or cold == config.hot_experts:
        return QuantizedExperts(experts, cold, experts_group_for(name, hidden, inter, config, cold))
    return MixedExperts(experts, hot, config.hot_experts,
                        experts_group_for(name, hidden, inter, config, config.hot_experts),
                        cold, experts_group_for(name, hidden, inter, config, cold))


def load_targets(model: nn.Module) -> dict[str, tuple]:
    """Checkpoint names of quantized weights -> (module, stacked name or None, full [.., O, I] shape)."""
    targets = {}
    inside = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MixedExperts))
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if inside and name.startswith(inside):  # a MixedExperts' stacks: filled through it
            continue
        if isinstance(module, PackedLinear) and not name.endswith((".gate_up", ".down")):
            targets[f"{prefix}weight"] = (module, None, module.weight_shape)
        elif isinstance(module, (QuantizedExperts, MixedExperts)):
            for stacked, shape in module.shapes.items():
                targets[f"{prefix}{stacked}"] = (module, stacked, shape)
    return targets


def fill_tied_head(model: nn.Module):
    """A quantized lm_head tied to the embedding gets the embedding's weight (which stays unquantized)."""
    if getattr(model, "quantized_tied_head", False):
        model.lm_head.load_weight(model.get_input_embeddings().weight.data)
