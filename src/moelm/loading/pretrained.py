"""Building a model: random weights (from_config) or a hub checkpoint (from_pretrained), then quantization while
loading and the inference fast paths, all applied to the unchanged model classes of moelm.models."""
from __future__ import annotations

import copy
import functools
import os
import sys

import torch

from ..config import AutoConfig, PretrainedConfig, dtype_from_str, read_config_json
from ..generation import GENERATION_CONFIG_NAME, GenerationConfig, GenerationMixin
from ..inference import optimize
from ..inference.quantization import BitsAndBytesConfig
from ..inference.quantize import fill_tied_head, per_expert, quantize_modules, resolve
from ..io.hub import resolve_model_dir, takes_hub_options, with_revision
from ..io.weights import CheckpointError, SafetensorsCheckpoint
from .backend import apply_backend, apply_moe_overrides
from .checkpoint import EXPERT_PARTS, load_checkpoint
from .compressed import read_quantization_config
from .offload import disk_layers, materialize, needs_placement, offload, plan


def from_config(cls, config: PretrainedConfig, dtype=None, device=None, seed: int | None = None, fast: bool = True,
                backend=None, moe_config=None, moe_overrides=None):
    """cls(config) initialised like the reference (normal(0, initializer_range)), in `dtype` on `device`;
    fast=False leaves out the inference fast paths. NeMo's backend=BackendConfig(...) picks each part's
    implementation (and leaves out the fast paths, which are implementations of their own); moe_config /
    moe_overrides set MoE fields of a copy of the config under NeMo's names (moelm.loading.backend).
    A config with num_nextn_predict_layers (ERNIE 4.5 MoE, as the -PT checkpoints' config.json) gets the MTP head
    (add_mtp), initialised as the rest after it, so the other weights are those the same seed gives without it."""
    if moe_config is not None or moe_overrides:
        config = copy.deepcopy(config)
        apply_moe_overrides(config, moe_config, moe_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config)
    model.init_weights()
    mtp = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if mtp and hasattr(model, "add_mtp"):
        model.add_mtp(mtp)
        model.init_weights(prefix="model.mtp_")
    model._cast(dtype_from_str(dtype) if dtype else torch.float32)
    model = model.to(compute_device(device)) if device is not None else model
    if backend is not None:
        return apply_backend(model, backend)
    return optimize(model) if fast else model


