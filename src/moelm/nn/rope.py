"""Rotary position embeddings: inverse frequencies for each rope type, and the two rotation layouts."""
from __future__ import annotations

import math

import torch

SEQ_DEPENDENT = ("dynamic", "longrope")  # rope types whose frequencies depend on the sequence length
_MEMO: dict = {}


def inv_freq_and_scale(rope: dict, dim: int, max_pos: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scaling for `rope` (a standardised rope_parameters dict).

    `seq_len` (max position + 1) matters for dynamic (NTK grows past max_pos) and longrope (long factors past
    original_max_position_embeddings). Remembered per parameters (decoding asks at every step), but dynamic's."""
    if rope["rope_type"] == "dynamic":
        return _inv_freq_and_scale(rope, dim, max_pos, seq_len)
    original = rope.get("original_max_position_embeddings")
    long = rope["rope_type"] == "longrope" and seq_len is not None and seq_len > original
    key = (repr(rope), dim, max_pos, long)
    if key not in _MEMO:
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = _inv_freq_and_scale(rope, dim, max_pos, seq_len)
    return _MEMO[key]


def _inv_freq_and_scale(rope: dict, dim: int, max_pos: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    kind, base = rope["rope_type"], rope["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    if kind == "default":
        return 1.0 / (base**exponents), 1.0
    if kind == "linear":
        return 1.0 / (base**exponents) / rope["factor"], 1.0
    if kind == "dynamic":
        factor, seq = rope["factor"], max(seq_len or max_pos, max_pos)
        base = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "yarn":
        return _yarn(rope, dim, max_pos)
    if kind == "longrope":
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or max_pos / original
        scale = rope.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = seq_len is not None and seq_len > original
        ext = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (ext * base**exponents), scale
    if kind == "llama3":
        return _llama3(rope, 1.0 / (base**exponents)), 1.0
    raise ValueError(f"unknown rope type {kind!r}")


def _yarn(rope: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base, original = rope["rope_theta"], rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = rope.get("attention_factor")
    if scale is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        scale = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, scale


def _llama3(rope: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [B, S, dim/2] for positions [B, S]."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, S, dim/2]
    if scale == 1.0:
        return freqs.cos(), freqs.sin()
    return freqs.cos() * scale, freqs.sin() * scale


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ERNIE: rotate pairs (x0, x1), (x2, x3), ... in fp32. x [B, H, S, D]; cos/sin [B, S, D/2]. Half precision:
    transformers' ops, so that the backward rounds where its backward does."""
    if x.dtype in (torch.bfloat16, torch.float16):
        cos, sin = (t.repeat_interleave(2, dim=-1)[:, None] for t in (cos, sin))
        turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return ((x.float() * cos) + (turned.float() * sin)).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, H, S, D/2] even + i odd
    turned = pairs * torch.complex(cos, sin)[:, None]  # (even cos - odd sin) + i (odd cos + even sin)
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PhiMoE/Llama: rotate (x[:D/2], x[D/2:]) in x's dtype. x [B, H, S, D]; cos/sin [B, S, D/2] in x's dtype."""
    cos = torch.cat((cos, cos), dim=-1)[:, None]
    sin = torch.cat((sin, sin), dim=-1)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
