"""Speculative decoding in the serving engine, configured as vLLM's --speculative-config.

Each step, every decoding sequence may get up to k drafted tokens; the engine feeds its last token and the drafts as
one segment of the step, checks them against the logits after each (moelm.generation.speculative.judge_draft: greedy
keeps drafts equal to the model's choice, sampling keeps a draft with probability min(1, p/q)), emits the kept ones
plus the model's next token, and rolls the sequence's KV row back to what was kept. The drafters below keep state per
KV row:

- Ngram: the earliest occurrence of the sequence's last n tokens (n from prompt_lookup_max down to
  prompt_lookup_min), its continuation as drafts;
- Mtp: ERNIE's multi-token-prediction head (Ernie4_5_MoeForCausalLM.mtp), with its own one-layer slot cache fed
  every position the main model made final (prompt chunks and kept tokens); drafts after the first from the head's
  own output and the draft before (as vLLM's MTP proposer runs a one-layer head k times);
- DraftModel: a smaller model with the same vocabulary and its own slot cache, drafting k tokens one step at a time,
  greedily or sampled with the sequence's own parameters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch

from ..generation.speculative import lookup
from ..inference.quantization import MODES
from ..inference.slots import SlotCache


class SpeculativeConfigError(ValueError):
    pass


@dataclass
class SpeculativeConfig:
    """vLLM's speculative_config fields that moelm runs (and `adaptive`, moelm's own: draft only while drafting
    steps produce tokens faster than plain ones)."""

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = None
    quantization: str | None = None
    adaptive: bool = True

    @classmethod
    def parse(cls, value: "str | dict") -> "SpeculativeConfig":
        """From --speculative-config's JSON (or a dict); SpeculativeConfigError naming the field at fault."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(f"--speculative-config is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise SpeculativeConfigError("--speculative-config must be a JSON object, e.g. "
                                         '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpeculativeConfigError(f"--speculative-config: moelm does not support {', '.join(unknown)} (it "
                                         f"takes {', '.join(sorted(known))})")
        value = dict(value)
        method = value.get("method") or ("draft_model" if value.get("model") else None)
        value["method"] = {"ernie_mtp": "mtp"}.get(method, method)
        if value["method"] not in ("ngram", "mtp", "draft_model"):
            raise SpeculativeConfigError(f"--speculative-config: method must be 'ngram', 'mtp' (or 'ernie_mtp') or "
                                         f"'draft_model' (with model), got {method!r}")
        if "num_speculative_tokens" not in value:
            raise SpeculativeConfigError("--speculative-config: num_speculative_tokens is required")
        config = cls(**value)
        config.check()
        return config

    def check(self):
        def positive(name, allow_none=True):
            v = getattr(self, name)
            if (v is None and not allow_none) or (v is not None and (type(v) is not int or v < 1)):
                raise SpeculativeConfigError(f"--speculative-config: {name} must be a positive integer, got {v!r}")

        positive("num_speculative_tokens", allow_none=False)
        for name in ("prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            positive(name)
        if not isinstance(self.adaptive, bool):
            raise SpeculativeConfigError(f"--speculative-config: adaptive must be true or false, got {self.adaptive!r}")
        if self.method == "draft_model":
            if not self.model:
                raise SpeculativeConfigError("--speculative-config: method 'draft_model' needs model (its path)")
            if self.quantization is not None and self.quantization not in MODES:
                raise SpeculativeConfigError(f"--speculative-config: quantization must be one of {', '.join(MODES)} "
                                             f"(the draft model's weights), got {self.quantization!r}")
        elif self.model is not None or self.quantization is not None:
            field = "model" if self.model is not None else "quantization"
            raise SpeculativeConfigError(f"--speculative-config: {field} is for method 'draft_model', not "
                                         f"{self.method!r}")
        if self.method == "ngram":
            # vLLM's defaults: both 5 when neither is given, else the one given for both
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            self.prompt_lookup_min = lo or hi or 5
            self.prompt_lookup_max = hi or lo or 5
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise SpeculativeConfigError(f"--speculative-config: prompt_lookup_min ({self.prompt_lookup_min}) "
                                             f"is more than prompt_lookup_max ({self.prompt_lookup_max})")
        elif self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
            raise SpeculativeConfigError("--speculative-config: prompt_lookup_min/max are for method 'ngram'")


def drafter_for(config: SpeculativeConfig, engine, draft_model=None):
    """The engine's drafter for `config` (draft_model: the loaded model of method 'draft_model')."""
    if config.method == "ngram":
        return Ngram(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "mtp":
        if getattr(engine.model, "mtp", None) is None:
            raise SpeculativeConfigError(f"--speculative-config: method 'mtp' needs ERNIE's MTP head; "
                                         f"{type(engine.model).__name__} has none (only ERNIE 4.5 MoE checkpoints "
                                         "with model.mtp_* tensors do)")
        return Mtp(engine)
    if draft_model is None:
        raise SpeculativeConfigError("--speculative-config: method 'draft_model' needs the draft model loaded")
    if draft_model.config.vocab_size != engine.config.vocab_size:
        raise SpeculativeConfigError(f"--speculative-config: the draft model has a vocabulary of "
                                     f"{draft_model.config.vocab_size} tokens, the model {engine.config.vocab_size}: "
                                     "they must share the tokenizer")
    return DraftModel(engine, draft_model)


def _ragged(modules) -> bool:
    from ..inference.modules import FastAttention

    return all(isinstance(m, FastAttention) for m in modules if hasattr(m, "q_proj"))


def slot_forward(run, cache: SlotCache, segments: list[tuple[int, int]], keep: list[int], ragged: bool):
    """run(positions [1, T], attention_mask or None) over one step of `cache` laid out as `segments`; the positions
    written count from then on."""
    plan = cache.schedule(segments)
    try:
        return run(plan.positions[None], None if ragged else cache.mask())
    finally:
        cache.commit()


class Ngram:
    """Drafts from the sequence's own tokens (prompt and output)."""

    hidden = False

    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram

    def propose(self, engine, seqs, ks) -> list[tuple[list[int], None]]:
        out = []
        for seq, k in zip(seqs, ks):
            row = seq.ids[:len(seq.prompt) + len(seq.tokens)]
            out.append((lookup(row, self.max_ngram, k, self.min_ngram).tolist() if k else [], None))
        return out

    def observe(self, seq, hidden):
        pass

    def verified(self, seq, length: int):
        pass

    def free(self, row: int):
        pass


class Mtp:
    """ERNIE's MTP head: `observe` collects the main model's pre-norm hidden states of each sequence's positions as
    they become final; `propose` runs the head over them (one ragged step over every drafting sequence) and drafts
    the token after the sequence's last one, then each further one from the head's output and that draft."""

    hidden = True

    def __init__(self, engine):
        model = engine.model
        config = model.config
        self.head = model.mtp
        layout = SimpleNamespace(num_key_value_heads=config.num_key_value_heads, head_size=config.head_size,
                                 num_hidden_layers=1)
        self.cache = SlotCache(layout, engine.max_num_seqs, engine.max_model_len, engine.cache.keys[0].dtype,
                               model.device, getattr(model.model, "sliding_window", None))
        self.ragged = _ragged(model.model.mtp_block.modules())
        self.pending: dict[int, list[torch.Tensor]] = {}  # row -> hidden [n, H] of positions from its head length

    def observe(self, seq, hidden: torch.Tensor):
        self.pending.setdefault(seq.row, []).append(hidden)

    def propose(self, engine, seqs, ks) -> list[tuple[list[int], torch.Tensor | None]]:
        drafting = [(seq, k) for seq, k in zip(seqs, ks) if k]
        if not drafting:
            return [([], None) for _ in seqs]
        segments, tokens, hidden, keep = [], [], [], []
        for seq, _ in drafting:
            h = torch.cat(self.pending.pop(seq.row))
            start = self.cache.lengths[seq.row]
            segments.append((seq.row, h.shape[0]))
            tokens += seq.ids[start + 1:start + 1 + h.shape[0]].tolist()  # the next token of each position
            hidden.append(h)
            keep.append(len(tokens) - 1)
        lengths = {row: self.cache.lengths[row] + n for row, n in segments}
        device = engine.model.device
        ids, states = torch.tensor([tokens], device=device), torch.cat(hidden)[None]
        drafts = {seq.row: [] for seq, _ in drafting}
        probs = {seq.row: [] for seq, _ in drafting}
        x = None  # the head's output at each drafting sequence's last position [1, n, H]
        for j in range(max(k for _, k in drafting)):
            if j:  # the head's output and the draft before: the next position's input (vLLM's MTP proposer)
                step = [(seq, k) for seq, k in drafting if k > j]
                picked = torch.tensor([i for i, (_, k) in enumerate(drafting) if k > j], device=device)
                drafting, segments = step, [(seq.row, 1) for seq, _ in step]
                ids = torch.tensor([[drafts[seq.row][-1] for seq, _ in step]], device=device)
                states, keep = x[:, picked], list(range(len(step)))
            x = slot_forward(lambda pos, mask: self.head.states(ids, states, pos, self.cache, mask), self.cache,
                             segments, keep, self.ragged)[:, keep]  # [1, n, H]
            logits = self.head.logits(x)[0].float().cpu()
            for (seq, _), row in zip(drafting, logits):
                token, q = engine.draft_token(seq, row, drafts[seq.row])
                drafts[seq.row].append(token)
                if q is not None:
                    probs[seq.row].append(q)
        for row, length in lengths.items():  # the further drafts' positions are not the sequence's
            self.cache.lengths[row] = length
        return [(drafts[seq.row], torch.stack(probs[seq.row]) if probs[seq.row] else None) if seq.row in drafts
                else ([], None) for seq in seqs]

    def verified(self, seq, length: int):
        pass

    def free(self, row: int):
        self.pending.pop(row, None)
        self.cache.free(row)


class DraftModel:
    """A smaller model drafting k tokens a step; its slot cache catches up with each sequence's tokens first."""

    hidden = False

    def __init__(self, engine, model):
        self.model = model
        dtype = model.get_input_embeddings().weight.dtype
        self.cache = SlotCache(model.config, engine.max_num_seqs, engine.max_model_len, dtype, model.device,
                               getattr(model.model, "sliding_window", None))
        self.ragged = _ragged(model.modules())

    def propose(self, engine, seqs, ks) -> list[tuple[list[int], torch.Tensor | None]]:
        drafts = {seq.row: [] for seq in seqs}
        probs = {seq.row: [] for seq in seqs}
        feed = {seq.row: seq.ids[self.cache.lengths[seq.row]:len(seq.prompt) + len(seq.tokens)].tolist()
                for seq in seqs}
        for j in range(max(ks, default=0)):
            step = [seq for seq, k in zip(seqs, ks) if k > j]
            segments = [(seq.row, len(feed[seq.row])) for seq in step]
            tokens = [t for seq in step for t in feed[seq.row]]
            keep = list(last_indices([n for _, n in segments]))
            device = self.model.device
            ids = torch.tensor([tokens], device=device)
            out = slot_forward(lambda pos, mask: self.model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                                            past_key_values=self.cache, use_cache=True,
                                                            logits_to_keep=torch.tensor(keep, device=device)),
                               self.cache, segments, keep, self.ragged)
            for seq, row in zip(step, out.logits[0].float().cpu()):
                token, q = engine.draft_token(seq, row, drafts[seq.row])
                drafts[seq.row].append(token)
                if q is not None:
                    probs[seq.row].append(q)
                feed[seq.row] = [token]
        return [(drafts[seq.row], torch.stack(probs[seq.row]) if probs[seq.row] else None) for seq in seqs]

    def observe(self, seq, hidden):
        pass

    def verified(self, seq, length: int):
        """The sequence's KV row now holds `length` positions: the draft cache keeps at most those."""
        self.cache.lengths[seq.row] = min(self.cache.lengths[seq.row], length)

    def free(self, row: int):
        self.cache.free(row)


def last_indices(counts: list[int]) -> list[int]:
    """The index of each segment's last token in the step's flat token list."""
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total - 1)
    return out