@takes_hub_options
def from_pretrained(cls, path: str | os.PathLike, dtype="auto", device=None, progress: bool | None = None,
                    config: PretrainedConfig | None = None, attn_implementation: str | None = None,
                    torch_dtype=None, quantization=None, quantization_config=None, fast: bool = True,
                    device_map=None, revision: str | None = None, low_cpu_mem_usage=None, trust_remote_code=None,
                    load_in_4bit: bool = False, load_in_8bit: bool = False, tp_plan=None, tp_size=None,
                    device_mesh=None, distributed_config=None, max_memory=None, offload_folder=None, backend=None,
                    gguf_file=None, mmap: bool = False, subfolder: str | None = None,
                    output_loading_info: bool = False, ignore_mismatched_sizes: bool = False,
                    use_safetensors: bool | None = None, **kwargs):
    """Load a hub-format checkpoint directory (or a hub id in the local cache) into cls.

    The model is built on the meta device and each tensor is read straight into place, so the peak memory is about
    the model's size plus one tensor. mmap=True maps each tensor used as stored (its dtype and shape, whole) from
    the file instead (copy-on-write: RSS counts its pages once touched, the OS shares them with its page cache,
    writes never reach the file); it is off by default because a file's pages are not transparent huge pages, and
    some kernels stream them slower (MKL's fp32 matrix-vector product 1.5x on a 400 MB LM head on the Zen 5 EPYC);
    an untied input embedding, which is only gathered from, is mapped either way.
    quantization="int8" | "int4" (or quantization_config=BitsAndBytesConfig(load_in_4bit=True) and the like)
    quantizes each weight as it is read. A checkpoint whose config.json has a compressed-tensors
    quantization_config (what moelm saves for int8/int4 models) is read as stored, its integer codes repacked onto
    moelm's kernels (moelm.loading.compressed). fast=False leaves out the inference fast paths
    (moelm.inference.optimize: decode kernels, fused projections).

    transformers' loader options: device_map puts the whole model on one device ("auto" is the GPU if there is
    one, else the CPU; see place()); revision picks a cached hub revision; load_in_4bit / load_in_8bit are
    BitsAndBytesConfig's; low_cpu_mem_usage (loading always is) and trust_remote_code (nothing remote ever runs) are
    accepted; cache_dir, local_files_only, token and force_download act on the hub resolution and downloads
    (moelm.io.hub.takes_hub_options). Other keyword arguments must be config fields, which they update; anything
    else is a TypeError.

    tp_plan="auto" (or a dict of rules), tp_size, device_mesh or distributed_config=DistributedConfig(...) shard
    the model over the processes torchrun launched (moelm.parallel): each rank reads only its slices.

    gguf_file= reads a llama.cpp GGUF file (a path, or a name in `path`) instead: see moelm.loading.gguf_load.
    config= replaces config.json's (a copy of it is used; the weights must fit it); subfolder= is the folder of
    `path` (a directory or a hub repository) that holds the checkpoint.

    As transformers: ignore_mismatched_sizes=True starts the modules of tensors with another shape from random
    weights (a classifier loaded with another num_labels) instead of raising; output_loading_info=True returns
    (model, {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}); use_safetensors=False is refused
    (moelm reads safetensors only, never pickled weights)."""
    if use_safetensors is False:
        raise ValueError("use_safetensors=False: moelm reads only safetensors checkpoints (pickled weights are never "
                         "loaded)")
    if isinstance(config, (str, os.PathLike)):
        config = cls.config_class.from_pretrained(config)
    if config is not None:
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__}.from_pretrained(config=...) takes a {cls.config_class.__name__}, got "
                            f"{type(config).__name__}")
        config = copy.deepcopy(config)
    if gguf_file is not None:
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} is not supported with gguf_file in moelm; pass the GGUF "
                             "file's path (or its directory) instead")
        from .gguf_load import from_gguf

        if per_expert(quantization) or per_expert(quantization_config):
            raise NotImplementedError("quantization= with experts / hot_experts is not implemented for GGUF files "
                                      "in moelm; load a hub checkpoint")

        if load_in_4bit or load_in_8bit:
            quantization_config = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
        return from_gguf(cls, with_revision(path, revision), gguf_file,
                         dtype=torch_dtype if torch_dtype is not None and dtype == "auto" else dtype, device=device,
                         progress=progress, config=config, quantization=quantization,
                         quantization_config=quantization_config, fast=fast,
                         apply_kwargs=lambda c: apply_kwargs(c, kwargs, attn_implementation),
                         refused={"device_map": device_map, "tp_plan": tp_plan, "tp_size": tp_size,
                                  "device_mesh": device_mesh, "distributed_config": distributed_config,
                                  "max_memory": max_memory, "offload_folder": offload_folder, "backend": backend,
                                  "mmap": mmap, "output_loading_info": output_loading_info,
                                  "ignore_mismatched_sizes": ignore_mismatched_sizes})
    layout = None
    if any(v is not None for v in (tp_plan, tp_size, device_mesh, distributed_config)):
        from ..parallel.load import distributed_layout

        if quantization is not None or quantization_config is not None or load_in_4bit or load_in_8bit:
            raise NotImplementedError("quantized weights under tensor/expert parallelism are not implemented in "
                                      "moelm; load the checkpoint's own dtype")
        if ignore_mismatched_sizes:
            raise NotImplementedError("ignore_mismatched_sizes under tensor/expert parallelism is not implemented in "
                                      "moelm; load the model in one process and save it first")
        layout, device = distributed_layout(tp_plan, tp_size, device_mesh, distributed_config, device_map, device)
        device_map = None
    if load_in_4bit or load_in_8bit:
        if quantization is not None or quantization_config is not None:
            raise ValueError("pass load_in_4bit / load_in_8bit or a quantization config, not both")
        quantization_config = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    split = needs_placement(device_map, max_memory)
    if split:
        if quantization is not None or quantization_config is not None:
            raise NotImplementedError("quantized weights with disk offload are not implemented in moelm")
        computes = {k: v for k, v in device_map.items() if str(v) != "disk"} if isinstance(device_map, dict) \
            else device_map
        device = place(computes or (device or "cpu"), device)
    elif device_map is not None:
        device = place(device_map, device)
    qconfig = resolve(quantization, quantization_config, device)
    path = with_revision(path, revision)
    directory = resolve_model_dir(path, subfolder)
    if config is None:
        data = read_config_json(directory)
        config = cls.config_class.from_dict(data) if cls.config_class is not PretrainedConfig else \
            AutoConfig.from_dict(data)
    apply_kwargs(config, kwargs, attn_implementation)
    config.validate()
    ckpt = SafetensorsCheckpoint(directory)
    try:
        dtype = torch_dtype if torch_dtype is not None and dtype == "auto" else dtype
        if dtype == "auto" or dtype is None:
            dtype = config.torch_dtype or checkpoint_dtype(ckpt)
        if isinstance(dtype, dict):
            raise NotImplementedError(f"dtype={dtype!r}: a dtype per submodule is not implemented in moelm; pass one")
        dtype = dtype_from_str(dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype}: the model's weights need a floating-point dtype")
        config.dtype = str(dtype).removeprefix("torch.")  # the loaded one, as transformers
        device = compute_device(device) if device is not None else torch.device("cpu")
        untie_a_stored_head(config, ckpt)
        with torch.device("meta"):
            model = cls(config)
        model._cast(dtype)
        stored = config.extra.get("quantization_config")
        if stored is not None:  # the checkpoint's weights are quantized already
            if qconfig is not None and per_expert(qconfig):
                raise ValueError(f"quantization experts / hot_experts were requested, but {directory} is stored "
                                 "quantized; load an unquantized checkpoint")
            if layout is not None or split:
                raise NotImplementedError("quantized checkpoints under tensor/expert parallelism or with disk offload "
                                          "are not implemented in moelm")
            qconfig = read_quantization_config(stored, model, qconfig, EXPERT_PARTS.get(config.model_type, {}))
        if qconfig is not None:
            quantize_modules(model, qconfig)
        if layout is not None:
            from ..parallel.apply import parallelize

            parallelize(model, layout, device.type)
        placed = plan(model, device_map, device, max_memory, offload_folder) if split else {"": str(device)}
        disk = disk_layers(placed)
        report = {}
        loading = dict(ignore_mismatched_sizes=ignore_mismatched_sizes, report=report)
        if disk:
            model.kept_aside = load_offloaded(model, ckpt, device, disk, offload_folder, progress, mmap, loading)
        else:
            model.to_empty(device=device)
            model.tie_weights()
            model.kept_aside = load_checkpoint(model, ckpt, progress=progress, mmap=mmap, **loading)
        fill_tied_head(model)
        # ERNIE's MTP head, when the checkpoint has one: left in the file (mapped) until its first use
        mtp = hasattr(model, "mtp_in") and not disk and layout is None and model.mtp_in(model.kept_aside)
    except CheckpointError as e:
        if not kwargs:
            raise
        changed = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise type(e)(f"{e} (from_pretrained({changed}) changed config.json's config; the checkpoint must "
                       "fit the changed one)") from None
    finally:
        ckpt.close()
    if backend is not None:
        prepare = functools.partial(apply_backend, backend=backend)
    elif fast and layout is not None:
        from ..parallel.apply import optimize_sharded

        prepare = optimize_sharded
    elif fast and not disk:  # offloaded models run the plain modules
        prepare = optimize
    else:
        prepare = None
    if prepare is not None:
        prepare(model)
    if mtp:
        model.build_mtp = functools.partial(build_mtp, prepare=prepare)
    if isinstance(model, GenerationMixin) and (directory / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.name_or_path = str(path)
    model.hf_device_map = placed
    if output_loading_info:
        return model.eval(), {**report, "error_msgs": []}
    return model.eval()


def build_mtp(model, prepare=None) -> None:
    """ERNIE's MTP head from the tensors loading kept aside (model.mtp builds it at its first use, so that decoding
    without it holds none of its weights: 0.49 GB in fp32 on ERNIE-4.5-21B-A3B), given the fast paths (or the
    backend) the rest of the model has."""
    model.kept_aside = model.take_mtp(model.kept_aside)
    if prepare is not None:
        prepare(model)


def apply_kwargs(config, kwargs: dict, attn_implementation: str | None = None) -> None:
    """from_pretrained's other keyword arguments, which must be config fields, set on the config; as transformers,
    num_labels or label2id give the labels (id2label) too."""
    kwargs = labels(config, dict(kwargs))
    unknown = sorted(k for k in kwargs if not config.has_field(k))
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: not "
                        f"a loader option nor a field of {type(config).__name__}")
    for key, value in kwargs.items():
        setattr(config, key, value)
    if attn_implementation:
        config.attn_implementation = attn_implementation


