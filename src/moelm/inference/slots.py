"""The slot cache of a serving engine: KV rows for up to `slots` sequences, each with its own length, and a step
that feeds them as one ragged batch flattened to [1, T] (each running sequence's next token plus a chunk of a prompt).

The model is called unchanged: `update` (the plain attention) returns every scheduled sequence's keys concatenated,
with `mask` the matching block-diagonal causal mask; FastAttention calls `ragged_attention` instead, which attends
each sequence to its own row in place (one batched decode attention for the one-token rows, SDPA per prompt chunk)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import decode_attention


@dataclass
class Schedule:
    """One step's layout: `segments` (row, start, count) in token order, start = the row's length before the step."""

    segments: list[tuple[int, int, int]]
    rows: torch.Tensor            # [T] slot row of each token
    positions: torch.Tensor       # [T] its position in its sequence
    decode: torch.Tensor | None   # [n] tokens of one-token segments
    decode_rows: tuple[int, int]  # the rows [first, last + 1) their attention reads
    decode_pick: torch.Tensor | None  # [n] which of those rows each token is
    decode_mask: torch.Tensor | None  # [last + 1 - first, 1, 1, L] bool, None when every row sees all L positions
    decode_length: int            # L
    chunks: list[tuple[int, int, int, int, torch.Tensor | None]]  # (row, start, count, first token, mask or None)
    max_position: int = 0         # the last position written
    step_mask: torch.Tensor | None = None  # [T, max_position + 1] bool: the sliding window of each token, or None


class SlotCache:
    """Per-layer keys/values [slots, Hkv, max_length, D]; `lengths[row]` positions of a row are filled. `schedule`
    lays out a step, the model's forward writes it, `commit` makes it count."""

    def __init__(self, config, slots: int, max_length: int, dtype: torch.dtype, device=None,
                 sliding_window: int | None = None):
        shape = (slots, config.num_key_value_heads, max_length, config.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.lengths = [0] * slots
        self.max_length = max_length
        self.window = sliding_window
        self.device = device
        self.plan: Schedule | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and masks come from the schedule, not from the model's default

    def used(self) -> int:
        """Positions filled, all rows together."""
        return sum(self.lengths)

    def free(self, row: int):
        self.lengths[row] = 0

    def schedule(self, segments: list[tuple[int, int]]) -> Schedule:
        """Lay out a step feeding `segments` (row, tokens) in that order; returns it (also kept as self.plan)."""
        if not segments:
            raise ValueError("a step needs at least one segment")
        laid, rows, positions, decode, chunks = [], [], [], [], []
        token = 0
        for row, count in segments:
            start = self.lengths[row]
            if start + count > self.max_length:
                raise ValueError(f"slot {row} holds {self.max_length} positions; {start + count} were asked for")
            laid.append((row, start, count))
            rows += [row] * count
            positions += range(start, start + count)
            if count == 1:
                decode.append((token, row, start))
            else:
                chunks.append((row, start, count, token, self._chunk_mask(start, count)))
            token += count
        dev = self.device
        plan = Schedule(laid, torch.tensor(rows, device=dev), torch.tensor(positions, device=dev), None, (0, 0),
                        None, None, 0, chunks, max(positions))
        if self.window is not None and plan.max_position >= self.window:
            cols = torch.arange(plan.max_position + 1, device=dev)[None]
            at = plan.positions[:, None]
            plan.step_mask = ((cols <= at) & (cols > at - self.window)).contiguous()
        if decode:
            first, last = min(r for _, r, _ in decode), max(r for _, r, _ in decode)
            plan.decode = torch.tensor([t for t, _, _ in decode], device=dev)
            plan.decode_rows = (first, last + 1)
            plan.decode_pick = torch.tensor([r - first for _, r, _ in decode], device=dev)
            ends = [1] * (last + 1 - first)  # rows between that feed nothing: one position, results dropped
            for _, r, s in decode:
                ends[r - first] = s + 1
            length = max(ends)
            plan.decode_length = length
            ends_t = torch.tensor(ends, device=dev)
            cols = torch.arange(length, device=dev)
            allowed = cols[None] < ends_t[:, None]
            if self.window is not None:
                allowed &= cols[None] > ends_t[:, None] - 1 - self.window
            plan.decode_mask = None if bool(allowed.all()) else allowed[:, None, None]
        self.plan = plan
        return plan

    def _chunk_mask(self, start: int, count: int) -> torch.Tensor | None:
        """[1, 1, count, start + count] causal mask of a prompt chunk after `start` cached positions (None: plain
        causal from position 0)."""
        q = torch.arange(start, start + count, device=self.device)[:, None]
        k = torch.arange(start + count, device=self.device)[None]
        windowed = self.window is not None and start + count > self.window
        if start == 0 and not windowed:
            return None
        mask = k <= q
        if self.window is not None:
            mask &= k > q - self.window
        return mask[None, None]

    def write(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """k/v [1, Hkv, T, D] of the scheduled tokens into their rows and positions."""
        plan = self.plan
        self.keys[layer_idx][plan.rows, :, plan.positions] = k[0].transpose(0, 1).to(self.keys[layer_idx].dtype)
        self.values[layer_idx][plan.rows, :, plan.positions] = v[0].transpose(0, 1).to(self.values[layer_idx].dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain attention's cache call: write, then every segment's keys/values up to its new end,
        concatenated [1, Hkv, sum of ends, D] in segment order (see `mask`)."""
        self.write(k, v, layer_idx)
        spans = [(row, start + count) for row, start, count in self.plan.segments]
        keys = torch.cat([self.keys[layer_idx][row, :, :end] for row, end in spans], dim=1)
        values = torch.cat([self.values[layer_idx][row, :, :end] for row, end in spans], dim=1)
        return keys[None], values[None]

    def mask(self) -> torch.Tensor:
        """[1, 1, T, sum of ends] bool for `update`'s layout: a token sees its own sequence's positions up to its
        own (within the sliding window)."""
        plan = self.plan
        total = sum(start + count for _, start, count in plan.segments)
        mask = torch.zeros(len(plan.rows), total, dtype=torch.bool, device=self.device)
        token = offset = 0
        for _, start, count in plan.segments:
            q = torch.arange(start, start + count, device=self.device)[:, None]
            k = torch.arange(start + count, device=self.device)[None]
            allowed = k <= q
            if self.window is not None:
                allowed &= k > q - self.window
            mask[token:token + count, offset:offset + start + count] = allowed
            token, offset = token + count, offset + start + count
        return mask[None, None]

    def commit(self):
        """The scheduled positions are now filled."""
        for row, start, count in self.plan.segments:
            self.lengths[row] = start + count
        self.plan = None


def ragged_attention(attn, x: torch.Tensor, cos_sin, cache: SlotCache) -> torch.Tensor:
    """attn's forward for a scheduled step: x [1, T, hidden] -> [1, T, hidden]. Keys/values go to the slot rows;
    one-token rows attend together (decode_attention over their rows' cache, in place), each prompt chunk by SDPA
    over its row."""
    _, t, _ = x.shape
    q, k, v = attn.qkv(x)
    q = q.view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, H, T, D]
    k = k.view(1, t, -1, attn.head_dim).transpose(1, 2)  # [1, Hkv, T, D]
    v = v.view(1, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos_sin
    q, k = attn.rotate(q, cos, sin), attn.rotate(k, cos, sin)
    cache.write(k, v, attn.layer_idx)
    keys, values = cache.keys[attn.layer_idx], cache.values[attn.layer_idx]
    plan = cache.plan
    out = q.new_empty(t, attn.num_heads, attn.head_dim)
    if plan.decode is not None:
        first, end = plan.decode_rows
        qd = q.new_zeros(end - first, attn.num_heads, 1, attn.head_dim)
        qd[plan.decode_pick, :, 0] = q[0, :, plan.decode].transpose(0, 1)
        length = plan.decode_length
        o = decode_attention(qd.to(keys.dtype), keys[first:end, :, :length], values[first:end, :, :length],
                             plan.decode_mask, attn.scaling)
        out[plan.decode] = o[plan.decode_pick, :, 0].to(out.dtype)
    for row, start, count, token, mask in plan.chunks:
        end = start + count
        o = attn.attend(q[:, :, token:token + count].to(keys.dtype), keys[row:row + 1, :, :end],
                        values[row:row + 1, :, :end], mask, 0.0)  # [1, H, count, D]
        out[token:token + count] = o[0].transpose(0, 1).to(out.dtype)
    return attn.o_proj(out.reshape(1, t, -1))
