"""from_pretrained(path, gguf_file=...): a llama.cpp GGUF (ERNIE 4.5, ERNIE 4.5 MoE, PhiMoE) read one tensor at a time
into a model built on the meta device, through the name table of loading/gguf.py.

What each GGML type becomes (quantization= / quantization_config= override the mode of every Linear and expert
stack; embeddings, norms, routers and biases are always floats in the model's dtype):
    F32, F16, BF16          floats in the model dtype (dtype="auto": BF16 or F16 if the file has them, else F32)
    Q4_0                    moelm int4, group 32, copied block for block: the fp16 scale and the 16 nibble bytes as
                            they are (exact; also under quantization="int4", whatever its group size)
    Q8_0, Q8_1, Q8_K, Q6_K  dequantized per tensor (gguf's reference code) and re-quantized to int8 (one scale per
                            row: moelm's int8 kernels take no per-block scales; |error| <= row max / 254 on top)
    any other block type    dequantized per tensor and re-quantized to int4 group 32 (Q4_K, Q5_K, Q2_K, Q3_K, Q4_1,
                            Q5_0, Q5_1, IQ*: whatever gguf.quants.dequantize implements; others are refused by name)
A stacked expert tensor is read and converted one expert at a time, so the peak memory is the quantized model plus
one expert matrix (or one embedding) in fp32. Tensors are read with plain file reads, not kept mapped.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import torch

from ..config import config_class_for, dtype_from_str
from ..config.gguf import gguf_config
from ..inference import optimize
from ..inference.quantization import LOAD_ELEMENTS, QuantizationConfig
from ..inference.quantize import load_targets, quantize_modules, resolve
from ..io.gguf import GGUFFile
from ..io.hub import resolve_gguf
from ..io.weights import CheckpointError
from .checkpoint import EXPERT_PARTS, hub_state_dict, hub_to_ours
from .gguf import _flat, _stack, gguf_plan, q4_0_codes

FLOATS = ("F32", "F16", "BF16")
EIGHT_BIT = ("Q8_0", "Q8_1", "Q8_K", "Q6_K")  # re-quantized to int8; every other block type to int4


def _config(g: GGUFFile, config_class=None):
    data = gguf_config(g)
    kind = config_class_for(data)
    if config_class is not None and config_class is not kind and config_class.__name__ != "PretrainedConfig":
        raise ValueError(f"{g.path.name} holds a {data['model_type']} model, not one for {config_class.__name__}")
    return kind.from_dict(data)


def from_gguf(cls, path, gguf_file, dtype="auto", device=None, progress=None, config=None, quantization=None,
              quantization_config=None, fast: bool = True, apply_kwargs=None, refused: dict | None = None):
    """The body of from_pretrained(path, gguf_file=...). apply_kwargs(config) applies the config overrides."""
    given = sorted(k for k, v in (refused or {}).items() if v not in (None, False))
    if given:
        raise NotImplementedError(f"from_pretrained(gguf_file=...) does not take {', '.join(given)} in moelm")
    if device is not None and torch.device(device).type != "cpu":
        raise NotImplementedError("moelm loads GGUF files on the CPU only")
    qconfig = resolve(quantization, quantization_config, "cpu")
    if qconfig is not None and qconfig.backend != "moelm":
        raise NotImplementedError("GGUF weights load into moelm's own int8/int4, not bitsandbytes")
    g = GGUFFile(resolve_gguf(path, gguf_file))
    config = config if config is not None else _config(g, cls.config_class)
    if apply_kwargs is not None:
        apply_kwargs(config)
    config.validate()
    dtype = g.float_dtype() if dtype in ("auto", None) else dtype_from_str(dtype)
    with torch.device("meta"):
        model = cls(config)
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise NotImplementedError(f"a GGUF holds a causal LM: load it with AutoModelForCausalLM (or the family's "
                                  f"...ForCausalLM), not {cls.__name__}")
    model._cast(dtype)
    plan = gguf_plan(config, {k for k, _ in hub_state_dict(model)})
    names = {item[0] for item in plan}
    missing, unexpected = sorted(names - set(g.shapes)), sorted(set(g.shapes) - names)
    if missing or unexpected:
        raise CheckpointError(f"{g.path.name} does not match {type(model).__name__}: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    sources = _sources(plan, config)
    _quantize(model, {m: {g.qtype(n) for n in ns} for m, ns in sources.items()}, qconfig)
    model.to_empty(device=torch.device("cpu"))
    model.tie_weights()
    _load(model, g, plan, progress)
    if fast:
        optimize(model)
    model.name_or_path = str(path if path is not None else g.path)
    model.hf_device_map = {"": "cpu"}
    return model.eval()


def _module_of(ours: str) -> str:
    return ours.rpartition(".")[0]


def _sources(plan, config) -> dict[str, set[str]]:
    """Module name of each Linear / expert stack -> the GGUF tensors its weights come from."""
    out: dict[str, set[str]] = {}
    for name, keys, _ in plan:
        for key in keys:
            ours = hub_to_ours(config.model_type, key)[0]
            if ours.endswith(".weight") and not key.endswith(("norm.weight", "embed_tokens.weight", "gate.weight")) \
                    or ours.endswith(("gate_up_proj", "down_proj")) and ".experts" in ours:
                out.setdefault(_module_of(ours), set()).add(name)
    if config.tie_word_embeddings:
        out["lm_head"] = {"token_embd.weight"}
    return out


def _mode(types: set[str], qconfig: QuantizationConfig | None) -> tuple[str, int] | None:
    """(mode, int4 group) of one module from its tensors' GGML types; None: floats."""
    if qconfig is not None:
        return qconfig.mode, 32 if qconfig.mode == "int4" and types == {"Q4_0"} else qconfig.group_size
    if types <= set(FLOATS):
        return None
    if types == {"Q4_0"}:
        return "int4", 32
    return ("int8", 64) if types & set(EIGHT_BIT + FLOATS) else ("int4", 32)


