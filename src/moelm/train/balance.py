"""ERNIE's aux-free load balancing: after each optimizer step, e_score_correction_bias += factor *
sign(mean load - load), the load being the tokens each expert was chosen for, summed over the step's micro-batches
and the data-parallel ranks, padding excluded, in fp32 (as NeMo's gate_bias_update_factor; 0 turns it off)."""
from __future__ import annotations

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
