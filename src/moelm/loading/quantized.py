"""`moelm quantize`: a bf16/fp32 hub checkpoint rewritten with int8/int4 weights in the compressed-tensors format,
one tensor at a time (read, quantized, written into its shard): the peak memory is about the largest tensor.
The result is what from_pretrained(path, quantization=...).save_pretrained(out) writes, tensor for tensor."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..config import config_class_for, dtype_from_str, read_config_json
from ..generation import GENERATION_CONFIG_NAME, GenerationConfig
from ..inference.quantization import QuantizationConfig, quantize
from ..inference.quantize import load_targets, quantize_modules
from ..io.hub import resolve_model_dir
from ..io.weights import INDEX_NAME, CheckpointError, SafetensorsCheckpoint, save_sharded
from .checkpoint import EXPERT_PARTS, KEPT_ASIDE, hub_to_ours, ours_to_hub, packed_module
from .compressed import to_packed
from .pretrained import checkpoint_dtype, untie_a_stored_head

# files of a model directory that are not copied: the weights (rewritten) and what save_pretrained writes
_NOT_COPIED = ("config.json", GENERATION_CONFIG_NAME, INDEX_NAME)
ROWS = 4096  # rows quantized at a time: the temporaries stay a few MB beside the tensor read
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def quantize_checkpoint(class_for: Callable, path: str | os.PathLike, out: str | os.PathLike,
                        quantization: QuantizationConfig, max_shard_size="5GB") -> list[Path]:
    """Write `path`'s checkpoint to `out` with its weights quantized as `quantization` says (moelm's int8 / int4,
    the modules from_pretrained(..., quantization=...) quantizes), in the compressed-tensors format, with the
    config (its quantization_config added), generation config and the other files (tokenizer, ...) of `path`.
    class_for(config) is the model class. Atomic: `out` gets the whole result or nothing new."""
    directory = resolve_model_dir(path)
    data = read_config_json(directory)
    if data.get("quantization_config") is not None:  # (null: not quantized, as from_pretrained reads it)
        method = data["quantization_config"].get("quant_method") if isinstance(data["quantization_config"],
                                                                                dict) else None
        raise ValueError(f"{directory} is already quantized (config.json has a {method + ' ' if method else ''}"
                         "quantization_config); quantize its unquantized original")
    if quantization.backend != "moelm":
        raise ValueError("moelm quantize writes moelm's own int8 / int4 weights only")
    if quantization.hot_experts is not None:
        raise ValueError("moelm quantize cannot write experts of two modes in one layer (hot_experts): load the "
                         "unquantized checkpoint with the same quantization= instead")
    config = config_class_for(data).from_dict(data)
    config.validate()
    with SafetensorsCheckpoint(directory) as ckpt:
        untie_a_stored_head(config, ckpt)
        dtype = dtype_from_str(config.torch_dtype or checkpoint_dtype(ckpt))
        model, expected = quantized_meta_model(class_for(config), config, dtype, quantization)
        model.kept_aside = {k: None for k in ckpt.keys() if KEPT_ASIDE.match(k)}  # noqa: SIM118
        if (directory / GENERATION_CONFIG_NAME).is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        files = model.saved_files()
        for f in sorted(directory.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES) \
                    and not f.name.startswith("."):
                files[f.name] = f.read_bytes()
        return write_quantized(model, ckpt, expected, out, files, max_shard_size)


def quantized_meta_model(cls, config, dtype: torch.dtype, quantization: QuantizationConfig):
    """cls(config) on the meta device in `dtype`, its modules quantized -> (model, {hub name: (shape, dtype)} of the
    unquantized model's tensors)."""
    with torch.device("meta"):
        model = cls(config)
    model._cast(dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {hub: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()
                if not (tied and key == "lm_head.weight") for hub, t in ours_to_hub(config.model_type, key, t)}
    quantize_modules(model, quantization)
    return model, expected


def write_quantized(model, ckpt, expected: dict, out, files: dict, max_shard_size="5GB") -> list[Path]:
    """Every tensor of `ckpt` (anything with keys / shape / dtype / get / directory) written to `out` as
    `model` (quantized, on the meta device) holds it, one tensor at a time, with `files` beside them."""
    plan = list(_plan(model, ckpt, expected))
    layout = [(name, dtype, shape) for name, dtype, shape, _ in plan]
    return save_sharded(((name, make()) for name, _, _, make in plan), out, max_shard_size=max_shard_size,
                        extra_files=files, layout=layout)


def _plan(model, ckpt, expected: dict) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], Callable]]:
    """(hub name, dtype, shape, a function reading and converting it) of every tensor to write, in order."""
    model_type = model.config.model_type
    targets = load_targets(model)
    params = dict(model.named_parameters())
    tied = getattr(model, "quantized_tied_head", False)
    seen, unexpected, wrong = set(), [], []
    for key in ckpt.keys():  # noqa: SIM118 (a checkpoint)
        if KEPT_ASIDE.match(key):
            seen.add(key)
            yield key, ckpt.dtype(key), tuple(ckpt.shape(key)), lambda key=key: ckpt.get(key)
            continue
        ours, expert, part = hub_to_ours(model_type, key)
        seen.add(key)
        if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):  # = the embedding
            continue
        if key in expected and tuple(ckpt.shape(key)) != expected[key][0]:
            wrong.append(f"{key} {list(ckpt.shape(key))} (expected {list(expected[key][0])})")
        elif ours in targets:
            num_parts = len(EXPERT_PARTS[model_type][ours.rpartition(".")[2]]) if expert is not None else 1
            module, _ = packed_module(targets[ours], expert, part, num_parts)
            yield from _packed(key.removesuffix(".weight"), module, tuple(ckpt.shape(key)),
                               lambda key=key: ckpt.get(key))
        elif ours in params and key in expected:
            yield key, params[ours].dtype, tuple(ckpt.shape(key)), lambda key=key, ours=ours: ckpt.get(key).to(
                params[ours].dtype)
        else:
            unexpected.append(key)
    embed = "model.embed_tokens.weight"
    if tied and embed in ckpt.keys():  # noqa: SIM118 (the head: a quantized copy of the embedding; else missing)
        seen.add("lm_head.weight")
        yield from _packed("lm_head", model.lm_head, tuple(ckpt.shape(embed)),
                           lambda: ckpt.get(embed).to(params[embed].dtype))
    missing = sorted(set(expected) - seen)
    if wrong:
        raise CheckpointError(f"checkpoint in {ckpt.directory} does not match {type(model).__name__}: "
                              f"{len(wrong)} tensor(s) with the wrong shape: {', '.join(wrong[:8])}")
    if missing or unexpected:
        raise CheckpointError(f"checkpoint in {ckpt.directory} does not match {type(model).__name__}: "
                              f"{len(missing)} missing tensor(s) {missing[:8]}, {len(unexpected)} unexpected "
                              f"{unexpected[:8]}")


def _packed(prefix: str, module, shape: tuple[int, int], read: Callable):
    """The three compressed-tensors tensors of one weight [O, I] quantized for `module` (mode, group size)."""
    o, i = shape
    bits = 8 if module.mode == "int8" else 4
    groups = 1 if module.mode == "int8" else i // module.group_size
    cache = {}

    def part(name):
        def make():
            if name == "weight_packed":  # read and quantized here, ROWS rows at a time; the scale and shape follow
                w = read()
                parts = [quantize(w[r:r + ROWS], module.mode, module.group_size) for r in range(0, o, ROWS)]
                del w
                cache.update(to_packed(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]),
                                       module.group_size))
            return cache.pop(name)
        return make

    yield f"{prefix}.weight_packed", torch.int32, (o, i * bits // 32), part("weight_packed")
    yield f"{prefix}.weight_scale", torch.float32, (o, groups), part("weight_scale")
    yield f"{prefix}.weight_shape", torch.int64, (2,), part("weight_shape")