def labels(config, kwargs: dict) -> dict:
    """kwargs with num_labels / label2id turned into id2label (LABEL_i names for a new count, as transformers)."""
    count, label2id = kwargs.pop("num_labels", None), kwargs.pop("label2id", None)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"num_labels must be a positive integer, got {count!r}")
    if label2id is not None and kwargs.get("id2label") is None:
        kwargs["id2label"] = {i: label for label, i in label2id.items()}
    if kwargs.get("id2label") is not None:
        kwargs["id2label"] = {int(i): label for i, label in kwargs["id2label"].items()}
        if count is not None and count != len(kwargs["id2label"]):
            raise ValueError(f"num_labels={count} but id2label / label2id name {len(kwargs['id2label'])} labels")
    elif count is not None and count != config.num_labels:
        kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(count)}
    return kwargs


def load_offloaded(model, ckpt, device, disk: list[str], folder, progress, mmap: bool, loading: dict) -> dict:
    """Load the resident parameters (mapped with mmap), then each disk layer alone: allocated, read, written to
    `folder`, freed (loading: load_checkpoint's keyword arguments)."""
    def under(names):
        return lambda n: any(n.startswith(d + ".") for d in names)

    on_disk = under(disk)
    materialize(model, device, skip=on_disk)
    model.tie_weights()
    kept = load_checkpoint(model, ckpt, progress=progress, only=lambda n: not on_disk(n), mmap=mmap, **loading)
    for name in disk:
        layer = model.get_submodule(name)
        materialize(layer, torch.device("cpu"))
        load_checkpoint(model, ckpt, progress=False, only=under([name]), **loading)
        offload(layer, name, folder, device)
    return kept


