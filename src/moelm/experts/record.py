"""What each MoE layer's experts do on some text, recorded from the routing the model actually does: a forward hook
on every MoE block's `experts` module sees its inputs (tokens x [T, H], the chosen experts index [T, K] and their
weights [T, K], as the block's router made them: ERNIE's top-k of softmax + correction bias with the unbiased
weights, PhiMoE's sparsemixer) and runs each chosen expert once more, unweighted, for its output norm."""
from __future__ import annotations

import torch

from ..models.modeling import moe_blocks


class Recorder:
    """Per MoE layer and expert, summed over the tokens whose mask is 1: tokens [L, E] (times chosen), gate [L, E]
    (routing weight), norm [L, E] (||expert output||, unweighted), reap [L, E] (weight x norm: REAP's saliency
    summed), coact [L, E, E] (tokens choosing both; the diagonal = tokens), and per layer overlap [L] (experts
    shared by adjacent tokens of a row, summed) over pairs (adjacent pairs seen)."""

    def __init__(self, model):
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layers: there are no experts to report on")
        self.layers = [i for i, _ in self.blocks]
        self.num_experts = self.blocks[0][1].experts.num_experts
        n, e = len(self.blocks), self.num_experts
        self.tokens = torch.zeros(n, e, dtype=torch.int64)
        self.gate = torch.zeros(n, e, dtype=torch.float64)
        self.norm = torch.zeros(n, e, dtype=torch.float64)
        self.reap = torch.zeros(n, e, dtype=torch.float64)
        self.coact = torch.zeros(n, e, e, dtype=torch.int64)
        self.overlap = torch.zeros(n, dtype=torch.int64)
        self.pairs = 0
        self.seen = 0  # tokens counted
        self.top_k = 0  # experts per token, as the hook sees them
        self.mask: torch.Tensor | None = None  # [B, S] of the batch being run
        self.handles = []

    def __enter__(self) -> "Recorder":
        for slot, (_, block) in enumerate(self.blocks):
            self.handles.append(block.experts.register_forward_hook(
                lambda module, args, out, slot=slot: self._hook(slot, module, *args[:3])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def batch(self, attention_mask: torch.Tensor):
        """The next forward's mask [B, S] (1: a token to count)."""
        self.mask = attention_mask.bool().cpu()
        self.seen += int(self.mask.sum())
        self.pairs += int((self.mask[:, 1:] & self.mask[:, :-1]).sum())

    @torch.no_grad()
    def _hook(self, slot: int, module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        t, k = index.shape
        e, self.top_k = self.num_experts, k
        mask = torch.ones(t, dtype=torch.bool) if self.mask is None else self.mask.reshape(-1)
        if mask.numel() != t:
            raise RuntimeError(f"the recorder's mask has {mask.numel()} tokens, the MoE block got {t}")
        ones = torch.ones(t, 1, dtype=weights.dtype, device=weights.device)
        norms = torch.stack([module.forward(x, index[:, j:j + 1], ones).float().norm(dim=-1) for j in range(k)], 1)
        index, weights, norms = index.cpu(), weights.detach().double().cpu(), norms.double().cpu()  # [T, K]
        chosen = index[mask].reshape(-1)
        keep = mask[:, None].expand(t, k)
        self.tokens[slot] += torch.bincount(chosen, minlength=e)
        self.gate[slot].index_add_(0, chosen, weights[keep])
        self.norm[slot].index_add_(0, chosen, norms[keep])
        self.reap[slot].index_add_(0, chosen, (weights * norms)[keep])
        hot = torch.zeros(t, e, dtype=torch.int64).scatter_(1, index, 1)[mask]  # [T', E] one-hot of the choice
        self.coact[slot] += hot.T @ hot
        if self.mask is not None:
            rows = hot.new_zeros(t, e)
            rows[mask] = hot
            rows = rows.reshape(*self.mask.shape, e)
            both = self.mask[:, 1:] & self.mask[:, :-1]
            self.overlap[slot] += int((rows[:, 1:] * rows[:, :-1]).sum(-1)[both].sum())
