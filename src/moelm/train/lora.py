"""LoRA on a moelm model, saved and loaded in peft's format (peft 0.21, transformers 5).

- Linear (nn.Linear, moelm's int8/int4 QuantizedLinear): out = base(x) + dropout(x) @ A.T @ B.T * scale, A [r, in],
  B [out, r]. The module keeps its name and parameters; its class becomes a subclass holding lora_A, lora_B.
- Stacked experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]), per expert: A [E, r, in], B [E, out, r], applied
  to the rows routed to each expert by grouped matmuls (Experts.project), never as an [E, out, in] delta. In the
  module: lora_A.<name>, lora_B.<name>. In peft's file (ParamWrapper): lora_A.weight [E*r, in] (expert-slowest
  rows), lora_B.weight [out, r*E] (expert-fastest columns); when both are targeted the wrappers nest in the order the
  parameters are registered, so gate_up_proj's tensors are under `experts.base_layer.` and down_proj's under
  `experts.`.

Adapters are fp32 (fp64 on an fp64 base), created in module order from the global torch RNG: A kaiming-uniform as
nn.Linear's default, B zeros (init_lora_weights=False: both kaiming-uniform). Every base parameter is frozen.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..inference.bnb import BnbExperts, BnbLinear
from ..inference.modules import FastExperts
from ..inference.quantization import PackedLinear, QuantizedExperts
from ..io.files import fsync_dir, fsync_file, locked, make_dir, temp_folder, writing
from ..nn.moe import Experts, grouped_linear
from ..parallel.experts import ExpertsEP, ExpertsTP, full_tensor

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # registration order, as in transformers' experts modules
HEADS = ("lm_head", "score")  # left out of "all-linear", as peft leaves out the output layer
# moelm (hub) module names -> transformers 5's, by model type (what peft's file names)
RENAMES = {"phimoe": ((".block_sparse_moe.", ".mlp."),),
           "ernie4_5_moe": ((".mlp.moe_statics", ".mlp.gate.moe_statics"),)}
# modules peft's modules_to_save may name (their tensors saved whole in the adapter): ERNIE's correction biases, which
# the aux-free balancing updates during a LoRA fine-tune
SAVABLE = ("moe_statics",)
# peft >= 0.18 on transformers 5 rewrites these target_modules names of ERNIE 4.5 MoE into its experts' parameters
# (a v4 -> v5 conversion, qwen2_moe's), so Linears with these names are written as target_parameters "<path>.weight"
PEFT_REWRITTEN = {"ernie4_5_moe": ("gate_proj", "up_proj", "down_proj")}


@dataclass
class LoraConfig:
    """peft's LoraConfig fields that moelm implements. target_modules: module-name suffixes (or full names), a regex
    string (re.fullmatch), or "all-linear" (every Linear but the output head); target_parameters: parameter-name
    suffixes of stacked experts (e.g. "experts.gate_up_proj") or of a Linear's "weight"; modules_to_save: only
    "moe_statics" (ERNIE's correction biases, saved whole in the adapter as peft saves such modules)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: moelm LoRA trains no biases (bias='none')")
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not supported (True or False)")
        if not (self.modules_to_save is None or isinstance(self.modules_to_save, list)
                and all(m in SAVABLE for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save={self.modules_to_save!r} is not supported: only "
                             f"{', '.join(SAVABLE)} (ERNIE's correction biases)")
        if not (self.target_modules or self.target_parameters):
            raise ValueError("LoraConfig needs target_modules or target_parameters")
        for name, value in (("target_modules", self.target_modules), ("target_parameters", self.target_parameters)):
            ok = value is None or isinstance(value, list) and all(isinstance(t, str) for t in value)
            if not ok and not (name == "target_modules" and isinstance(value, str)):
                raise ValueError(f"{name} must be a list of names{' or a string' * (name == 'target_modules')}, "
                                 f"got {value!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_peft(cls, d: dict) -> LoraConfig:
        """From an adapter_config.json dict: moelm's fields, peft's metadata, and peft's other options only at the
        value that turns them off (anything else is an error naming it)."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type {d.get('peft_type')!r} is not supported (LORA only)")
        ours = {f.name for f in fields(cls)}
        bad = {k: v for k, v in d.items() if k not in ours and k not in PEFT_METADATA and not _off(v)}
        if bad:
            raise ValueError(f"unsupported peft LoRA options: {', '.join(f'{k}={v!r}' for k, v in bad.items())}")
        return cls(**{k: v for k, v in d.items() if k in ours})


def _off(value) -> bool:
    """Whether a peft option's value turns it off (0 is a value: layers_to_transform=0 is layer 0)."""
    return value is None or value is False or isinstance(value, (dict, list, str)) and not value


PEFT_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
                 "inference_mode", "megatron_core", "qalora_group_size"}


# ---------------------------------------------------------------- the LoRA modules

def _dropout(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return F.dropout(x, module.lora_dropout, module.training) if module.lora_dropout else x


class LoraLinearMixin:
    """Mixed into a Linear's class: base(x) + dropout(x) @ lora_A.T @ lora_B.T * lora_scaling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        h = F.linear(F.linear(_dropout(self, x, self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (h * self.lora_scaling).to(out.dtype)


class LoraExpertsMixin:
    """Mixed into a stacked experts' class: each targeted projection of the rows sorted by expert gets
    (dropout(x) @ A[e].T @ B[e].T) * lora_scaling for its rows' expert e, by two grouped matmuls."""

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = super().project(name, x, counts)
        if name not in self.lora_A:
            return out
        a, b = self.lora_A[name], self.lora_B[name]
        path = "auto" if a.shape[1] * a.element_size() % 16 == 0 else "bmm"  # torch._grouped_mm: 16-byte rows
        h = grouped_linear(_dropout(self, x, a.dtype), a, counts, path)  # [N, r]
        return out + (grouped_linear(h, b, counts, path) * self.lora_scaling).to(out.dtype)


LORA = (LoraLinearMixin, LoraExpertsMixin)


class TrainableQuantizedExperts(QuantizedExperts):
    """int8/int4 experts with LoRA on them: always the grouped form (Experts.forward, the chosen experts dequantized:
    QuantizedExperts.project), which QuantizedExperts itself takes only when gradients are needed."""

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if isinstance(self, LoraExpertsMixin):
            return Experts.forward(self, x, index, weights)
        return super().forward(x, index, weights)


_CLASSES: dict[tuple[type, type], type] = {}


def _lora_class(mixin: type, base: type) -> type:
    """The class (mixin, base), made once and named in this module (so that models with it pickle)."""
    if (mixin, base) not in _CLASSES:
        name = f"Lora{base.__name__}"
        while name in globals():
            name += "_"
        cls = type(name, (mixin, base), {"lora_base": base, "__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _CLASSES[mixin, base] = cls
    return _CLASSES[mixin, base]


# ---------------------------------------------------------------- applying

def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze every base parameter and add trainable adapters to the targets of `config`, in place (in module order,
    from the global torch RNG). Returns the model."""
    if is_lora(model):
        raise ValueError("this model already has LoRA adapters")
    for name, module in model.named_modules():
        if isinstance(module, (BnbLinear, BnbExperts)):
            raise NotImplementedError(f"{name}: bitsandbytes weights are not supported by moelm LoRA; load the base "
                                      "with quantization='int8' or 'int4' (moelm's) instead")
    linears, experts = _targets(model, config)
    saved = _saved_modules(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in saved:
        model.get_submodule(name).lora_saved = True
    for name, module in list(model.named_modules()):
        if name in linears:
            _add_linear(module, config)
        elif name in experts:
            _add_experts(module, experts[name], config)
        elif type(module) is QuantizedExperts:
            module.__class__ = TrainableQuantizedExperts  # gradients reach the adapters before it
    fusions = (("fused_qkv", ("q_proj", "k_proj", "v_proj")), ("fused_gate_up", ("gate_proj", "up_proj")))
    for module in model.modules():  # a fused q/k/v or gate/up (inference) would bypass the adapters
        for fused, parts in fusions:
            if getattr(module, fused, None) is not None and any(isinstance(getattr(module, p, None), LoraLinearMixin)
                                                                 for p in parts):
                setattr(module, fused, None)
    return model


def _saved_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules named by modules_to_save (name suffixes), each entry matching at least one."""
    out = []
    for target in config.modules_to_save or []:
        hit = [n for n, _ in model.named_modules() if _matches((n,), target)]
        if not hit:
            raise ValueError(f"modules_to_save entry {target!r} matches no module of the model")
        out += hit
    return out


def _peft_name(model: nn.Module, name: str) -> str:
    """A module or parameter name as transformers 5 (and so peft's file) spells it."""
    for ours, theirs in RENAMES.get(getattr(getattr(model, "config", None), "model_type", None), ()):
        name = name.replace(ours, theirs)
    return name


def _matches(names: tuple[str, ...], target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def _targets(model: nn.Module, config: LoraConfig) -> tuple[set[str], dict[str, list[str]]]:
    """(names of the Linears to adapt, {experts module name: its parameters to adapt}); errors name targets that
    match nothing or something moelm cannot adapt."""
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantizedExperts))
    modules = [(n, m) for n, m in model.named_modules() if n and not n.startswith(inside)]
    linear = {n for n, m in modules if isinstance(m, (nn.Linear, PackedLinear))}
    linears, experts = set(), {}
    spec = config.target_modules
    if isinstance(spec, str) and spec.lower() == "all-linear":
        linears = {n for n in linear if n not in HEADS}
    elif isinstance(spec, str):
        hit = [n for n, _ in modules if re.fullmatch(spec, n) or re.fullmatch(spec, _peft_name(model, n))]
        _only_linears(model, hit, linear, f"target_modules {spec!r}")
        linears = set(hit)
    else:
        for target in spec or []:
            hit = [n for n, _ in modules if _matches((n, _peft_name(model, n)), target)]
            _only_linears(model, hit, linear, f"target_modules entry {target!r}")
            linears.update(hit)
    for target in config.target_parameters or []:
        hit = [(n, p) for n, m in modules for p in _param_names(m)
               if _matches((f"{n}.{p}", _peft_name(model, f"{n}.{p}")), target)]
        if not hit:
            raise ValueError(f"target_parameters entry {target!r} matches no parameter of the model")
        for n, p in hit:
            m = model.get_submodule(n)
            if isinstance(m, (Experts, QuantizedExperts)) and p in EXPERT_PARAMS:
                experts.setdefault(n, []).append(p)
            elif n in linear and p == "weight":
                linears.add(n)
            else:
                raise ValueError(f"target_parameters entry {target!r} matches {n}.{p} ({type(m).__name__}): only "
                                 f"the stacked experts' {' and '.join(EXPERT_PARAMS)} and Linear weights take LoRA")
    for n, m in model.named_modules():
        if n in linears and isinstance(getattr(m, "weight", None), DTensor):
            raise NotImplementedError(f"{n}: LoRA on a tensor-parallel (DTensor) Linear is not supported; apply "
                                      "LoRA before sharding")
        if n in experts and isinstance(m, ExpertsTP):
            raise NotImplementedError(f"{n}: LoRA on tensor-parallel experts (ExpertsTP) is not supported; use "
                                      "expert parallelism (ExpertsEP) or none")
    return linears, {n: [p for p in EXPERT_PARAMS if p in ps] for n, ps in experts.items()}


def _param_names(module: nn.Module) -> list[str]:
    if isinstance(module, QuantizedExperts):
        return list(EXPERT_PARAMS)
    if isinstance(module, PackedLinear):
        return ["weight"]
    return [n for n, _ in module.named_parameters(recurse=False)]


def _only_linears(model: nn.Module, hit: list[str], linear: set[str], what: str):
    if not hit:
        raise ValueError(f"{what} matches no module of the model")
    for n in hit:
        if n not in linear:
            m = model.get_submodule(n)
            hint = "; stacked experts are targeted with target_parameters" if isinstance(
                m, (Experts, QuantizedExperts)) else ""
            raise ValueError(f"{what} matches {n} ({type(m).__name__}), which is not a Linear{hint}")


def _adapter_dtype(module: nn.Module) -> torch.dtype:
    t = next((p for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    return torch.float64 if t is not None and t.dtype == torch.float64 else torch.float32


def _device(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    return t.device if t is not None else next(iter(module.buffers())).device


def _init_a(shape, dtype, device) -> torch.Tensor:
    """kaiming-uniform(a=sqrt(5)) as nn.Linear's (and peft's) lora_A: U(-1/sqrt(in), 1/sqrt(in)), on a 2-D view
    [rows, in] (for experts: peft's [E*r, in] order)."""
    a = torch.empty(math.prod(shape[:-1]), shape[-1], dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a.view(*shape)


def _init_b(shape, dtype, device, config: LoraConfig) -> torch.Tensor:
    if config.init_lora_weights:
        return torch.zeros(*shape, dtype=dtype, device=device)
    return _init_a(shape, dtype, device)


def _add_linear(module: nn.Module, config: LoraConfig):
    dtype, device = _adapter_dtype(module), _device(module)
    a = _init_a((config.r, module.in_features), dtype, device)
    b = _init_b((module.out_features, config.r), dtype, device, config)
    module.__class__ = _lora_class(LoraLinearMixin, type(module))
    module.lora_A, module.lora_B = nn.Parameter(a), nn.Parameter(b)
    module.lora_scaling, module.lora_dropout = config.scaling, config.lora_dropout


def _add_experts(module: nn.Module, params: list[str], config: LoraConfig):
    """A [E, r, in], B [E, out, r] per targeted parameter. Under expert parallelism (ExpertsEP: num_experts is the
    local count) every rank draws the adapters of all experts, the same on each, and keeps its own slice."""
    base = {FastExperts: Experts, QuantizedExperts: TrainableQuantizedExperts}.get(type(module), type(module))
    ranks, rank = _ep(module)
    dtype, device = _adapter_dtype(module), _device(module)
    mine = slice(rank * module.num_experts, (rank + 1) * module.num_experts)
    lora_a, lora_b = {}, {}
    for p in params:
        e, out, inp = _expert_shape(module, p)
        total = e * ranks
        lora_a[p] = nn.Parameter(_init_a((total, config.r, inp), dtype, device)[mine].clone())
        lora_b[p] = nn.Parameter(_init_b((total, out, config.r), dtype, device, config)[mine].clone())
    module.__class__ = _lora_class(LoraExpertsMixin, base)
    module.lora_A, module.lora_B = nn.ParameterDict(lora_a), nn.ParameterDict(lora_b)
    module.lora_scaling, module.lora_dropout = config.scaling, config.lora_dropout


def _expert_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(local experts, out, in) of a stacked projection."""
    if isinstance(module, QuantizedExperts):
        return module.shapes[name]
    return tuple(getattr(module, name).shape)


def is_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LORA) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what the optimizer trains), in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, LoraLinearMixin):
            out += [m.lora_A, m.lora_B]
        elif isinstance(m, LoraExpertsMixin):
            out += [*m.lora_A.values(), *m.lora_B.values()]
    return out


# ---------------------------------------------------------------- peft's layout

def _entries(model: nn.Module):
    """For every adapter tensor: (peft key, parameter name, parameter, owning module, kind); kind "linear" (same
    layout), "expert_A" or "expert_B" (see _to_peft), "saved" (a tensor of a modules_to_save module, whole)."""
    for name, module in model.named_modules():
        key = f"base_model.model.{_peft_name(model, name)}"
        if isinstance(module, LoraLinearMixin):
            yield f"{key}.lora_A.weight", f"{name}.lora_A", module.lora_A, module, "linear"
            yield f"{key}.lora_B.weight", f"{name}.lora_B", module.lora_B, module, "linear"
        elif isinstance(module, LoraExpertsMixin):
            targeted = [p for p in EXPERT_PARAMS if p in module.lora_A]
            for i, p in enumerate(targeted):  # peft nests one wrapper per parameter: the first is innermost
                nest = "base_layer." * (len(targeted) - 1 - i)
                yield f"{key}.{nest}lora_A.weight", f"{name}.lora_A.{p}", module.lora_A[p], module, "expert_A"
                yield f"{key}.{nest}lora_B.weight", f"{name}.lora_B.{p}", module.lora_B[p], module, "expert_B"
        if getattr(module, "lora_saved", False):  # peft's modules_to_save: the module's own tensors, whole
            for p, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                yield f"{key}.{p}", f"{name}.{p}", t, module, "saved"


def _to_peft(kind: str, t: torch.Tensor) -> torch.Tensor:
    """Ours -> peft's: A [E, r, in] -> [E*r, in]; B [E, out, r] -> [out, r*E] (column j*E + e is B[e][:, j])."""
    if kind == "expert_A":
        return t.reshape(-1, t.shape[-1])
    if kind == "expert_B":
        return t.permute(1, 2, 0).reshape(t.shape[1], -1)
    return t


def _from_peft(kind: str, t: torch.Tensor, experts: int) -> torch.Tensor:
    if kind == "expert_A":
        return t.reshape(experts, -1, t.shape[-1])
    if kind == "expert_B":
        return t.reshape(t.shape[0], -1, experts).permute(2, 0, 1)
    return t


def _ep(module: nn.Module) -> tuple[int, int]:
    """(ranks, this rank) of the expert-parallel group holding `module`'s experts; (1, 0) without one."""
    if isinstance(module, ExpertsEP):
        return module.ep_mesh.size(), module.ep_mesh.get_local_rank()
    return 1, 0


def _gather(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return full_tensor(t.detach(), ("shard", 0, module.ep_mesh)) if isinstance(module, ExpertsEP) else t


def lora_state_dict(model: nn.Module, full=None) -> dict[str, torch.Tensor]:
    """The adapters under peft's keys and layouts (base_model.model.<transformers module path>...). full(name,
    tensor) -> the whole tensor from this rank's (name: the moelm parameter name); by default a DTensor's
    full_tensor() and expert-parallel slices gathered over their group (collectives: every rank calls this)."""
    out = {}
    for key, name, param, module, kind in _entries(model):
        t = full(name, param) if full is not None else _gather(module, param)
        out[key] = _to_peft(kind, t.detach()).contiguous()
    return out


def peft_targets(model: nn.Module) -> tuple[list[str] | None, list[str] | None]:
    """(target_modules, target_parameters) naming exactly the adapted modules and parameters, as transformers 5
    names them (full names: an adapter of some layers only stays so)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rewritten = PEFT_REWRITTEN.get(model_type, ())
    modules, params = [], []
    for name, module in model.named_modules():
        peft = _peft_name(model, name)
        if isinstance(module, LoraLinearMixin) and name.rpartition(".")[2] in rewritten:
            params.append(f"{peft}.weight")
        elif isinstance(module, LoraLinearMixin):
            modules.append(peft)
        elif isinstance(module, LoraExpertsMixin):
            params += [f"{peft}.{p}" for p in EXPERT_PARAMS if p in module.lora_A]
    return modules or None, params or None


# ---------------------------------------------------------------- saving, loading, merging

def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoraConfig,
                 base_model_name_or_path: str | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained on the
    transformers model, written atomically. Every rank gathers (collectives); only rank 0 writes."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(model)
    directory = Path(directory)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return directory
    modules, params = peft_targets(model)
    if config.lora_dropout and params:
        warnings.warn(f"lora_dropout={config.lora_dropout} with target_parameters {params[:2]}...: peft loads "
                      "such an adapter only with lora_dropout=0", stacklevel=2)
    peft_config = dict(asdict(config), peft_type="LORA", base_model_name_or_path=base_model_name_or_path,
                       target_modules=modules, target_parameters=params, fan_in_fan_out=False, inference_mode=True,
                       revision=None, lora_bias=False, use_dora=False,
                       task_type="CAUSAL_LM" if hasattr(model, "lm_head") else None)
    make_dir(directory)
    fsync_dir(directory.parent)
    with writing(directory), temp_folder(directory, ".tmp-adapter-") as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / f, 0o644)
            fsync_file(tmp / f)
        with locked(directory):  # other files in it stay; ours are replaced one by one, the config last
            if (directory / CONFIG_NAME).exists():  # not beside the new weights, even for a moment
                (directory / CONFIG_NAME).unlink()
                fsync_dir(directory)
            for f in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / f, directory / f)
            fsync_dir(directory)
    return directory


def read_files(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors (peft's layouts); errors name the file at fault."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (not a LoRA adapter directory)")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    try:
        config = LoraConfig.from_peft(settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (moelm reads safetensors adapters only)")
    try:
        return config, load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoraConfig:
    """Apply the LoRA of an adapter directory (save_adapter's, or peft's for the same targets) and load its tensors.
    Returns its config. Errors name missing, unexpected or misshapen tensors."""
    config, tensors = read_files(directory)
    build_named_mtp(model, tensors)
    apply_lora(model, config)
    load_tensors(model, tensors, directory)
    return config


def build_named_mtp(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Build ERNIE's MTP head (from_pretrained leaves it to its first use) when an adapter's tensors adapt it, as a
    fine-tune that trained the MTP loss writes them: its Linears are then targets like the decoder's."""
    if any(".mtp_" in key for key in tensors):
        getattr(model, "mtp", None)


def _base_entries(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """The base weights of adapted Linears that the adapter holds too (peft saves an adapted lm_head's
    `base_layer.weight`/`.bias`, as an embedding layer's; loading it puts them in the model, as peft does)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinearMixin):
            for p, t in module.named_parameters(recurse=False):
                key = f"base_model.model.{_peft_name(model, name)}.base_layer.{p}"
                if key in tensors and not p.startswith("lora_"):
                    out[key] = (f"{name}.{p}", t, module, "linear")
    return out


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], directory) -> None:
    """An adapter's tensors (peft's keys and layouts) into the adapters applied to `model`."""
    entries = {key: rest for key, *rest in _entries(model)}
    entries.update(_base_entries(model, tensors))
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    if missing or unexpected:
        raise ValueError(f"adapter {directory}: missing tensors {missing[:8]}{'...' * (len(missing) > 8)}, "
                         f"unexpected tensors {unexpected[:8]}{'...' * (len(unexpected) > 8)}")
    with torch.no_grad():
        for key, (name, param, module, kind) in entries.items():
            ranks, rank = _ep(module)
            local = param.shape[0]
            t = tensors[key]
            full_shape = _to_peft(kind, torch.empty((local * ranks, *param.shape[1:]), device="meta")).shape
            if t.shape != full_shape:
                raise ValueError(f"adapter {directory}: {key} has shape {tuple(t.shape)}, the model's "
                                 f"{name} needs {tuple(full_shape)}")
            if kind.startswith("expert"):
                t = _from_peft(kind, t, local * ranks)[rank * local:(rank + 1) * local]
            param.copy_(t)


def read_adapter(model: nn.Module, directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict[str, tuple]]]:
    """An adapter directory's config and tensors in moelm's layouts, without applying it: {module name: {"weight":
    (A [r, in], B [out, r])}} for a Linear, {module name: {parameter: (A [E, r, in], B [E, out, r])}} for stacked
    experts; B not scaled. Errors name a missing, unexpected or misshapen tensor."""
    directory = Path(directory)
    config, tensors = read_files(directory)
    build_named_mtp(model, tensors)
    if config.modules_to_save:
        raise ValueError(f"adapter {directory}: modules_to_save={config.modules_to_save!r} replaces base tensors, "
                         "which a per-request adapter cannot; merge it into the base (moelm merge)")
    linears, experts = _targets(model, config)
    out, used = {}, set()

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"adapter {directory}: missing tensor {key}")
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"adapter {directory}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                             f"{tuple(shape)}")
        used.add(key)
        return tensors[key]

    for name in sorted(linears):
        module, key = model.get_submodule(name), f"base_model.model.{_peft_name(model, name)}"
        out[name] = {"weight": (take(f"{key}.lora_A.weight", (config.r, module.in_features)),
                                take(f"{key}.lora_B.weight", (module.out_features, config.r)))}
    for name, params in sorted(experts.items()):
        module, key = model.get_submodule(name), f"base_model.model.{_peft_name(model, name)}"
        out[name] = {}
        for i, p in enumerate(params):
            e, rows, cols = _expert_shape(module, p)
            nest = "base_layer." * (len(params) - 1 - i)
            a = take(f"{key}.{nest}lora_A.weight", (e * config.r, cols))
            b = take(f"{key}.{nest}lora_B.weight", (rows, config.r * e))
            out[name][p] = (_from_peft("expert_A", a, e), _from_peft("expert_B", b, e))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"adapter {directory}: unexpected tensors {unexpected[:8]}{'...' * (len(unexpected) > 8)}")
    return config, out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B @ A; experts batched over E) and give the modules
    back their classes, without adapters: save_pretrained then writes a plain hub checkpoint. Base parameters stay
    frozen."""
    embeddings = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, LORA) and isinstance(module, (PackedLinear, QuantizedExperts)):
            raise ValueError(f"{name} has int8/int4 weights: LoRA cannot be merged into them; load the base model "
                             "unquantized, load_adapter onto it, then merge")
        if isinstance(module, LoraLinearMixin) and module.weight is embeddings:
            raise ValueError(f"{name}'s weight is tied to the input embeddings: merging would change both")
    for module in model.modules():
        if isinstance(module, LoraLinearMixin):
            w = module.weight
            w.add_((module.lora_B @ module.lora_A * module.lora_scaling).to(w.dtype))
            del module.lora_A, module.lora_B, module.lora_scaling, module.lora_dropout
        elif isinstance(module, LoraExpertsMixin):
            for p in module.lora_A:
                w = getattr(module, p)
                w.add_((torch.bmm(module.lora_B[p], module.lora_A[p]) * module.lora_scaling).to(w.dtype))
            del module.lora_A, module.lora_B, module.lora_scaling, module.lora_dropout
        else:
            continue
        module.__class__ = module.lora_base
    for module in model.modules():
        if type(module) is TrainableQuantizedExperts:
            module.__class__ = QuantizedExperts
        module.__dict__.pop("lora_saved", None)
    return model
