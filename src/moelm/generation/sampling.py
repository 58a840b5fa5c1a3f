"""The one sampler of `generate` and the serve engine: scores [N, V] (fp32) through penalties, warpers and a choice.

`Sampling` holds the knobs both share and validates them once; GenerationConfig.sampling() and
SamplingParams.sampling() build it. The order is transformers' logits processors' (logit bias, as its sequence_bias,
first; OpenAI's presence / frequency penalties, which transformers lacks, right after the repetition penalty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class SamplingError(ValueError):
    """An invalid sampling knob; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class Sampling:
    """temperature 0 is greedy (argmax, no draw, no warpers); top_k 0, top_p 1, min_p 0 and penalties of 1 or 0 are
    off. logit_bias maps token ids to what is added to their logits."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        def check(name: str, rule: str, ok=lambda v: True, integer: bool = False):
            value = getattr(self, name)
            number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and ok(value)):
                raise SamplingError(name, f"{name} must be {rule}, got {value!r}")

        check("temperature", ">= 0 (0 is greedy)", lambda v: v >= 0)
        check("top_k", "an integer >= 0 (0 is off)", lambda v: v >= 0, integer=True)
        check("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        check("min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        check("repetition_penalty", "> 0", lambda v: v > 0)
        check("presence_penalty", "a number")
        check("frequency_penalty", "a number")
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and isinstance(bias, (int, float)) and math.isfinite(bias)):
                raise SamplingError("logit_bias", f"logit_bias maps token ids to numbers, got {token!r}: {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(scores: torch.Tensor, s: Sampling, input_ids: torch.Tensor | None = None, prompt_length: int = 0,
                    ignore: torch.Tensor | None = None, banned: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [N, V] with logit bias, the repetition penalty over input_ids [N, L] (the first ignore[n] positions of
    row n, its left padding, not counted), presence / frequency penalties over the tokens after prompt_length, and
    -inf for the `banned` ids [E] (EOS before min_length / min_tokens)."""
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias), dtype=torch.long, device=scores.device)
        bias = torch.tensor(list(s.logit_bias.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.index_add(1, ids, bias.expand(scores.shape[0], -1))
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, input_ids, s.repetition_penalty, ignore)
    if s.presence_penalty or s.frequency_penalty:
        generated = input_ids[:, prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        scores = scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(scores.dtype)
    if banned is not None:
        scores = suppress(scores, banned)
    return scores


def warp(scores: torch.Tensor, s: Sampling, keep: int = 1) -> torch.Tensor:
    """Scores [N, V] through temperature, top-k, top-p and min-p (each keeping at least `keep` tokens); unchanged when
    greedy."""
    if s.greedy:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        scores = top_k_filter(scores, s.top_k, keep)
    if s.top_p < 1.0:
        scores = top_p_filter(scores, s.top_p, keep)
    if s.min_p:
        scores = min_p_filter(scores, s.min_p, keep)
    return scores


def choose(scores: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [N] from scores [N, V]: the argmax when greedy, else a draw from softmax(scores)."""
    if s.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


# ------------------------------------------------------------------ the processors, on [N, V]

def repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float,
                       ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [N, V] of tokens present in input_ids [N, L] divided by `penalty` (multiplied where negative). The first
    ignore[n] positions of row n (its left padding) do not count. Repeated ids are penalised once."""
    vocab = scores.shape[-1]
    if ignore is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None] < ignore[:, None], vocab)
    ids = input_ids.clamp(max=vocab)
    padded = F.pad(scores, (0, 1))  # column V absorbs the ignored positions
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def suppress(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """-inf for token_ids in every row."""
    banned = torch.isin(torch.arange(scores.shape[-1], device=scores.device), token_ids.to(scores.device))
    return torch.where(banned, -torch.inf, scores)


def top_k_filter(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    """Keep the k best scores per row (ties with the k-th included)."""
    k = min(max(k, keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, -torch.inf)


def top_p_filter(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches p (at least `keep` of them)."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p
    drop[..., -keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)


def min_p_filter(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below p times the best token's (keeping at least `keep`)."""
    probs = scores.softmax(-1)
    drop = probs < p * probs.amax(-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill(drop, -torch.inf)