def _quantize(model, types: dict[str, set[str]], qconfig) -> None:
    """quantize_modules once per (mode, group) with every other module left out."""
    modes = {m: _mode(t, qconfig) for m, t in types.items()}
    kept = qconfig.modules_to_not_convert if qconfig is not None else ()  # floats, dequantized where stored so
    for choice in sorted({c for c in modes.values() if c is not None}):
        others = tuple(re.escape(m) for m, c in modes.items() if c != choice) + kept  # names, as patterns
        quantize_modules(model, QuantizationConfig(choice[0], group_size=choice[1], modules_to_not_convert=others))
    if any(c is not None for c in modes.values()):
        model.quantization = qconfig or QuantizationConfig(
            "int8" if any(c and c[0] == "int8" for c in modes.values()) else "int4", group_size=32)


def _load(model, g: GGUFFile, plan, progress) -> None:
    """Every GGUF tensor into place: packed Q4_0 blocks as they are, other types through float32 one tensor (one
    expert) at a time."""
    kind = model.config.model_type
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = load_targets(model)
    show = progress if progress is not None else g.path.stat().st_size > 2**30
    jobs = [(name, keys, combine) for name, keys, combine in plan]
    if model.config.tie_word_embeddings and "lm_head.weight" in targets:
        jobs.append(("token_embd.weight", ["lm_head.weight"], None))
    for n, (name, keys, combine) in enumerate(jobs):
        if not keys:  # written from the config (rope factors) or as zeros (PhiMoE biases llama.cpp requires)
            if not np.array_equal(g.floats(name), combine([])):
                raise CheckpointError(f"{g.path.name}: {name} differs from what the config implies "
                                      f"(a non-zero bias the model has no place for, or other rope factors)")
            continue
        if combine is _stack and g.shapes[name][0] != len(keys):
            raise CheckpointError(f"{g.path.name}: {name} {g.shapes[name]} holds {g.shapes[name][0]} experts, the "
                                  f"model {len(keys)}")
        for e, key in enumerate(keys):
            ours, expert, part = hub_to_ours(kind, key)
            index = e if combine is _stack else None
            if ours in targets:
                _load_packed(targets[ours], g, name, index, expert, part, kind)
                continue
            view = params[ours]
            if expert is not None:
                view = view[expert].chunk(len(EXPERT_PARTS[kind][ours.rpartition(".")[2]]), dim=0)[part]
            got, shape = list(g.shapes[name][1:] if index is not None else g.shapes[name]), list(view.shape)
            if len(got) == 2 and got == shape:  # a matrix (the embedding): a block of rows at a time
                for r, x in _row_blocks(g, name, index):
                    with torch.no_grad():
                        view[r:r + len(x)].copy_(torch.from_numpy(x))
                continue
            x = g.floats(name, index)
            if combine is _flat and x.size == view.numel():
                x = x.reshape(shape)
            if list(x.shape) != shape:
                raise CheckpointError(f"{g.path.name}: {name} {list(x.shape)} vs model {ours} {shape}")
            with torch.no_grad():
                view.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        if show and (n % 16 == 0 or n == len(jobs) - 1):
            print(f"\rLoading GGUF: {n + 1}/{len(jobs)} tensors", end="\n" if n == len(jobs) - 1 else "",
                  file=sys.stderr, flush=True)


