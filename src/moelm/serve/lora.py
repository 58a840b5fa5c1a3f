"""Per-request LoRA: PEFT adapters (moelm's finetune writes them; peft's own too) loaded side by side onto the
served model, each sequence of a step running with its own (or none), in one batch.

`Adapters.load(model, {name: directory})` reads each adapter (moelm.train.lora.read_adapter) and gives every targeted
module a stack of all of them, adapter 0 being none: a Linear A [N+1, r, in], B [N+1, out, r] (B scaled, ranks padded
with zeros), stacked experts the same per projection with an expert axis. Before a step the engine sets the adapter of
every token (`rows.set(index [T])`); a targeted module adds, for each adapter present in the step, the LoRA product of
that adapter's tokens (experts: grouped by expert, over the rows sorted by expert) to the base output. Targeted
modules lose their fused and one-call C paths (they would skip the adapters); the others keep theirs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.quantization import QuantizedExperts
from ..nn.moe import Experts, grouped_linear, sort_by_expert
from ..train.lora import HEADS, read_adapter


class Rows:
    """The adapter of each token of the running step (`index` [T]; None outside a step) and the tokens whose logits
    are kept (`keep`: the last layer's feed-forward sees only those). `of(n)`: for a module input of n rows (T, or
    len(keep)), its rows' adapters [n] and [(adapter, row indices)] for the adapters > 0 among them."""

    def __init__(self):
        self.set(None)

    def set(self, index: torch.Tensor | None, keep: torch.Tensor | None = None):
        self.index, self.keep, self._of = index, keep, {}
        self.active = index is not None and bool((index > 0).any())

    def clear(self):
        self.set(None)

    def of(self, n: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        if n not in self._of:
            index = self.index if n == len(self.index) else self.index[self.keep] \
                if self.keep is not None and n == len(self.keep) else None
            if index is None:
                raise RuntimeError(f"a LoRA module got {n} rows in a step of {len(self.index)} tokens")
            self._of[n] = index, [(int(a), (index == a).nonzero()[:, 0]) for a in index.unique() if a > 0]
        return self._of[n]


class MultiLoraLinear:
    """Mixed into a Linear's class: base(x) + for each adapter a of the step, x[its tokens] @ A[a].T @ B[a].T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.lora_rows.active:
            return out
        flat_x, shape = x.reshape(-1, x.shape[-1]), out.shape
        flat = out.reshape(-1, shape[-1]).clone()
        for a, tokens in self.lora_rows.of(flat_x.shape[0])[1]:
            tokens = tokens.to(flat_x.device)
            h = F.linear(F.linear(flat_x[tokens].to(self.lora_A.dtype), self.lora_A[a]), self.lora_B[a])
            flat.index_add_(0, tokens, h.to(flat.dtype))
        return flat.view(shape)


class MultiLoraExperts:
    """Mixed into stacked experts: with adapters in the step, the grouped form (Experts.forward) whose projections
    add each adapter's LoRA product to the rows of its tokens, grouped by expert."""

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self.lora_rows.active:
            return super().forward(x, index, weights)
        token, _, counts = sort_by_expert(index, weights, self.num_experts)
        experts = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
        tokens, groups = self.lora_rows.of(x.shape[0])
        adapter = tokens.to(token.device)[token]  # [T*K] each row's adapter
        self._lora_rows_of = [(a, (adapter == a).nonzero()[:, 0]) for a, _ in groups]
        self._lora_experts = experts
        try:
            return Experts.forward(self, x, index, weights)
        finally:
            self._lora_rows_of = self._lora_experts = None

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = base_project(self, name, x, counts)
        if name not in self.lora_A or not getattr(self, "_lora_rows_of", None):
            return out
        out = out.clone()
        for a, rows in self._lora_rows_of:
            if not len(rows):
                continue
            mine = torch.bincount(self._lora_experts[rows], minlength=self.num_experts)
            h = grouped_linear(x[rows].to(self.lora_A[name].dtype), self.lora_A[name][a], mine, "bmm")
            h = grouped_linear(h, self.lora_B[name][a], mine, "bmm")
            out.index_add_(0, rows, h.to(out.dtype))
        return out


def base_project(module, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The base projection of rows sorted by expert (int8/int4 experts: dequantized, as LoRA training does)."""
    if isinstance(module, QuantizedExperts):
        return QuantizedExperts.project(module, name, x, counts)
    return grouped_linear(x, getattr(module, name), counts, module.path)


_CLASSES: dict[tuple[type, type], type] = {}


def _class(mixin: type, base: type) -> type:
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"MultiLora{base.__name__}", (mixin, base), {"lora_base": base})
    return _CLASSES[mixin, base]


class Adapters:
    """The adapters served beside the base model: `names` {name: id from 1}, `paths`, `rows` (see Rows)."""

    def __init__(self):
        self.names: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self.rows = Rows()

    @classmethod
    def load(cls, model: nn.Module, directories: dict[str, str]) -> Adapters:
        """Read the adapters and stack them onto `model`'s targeted modules (in place). Errors name the adapter
        and what is wrong with it."""
        from ..inference import decode

        self = cls()
        read = {}
        for i, (name, directory) in enumerate(directories.items(), 1):
            try:
                config, tensors = read_adapter(model, directory)
            except (OSError, ValueError, NotImplementedError) as e:
                raise ValueError(f"LoRA adapter {name} ({directory}): {e}") from None
            heads = [m for m in tensors if m.rpartition(".")[2] in HEADS or m == "lm_head"]
            if heads:
                raise ValueError(f"LoRA adapter {name}: adapters on the output head ({heads[0]}) are not served")
            read[i] = (config.scaling, tensors)
            self.names[name], self.paths[name] = i, str(directory)
        targets: dict[str, dict[str, list]] = {}
        for i, (_, tensors) in read.items():
            for module, params in tensors.items():
                for p in params:
                    targets.setdefault(module, {}).setdefault(p, [])
        n = len(read) + 1
        with torch.no_grad():
            for module_name, params in targets.items():
                module = model.get_submodule(module_name)
                stacks_a, stacks_b = {}, {}
                for p in params:
                    pairs = {i: t[module_name][p] for i, (_, t) in read.items() if p in t.get(module_name, {})}
                    rank = max(a.shape[-2] for a, _ in pairs.values())
                    a0, b0 = next(iter(pairs.values()))
                    a = torch.zeros(n, *a0.shape[:-2], rank, a0.shape[-1])
                    b = torch.zeros(n, *b0.shape[:-1], rank)
                    for i, (ai, bi) in pairs.items():
                        a[i, ..., :ai.shape[-2], :] = ai.float()
                        b[i, ..., :bi.shape[-1]] = bi.float() * read[i][0]
                    device = next(module.parameters(), next(module.buffers(), a)).device
                    stacks_a[p], stacks_b[p] = a.to(device), b.to(device)
                if isinstance(module, (Experts, QuantizedExperts)):
                    module.__class__ = _class(MultiLoraExperts, type(module))
                    module.lora_A, module.lora_B = stacks_a, stacks_b
                else:
                    module.__class__ = _class(MultiLoraLinear, type(module))
                    module.lora_A, module.lora_B = stacks_a["weight"], stacks_b["weight"]
                module.lora_rows = self.rows
        fusions = (("fused_qkv", ("q_proj", "k_proj", "v_proj")), ("fused_gate_up", ("gate_proj", "up_proj")))
        for module in model.modules():  # a fused q/k/v or gate/up would skip the adapters
            for fused, parts in fusions:
                if getattr(module, fused, None) is not None and any(
                        isinstance(getattr(module, p, None), MultiLoraLinear) for p in parts):
                    setattr(module, fused, None)
        decode.forget_plans()  # one-call steps planned before would run the modules without their adapters
        return self

    def id(self, name: str) -> int:
        return self.names.get(name, 0)
