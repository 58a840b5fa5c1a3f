"""ERNIE's MTP head (ErnieMtp) for drafting, in few calls: its norms, projection, final norm and LM head go straight
to the C kernels (kernels.rmsnorm, kernels.gemv) instead of through their modules, its decoder layer through the
model's fast layer (one C call while decoding). On a small model a draft then costs about half as much: the head's
compute is one layer and the LM head, and the modules' per-call work was as much again.

The results are the head's up to rounding (the projection and LM head by gemv wherever the modules' measured path is
another; logits in fp32, not rounded to the model's dtype); drafts need no more, since the model checks them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.layers import attention_mask_4d
from . import kernels
from .decode import _mat_tensors
from .norms import FastRMSNorm

DTYPES = (torch.float32, torch.bfloat16)


class MtpStep:
    """states() and logits() as ErnieMtp's for a few rows of a decoding step without gradients, or None where this
    does not apply (then the head's modules run): CPU kernels built, every norm a FastRMSNorm of the activations'
    dtype, the projection and LM head FastLinear or QuantizedLinear with contiguous CPU tensors, at most
    kernels.MAX_ROWS rows."""

    def __init__(self, model, depth: int = 0):
        base = model.model
        self.head, self.depth = model.mtp, depth
        self.embed = base.embed_tokens
        self.norms = (base.mtp_emb_norm[depth], base.mtp_hidden_norm[depth], base.norm)
        self.proj, self.lm_head, self.block = base.mtp_linear_proj[depth], model.lm_head, base.mtp_block[depth]
        self.base = base

    def _ready(self, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (not torch.is_grad_enabled() and dtype in DTYPES and device.type == "cpu" and 0 < rows
                <= kernels.MAX_ROWS and width % 32 == 0 and kernels.available()
                and all(type(n) is FastRMSNorm and n.weight.dtype == dtype and n.weight.is_contiguous()
                        for n in self.norms))

    def states(self, next_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, cache,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """ErnieMtp.states (next_ids [B, S], hidden [B, S, H], position_ids [B, S]) -> [B, S, H], or None."""
        weight = self.embed.weight
        proj = _mat_tensors(self.proj)
        if proj is None or not self._ready(next_ids.numel(), weight.shape[1], weight.dtype, weight.device):
            return None
        emb = F.embedding(next_ids, weight).masked_fill((position_ids == 0)[..., None], 0)
        a, b, _ = self.norms
        x = torch.cat([kernels.rmsnorm(emb, a.weight, a.variance_epsilon),
                       kernels.rmsnorm(hidden.to(emb.dtype), b.weight, b.variance_epsilon)], dim=-1)
        x = kernels.gemv(x, *proj[:3], bias=None if proj[3] is None else proj[3].float()).to(emb.dtype)
        past = cache.get_seq_length() if cache is not None else 0
        mask = attention_mask_4d(attention_mask, x.shape[0], x.shape[1], past, None, x.device)
        x, _, _ = self.block(x, self.base.rotary(x, position_ids), mask, cache)
        return x

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The final norm and LM head over states [B, S, H] -> fp32 [B, S, V] (ErnieMtp.logits, not rounded to the
        model's dtype)."""
        head = _mat_tensors(self.lm_head)
        norm = self.norms[2]
        rows = states.numel() // states.shape[-1]
        if head is None or not self._ready(rows, states.shape[-1], states.dtype, states.device):
            return self.head.logits(states).float()
        return kernels.gemv(kernels.rmsnorm(states, norm.weight, norm.variance_epsilon), *head[:3],
                            bias=None if head[3] is None else head[3].float())
