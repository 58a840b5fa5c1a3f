"""Mixture of experts: stacked experts computed grouped (tokens sorted by expert), the ERNIE and PhiMoE routers,
the load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_MM_OK: dict[tuple, bool] = {}


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grouped_mm_works(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs here for these dtypes (and its backward, when gradients are needed): probed
    once per device, dtypes and grad mode (CPU: fp32/bf16 forward and, from torch 2.10 or so, backward). The probe
    saves its tensors past any saved-tensor hooks around it: under activation checkpointing the first forward
    probes and its recompute does not, and the checkpoint must see the same saves in both."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    grad = needs_grad(x, w)
    key = (x.device.type, x.dtype, w.dtype, grad)
    if key not in _GROUPED_MM_OK:
        try:
            with torch.enable_grad() if grad else torch.no_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                probe_w = torch.ones(2, 16, 16, dtype=w.dtype, device=w.device, requires_grad=grad)
                probe_x = torch.ones(16, 16, dtype=x.dtype, device=x.device, requires_grad=grad)
                offs = torch.tensor([8, 16], dtype=torch.int32, device=x.device)
                out = torch._grouped_mm(probe_x, probe_w.transpose(1, 2), offs=offs)
                if grad:
                    out.backward(torch.ones_like(out))
                    assert bool((probe_w.grad == 8).all()) and bool((probe_x.grad == 16).all())
            _GROUPED_MM_OK[key] = True
        except (RuntimeError, NotImplementedError, TypeError, AssertionError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()  # torch._grouped_mm's backward rejects an expanded gradient (strides 0)


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these widths: rows of 16 bytes, the input's and, for the backward, the
    output's (a tensor-parallel slice of an expert can be narrower)."""
    widths = (w.shape[2], w.shape[1]) if needs_grad(x, w) else (w.shape[2],)
    return all(n * w.element_size() % 16 == 0 for n in widths)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """Rows of x [N, in] sorted by expert, counts [E] rows per expert, w [E, out, in] -> [N, out].
    path: "grouped_mm" (torch._grouped_mm), "bmm" (padded batched matmul) or "auto" (the first where it runs)."""
    if path == "grouped_mm" and not _grouped_mm_works(x, w):
        raise RuntimeError(f"torch._grouped_mm does not run here ({x.device.type}, {x.dtype}"
                           f"{', with gradients' if needs_grad(x, w) else ''}); choose experts='torch' or 'bmm'")
    if torch.compiler.is_compiling() and path != "grouped_mm":
        # the compiler's torch._grouped_mm takes bf16 only, and the padded bmm has data-dependent shapes: an op
        # opaque to it instead (transformers falls back likewise), so that fullgraph=True compiles too
        return _padded_bmm_op(x, w, counts)
    if path != "bmm" and _grouped_mm_works(x, w) and (path == "grouped_mm" or _aligned(x, w)):
        offs = counts.cumsum(0).to(torch.int32)
        out = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        if out.requires_grad:
            out.register_hook(_contiguous)
        return out
    return _padded_bmm(x, w.transpose(1, 2), counts)


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, transpose_x: bool = False) -> torch.Tensor:
    """Autograd-friendly equivalent of grouped_mm: pad each expert's rows to the largest group and run one bmm.
    x [N, in], w [E, in, out] -> [N, out]; transpose_x: w is [N, out] too, and the result [E, in, out] is each
    expert's x rows transposed times its w rows (a weight gradient)."""
    n, num_experts = x.shape[0], counts.shape[0]
    starts = counts.cumsum(0) - counts  # [E]
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts, output_size=n)  # [N]
    slot = torch.arange(n, device=x.device) - starts[expert]  # [N]
    width = int(counts.max()) if n else 0
    padded = x.new_zeros(num_experts, width, x.shape[1]).index_put((expert, slot), x)  # [E, C, in]
    if transpose_x:
        other = w.new_zeros(num_experts, width, w.shape[1]).index_put((expert, slot), w)  # [E, C, out]
        return torch.bmm(padded.transpose(1, 2), other)
    return torch.bmm(padded, w)[expert, slot]  # [N, out]


@torch.library.custom_op("moelm::padded_bmm", mutates_args=())
def _padded_bmm_op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_linear's bmm path (w [E, out, in]) as one op the compiler does not look into."""
    return _padded_bmm(x, w.transpose(1, 2), counts)