def place(device_map, device=None) -> torch.device:
    """The one device a device_map puts the model on: "cpu", "cuda[:N]", an int (a GPU), "auto" / "balanced" /
    "balanced_low_0" / "sequential" (the GPU when there is one, else the CPU), or a dict whose values all name one
    device. A map that would split the model over several devices or offload it to disk is not implemented yet."""
    if isinstance(device_map, dict):
        targets = {f"cuda:{v}" if isinstance(v, int) else str(v) for v in device_map.values()}
        if len(targets) != 1:
            raise NotImplementedError(f"device_map places modules on {sorted(targets)}: splitting a model over "
                                      "several devices is not implemented in moelm yet")
        device_map = targets.pop()
    if isinstance(device_map, torch.device):
        device_map = str(device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        gpus = torch.cuda.device_count()
        if gpus > 1:
            raise NotImplementedError(f"device_map={device_map!r} would split the model over {gpus} GPUs, which "
                                      "moelm does not do yet; pass device_map='cuda:0' or device='cuda:0'")
        device_map = "cuda:0" if gpus else "cpu"
    if device_map == "disk":
        raise NotImplementedError("device_map='disk' (offloading) is not implemented in moelm yet")
    target = compute_device(device_map, "device_map", "a device, 'auto', 'balanced', 'sequential' or a dict of "
                                                      "module -> device")
    if device is not None and torch.device(device) != target:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; give one of them")
    return target


def untie_a_stored_head(config, ckpt) -> None:
    """A config that ties the LM head to the embedding, and a checkpoint that stores both with different values: the
    stored head is used (config.tie_word_embeddings = False), as transformers 5 does, said on stderr."""
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if not (getattr(config, "tie_word_embeddings", False) and {head, embedding} <= set(ckpt.keys())):
        return
    same = ckpt.shape(head) == ckpt.shape(embedding) and ckpt.dtype(head) == ckpt.dtype(embedding)
    if same:  # the files' pages, compared a block of rows at a time (no copy of a 1 GB embedding)
        a, b = (m if (m := ckpt.mapped(k)) is not None else ckpt.get(k) for k in (head, embedding))
        same = all(torch.equal(a[i:i + 4096], b[i:i + 4096]) for i in range(0, a.shape[0], 4096))
    if not same:
        print(f"moelm: config.json ties {head} to {embedding}, but the checkpoint stores both with different "
              f"values: the stored {head} is used (as transformers); set tie_word_embeddings: false to say so",
              file=sys.stderr)
        config.tie_word_embeddings = False


def compute_device(spec, what: str = "device", kinds: str = "a device") -> torch.device:
    """torch.device(spec) where moelm can compute: the CPU, or a CUDA device this machine has (an int is a GPU, as
    transformers); anything else is a ValueError naming `what`."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = f"cuda:{spec}"
    try:
        target = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}={spec!r} is not {kinds}") from None
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{what}={spec!r}: no such CUDA device here ({torch.cuda.device_count()} GPUs)")
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}={spec!r}: moelm runs on cpu and cuda")
    return target


def checkpoint_dtype(ckpt) -> torch.dtype:
    """The dtype of the checkpoint's first float tensor (not a quantization scale, not ERNIE's fp32 correction
    bias); fp32 when there is none."""
    for key in ckpt.keys():
        dt = ckpt.dtype(key)
        if dt.is_floating_point and not key.endswith(("e_score_correction_bias", "weight_scale")):
            return dt
    return torch.float32