def _load_packed(target, g: GGUFFile, name: str, index, expert, part, kind: str) -> None:
    """One weight matrix into a QuantizedLinear / QuantizedExperts: Q4_0 into int4 group 32 block for block,
    anything else dequantized and quantized by the module."""
    module, stacked, shape = target
    rows = slice(None)
    if stacked is not None:
        n = shape[1] // len(EXPERT_PARTS[kind][stacked])
        rows = slice(part * n, (part + 1) * n)
        shape = (n, shape[2])
    got = g.shapes[name][1:] if index is not None else g.shapes[name]
    if list(got) != list(shape):
        raise CheckpointError(f"{g.path.name}: {name} {list(got)} vs model {list(shape)}")
    if g.qtype(name) == "Q4_0" and module.mode == "int4" and module.group_size == 32:
        q, scale = q4_0_codes(g.raw(name, index).reshape(shape[0], -1))
        if stacked is None:
            module.load_packed(torch.from_numpy(q), torch.from_numpy(scale), rows)
        else:
            module.load_packed(stacked, torch.from_numpy(q), torch.from_numpy(scale), expert, rows)
        return
    start = rows.start or 0
    for r, x in _row_blocks(g, name, index):
        part = slice(start + r, start + r + len(x))
        if stacked is None:
            module.load_weight(torch.from_numpy(x), part)
        else:
            module.load_weight(stacked, torch.from_numpy(x), expert, part)


def _row_blocks(g: GGUFFile, name: str, index):
    """(first row, float32 rows) of a matrix (or expert `index` of a stack), dequantized LOAD_ELEMENTS at a time:
    never a whole fp32 copy of a 400 MB embedding, nor gguf's temporaries of it."""
    from gguf.quants import dequantize

    rows, cols = g.shapes[name][-2:]
    step = max(1, LOAD_ELEMENTS // cols)
    width = int(g.gguf.quant_shape_to_byte_shape((cols,), g.types[name])[0])
    start = g.offsets[name] + (index or 0) * rows * width
    for r in range(0, rows, step):
        n = min(step, rows - r)
        raw = np.fromfile(g.path, dtype=np.uint8, count=n * width, offset=start + r * width).reshape(n, width)
        try:
            x = dequantize(raw, g.types[name])
        except NotImplementedError:
            g.floats(name, index)  # its error, naming the type
            raise
        yield r, np.ascontiguousarray(x.reshape(-1, cols))