@_padded_bmm_op.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("moelm::padded_bmm_weight_grad", mutates_args=())
def _weight_grad_op(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _padded_bmm(grad, x, counts, transpose_x=True)  # [E, out, in]


@_weight_grad_op.register_fake
def _(grad, x, counts):
    return grad.new_empty(counts.shape[0], grad.shape[1], x.shape[1])


def _padded_bmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _padded_bmm_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad_x = _padded_bmm_op(grad, w.transpose(1, 2).contiguous(), counts) if ctx.needs_input_grad[0] else None
    grad_w = _weight_grad_op(grad, x, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_padded_bmm_op.register_autograd(_padded_bmm_backward, setup_context=_padded_bmm_setup)


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    path = "auto"  # grouped_linear's path

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], index/weights [T, K] -> [T, H] = sum_k weights[:, k] * expert_{index[:, k]}(x)."""
        token, w, counts = sort_by_expert(index, weights, self.num_experts)
        h = self.project("gate_up_proj", x[token], counts)  # [T*K, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = self.project("down_proj", F.silu(gate) * up, counts)  # [T*K, H]
        return torch.zeros_like(x).index_add_(0, token, (h * w.to(h.dtype)).to(x.dtype))

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows x [N, in] sorted by expert (counts [E]) through the stacked projection `name` -> [N, out]; subclasses
        add to it (LoRA: moelm.train.lora)."""
        return grouped_linear(x, getattr(self, name), counts, self.path)


def sort_by_expert(index: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """index/weights [T, K] -> the (token, choice) pairs sorted by expert: token [T*K], weight [T*K, 1], and
    counts [E] pairs per expert."""
    k = index.shape[1]
    flat = index.reshape(-1)  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order // k, weights.reshape(-1)[order, None], counts


def ernie_route(x: torch.Tensor, gate_weight: torch.Tensor, correction_bias: torch.Tensor, k: int,
                norm_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 softmax gate; the correction bias only chooses; chosen probabilities renormalised.

    x [T, H] -> logits [T, E] fp32, weights [T, K] in x's dtype, index [T, K]."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), gate_weight.float())
        weights, index = ernie_choose(logits, correction_bias, k, norm_min)
    return logits, weights.to(x.dtype), index


def ernie_choose(logits: torch.Tensor, correction_bias: torch.Tensor, k: int, norm_min: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE's choice from router logits [T, E]: top-k of softmax + bias, weights the chosen (unbiased)
    probabilities renormalised -> weights [T, K] fp32, index [T, K]."""
    probs = F.softmax(logits.float(), dim=-1, dtype=torch.float)
    _, index = torch.topk(probs + correction_bias.reshape(-1).float(), k, dim=-1)
    weights = probs.gather(-1, index)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min), index


class _SparseMixerGrad(torch.autograd.Function):
    """Forward: multiplier * mask_for_one. Backward: the sparsemixer's gradient estimate w.r.t. the scores."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad):
        multiplier, selected, masked_gates = ctx.saved_tensors
        grad = grad * multiplier
        grad_scores = masked_gates * grad.mul(-1)
        grad_scores.scatter_add_(dim=-1, index=selected, src=grad)
        return grad_scores, None, None, None, None


def _sparsemixer_pick(scores, masked_scores, jitter_eps: float, training: bool, second: bool):
    """One pick: mask scores far below the max, then argmax (inference) or Gumbel-sample (training)."""
    with torch.no_grad():
        top, top_index = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * jitter_eps)
    gates = masked_scores.masked_fill(far, float("-inf"))
    if training:
        noise = torch.empty_like(gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
        selected = (gates - noise).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected = top_index
    gates = torch.softmax(gates, dim=-1)
    multiplier = gates.gather(dim=-1, index=selected)
    if training:
        _, max_index = gates.max(dim=-1, keepdim=True)
        coin = torch.rand_like(multiplier)
        if second:
            coin = coin.uniform_()
        mask_for_one = torch.logical_or(selected == max_index, coin > 0.75)  # Heun's third-order method
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(gates)
        multiplier = _SparseMixerGrad.apply(scores, multiplier, selected, gates, mask_for_one)
    return multiplier, selected


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE top-2 routing. scores [T, E] -> weights [T, 2] (not renormalised), index [T, 2]."""
    w1, e1 = _sparsemixer_pick(scores, scores, jitter_eps, training, second=False)
    masked = torch.scatter(scores, -1, e1, float("-inf"))
    w2, e2 = _sparsemixer_pick(scores, masked, jitter_eps, training, second=True)
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...] | None, num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers' logits [T = B * S, E]; padding excluded by the 2D mask
    [B, K]. With a cache K > S (the mask covers the past too): its last S columns are this forward's tokens. No MoE
    layer (an ERNIE config whose layer range holds none): 0."""
    if not router_logits:
        return torch.zeros((), dtype=torch.float32, device=attention_mask.device if attention_mask is not None
                           else None)
    if attention_mask is not None:
        rows, tokens = attention_mask.shape[0], router_logits[0].shape[0] // max(attention_mask.shape[0], 1)
        if attention_mask.dim() != 2 or rows * tokens != router_logits[0].shape[0] or attention_mask.shape[1] < tokens:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit router logits of "
                             f"{router_logits[0].shape[0]} tokens: a 2D mask [batch, past + new tokens] is needed")
        attention_mask = attention_mask[:, -tokens:]
    device = router_logits[0].device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits.to(device), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        if mask is None:
            tokens_per_expert = tokens_per_expert + torch.histc(
                chosen.reshape(-1).float(), bins=num_experts, min=0, max=num_experts)
            prob_per_expert = prob_per_expert + probs.float().sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            tokens_per_expert = tokens_per_expert + torch.zeros_like(tokens_per_expert).scatter_add_(
                0, chosen.reshape(-1), mask.repeat_interleave(top_k))
            prob_per_expert = prob_per_expert + (probs.float() * mask[:, None]).sum(dim=0)
            rows = rows + mask.sum()
    return torch.sum((tokens_per_expert / rows) * (prob_per_expert / rows)) * num_experts
