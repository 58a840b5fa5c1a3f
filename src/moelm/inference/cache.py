"""The static KV cache: keys/values preallocated for the whole generation, written by position."""
from __future__ import annotations

import torch


class StaticCache:
    """Per-layer keys/values [B, Hkv, max_length, D] allocated once; `update` writes the new positions and returns
    views of the filled part, so attention sees exactly what a DynamicCache would."""

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype, device=None, tp_size: int = 1):
        shape = (batch_size, config.num_key_value_heads // tp_size, max_length, config.head_size)  # local heads
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.lengths = [0] * n
        self.max_length = max_length

    def reserve(self, layer_idx: int, new: int) -> int:
        """Claim the next `new` positions of a layer; returns the first."""
        start = self.lengths[layer_idx]
        if start + new > self.max_length:
            raise ValueError(f"the static KV cache holds {self.max_length} positions; {start + new} were asked for")
        self.lengths[layer_idx] = start + new
        return start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.reserve(layer_idx, k.shape[-2])
        end = self.lengths[layer_idx]
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def __len__(self) -> int:
        return sum(1 for n in self.lengths if n)

    def reorder_cache(self, beam_idx: torch.Tensor):
        for t in self.keys + self.values:
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def resize(self, max_length: int, rows: torch.Tensor | None = None):
        """Room for max_length positions, holding the cached rows `rows` [N] in that order (all when None), as a
        continued generation needs: longer, or with each prompt's row repeated for beams."""
        if max_length < max(self.lengths):
            raise ValueError(f"the static KV cache holds {max(self.lengths)} positions, more than {max_length}")
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                t = t if rows is None else t.index_select(0, rows.to(t.device))
                store[i] = t.new_zeros(*t.shape[:2], max_length, t.shape[-1])
                store[i][:, :, :self.lengths[i]] = t[:, :, :self.lengths[i]]
        self.max_length = max_length

    def crop(self, length: int):
        """Keep the first `length` positions (a negative length drops that many from the end, as DynamicCache)."""
        self.lengths = [min(n, length) if length >= 0 else max(n + length, 0) for n in self.lengths]

    def batch_repeat_interleave(self, repeats: int):
        """Each row repeated `repeats` times (transformers' name: for beams or several samples)."""
        self.resize(self.max_length, torch.arange(self.keys[0].shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep the rows `indices` [N], in that order."""
        self.resize(self.max_length, torch.as_tensor(indices))

    def reset(self):
        """Empty, as when allocated."""
        for t in self.keys + self.values:
            t.zero_()
        self.lengths = [0] * len(self.lengths)

