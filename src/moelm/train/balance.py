"""ERNIE's aux-free load balancing: after each optimizer step, e_score_correction_bias += factor *
sign(mean load - load), the load being the tokens each expert was chosen for, summed over the step's micro-batches
and the data-parallel ranks, padding excluded, in fp32 (as NeMo's gate_bias_update_factor; 0 turns it off); and
NeMo's load-balance metrics of such loads (balance_metrics). RoutedLoad counts them from the choice the forward made."""
from __future__ import annotations

import contextlib
import functools
import math
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F


class ExpertLoad:
    """Per MoE layer, the tokens routed to each expert [E] (fp32), accumulated over micro-batches."""

    def __init__(self):
        self.loads: list[torch.Tensor] = []

    def add(self, router_logits: tuple[torch.Tensor, ...], biases: list[torch.Tensor], k: int,
            attention_mask: torch.Tensor | None = None):
        """One micro-batch: each layer's router logits [T, E] and correction bias [1, E] give its choice as the
        router makes it (top-k of softmax + bias); a 0 in the mask [B, S] (T = B * S) drops that token."""
        weight = None if attention_mask is None else attention_mask.reshape(-1).float()
        for i, (logits, bias) in enumerate(zip(router_logits, biases)):
            with torch.no_grad():
                probs = F.softmax(logits.float(), dim=-1)
                chosen = torch.topk(probs + bias.reshape(-1).float(), k, dim=-1).indices  # [T, K]
                ones = torch.ones(chosen.shape, device=chosen.device) if weight is None else \
                    weight.to(chosen.device)[:, None].expand(chosen.shape)
                load = torch.zeros(logits.shape[-1], device=chosen.device).index_add_(
                    0, chosen.reshape(-1), ones.reshape(-1))
            if i == len(self.loads):
                self.loads.append(load)
            else:
                self.loads[i] += load

    def reduce(self, group=None) -> list[torch.Tensor]:
        """The loads summed over the data-parallel ranks of `group` (a collective when torch.distributed runs)."""
        if dist.is_available() and dist.is_initialized() and self.loads:
            flat = torch.stack(self.loads)
            dist.all_reduce(flat, group=group)
            self.loads = list(flat.unbind(0))
        return self.loads


@torch.no_grad()
def update_correction_bias(biases: list[torch.Tensor], loads: list[torch.Tensor], factor: float) -> None:
    """bias += factor * sign(mean(load) - load), in place, per layer: an expert chosen less than the mean is made
    more likely to be chosen, one chosen more less likely."""
    if not factor:
        return
    for bias, load in zip(biases, loads):
        bias += (factor * torch.sign(load.mean() - load)).reshape(bias.shape).to(bias.dtype)


# ---- NeMo AutoModel's load-balance metrics (the moe/... keys of its brief and detailed modes) ------------------

def layer_balance(load: torch.Tensor) -> dict:
    """One MoE layer's balance from its load [E] (tokens routed to each expert): cv (std / mean, unbiased std),
    utilization [E] (load / ideal load, the ideal being sum / E: 1 = its fair share, 0 = dead), dead_expert_frac,
    expert_diversity (exp(H) / E, H the entropy of load / sum: 1 = uniform, 1/E = one expert)."""
    load = load.double()
    n, total, mean = load.numel(), float(load.sum()), float(load.mean())
    cv = float(load.std()) / mean if mean > 0 and n > 1 else 0.0
    if total == 0:
        return dict(cv=0.0, utilization=torch.zeros(n, dtype=torch.float64), dead_expert_frac=1.0,
                    expert_diversity=0.0)
    p = load / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return dict(cv=cv, utilization=load / (total / n), dead_expert_frac=float((load == 0).double().mean()),
                expert_diversity=math.exp(entropy) / n)


