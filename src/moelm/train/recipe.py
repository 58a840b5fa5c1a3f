"""A finetune recipe: YAML in NeMo AutoModel's spirit (model, dataset, validation_dataset, step, optimizer,
lr_scheduler, distributed, moe, moe_metrics, peft, checkpoint, seed), read into dataclasses whose fields are the
keys. An unknown key, a wrong type or an inconsistent size is an error naming the key; `--section.key=value`
overrides a key."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DataConfig


class RecipeError(ValueError):
    pass


@dataclass
class ModelSection:
    name_or_path: str = ""  # checkpoint directory, hub id in the local cache, or a named config (moelm new)
    tokenizer: str | None = None  # tokenizer directory when name_or_path has none (a named config)
    dtype: str = "float32"  # the weights' dtype: float32 or bfloat16
    autocast: str | None = None  # "bfloat16": compute under torch.autocast, weights and optimizer in `dtype`
    config_overrides: dict = field(default_factory=dict)  # config.json keys changed before building the model
    quantization: str | None = None  # "int8" / "int4": frozen quantized base (LoRA only)


@dataclass
class StepSection:
    global_batch_size: int = 8  # examples per optimizer step, over all data-parallel ranks
    local_batch_size: int = 2  # examples per forward on one rank; accumulation = global / (local * dp)
    max_steps: int = 100
    num_epochs: int | None = None  # stop after this many passes too (whichever comes first)
    shuffle: bool = True  # a new order each epoch, from the seed
    val_every_steps: int = 0  # 0: validate only at the end (when a validation_dataset is given)
    log_every_steps: int = 1


@dataclass
class OptimizerSection:
    name: str = "AdamW"  # AdamW or Adam (torch.optim)
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null: no clipping
    fused: bool = True  # torch's fused kernel (one pass over each tensor); false: its per-tensor loop


@dataclass
class SchedulerSection:
    warmup_steps: int = 0  # lr rises linearly from 0 to lr (as transformers' schedules)
    decay: str = "constant"  # constant; linear (to 0 at max_steps); cosine (to min_lr at max_steps)
    min_lr: float = 0.0  # cosine only


@dataclass
class DistributedSection:
    fsdp: int | None = None  # FSDP2 ranks of the dense weights; null: the whole world
    ep: int = 1  # expert-parallel ranks (divides the experts and the data-parallel ranks)
    tp: int = 1
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward


@dataclass
class MoeSection:
    aux_loss_coef: float | None = None  # null: the config's router_aux_loss_coef
    gate_bias_update_factor: float = 0.0  # ERNIE's aux-free balancing (NeMo's default 0: off)
    # ERNIE's MTP head (a checkpoint's model.mtp_*): its loss's weight; null: config.json's multi_token_pred_lambda,
    # else 0.3 as in ERNIE's training code; 0: the head is not trained
    mtp_loss_coef: float | None = None


@dataclass
class MoeMetricsSection:
    """NeMo AutoModel's moe_metrics: the experts' load balance in metrics.jsonl (MoE models, logged steps)."""
    enabled: bool = True  # NeMo's default is false; moelm logs the brief metrics unless told not to
    mode: str = "brief"  # brief: aggregates and the top/bottom experts; detailed: per layer too
    detailed_every_steps: int | None = None  # detailed mode: per layer on these steps only; null: every logged step
    top_k_experts: int = 5  # the most and least used experts logged one by one; 0: none


@dataclass
class PeftSection:
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_parameters: list[str] = field(default_factory=list)
    use_rslora: bool = False


@dataclass
class CheckpointSection:
    dir: str = "checkpoints"
    every_steps: int = 0  # 0: only the final model
    keep_last: int = 2  # step checkpoints kept (older ones are deleted after a new one is in place)
    merge: bool = False  # LoRA: also write the merged model as a hub checkpoint (final/merged)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DataConfig | None = None
    validation_dataset: DataConfig | None = None
    step: StepSection = field(default_factory=StepSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    moe: MoeSection = field(default_factory=MoeSection)
    moe_metrics: MoeMetricsSection = field(default_factory=MoeMetricsSection)
    peft: PeftSection | None = None  # absent: full-parameter fine-tuning
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    seed: int = 1234
    source: str = field(default="recipe", compare=False)  # where it came from, for error messages

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


CHOICES = {"optimizer.name": ("AdamW", "Adam"), "lr_scheduler.decay": ("constant", "linear", "cosine"),
           "model.dtype": ("float32", "bfloat16"), "model.autocast": (None, "bfloat16"),
           "model.quantization": (None, "int8", "int4"), "moe_metrics.mode": ("brief", "detailed")}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` with `section.key=value` overrides (values in YAML syntax)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except DuplicateKey as e:
        raise RecipeError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item, path)
    return build_recipe(data, str(path))


class DuplicateKey(Exception):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one section")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_override(data: dict, item: str, source) -> None:
    """`a.b.c=value` into the nested dict (`--` prefix allowed)."""
    key, eq, value = item.removeprefix("--").partition("=")
    if not eq or not key or not item.startswith("--"):
        raise RecipeError(f"override {item!r}: expected --section.key=value")
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part!r} in {source} is not a section")
    node[last] = yaml.safe_load(value) if value else None


def build_recipe(data: dict, source: str = "recipe") -> Recipe:
    _refuse_unknown(data, source)
    recipe = _build(Recipe, data, source, "")
    recipe.source = source
    check(recipe)
    return recipe


# NeMo AutoModel's recipe keys that moelm takes under another name
NEMO_NAMES = {"step_scheduler": "step", "rng": "seed", "model.pretrained_model_name_or_path": "model.name_or_path",
              "model.torch_dtype": "model.dtype", "checkpoint.checkpoint_dir": "checkpoint.dir",
              "distributed.ep_size": "distributed.ep", "distributed.tp_size": "distributed.tp",
              "dataset.path_or_dataset": "dataset.path",
              "validation_dataset.path_or_dataset": "validation_dataset.path"}


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "source"}


def _unknown_keys(cls, data, prefix: str = "") -> dict[str, tuple[type, list[str]]]:
    """{section prefix: (its dataclass, the keys given there that it does not take)}, through every section."""
    if not isinstance(data, dict):
        return {}
    fields, found = _fields(cls), {}
    for key, value in data.items():
        if key not in fields:
            found.setdefault(prefix, (cls, []))[1].append(prefix + str(key))
            continue
        for kind in typing.get_args(fields[key]) or (fields[key],):
            if dataclasses.is_dataclass(kind):
                found.update(_unknown_keys(kind, value, f"{prefix}{key}."))
    return found


def _refuse_unknown(data, source: str) -> None:
    """One error naming every key the recipe has that moelm does not take (a NeMo AutoModel recipe has many)."""
    found = _unknown_keys(Recipe, data)
    if not found:
        return
    keys = [k for _, ks in found.values() for k in ks]
    takes = [f"{prefix.rstrip('.') or 'a recipe'} takes {', '.join(sorted(_fields(cls)))}"
             for prefix, (cls, _) in found.items()]
    renamed = [f"{k} is {NEMO_NAMES[k]}" for k in keys if k in NEMO_NAMES]
    raise RecipeError(f"{source}: unknown key{'s' * (len(keys) > 1)} {', '.join(map(repr, keys))}; "
                      + "; ".join(takes) + (f" (NeMo AutoModel's {', '.join(renamed)} here)" if renamed else ""))


def _build(cls, data, source: str, prefix: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)  # unknown keys: refused before (_refuse_unknown)
    values = {}
    for name, value in data.items():
        values[name] = _value(hints[name], value, source, prefix + name)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'recipe'}: {e}") from None


def _value(hint, value, source: str, key: str):
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    optional = union and type(None) in typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{source}: {key} may not be null")
    if key in CHOICES and value not in CHOICES[key]:
        raise RecipeError(f"{source}: {key} must be one of {', '.join(map(str, CHOICES[key]))}, got {value!r}")
    errors = []
    for kind in args:
        if dataclasses.is_dataclass(kind):
            return _build(kind, value, source, key + ".")
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                errors.append(kind)
                continue
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            items = typing.get_args(kind)
            if origin is tuple and len(value) != len(items):
                raise RecipeError(f"{source}: {key} must be {len(items)} values, got {value!r}")
            return origin(_value(items[0], v, source, key) if items else v for v in value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
        errors.append(kind)
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise RecipeError(f"{source}: {key} must be {names}, got {value!r}")


def check(recipe: Recipe) -> None:
    """Sizes and settings that cannot work, named (those needing the world size are checked by the trainer)."""
    src, step = recipe.source, recipe.step
    if recipe.dataset is None:
        raise RecipeError(f"{src}: a recipe needs a dataset section (kind, path)")
    if not recipe.model.name_or_path:
        raise RecipeError(f"{src}: model.name_or_path is required")
    for key in ("global_batch_size", "local_batch_size", "max_steps", "log_every_steps"):
        if getattr(step, key) < 1:
            raise RecipeError(f"{src}: step.{key} must be >= 1, got {getattr(step, key)}")
    if step.global_batch_size % step.local_batch_size:
        raise RecipeError(f"{src}: step.local_batch_size ({step.local_batch_size}) must divide "
                          f"step.global_batch_size ({step.global_batch_size})")
    if recipe.distributed.ep < 1 or recipe.distributed.tp < 1:
        raise RecipeError(f"{src}: distributed.ep and distributed.tp must be >= 1")
    if recipe.model.quantization and recipe.peft is None:
        raise RecipeError(f"{src}: model.quantization ({recipe.model.quantization}) freezes a quantized base: it "
                          "needs a peft section (LoRA)")
    if recipe.checkpoint.keep_last < 1:
        raise RecipeError(f"{src}: checkpoint.keep_last must be >= 1")
    _check_numbers(recipe)
    metrics = recipe.moe_metrics
    if metrics.top_k_experts < 0:
        raise RecipeError(f"{src}: moe_metrics.top_k_experts must be >= 0, got {metrics.top_k_experts}")
    if metrics.detailed_every_steps is not None and metrics.detailed_every_steps < 1:
        raise RecipeError(f"{src}: moe_metrics.detailed_every_steps must be >= 1 or null, got "
                          f"{metrics.detailed_every_steps}")
    if metrics.detailed_every_steps is not None and metrics.mode != "detailed":
        raise RecipeError(f"{src}: moe_metrics.detailed_every_steps applies to mode detailed, not {metrics.mode}")


def _check_numbers(recipe: Recipe) -> None:
    """Values out of their range, named (rather than a run that silently does something else, or torch's error)."""
    src, opt, sched = recipe.source, recipe.optimizer, recipe.lr_scheduler
    minimum = {"step.num_epochs": (recipe.step.num_epochs, 1), "step.val_every_steps": (recipe.step.val_every_steps, 0),
               "checkpoint.every_steps": (recipe.checkpoint.every_steps, 0),
               "lr_scheduler.warmup_steps": (sched.warmup_steps, 0), "optimizer.lr": (opt.lr, 0),
               "optimizer.eps": (opt.eps, 0), "optimizer.weight_decay": (opt.weight_decay, 0),
               "lr_scheduler.min_lr": (sched.min_lr, 0), "distributed.fsdp": (recipe.distributed.fsdp, 1)}
    for key, (value, low) in minimum.items():
        if value is not None and not (math.isfinite(value) and value >= low):
            raise RecipeError(f"{src}: {key} must be >= {low}{' or null' * (key in NULLABLE)}, got {value}")
    if not all(0 <= b < 1 for b in opt.betas):
        raise RecipeError(f"{src}: optimizer.betas must be in [0, 1), got {list(opt.betas)}")
    if opt.max_grad_norm is not None and not (math.isfinite(opt.max_grad_norm) and opt.max_grad_norm > 0):
        raise RecipeError(f"{src}: optimizer.max_grad_norm must be > 0 or null (no clipping), got {opt.max_grad_norm}")
    if sched.min_lr and sched.decay != "cosine":
        raise RecipeError(f"{src}: lr_scheduler.min_lr applies to decay cosine, not {sched.decay}")
    if not 0 <= recipe.seed < 2 ** 63:
        raise RecipeError(f"{src}: seed must be in [0, 2**63), got {recipe.seed}")
    if not recipe.checkpoint.dir:
        raise RecipeError(f"{src}: checkpoint.dir must be a directory, got an empty string")


NULLABLE = ("step.num_epochs", "distributed.fsdp")
