"""Hub checkpoint names <-> moelm parameters, in one table; loading into a meta-built model and saving back.

The only renames are the stacked experts: the hub stores one tensor per expert and projection, moelm stacks them:
    {prefix}.experts.{e}.{gate}.weight [I, H] -> {prefix}.experts.gate_up_proj[e, :I]
    {prefix}.experts.{e}.{up}.weight   [I, H] -> {prefix}.experts.gate_up_proj[e, I:]
    {prefix}.experts.{e}.{down}.weight [H, I] -> {prefix}.experts.down_proj[e]
"""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import torch

from ..io.weights import CheckpointError, SafetensorsCheckpoint, save_sharded
from .compressed import packed_tensors, read_codes, stored_groups, stored_shape

# model_type -> {stacked parameter: hub projection names stacked along dim 1, in order}
EXPERT_PARTS = {
    "ernie4_5_moe": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
    "phimoe": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
}
# Hub tensors moelm does not compute with but keeps, to write them back on save (ERNIE multi-token prediction).
KEPT_ASIDE = re.compile(r"^model\.mtp_")
# Buffers older checkpoints saved, computed from the config: skipped, as transformers
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<part>\w+)\.weight$")


def hub_to_ours(model_type: str, key: str) -> tuple[str, int | None, int | None]:
    """Hub key -> (our key, expert index, part index) — expert/part None for keys that map one to one."""
    m = _EXPERT_KEY.match(key)
    if m and model_type in EXPERT_PARTS:
        for ours, parts in EXPERT_PARTS[model_type].items():
            if m["part"] in parts:
                return f"{m['prefix']}.{ours}", int(m["e"]), parts.index(m["part"])
    return key, None, None