def _aggregate(values: list[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_mean": sum(values) / len(values), f"{prefix}_median": statistics.median(values),
            f"{prefix}_min": min(values), f"{prefix}_max": max(values)}


def balance_metrics(loads: list[torch.Tensor], detailed: bool = False, top_k: int = 5,
                    layers: list[int] | None = None) -> dict[str, float]:
    """NeMo AutoModel's brief (or detailed) load-balance metrics of the MoE layers' loads [E] (`layers`: their
    indices in the names, default 0, 1, ...): moe/cv_{mean,median,min,max}, moe/expert_utilization_{p25,median,
    p75,min,max}, the top_k most and least used experts (moe_expert_utilization/layer_{i}_expert_{j}),
    moe/dead_expert_frac_mean, moe/expert_diversity_{mean,min}; detailed adds moe/layer_{i}/cv,
    utilization_mean, dead_expert_frac and expert_diversity."""
    if not loads:
        return {}
    layers = list(range(len(loads))) if layers is None else layers
    stats = [layer_balance(load) for load in loads]
    out = _aggregate([s["cv"] for s in stats], "moe/cv")
    entries = sorted((float(u), i, j) for i, s in zip(layers, stats) for j, u in enumerate(s["utilization"]))
    k = min(top_k, len(entries))
    for u, i, j in entries[:k] + entries[len(entries) - k:]:
        out[f"moe_expert_utilization/layer_{i}_expert_{j}"] = u
    ratios = [u for u, _, _ in entries]
    n = len(ratios)
    out["moe/expert_utilization_p25"] = ratios[n // 4] if n >= 4 else ratios[0]
    out["moe/expert_utilization_median"] = statistics.median(ratios)
    out["moe/expert_utilization_p75"] = ratios[3 * n // 4] if n >= 4 else ratios[-1]
    out["moe/expert_utilization_min"], out["moe/expert_utilization_max"] = ratios[0], ratios[-1]
    out["moe/dead_expert_frac_mean"] = sum(s["dead_expert_frac"] for s in stats) / len(stats)
    out["moe/expert_diversity_mean"] = sum(s["expert_diversity"] for s in stats) / len(stats)
    out["moe/expert_diversity_min"] = min(s["expert_diversity"] for s in stats)
    if detailed:
        for i, s in zip(layers, stats):
            out[f"moe/layer_{i}/cv"] = s["cv"]
            out[f"moe/layer_{i}/utilization_mean"] = float(s["utilization"].mean())
            out[f"moe/layer_{i}/dead_expert_frac"] = s["dead_expert_frac"]
            out[f"moe/layer_{i}/expert_diversity"] = s["expert_diversity"]
    return out


class RoutedLoad(ExpertLoad):
    """The loads [E] of the MoE blocks given (in layer order), counted from the expert index [T, K] each block hands
    its experts module (a forward pre-hook): the choice the forward made, PhiMoE's sampled one included. Only the
    forwards inside `recording(mask)` count, so an activation-checkpointing recomputation in the backward does not;
    a 0 in the mask [B, S] (T = B * S) drops that token."""

    def __init__(self, blocks: list, num_experts: int, device=None):
        super().__init__()
        self.num_experts, self.device = num_experts, device
        self.mask: torch.Tensor | None = None
        self.on = False
        self.hooks = [block.experts.register_forward_pre_hook(functools.partial(self._count, i))
                      for i, block in enumerate(blocks)]
        self.clear()

    def clear(self):
        self.loads = [torch.zeros(self.num_experts, device=self.device) for _ in self.hooks]

    @contextlib.contextmanager
    def recording(self, attention_mask: torch.Tensor | None = None):
        self.on, self.mask = True, attention_mask
        try:
            yield self
        finally:
            self.on, self.mask = False, None

    @torch.no_grad()
    def _count(self, i: int, module, args):
        if not self.on:
            return
        index = args[1]  # experts(x [T, H], index [T, K], weights [T, K])
        if self.mask is None:
            weight = torch.ones(index.numel(), device=index.device)
        else:
            if self.mask.numel() != index.shape[0]:
                raise RuntimeError(f"expert load: layer {i} routed {index.shape[0]} tokens, the attention mask "
                                   f"has {self.mask.numel()}")
            weight = self.mask.reshape(-1, 1).float().to(index.device).expand(index.shape).reshape(-1)
        load = self.loads[i]
        load.index_add_(0, index.reshape(-1).to(load.device), weight.to(load.device))

    def remove(self):
        for hook in self.hooks:
            hook.remove()
