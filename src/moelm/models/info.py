"""`moelm info`: a checkpoint or named config described (the config's summary, the model's parameters, their
bytes) and, with tp / ep / quantization, the per-rank memory and collectives of that layout (moelm.parallel): a plan,
from a model built on the meta device (no weights are read). With load, the checkpoint is then loaded and the memory
measured: this process's RSS after loading and its peak."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import NAMED_CONFIGS, AutoConfig, dtype_from_str, named_config
from ..inference import cpu
from ..inference.quantization import QuantizationConfig
from ..inference.quantize import quantize_modules
from ..io.hub import resolve_model_dir
from ..loading.checkpoint import EXPERT_PARTS
from ..loading.compressed import read_quantization_config
from ..parallel.comm import comm_plan
from ..parallel.memory import memory_plan
from .auto import CAUSAL_LM


def info(name: str, dtype: str = "auto", tp: int = 1, ep: int = 1, quantization: str | None = None,
         tokens: int = 4096, load: bool = False) -> list[tuple[str, str]]:
    """(key, line) pairs describing `name`: a checkpoint directory, a hub id in the local cache or a named
    config. load: also load the checkpoint (in dtype, with quantization) and add what was measured."""
    if load and (tp > 1 or ep > 1):
        raise ValueError("info --load measures this one process: it cannot be combined with --tp / --ep")
    if name in NAMED_CONFIGS and not Path(name).exists():
        if load:
            raise ValueError(f"info --load needs a checkpoint; {name!r} is a named config (moelm new writes one)")
        directory, config = None, named_config(name)
    else:
        directory = resolve_model_dir(name)
        config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = CAUSAL_LM[config.model_type](config)
    total = model.num_parameters()
    dtype = dtype_from_str((config.dtype or "float32") if dtype == "auto" else dtype)
    files = sorted(directory.glob("*.safetensors")) if directory else []
    on_disk = sum(f.stat().st_size for f in files)
    stored = stored_quantization(model, config, dtype, quantization, tp, ep)
    weights = total * dtype.itemsize if stored is None else stored[0]
    lines = [("model", str(directory or f"named config {name}")), *config.summary().items(),
             ("parameters", f"{human(total)} total, {human(model.num_active_parameters())} active per token"),
             ("dtype", f"{str(dtype).removeprefix('torch.')} (config: {config.dtype or 'unset'})"),
             ("memory", f"plan: {human(weights, 'B')} of weights" + (f" (stored {stored[1]})" if stored else "")
                        + (f"; {human(on_disk, 'B')} on disk in {len(files)} file(s)" if files else ""))]
    if stored is None and (tp > 1 or ep > 1 or quantization):
        lines += layout_lines(model, tp, ep, dtype, quantization, tokens)
    if load:
        lines.append(("loaded", loaded(CAUSAL_LM[config.model_type], directory, dtype, quantization)))
    return lines


def stored_quantization(model, config, dtype: torch.dtype, quantization: str | None, tp: int, ep: int
                        ) -> tuple[int, str] | None:
    """For a checkpoint stored quantized (config.json's quantization_config), the bytes of its weights as loaded and
    its modes, checked as from_pretrained checks them (another --quantization, --tp / --ep: the same errors); else
    None. `model` (on the meta device) is quantized in place."""
    data = config.extra.get("quantization_config")
    if data is None:
        return None
    if tp > 1 or ep > 1:
        raise ValueError("quantized checkpoints under tensor/expert parallelism are not implemented in moelm")
    requested = QuantizationConfig(quantization) if quantization else None
    qconfig = read_quantization_config(data, model, requested, EXPERT_PARTS.get(config.model_type, {}))
    model._cast(dtype)
    quantize_modules(model, qconfig)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    modes = sorted({f"{mode} group {group}" if mode == "int4" and group > 0 else mode
                    for mode, group in qconfig.modules.values()})
    return size, f"{', '.join(modes)}, compressed-tensors"


def loaded(cls, directory: Path, dtype: torch.dtype, quantization: str | None) -> str:
    """The checkpoint loaded (cls.from_pretrained) and this process's memory measured: RSS after loading, what the
    model added to it, and the peak RSS."""
    before, _ = cpu.memory()
    start = time.perf_counter()
    model = cls.from_pretrained(directory, dtype=dtype, quantization=quantization, progress=False)
    seconds = time.perf_counter() - start
    after, peak = cpu.memory()
    del model
    if after is None:
        return f"measured: peak RSS {human(peak, 'B')} ({seconds:.1f} s to load)"
    return (f"measured: RSS {human(after, 'B')} after loading ({human(after - before, 'B')} for the model), peak RSS "
            f"{human(peak, 'B')} ({seconds:.1f} s to load{', ' + quantization if quantization else ''})")


def layout_lines(model, tp: int, ep: int, dtype: torch.dtype, quantization: str | None,
                 tokens: int) -> list[tuple[str, str]]:
    """The per-rank memory of tp x ep (and quantization), and with tp or ep the collectives' payload per token."""
    gb, mb = 1e9, 1e6
    plan = memory_plan(model, tp, ep, dtype, quantization, tokens)
    lines = [
        ("layout", f"tp {plan['tp']} x ep {plan['ep']} on {plan['world']} ranks"
                   + (f", {quantization} weights" if quantization else "")),
        ("per rank", f"weights {plan['weights'] / gb:.2f} GB (dense {plan['dense'] / gb:.2f}, experts "
                     f"{plan['experts'] / gb:.2f}); KV cache {plan['kv_per_1k'] / mb:.1f} MB per 1k tokens of a "
                     f"sequence; largest activation {plan['activation'] / mb:.0f} MB ({plan['activation_what']}, "
                     f"{plan['tokens']}-token step)"),
    ]
    if tp > 1 or ep > 1:
        decode = comm_plan(model.config, tp, ep, tokens=1, logits=1, dtype=dtype)
        prefill = comm_plan(model.config, tp, ep, tokens=tokens, logits=1, dtype=dtype)
        lines.append(("collectives", f"{kinds(decode, 1)} per decode token; {kinds(prefill, tokens)} per token of "
                                     f"a {tokens}-token prefill (payload per rank)"))
    return lines


def human(n: float, unit: str = "") -> str:
    """1234567 -> "1.2M" (with `unit` after it)."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000


def kinds(counts: dict[str, int], tokens: int) -> str:
    """Bytes per token of each kind of collective."""
    return ", ".join(f"{kind} {human(n / tokens, 'B')}" for kind, n in sorted(counts.items())) or "none"
