"""Shared layers: RMSNorm, SwiGLU MLP, GQA attention (SDPA or eager), the pre-norm decoder layer, the KV cache
and attention masks. Plain PyTorch: the inference fast paths (moelm.inference) subclass these after loading."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.variance_epsilon)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)


class DynamicCache:
    """Per-layer keys/values [B, Hkv, T, D], grown by concatenation."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def __len__(self) -> int:
        return len(self.keys)

    def reorder_cache(self, beam_idx: torch.Tensor):
        self.keys = [k.index_select(0, beam_idx.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, beam_idx.to(v.device)) for v in self.values]

    def crop(self, length: int):
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]

    def batch_repeat_interleave(self, repeats: int):
        """Each row repeated `repeats` times in place (transformers' name: for beams or several samples)."""
        if self.keys:
            self.reorder_cache(torch.arange(self.keys[0].shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices` [N], in that order."""
        if self.keys:
            self.reorder_cache(torch.as_tensor(indices))

    def reset(self):
        """Empty, as a new cache."""
        self.keys, self.values = [], []


def attention_mask_4d(attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
                      sliding_window: int | None, device) -> torch.Tensor | None:
    """Boolean [B, 1, Q, K] mask (True = attend) over cache positions, or None when plain causal suffices."""
    kv_len = past + q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    padded = attention_mask is not None and (torch.compiler.is_compiling()  # no shortcut on the mask's values
                                             or not bool(attention_mask[:, :kv_len].all()))
    windowed = sliding_window is not None and kv_len > sliding_window
    if not padded and not windowed and (q_len == 1 or past == 0):
        return None
    q_idx = torch.arange(past, kv_len, device=device)[:, None]  # [Q, 1]
    kv_idx = torch.arange(kv_len, device=device)[None, :]  # [1, K]
    mask = kv_idx <= q_idx
    if sliding_window is not None:
        mask = mask & (kv_idx > q_idx - sliding_window)
    mask = mask[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :kv_len].bool()
    return mask


class Attention(nn.Module):
    """GQA self-attention with rotary embeddings applied by `rotate(x, cos, sin)`."""

    def __init__(self, config, layer_idx: int, bias: bool, rotate):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = getattr(config, "attention_dropout", 0.0)
        self.config = config
        self.rotate = rotate
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache: DynamicCache | None,
                output_attentions: bool = False):
        """x [B, S, hidden] -> ([B, S, hidden], attention weights [B, H, S, K] or None)."""
        b, s, _ = x.shape
        dropout = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        weights = None
        if output_attentions or self.config.attn_implementation == "eager":
            out, weights = eager_attention(q, k, v, mask, self.scaling, dropout, self.training)
        else:
            out = self.attend(q, k, v, mask, dropout)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), weights

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q, k, v, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """SDPA: q [B, H, S, D], k/v [B, Hkv, K, D], mask [B, 1, S, K] bool or None (causal) -> [B, H, S, D]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
                                              is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=self.num_heads != self.num_kv_heads)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP/MoE with residuals. The MoE block returns (out, router_logits)."""

    def __init__(self, config, layer_idx: int, norm, mlp: nn.Module, mlp_name: str, attn_bias: bool, rotate):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, attn_bias, rotate)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()

    def forward(self, x, cos_sin, mask, cache, output_attentions=False, keep=None):
        """x [B, S, hidden] -> (x, attention weights or None, router logits [B*S, E] or None). keep (a slice or
        indices of S): the positions whose output is wanted; the MLP / MoE block runs on those only (x [B, K, hidden]
        out), as llama.cpp does in its last layer."""
        h, weights = self.self_attn(self.input_layernorm(x), cos_sin, mask, cache, output_attentions)
        x = x + h
        if keep is not None:
            x = x[:, keep]
        x, router_logits = self.feed_forward(x, self.post_attention_layernorm(x))
        return x, weights, router_logits

    def feed_forward(self, x: torch.Tensor, normed: torch.Tensor):
        """(x + MLP or MoE block of `normed`, router logits or None)."""
        out = getattr(self, self.mlp_name)(normed)
        out, router_logits = out if isinstance(out, tuple) else (out, None)
        return x + out, router_logits


def eager_attention(q, k, v, mask, scaling: float, dropout: float, training: bool):
    """Explicit softmax attention; returns the [B, H, Q, K] weights too."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # [B, H, Q, K]
    q_len, kv_len = q.shape[2], k.shape[2]
    if mask is None and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights
