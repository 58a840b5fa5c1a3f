"""The slot cache of a serving engine: KV rows for up to `slots` sequences, each with its own length, and a step
that feeds them as one ragged batch flattened to [1, T] (each running sequence's next token plus a chunk of a prompt).

The model is called unchanged: `update` (the plain attention) returns every scheduled sequence's keys concatenated,
with `mask` the matching block-diagonal causal mask; FastAttention calls `ragged_attention` instead, which attends
each sequence to its own row in place (one batched decode attention for the one-token rows, SDPA per prompt chunk)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
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
    decode_rows: list[int]        # the rows their attention reads (contiguous rows: a range, some feeding nothing)
    decode_pick: torch.Tensor | None  # [n] which of those rows each token is
    decode_mask: torch.Tensor | None  # [len(decode_rows), 1, 1, L] bool, None when every row sees all L positions
    decode_length: int            # L
    chunks: list[tuple[int, int, int, int, torch.Tensor | None]]  # (row, start, count, first token, mask or None)
    max_position: int = 0         # the last position written
    step_mask: torch.Tensor | None = None  # [T, max_position + 1] bool: the sliding window of each token, or None
    blocks: torch.Tensor | None = None     # [T] the block each token's keys go to
    offsets: torch.Tensor | None = None    # [T] and the position in it
    tables: torch.Tensor | None = None     # [T, width] each token's row's block table (int64, contiguous)


class OutOfBlocks(RuntimeError):
    """The paged cache has no block left to give."""


class BlockPool:
    """The blocks 0..n-1 of a paged cache: how many rows hold each, the full blocks remembered by the digest of their
    token prefix (prefix caching), and the remembered blocks no row holds, given out again least recently used
    first."""

    def __init__(self, n: int):
        self.refs = [0] * n
        self.free = deque(range(n))  # held by no row, remembering nothing
        self.idle: OrderedDict[int, None] = OrderedDict()  # held by no row, remembered: oldest first
        self.digest_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def held(self) -> int:
        return len(self.refs) - self.available()

    def take(self) -> int:
        """A block to write (a remembered one is forgotten when no free one is left)."""
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.block_of[self.digest_of.pop(block)]
        else:
            raise OutOfBlocks("no KV block is free")
        self.refs[block] = 1
        return block

    def share(self, block: int):
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1

    def release(self, block: int):
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self.idle[block] = None
            else:
                self.free.append(block)

    def remember(self, block: int, digest: bytes):
        """The block is full and holds the prefix `digest` names (a prefix already remembered keeps its block)."""
        if digest not in self.block_of and block not in self.digest_of:
            self.block_of[digest] = block
            self.digest_of[block] = digest

    def find(self, digest: bytes) -> int | None:
        return self.block_of.get(digest)


def chain(digest: bytes, tokens: torch.Tensor) -> bytes:
    """The digest of a prefix: the one before it and the next block's token ids (int64)."""
    return hashlib.sha256(digest + tokens.to(torch.int64).numpy().tobytes()).digest()


class SlotCache:
    """Keys/values of up to `slots` sequences (rows), each with its own length, written by `schedule`d steps: the
    model's forward writes a step, `commit` makes it count.

    Contiguous (block_size None): per layer [slots, Hkv, max_length, D], row r in block r. Paged (block_size B): per
    layer a pool [num_blocks, Hkv, B, D] (default: slots * max_length positions); a row holds blocks as it grows
    (`grow`, `room`) and gives them back (`free`); with `prefix_caching`, full blocks are remembered by the digest of
    the tokens up to their end (`remember`) and a new row starts from the longest remembered prefix of its prompt
    (`reuse`)."""

    def __init__(self, config, slots: int, max_length: int, dtype: torch.dtype, device=None,
                 sliding_window: int | None = None, block_size: int | None = None, num_blocks: int | None = None,
                 prefix_caching: bool = False):
        self.paged = block_size is not None
        self.block_size = block_size if self.paged else max_length
        self.width = -(-max_length // self.block_size)  # blocks a row can hold
        n = (num_blocks or slots * self.width) if self.paged else slots
        if n < self.width:
            raise ValueError(f"{n} KV blocks of {self.block_size} positions cannot hold one sequence of "
                             f"{max_length} positions (at least {self.width} blocks)")
        shape = (n, config.num_key_value_heads, self.block_size, config.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.num_blocks = n
        self.pool = BlockPool(n) if self.paged else None
        self.prefix_caching = prefix_caching and self.paged
        self.blocks: list[list[int]] = [[] for _ in range(slots)] if self.paged else [[r] for r in range(slots)]
        self.table = torch.tensor([b + [0] * (self.width - len(b)) for b in self.blocks], dtype=torch.int64)
        self.digests: list[list[bytes]] = [[] for _ in range(slots)]  # of each row's first remembered blocks
        self.salts: list[bytes] = [b""] * slots
        self.lengths = [0] * slots
        self.max_length = max_length
        self.window = sliding_window
        self.device = device
        self.plan: Schedule | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and masks come from the schedule, not from the model's default

    def used(self) -> int:
        """Positions held, all rows together (paged: whole blocks)."""
        return self.pool.held() * self.block_size if self.paged else sum(self.lengths)

    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def room(self, row: int) -> int:
        """Positions the row can reach with its blocks and those free."""
        if not self.paged:
            return self.max_length
        return min(self.max_length, (len(self.blocks[row]) + self.pool.available()) * self.block_size)

    def grow(self, row: int, length: int) -> bool:
        """Give the row blocks for `length` positions; False (and nothing taken) when too few are free."""
        if length > self.max_length:
            return False
        need = -(-length // self.block_size) - len(self.blocks[row])
        if need <= 0:
            return True
        if need > self.pool.available():
            return False
        for _ in range(need):
            block = self.pool.take()
            self.table[row, len(self.blocks[row])] = block
            self.blocks[row].append(block)
        return True

    def free(self, row: int):
        self.lengths[row] = 0
        if self.paged:
            for block in self.blocks[row]:
                self.pool.release(block)
            self.blocks[row] = []
            self.digests[row] = []
            self.table[row] = 0

    def reuse(self, row: int, tokens: torch.Tensor, salt: bytes = b"") -> int:
        """Start an empty row from the longest remembered prefix of `tokens` [n] in whole blocks, leaving at least
        its last token to compute; returns the positions reused. `salt` starts the row's digests: what else its KV
        depends on (a LoRA adapter), so that rows with another salt share none of its blocks."""
        self.salts[row] = salt
        if not self.prefix_caching or self.blocks[row]:
            return 0
        size, digest = self.block_size, salt
        for i in range((len(tokens) - 1) // size):
            digest = chain(digest, tokens[i * size:(i + 1) * size])
            block = self.pool.find(digest)
            if block is None:
                break
            self.pool.share(block)
            self.table[row, i] = block
            self.blocks[row].append(block)
            self.digests[row].append(digest)
        self.lengths[row] = len(self.blocks[row]) * size
        return self.lengths[row]

    def remember(self, row: int, tokens: torch.Tensor):
        """Remember the row's full blocks not yet remembered; tokens [>= its length]: the ids at its positions."""
        if not self.prefix_caching:
            return
        size, digests = self.block_size, self.digests[row]
        for i in range(len(digests), self.lengths[row] // size):
            digests.append(chain(digests[-1] if digests else self.salts[row], tokens[i * size:(i + 1) * size]))
            self.pool.remember(self.blocks[row][i], digests[-1])

    def schedule(self, segments: list[tuple[int, int]]) -> Schedule:
        """Lay out a step feeding `segments` (row, tokens) in that order; returns it (also kept as self.plan). A
        paged row must hold the blocks for its new positions (grow)."""
        if not segments:
            raise ValueError("a step needs at least one segment")
        laid, rows, positions, decode, chunks = [], [], [], [], []
        token = 0
        for row, count in segments:
            start = self.lengths[row]
            if start + count > min(self.max_length, len(self.blocks[row]) * self.block_size):
                raise ValueError(f"slot {row} holds {min(self.max_length, len(self.blocks[row]) * self.block_size)} "
                                 f"positions; {start + count} were asked for")
            laid.append((row, start, count))
            rows += [row] * count
            positions += range(start, start + count)
            if count == 1:
                decode.append((token, row, start))
            else:
                chunks.append((row, start, count, token, self._chunk_mask(start, count)))
            token += count
        dev = self.device
        plan = Schedule(laid, torch.tensor(rows, device=dev), torch.tensor(positions, device=dev), None, [],
                        None, None, 0, chunks, max(positions))
        rows_t, positions_t = torch.tensor(rows), torch.tensor(positions)
        plan.tables = self.table[rows_t]
        plan.blocks = plan.tables.gather(1, (positions_t // self.block_size)[:, None])[:, 0].to(dev)
        plan.offsets = (positions_t % self.block_size).to(dev)
        if self.window is not None and plan.max_position >= self.window:
            cols = torch.arange(plan.max_position + 1, device=dev)[None]
            at = plan.positions[:, None]
            plan.step_mask = ((cols <= at) & (cols > at - self.window)).contiguous()
        if decode:
            if self.paged:  # the rows gathered in token order
                plan.decode_rows = [r for _, r, _ in decode]
                plan.decode_pick = torch.arange(len(decode), device=dev)
                ends = [s + 1 for _, _, s in decode]
            else:  # a range of rows, viewed in place; rows between that feed nothing: one position, results dropped
                first, last = min(r for _, r, _ in decode), max(r for _, r, _ in decode)
                plan.decode_rows = list(range(first, last + 1))
                plan.decode_pick = torch.tensor([r - first for _, r, _ in decode], device=dev)
                ends = [1] * (last + 1 - first)
                for _, r, s in decode:
                    ends[r - first] = s + 1
            plan.decode = torch.tensor([t for t, _, _ in decode], device=dev)
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
        """k/v [1, Hkv, T, D] of the scheduled tokens into their blocks and positions."""
        plan = self.plan
        self.keys[layer_idx][plan.blocks, :, plan.offsets] = k[0].transpose(0, 1).to(self.keys[layer_idx].dtype)
        self.values[layer_idx][plan.blocks, :, plan.offsets] = v[0].transpose(0, 1).to(self.values[layer_idx].dtype)

    def gather(self, layer_idx: int, rows: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [len(rows), Hkv, length, D] of positions 0..length-1 of the rows (contiguous rows in a
        range: views in place; paged: copies, positions past a row's blocks read block 0)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if not self.paged:
            first = rows[0]
            if rows == list(range(first, first + len(rows))):
                return keys[first:first + len(rows), :, :length], values[first:first + len(rows), :, :length]
            index = torch.tensor(rows, device=keys.device)
            return keys[index, :, :length], values[index, :, :length]
        n = -(-length // self.block_size)
        blocks = self.table[rows, :n].to(keys.device)  # [R, n]
        shape = (len(rows), keys.shape[1], n * self.block_size, keys.shape[3])
        k = keys[blocks].transpose(1, 2).reshape(shape)[:, :, :length]
        v = values[blocks].transpose(1, 2).reshape(shape)[:, :, :length]
        return k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain attention's cache call: write, then every segment's keys/values up to its new end,
        concatenated [1, Hkv, sum of ends, D] in segment order (see `mask`)."""
        self.write(k, v, layer_idx)
        spans = [self.gather(layer_idx, [row], start + count) for row, start, count in self.plan.segments]
        keys = torch.cat([k[0] for k, _ in spans], dim=1)
        values = torch.cat([v[0] for _, v in spans], dim=1)
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
    keys = cache.keys[attn.layer_idx]
    plan = cache.plan
    out = q.new_empty(t, attn.num_heads, attn.head_dim)
    if plan.decode is not None:
        qd = q.new_zeros(len(plan.decode_rows), attn.num_heads, 1, attn.head_dim)
        qd[plan.decode_pick, :, 0] = q[0, :, plan.decode].transpose(0, 1)
        kd, vd = cache.gather(attn.layer_idx, plan.decode_rows, plan.decode_length)
        o = decode_attention(qd.to(keys.dtype), kd, vd, plan.decode_mask, attn.scaling)
        out[plan.decode] = o[plan.decode_pick, :, 0].to(out.dtype)
    for row, start, count, token, mask in plan.chunks:
        kc, vc = cache.gather(attn.layer_idx, [row], start + count)
        o = attn.attend(q[:, :, token:token + count].to(keys.dtype), kc, vc, mask, 0.0)  # [1, H, count, D]
        out[token:token + count] = o[0].transpose(0, 1).to(out.dtype)
    return attn.o_proj(out.reshape(1, t, -1))