def ours_to_hub(model_type: str, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) -> hub (key, tensor view) pairs; stacked experts are split per expert and part."""
    prefix, _, name = key.rpartition(".")
    parts = EXPERT_PARTS.get(model_type, {}).get(name)
    if parts is None or not prefix.endswith(".experts"):
        yield key, tensor
        return
    for e in range(tensor.shape[0]):
        for p, chunk in zip(parts, tensor[e].chunk(len(parts), dim=0)):
            yield f"{prefix}.{e}.{p}.weight", chunk


def _part_view(param: torch.Tensor, expert: int | None, part: int | None, num_parts: int) -> torch.Tensor:
    if expert is None:
        return param
    return param[expert].chunk(num_parts, dim=0)[part]


def load_checkpoint(model, ckpt: SafetensorsCheckpoint, progress: bool | None = None,
                    only=None, mmap: bool = False, ignore_mismatched_sizes: bool = False,
                    report: dict | None = None) -> dict[str, torch.Tensor]:
    """Copy every checkpoint tensor into `model`'s already allocated parameters, one tensor at a time. A model
    sharded over ranks (model.parallel, see moelm.parallel) reads only its own slices, with safetensors' slicing.

    only(name) -> bool limits the pass to some parameters (the others are loaded by another pass). mmap: weights
    used as stored are mapped from the file (SafetensorsCheckpoint.mapped) instead of read; kept-aside tensors and
    an untied input embedding used as stored always are (only its looked-up rows are ever read: 1 GB of RSS saved
    on ERNIE-4.5-21B-A3B in fp32).
    Returns the tensors kept aside (MTP). Raises CheckpointError for missing, unexpected or misshapen tensors;
    ignore_mismatched_sizes: a tensor of another shape leaves its module (not quantized, not sharded) to random
    weights instead, as transformers. `report` gets transformers' loading info: missing_keys (new heads started from
    random weights), unexpected_keys (another head's tensors, skipped), mismatched_keys ((key, checkpoint shape,
    model shape) of those left to random weights)."""
    from ..inference.quantize import load_targets

    parallel = getattr(model, "parallel", None)
    model_type = model.config.model_type
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = load_targets(model)  # name -> (module, stacked name, full shape): quantized as they are read
    as_stored = getattr(getattr(model, "quantization", None), "modules", None) is not None  # compressed-tensors
    params.update({name: torch.empty(shape, device="meta") for name, (_, _, shape) in quantized.items()})
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in params
    # an untied input embedding is only ever gathered from (a few rows a token): mapped even without mmap
    embedding = getattr(model.get_input_embeddings(), "weight", None)
    gathered = set() if tied else {n for n, p in params.items() if p is embedding}
    elsewhere = {n for n in params if only is not None and not only(n)}
    filled: dict[str, set] = {k: set() for k in params}
    kept: dict[str, torch.Tensor] = {}
    unexpected, mismatched, wrong_dtype = [], [], []
    info = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    reinit: set[str] = set()  # parameters whose modules start from random weights (ignore_mismatched_sizes)
    stored = stored_groups(ckpt)  # X.weight -> X.weight_packed / weight_scale / weight_shape: quantized as stored
    companions = {k for keys in stored.values() for k in keys.values()} - {
        keys.get("weight_packed", keys.get("weight")) for keys in stored.values()}
    keys = ckpt.keys()
    # A base model (no `model.` attribute) reads a causal-LM checkpoint without the prefix; a model with another
    # head ignores the checkpoint's lm_head, and its own new head (score) starts from random weights.
    strip_prefix = not hasattr(model, "model") and any(k.startswith("model.") for k in keys)
    skip_heads = tuple(h for h in ("lm_head.",) if not any(n.startswith(h) for n in params))
    new_heads = tuple(getattr(model, "new_heads", ()))
    total = sum(_nbytes(ckpt, k) for k in keys)
    show = progress if progress is not None else total > 2**30
    done, start = 0, time.time()
    for n, key in enumerate(keys):
        codes = stored.get(key.removesuffix("_packed"))
        if KEPT_ASIDE.match(key):  # mapped where it can be: only read again when the model is saved
            kept[key] = ckpt.get(key) if (mapped := ckpt.mapped(key)) is None else mapped
        elif key in companions or IGNORED.search(key):  # read with their weight; skipped
            pass
        elif (hub := _adapt_key(key.removesuffix("_packed") if codes else key, strip_prefix, skip_heads)) is None:
            info["unexpected_keys"].add(key)  # another head's tensor (or the base model's lm_head): skipped
        else:
            ours, expert, part = hub_to_ours(model_type, hub)
            if ours in elsewhere:
                pass
            elif ours not in params or (tied and ours == "lm_head.weight"):
                if not (tied and ours == "lm_head.weight"):
                    unexpected.append(key)
            else:
                num_parts = len(EXPERT_PARTS[model_type][ours.rpartition(".")[2]]) if expert is not None else 1
                param = params[ours]
                if expert is not None and expert >= _num_experts(param, ours, parallel):
                    unexpected.append(key)
                else:
                    if parallel is not None:  # (this rank's view, its index in the hub tensor, the whole shape)
                        view = parallel.local_view(ours, param.data, expert, part, num_parts)
                    else:
                        target = _part_view(param.data, expert, part, num_parts)
                        view = target, None, tuple(target.shape)
                    shape = tuple(ckpt.shape(key)) if codes is None else stored_shape(ckpt, codes, _mode(quantized,
                                                                                                          ours))
                    if view[2] != shape and ignore_mismatched_sizes and ours not in quantized and parallel is None:
                        info["mismatched_keys"].add((key, torch.Size(shape), torch.Size(view[2])))
                        reinit.add(ours)
                        filled[ours].add((expert, part))
                    elif view[2] != shape:
                        mismatched.append(f"{key}: checkpoint {list(shape)} vs model {list(view[2])} "
                                          f"(in {ckpt.file_of(key).name})")
                        filled[ours].add((expert, part))  # reported here, not as missing too
                    elif codes is not None and ours not in quantized:
                        mismatched.append(f"{key}: stored quantized, but the model's {ours} is not (its "
                                          "quantization_config leaves it out, or moelm keeps it unquantized: "
                                          "routers, norms and embeddings are floats)")
                        filled[ours].add((expert, part))
                    elif codes is None and ours in quantized and as_stored:
                        mismatched.append(f"{key}: stored unquantized, but the quantization_config quantizes the "
                                          f"model's {ours} (add it to the config's ignore to read it as stored)")
                        filled[ours].add((expert, part))
                    elif codes is None and not ckpt.dtype(key).is_floating_point:
                        wrong_dtype.append(f"{key}: checkpoint {str(ckpt.dtype(key)).removeprefix('torch.')}, "
                                           f"the model needs a float (in {ckpt.file_of(key).name})")
                        filled[ours].add((expert, part))
                    elif view[0] is None:  # an expert of another rank
                        filled[ours].add((expert, part))
                    else:
                        target, index, _ = view
                        if codes is not None:
                            module, rows = packed_module(quantized[ours], expert, part, num_parts)
                            read_codes(ckpt, codes, module, shape, rows)
                        elif ours in quantized:
                            _load_quantized(quantized[ours], ckpt.get(key), expert, part, num_parts)
                        elif index is not None:
                            ckpt.read_slice_into(key, index, target)
                        elif (mmap or ours in gathered) and expert is None and \
                                (mapped := ckpt.mapped(key, like=target)) is not None:
                            param.data = mapped  # used as stored: the file's pages, read as they are touched
                        else:
                            ckpt.read_into(key, target)
                        filled[ours].add((expert, part))
        done += _nbytes(ckpt, key)
        if show and (n == len(keys) - 1 or n % 16 == 0):
            rate = done / max(time.time() - start, 1e-6) / 2**20
            print(f"\rLoading weights: {100 * done / max(total, 1):5.1f}% ({n + 1}/{len(keys)} tensors, "
                  f"{rate:.0f} MiB/s)", end="\n" if n == len(keys) - 1 else "", file=sys.stderr, flush=True)
    missing = []
    for name, got in filled.items():
        if tied and name == "lm_head.weight" or name in elsewhere:
            continue
        if not got and name.startswith(new_heads):
            print(f"moelm: {name} is not in the checkpoint; it starts from random weights and needs training",
                  file=sys.stderr)
            with torch.no_grad():
                params[name].normal_(0.0, model.config.initializer_range)
            info["missing_keys"].add(name)
            continue
        prefix, _, last = name.rpartition(".")
        parts = EXPERT_PARTS.get(model_type, {}).get(last) if prefix.endswith(".experts") else None
        if parts is None:
            if not got:
                missing.append(name)
        else:
            for e in range(_num_experts(params[name], name, parallel)):
                missing += [f"{prefix}.{e}.{p}.weight" for i, p in enumerate(parts) if (e, i) not in got]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape: {_listing(mismatched)} (pass "
                        "ignore_mismatched_sizes=True to start their modules from random weights)")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} tensor(s) with the wrong dtype: {_listing(wrong_dtype)}")
    if problems:
        where = ckpt.files[0].parent
        raise CheckpointError(f"checkpoint in {where} does not match {type(model).__name__} "
                              f"({model_type}): " + "; ".join(problems))
    if reinit:
        model.init_weights(modules={name.rpartition(".")[0] for name in reinit})
    if report is not None:
        for k, v in info.items():
            report.setdefault(k, set()).update(v)
    return kept


def _num_experts(param: torch.Tensor, name: str, parallel) -> int:
    """The model's experts in a stacked parameter (this rank holds a 1/ep share of them under EP)."""
    layout = parallel.layouts.get(name) if parallel is not None else None
    return param.shape[0] * (layout[2].size() if layout is not None and layout[1] == 0 else 1)


