"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, symmetric int4 / int8 weights) <-> moelm's
int4 / int8 buffers, exactly: the integer codes are repacked, int8 scales converted to fp32, int4 scales to fp16
where every one of a weight's is an fp16 value (else fp32); nothing is dequantized. moelm writes fp32 scales.

moelm int4 (group G): nibble n = code + 8; a group's G/2 bytes hold input j (low nibble) and j + G/2 (high).
pack-quantized: code + 2^(bits-1) packed little-endian into int32 words, input j at bit bits * j of the row:
    int4 -> byte k holds inputs 2k (low nibble) and 2k + 1 (high); int8 -> byte j holds input j (+ 128).
int-quantized / naive-quantized: `weight` int8 [O, I], the codes as they are (int4 ones in -8..7).
A weight X [O, I] is stored as X.weight_packed int32 [O, I * bits / 32], X.weight_scale [O, I / G] (channel-wise:
[O, 1]) and X.weight_shape [2] = [O, I].
"""
from __future__ import annotations

import math
import re
import sys

import torch

from ..inference import kernels
from ..inference.quantization import PackedLinear, QuantizationConfig, QuantizedExperts, kept_as_float
from ..io.weights import CheckpointError
from ..nn.moe import Experts

PACKED, INT8 = "pack-quantized", ("int-quantized", "naive-quantized")
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
ROUTERS = r"re:.*\.(gate|router)$"
CLASSES = ("Linear", "Module")  # the class names a Linear matches as a target or in ignore (its class and base)


class CompressedTensorsError(ValueError):
    """A compressed-tensors quantization_config or tensor moelm cannot represent exactly."""


# ---------------------------------------------------------------- codes

def to_packed(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """moelm (q, scale) of one [O, I] weight -> {weight_packed, weight_scale, weight_shape} (pack-quantized; scales
    written in fp32, which widens fp16 ones exactly: transformers dequantizes to the scales' dtype)."""
    o = q.shape[0]
    if q.dtype == torch.int8:  # int8: byte j = q[j] + 128, four to a word
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        return {"weight_packed": codes.contiguous().view(torch.int32), "weight_scale": scale.float().reshape(o, 1),
                "weight_shape": torch.tensor([o, q.shape[1]])}
    n = q.reshape(o, -1, group_size // 2)
    nibbles = torch.cat([n & 15, n >> 4], dim=-1).reshape(o, -1)  # [O, I] in input order
    pairs = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return {"weight_packed": pairs.contiguous().view(torch.int32), "weight_scale": scale.float(),
            "weight_shape": torch.tensor([o, nibbles.shape[1]])}


def from_packed(packed: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, in_features: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """pack-quantized (weight_packed int32 [O, ceil(I * bits / 32)], weight_scale [O, groups]) -> moelm (q, scale):
    int8 q [O, I], scale fp32 [O]; int4 q uint8 [O, I/2], scale [O, I/group_size] as stored."""
    o = packed.shape[0]
    raw = packed.contiguous().view(torch.uint8)  # [O, I * bits / 8], little-endian as written
    if sys.byteorder != "little":
        raw = raw.view(o, -1, 4).flip(-1).reshape(o, -1)
    raw = raw[:, :in_features * bits // 8]
    if bits == 8:
        return (raw.to(torch.int16) - 128).to(torch.int8), scale.float().reshape(o)
    return _moelm_int4(torch.stack([raw & 15, raw >> 4], dim=-1).reshape(o, -1), group_size), scale


def from_int8(weight: torch.Tensor, scale: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """int-quantized / naive-quantized codes int8 [O, I] and scale [O, groups] -> moelm (q, scale) as from_packed:
    int8 (group_size 0) as they are, scale fp32 [O]; int4 (codes in -8..7) packed in groups of group_size."""
    o = weight.shape[0]
    if not group_size:
        return weight, scale.float().reshape(o)
    return _moelm_int4((weight + 8).to(torch.uint8), group_size), scale.reshape(o, -1)


def _moelm_int4(nibbles: torch.Tensor, group_size: int) -> torch.Tensor:
    """Nibbles (code + 8) uint8 [O, I] in input order -> moelm's int4 bytes [O, I/2]: within each group, input j
    in the low nibble and j + G/2 in the high one."""
    groups = nibbles.reshape(nibbles.shape[0], -1, group_size)
    half = group_size // 2
    return (groups[..., :half] | (groups[..., half:] << 4)).reshape(nibbles.shape[0], -1)


# ---------------------------------------------------------------- config.json

def quantization_config(model, parts: dict[str, tuple[str, ...]]) -> dict:
    """config.json's quantization_config of a moelm-quantized model: one config group per (mode, group size). The
    routed experts' scheme comes first, with a regex naming them (transformers 5 dequantizes its fused experts with
    the first group whose regex targets mention "experts"); the dense layers' most common scheme targets "Linear"
    (the catch-all), the others name their modules. Ignored: unquantized Linears, the routers (`.gate` in the hub's
    names, `.router` in transformers 5's) and the MTP tensors kept aside unquantized."""
    dense: dict[tuple[str, int], list[str]] = {}
    experts: dict[tuple[str, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            experts.setdefault((module.mode, module.group_size), []).append(name)
        elif isinstance(module, PackedLinear) and not name.endswith((".gate_up", ".down")):
            dense.setdefault((module.mode, module.group_size), []).append(name)
    catch_all = max(dense, key=lambda s: len(dense[s])) if dense else None
    projections = "|".join(re.escape(p) for ps in parts.values() for p in ps)
    targets: dict[tuple[str, int], list[str]] = {}
    for scheme, blocks in experts.items():
        every = len(experts) == 1
        targets[scheme] = [rf"re:.*\.experts\.\d+\.({projections})$"] if every else [
            rf"re:^{re.escape(b)}\.\d+\.({projections})$" for b in sorted(blocks)]
    for scheme, names in sorted(dense.items(), key=lambda item: item[0] == catch_all):
        targets.setdefault(scheme, []).extend(["Linear"] if scheme == catch_all else
                                              [f"re:^{re.escape(n)}$" for n in sorted(names)])
    groups = {}
    for i, ((mode, group), names) in enumerate(targets.items()):
        weights = {"num_bits": 8 if mode == "int8" else 4, "type": "int", "symmetric": True,
                   "strategy": "channel" if mode == "int8" else "group",
                   "group_size": None if mode == "int8" else group, "dynamic": False, "actorder": None,
                   "observer": "minmax", "block_structure": None}
        groups[f"group_{i}"] = {"targets": names, "format": PACKED, "weights": weights,
                                "input_activations": None, "output_activations": None}
    ignore = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    ignore += [rf"re:^{re.escape(name)}\.\d+\.({projections})$" for name, m in model.named_modules()
               if isinstance(m, Experts)]  # routed experts left unquantized ("Linear" would target them)
    if any(type(m).__name__ == "Router" for m in model.modules()):
        ignore.append(ROUTERS)
    if getattr(model, "kept_aside", None) or hasattr(getattr(model, "model", None), "mtp_block"):
        ignore.append(r"re:^model\.mtp_")  # the MTP head: kept aside, or loaded (Ernie4_5_MoeForCausalLM.mtp)
    return {"quant_method": "compressed-tensors", "format": PACKED, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


# ---------------------------------------------------------------- reading a config

_SCHEME_FIELDS = {"num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder", "observer",
                  "block_structure", "observer_kwargs", "zp_dtype", "scale_dtype"}


def _names(value, field: str) -> list[str]:
    """A list of module names or patterns (targets, ignore) from the config; None is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CompressedTensorsError(f"quantization_config.{field} {value!r}: expected a list of strings")
    for v in value:
        try:
            re.compile(v[3:]) if v.startswith("re:") else None
        except re.error as e:
            raise CompressedTensorsError(f"quantization_config.{field} {v!r}: not a regular expression ({e})") from None
    return value


def parse_scheme(name: str, group: dict, fmt: str) -> tuple[str, int]:
    """One config group -> moelm (mode, group size) or CompressedTensorsError naming the field."""
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        raise CompressedTensorsError(f"{where} is a {type(group).__name__}, not an object")
    fmt = group.get("format") or fmt
    if fmt not in (PACKED, *INT8):
        raise CompressedTensorsError(f"{where}.format {fmt!r}: moelm reads {PACKED}, int-quantized and "
                                     "naive-quantized integer weights only")
    for field in ("input_activations", "output_activations"):
        if group.get(field) is not None:
            raise CompressedTensorsError(f"{where}.{field} is set: moelm quantizes weights only (W4A16 / W8A16)")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise CompressedTensorsError(f"{where}.weights: missing; moelm reads weight-quantized schemes only")
    w = {k: v for k, v in w.items() if v is not None}
    bits, strategy, size = w.get("num_bits"), w.get("strategy"), w.get("group_size")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if size is None else "channel" if size == -1 else "group"
    if w.get("type", "int") != "int":
        raise CompressedTensorsError(f"{where}.weights.type {w['type']!r}: moelm reads int weights only")
    if bits not in (4, 8):
        raise CompressedTensorsError(f"{where}.weights.num_bits {bits!r}: moelm reads 4- and 8-bit weights")
    if w.get("symmetric", True) is not True:
        raise CompressedTensorsError(f"{where}.weights.symmetric is false: moelm has no zero points")
    if w.get("actorder") not in (None, False, "weight", "static"):  # weight / static: no g_idx, groups in order
        raise CompressedTensorsError(f"{where}.weights.actorder {w['actorder']!r}: moelm reads weights in input "
                                     "order only (no g_idx)")
    if w.get("dynamic", False) not in (False, None):
        raise CompressedTensorsError(f"{where}.weights.dynamic {w['dynamic']!r}: moelm reads static weights")
    if bits == 8 and strategy not in ("channel", "tensor"):  # tensor: its one scale repeated for every row
        raise CompressedTensorsError(f"{where}.weights.strategy {strategy!r}: moelm's int8 has one scale per output "
                                     "row (strategy 'channel' or 'tensor')")
    if bits == 4 and strategy not in ("group", "channel", "tensor"):
        raise CompressedTensorsError(f"{where}.weights.strategy {strategy!r}: moelm's int4 has group, channel or "
                                     "tensor scales")
    if bits == 4 and strategy == "group" and (not isinstance(size, int) or size < 32 or size % 32):
        raise CompressedTensorsError(f"{where}.weights.group_size {size!r}: moelm's int4 kernels need a multiple "
                                     "of 32")
    unknown = sorted(set(w) - _SCHEME_FIELDS)
    if unknown:
        raise CompressedTensorsError(f"{where}.weights.{unknown[0]} is not read by moelm")
    if bits == 8:
        return "int8", 0
    return "int4", size if strategy == "group" else -1  # -1: one group per row (in_features), as for "tensor"


def read_quantization_config(data, model, requested: QuantizationConfig | None, parts: dict[str, tuple[str, ...]]
                             ) -> QuantizationConfig:
    """config.json's quantization_config -> the QuantizationConfig that loads it as stored (resolve_config). A
    quantization the caller asked for too must be the same mode (it is then redundant); another is an error."""
    if not isinstance(data, dict):
        raise CompressedTensorsError(f"config.json's quantization_config is a {type(data).__name__}, not an object")
    config = resolve_config(data, model, parts)
    modes = sorted({mode for mode, _ in config.modules.values()})
    if requested is not None and (requested.backend != "moelm" or modes != [requested.mode]):
        asked = requested.mode if requested.backend == "moelm" else f"{requested.backend} {requested.mode}"
        raise ValueError(f"quantization {asked!r} was requested, but the checkpoint is stored quantized "
                         f"({'/'.join(modes)}, compressed-tensors); load it without quantization= (its "
                         "config.json says how it is quantized)")
    kept = _stored_but_kept(config.modules, requested.modules_to_not_convert if requested is not None else ())
    if kept:
        raise ValueError(f"modules_to_not_convert names {kept[0]}, which the checkpoint stores quantized "
                         "(compressed-tensors): moelm does not dequantize it; load it without modules_to_not_convert")
    return config


def _stored_but_kept(modules: dict, skip: tuple[str, ...]) -> list[str]:
    """The stored quantized modules that `skip` names, matched as quantize_modules matches modules_to_not_convert."""
    return [name for name in modules if kept_as_float(name, skip)]


def resolve_config(data: dict, model, parts: dict[str, tuple[str, ...]]) -> QuantizationConfig:
    """config.json's compressed-tensors quantization_config -> a QuantizationConfig whose `modules` give each
    quantized moelm module (its name) its (mode, group size); modules not targeted stay unquantized."""
    if data.get("quant_method") != "compressed-tensors":
        raise CompressedTensorsError(f"quantization_config.quant_method {data.get('quant_method')!r}: moelm reads "
                                     "compressed-tensors and its own int8/int4 only")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if data.get(field) and not (field == "sparsity_config" and _dense(data[field])):
            raise CompressedTensorsError(f"quantization_config.{field} is set: moelm does not read it")
    status = data.get("quantization_status", "compressed")
    if status != "compressed":
        raise CompressedTensorsError(f"quantization_config.quantization_status {status!r}: moelm reads compressed "
                                     "checkpoints only")
    fmt = data.get("format") or PACKED
    groups = data.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CompressedTensorsError(f"quantization_config.config_groups is a {type(groups).__name__}, not an object")
    if not groups:
        raise CompressedTensorsError("quantization_config.config_groups is empty")
    schemes = {}  # target -> (mode, group); a target named again by a later group is that group's (as in CT)
    for name, group in groups.items():
        scheme = parse_scheme(name, group, fmt)
        for t in _names(group.get("targets"), f"config_groups.{name}.targets"):
            schemes[t] = scheme
    ignore = _names(data.get("ignore"), "ignore")
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found = _scheme_for(name, schemes, ignore)
            if found is not None:
                modules[name] = _check_group(name, found, module.in_features)
        elif isinstance(module, Experts):
            found = {_scheme_for(f"{name}.{e}.{p}", schemes, ignore) for e in range(module.num_experts)
                     for ps in parts.values() for p in ps}
            if len(found) != 1:
                raise CompressedTensorsError(f"the experts of {name} are quantized with different schemes "
                                             f"({sorted(map(str, found))}); moelm needs one scheme per MoE block")
            scheme = found.pop()
            if scheme is not None:
                _, two_i, h = module.gate_up_proj.shape
                first, second = _check_group(name, scheme, h), _check_group(name, scheme, two_i // 2)
                if first != second:
                    raise CompressedTensorsError(f"{name}: channel-wise int4 experts over {h} and {two_i // 2} "
                                                 "inputs (moelm's experts share one group size)")
                modules[name] = first
    if not modules:
        raise CompressedTensorsError("quantization_config targets none of the model's Linear layers or experts")
    if "lm_head" in modules and getattr(model.config, "tie_word_embeddings", False):
        raise CompressedTensorsError("quantization_config quantizes lm_head, but tie_word_embeddings is true (the head "
                                     "is the input embedding, and a stored lm_head would not be read): set "
                                     "tie_word_embeddings to false in config.json to read the stored head")
    modes = sorted({m for m, _ in modules.values()})
    sizes = sorted({g for m, g in modules.values() if m == "int4"})
    return QuantizationConfig(modes[-1] if len(modes) == 1 else modes[0], sizes[0] if sizes else 64,
                              modules=modules)


def _dense(sparsity) -> bool:
    """A sparsity_config of format "dense": the weights are stored as they are (no sparse compression)."""
    return isinstance(sparsity, dict) and sparsity.get("format") == "dense"


def _check_group(name: str, scheme: tuple[str, int], in_features: int) -> tuple[str, int]:
    mode, group = scheme
    if mode == "int4" and group == -1:
        group = in_features
        if in_features % 32:
            raise CompressedTensorsError(f"{name}: channel-wise int4 over {in_features} inputs (moelm's int4 groups "
                                         "are multiples of 32)")
    if mode == "int4" and in_features % group:
        raise CompressedTensorsError(f"{name}: group_size {group} does not divide its {in_features} inputs")
    return mode, group


def _scheme_for(name: str, schemes: dict, ignore: list[str]) -> tuple[str, int] | None:
    """compressed-tensors' matching of a Linear (match_targets): ignored -> None; else the exact name, then the
    regexes in alphabetical order, then a class name (Linear, Module)."""
    if any(_matches(name, t) or t in CLASSES for t in ignore):
        return None
    ranked = sorted(schemes, key=lambda t: ("re:" in t, t))
    target = next((t for t in ranked if _matches(name, t)), None) or next((t for t in ranked if t in CLASSES), None)
    return None if target is None else schemes[target]


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


# ---------------------------------------------------------------- writing tensors

def packed_tensors(model, parts: dict[str, tuple[str, ...]]) -> dict[str, object]:
    """State-dict key of a quantized buffer -> a function yielding its hub tensors (for qweight), or None (scale:
    written with its qweight)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            for stacked, child in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                out[f"{name}.{child}.qweight"] = _experts(name, module, stacked, parts[stacked])
                out[f"{name}.{child}.scale"] = None
        elif isinstance(module, PackedLinear) and not name.endswith((".gate_up", ".down")):
            out[f"{name}.qweight"] = _linear(name, module)
            out[f"{name}.scale"] = None
    return out


def _linear(name, module):
    def tensors():
        for suffix, t in to_packed(module.qweight, module.scale, module.group_size).items():
            yield f"{name}.{suffix}", t
    return tensors


def _experts(name, module, stacked, parts):
    def tensors():
        q, s = module.stacked(stacked)
        for e in range(q.shape[0]):
            for p, qp, sp in zip(parts, q[e].chunk(len(parts)), s[e].chunk(len(parts))):
                for suffix, t in to_packed(qp, sp, module.group_size).items():
                    yield f"{name}.{e}.{p}.{suffix}", t
    return tensors


# ---------------------------------------------------------------- reading tensors

def stored_groups(ckpt) -> dict[str, dict[str, str]]:
    """Hub weight name X.weight -> its stored compressed-tensors keys {weight_packed | weight, weight_scale,
    weight_shape} (those present), for every X.weight_scale in the checkpoint."""
    out = {}
    for key in ckpt.keys():  # noqa: SIM118 (a checkpoint, not a dict)
        prefix, _, last = key.rpartition(".")
        if last in ("weight_scale", "weight_packed"):
            names = ("weight_packed", "weight", "weight_scale", "weight_shape")
            keys = {n: f"{prefix}.{n}" for n in names if f"{prefix}.{n}" in ckpt}
            if "weight_scale" not in keys or ("weight_packed" in keys) == ("weight" in keys):
                raise CheckpointError(f"{prefix}: stored {', '.join(keys)}; a quantized weight is weight_packed or "
                                      f"weight (unpacked codes), with weight_scale (in {ckpt.file_of(key).name})")
            out[f"{prefix}.weight"] = keys
    return out


def stored_shape(ckpt, keys: dict[str, str], mode: str) -> tuple[int, ...]:
    """The [O, I] of a stored quantized weight (weight_shape, else the int8 weight's or the packed one's)."""
    if "weight_shape" in keys:
        key = keys["weight_shape"]
        dtype, dims = ckpt.dtype(key), ckpt.shape(key)
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool or len(dims) != 1:
            raise CheckpointError(f"{key}: {str(dtype).removeprefix('torch.')} {list(dims)}, expected 1-D integers "
                                  f"(in {ckpt.file_of(key).name})")
        return tuple(ckpt.get(key).tolist())
    if "weight_packed" in keys:
        o, words = ckpt.shape(keys["weight_packed"])
        return o, words * (4 if mode == "int8" else 8)
    return tuple(ckpt.shape(keys["weight"]))


def read_codes(ckpt, keys: dict[str, str], module, shape: tuple[int, int], rows: slice | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One stored weight [O, I] = shape -> moelm (q, scale) for `module` (a QuantizedLinear: its mode and group
    size). With `rows` (a slice of module's rows) the codes go straight into module's buffers there and None is
    returned: repacked in C from the file's mapped bytes (no copy of the stored tensor) where the kernels are built."""
    mode, group = module.mode, module.group_size
    scale_key = keys["weight_scale"]
    if ckpt.dtype(scale_key) not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"{scale_key}: scales in {ckpt.dtype(scale_key)} (moelm reads fp32, bf16 and fp16 "
                              "scales)")
    bits = 8 if mode == "int8" else 4
    if "weight_packed" in keys:
        key = keys["weight_packed"]
        if ckpt.dtype(key) != torch.int32:
            raise CheckpointError(f"{key}: {ckpt.dtype(key)}, not int32")
        o, i = shape
        if tuple(ckpt.shape(key)) != (o, -(-i * bits // 32)):
            raise CheckpointError(f"{key}: shape {list(ckpt.shape(key))} does not hold {bits}-bit codes of [{o}, {i}]")
    else:
        key = keys["weight"]
        if ckpt.dtype(key) != torch.int8:
            raise CheckpointError(f"{key}: a {ckpt.dtype(key)} weight beside {scale_key}; moelm reads int8 codes "
                                  "stored unpacked")
        o, i = ckpt.shape(key)
    want = (o,) if mode == "int8" else (o, i // group)
    stored = tuple(ckpt.shape(scale_key))
    scale = None
    if stored and math.prod(stored) == 1 and len(stored) <= 2:  # strategy tensor: one scale for every group
        scale, stored = ckpt.get(scale_key).reshape(1, 1).expand(o, math.prod(want) // o).reshape(want), want
    if math.prod(stored) != math.prod(want) or not stored or stored[0] != o:
        raise CheckpointError(f"{scale_key}: shape {list(stored)}, expected {list(want)} for a {mode} weight "
                              f"[{o}, {i}]" + (f" in groups of {group}" if mode == "int4" else ""))
    repacked = bits == 8 or group % 4 == 0 and "weight_packed" in keys  # (unpacked int4 codes: from_int8)
    if rows is not None and kernels.available() and sys.byteorder == "little" and repacked:
        q = module.qweight[rows]
        if "weight_packed" in keys:
            kernels.repack(_mapped_or_read(ckpt, key).view(torch.uint8)[:, :i * bits // 8], q, bits, group)
        else:
            ckpt.read_into(key, q)
        if scale is None and ckpt.dtype(scale_key) == module.scale.dtype and stored == want:
            ckpt.read_into(scale_key, module.scale[rows])
        else:
            module.load_scales((ckpt.get(scale_key) if scale is None else scale).reshape(want), rows)
        return None
    scale = ckpt.get(scale_key) if scale is None else scale
    if "weight_packed" in keys:
        value = from_packed(ckpt.get(key), scale.reshape(o, -1), bits, group, i)
    else:
        codes = ckpt.get(key)
        if bits == 4 and codes.numel() and not -8 <= codes.min() <= codes.max() <= 7:
            raise CheckpointError(f"{key}: codes from {codes.min().item()} to {codes.max().item()}, not 4-bit "
                                  "(-8..7)")
        value = from_int8(codes, scale, 0 if bits == 8 else group)
    if rows is None:
        return value
    module.load_packed(*value, rows)
    return None


def _mapped_or_read(ckpt, key: str) -> torch.Tensor:
    """The stored tensor as a map of the file's bytes where the checkpoint can map it (read by the OS as touched,
    shared with its page cache, unmapped when dropped), else read into memory."""
    mapped = getattr(ckpt, "mapped", None)
    tensor = mapped(key) if mapped is not None else None
    return ckpt.get(key) if tensor is None else tensor