def packed_module(target, expert: int | None, part: int | None, num_parts: int):
    """(QuantizedLinear, its rows) that one hub weight of a load_targets entry goes to."""
    module, stacked, shape = target
    if stacked is None:
        return module, slice(None)
    rows = shape[1] // num_parts
    return module.rows(stacked, expert, slice(part * rows, (part + 1) * rows))


def _mode(quantized: dict, ours: str) -> str:
    return quantized[ours][0].mode if ours in quantized else "int4"


def _load_quantized(target, value, expert: int | None, part: int | None, num_parts: int):
    """value: a float weight [O, I], quantized here (stored codes go through read_codes)."""
    module, rows = packed_module(target, expert, part, num_parts)
    module.load_weight(value, rows)


def _adapt_key(key: str, strip_prefix: bool, skip_heads: tuple[str, ...]) -> str | None:
    if key.startswith(skip_heads):
        return None
    if strip_prefix:
        return key.removeprefix("model.") if key.startswith("model.") else None
    return key


def _nbytes(ckpt: SafetensorsCheckpoint, key: str) -> int:
    n = 1
    for d in ckpt.shape(key):
        n *= d
    return n * ckpt.dtype(key).itemsize


def _listing(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... (+{len(names) - most} more)" if len(names) > most else "")


def hub_state_dict(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under hub names, in hub layout (tied lm_head left out, kept-aside tensors included;
    int8 / int4 weights as compressed-tensors' pack-quantized X.weight_packed, X.weight_scale, X.weight_shape).
    A sharded model's tensors are gathered whole one at a time (a collective: every rank iterates)."""
    model_type = model.config.model_type
    tied = getattr(model.config, "tie_word_embeddings", False)
    parallel = getattr(model, "parallel", None)
    quantized = getattr(model, "quantization", None) is not None
    packed = packed_tensors(model, EXPERT_PARTS.get(model_type, {})) if quantized else {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        if key in packed:  # int8 / int4 weights in the compressed-tensors layout
            if packed[key] is not None:
                yield from packed[key]()
            continue
        tensor = parallel.full(key, tensor.detach()) if parallel is not None else tensor.detach()
        yield from ours_to_hub(model_type, key, tensor)
    yield from getattr(model, "kept_aside", {}).items()


def save_checkpoint(model, directory, max_shard_size="5GB", extra_files=None):
    """save_sharded of hub_state_dict. A sharded model: every rank gathers, rank 0 writes, and a failure there is
    raised on every rank."""
    parallel = getattr(model, "parallel", None)
    tensors = hub_state_dict(model)
    if parallel is None:
        return save_sharded(tensors, directory, max_shard_size=max_shard_size, extra_files=extra_files)
    error = None
    if parallel.is_writer:
        try:
            save_sharded(tensors, directory, max_shard_size=max_shard_size, extra_files=extra_files)
        except Exception as e:  # keep gathering with the other ranks, then raise everywhere
            error = e
    for _ in tensors:
        pass
    message = parallel.from_writer(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise OSError(f"saving to {directory} failed on rank 0: {message}")
