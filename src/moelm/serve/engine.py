"""The serving engine, usable without HTTP: `submit` a prompt, iterate its outputs (or get them by callback),
`cancel` it.

One thread owns the model. Requests come in through a bounded queue. Each step runs one forward over every running
sequence's next token plus chunks of waiting prompts (continuous batching, at most `max_num_batched_tokens` tokens);
a sequence leaves the batch the step it finishes or is cancelled. KV lives in a paged SlotCache: `max_num_seqs`
rows, each holding blocks of `block_size` positions from one pool as it grows. With prefix caching, a new sequence
starts from the longest run of full blocks another sequence left with the same tokens (its prompt's last token is
always computed). When a step needs a block and none is free, the sequence admitted last is preempted: its blocks go
back (those remembered stay until needed), and it waits at the head of the queue to be prefilled again (prompt and
tokens so far), then goes on where it was.
Each sequence samples with its own parameters and its own seeded generator, so a seed reproduces an output whatever
else runs. With `speculative` (moelm.serve.speculation), a decoding sequence feeds its drafts with its last token and
keeps those the model agrees with."""
from __future__ import annotations

import contextlib
import itertools
import queue
import random
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from ..generation.sampling import Sampling, SamplingError, apply_penalties, choose, warp
from ..generation.speculative import Always, Pace, judge_draft
from ..inference.quantization import independent_rows
from ..inference.slots import SlotCache
from ..models.modeling import logits_kept, moe_blocks
from ..text import Detokenizer, StopStrings
from .speculation import SpeculativeConfig, drafter_for
from .structured import GrammarError, Grammars, allowed

DEFAULT_MAX_MODEL_LEN = 4096  # the KV of max_num_seqs rows of this many positions is allocated at start


class RequestError(ValueError):
    """A request the engine cannot take (the server answers 400); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineFull(RuntimeError):
    """The waiting queue is full (the server answers 503)."""


@dataclass
class SamplingParams(Sampling):
    """Per-request decoding: the sampler's knobs (moelm.generation.Sampling: temperature 0 is greedy, top_k 0 off),
    OpenAI's other fields and vLLM's usual extensions. max_tokens 0: the prompt alone (its logprobs), nothing
    sampled."""

    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and rank, and the k most likely
    skip_special_tokens: bool = True
    n: int = 1
    structured: tuple[str, object, str] | None = None  # (kind, spec, request field): see moelm.serve.structured
    grammar: str | None = None  # its compiled grammar (Engine.check sets it)
    adapter: int = 0  # the LoRA adapter it runs with (Engine's `adapters`; 0: none)
    cache_salt: str | None = None  # shares prefix-cache blocks only with requests of the same salt

    def __post_init__(self):
        """Checked when the engine takes the request (sampling()), where a bad knob becomes a RequestError."""

    def sampling(self) -> Sampling:
        """The sampler's knobs alone (SamplingError naming the field for a bad one)."""
        return Sampling(**{f.name: getattr(self, f.name) for f in fields(Sampling)})


def salt_of(params: SamplingParams) -> bytes:
    """What starts a sequence's prefix-cache digests: its LoRA adapter and its cache_salt (none: b"")."""
    salt = b"" if not params.adapter else f"lora:{params.adapter}".encode()
    if params.cache_salt is not None:
        salt += b"\0salt:" + params.cache_salt.encode()
    return salt


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: a prompt's first token (nothing before it)
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int | None = None  # a prompt token's: 1 + the tokens more likely (ties count)


@dataclass
class Output:
    """One event of choice `index`: its new token (none in a final flush) and the text that became final; a
    finish_reason ("stop", "length", "abort" or "error" with `error`) on its last event; on its first event, with
    SamplingParams.prompt_logprobs, the prompt tokens' logprobs (one per prompt token)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Request:
    """A submitted prompt with `n` choices. Iterate it for its Outputs (when no callback was given), `cancel()` it;
    `prompt_tokens` and `completion_tokens` count as it goes."""

    def __init__(self, engine: "Engine", rid: int, prompt: list[int], params: SamplingParams,
                 callback: Callable[[Output], None] | None):
        self.engine, self.id, self.prompt, self.params = engine, rid, prompt, params
        self.queue: queue.Queue | None = None if callback is not None else queue.Queue()
        self.callback = callback or self.queue.put
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache (its first choice's)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def cancel(self):
        self.engine.cancel(self)

    def __iter__(self):
        if self.queue is None:
            raise TypeError("this request delivers its outputs to its callback")
        left = self.params.n
        while left:
            out = self.queue.get()
            left -= out.finish_reason is not None
            yield out


class Sequence:
    """One choice of a request as the engine runs it."""

    def __init__(self, request: Request, index: int, generator: torch.Generator | None, tokenizer):
        p = request.params
        self.request, self.index, self.generator = request, index, generator
        self.prompt = request.prompt
        self.tokens: list[int] = []
        self.row: int | None = None
        self.filled = 0  # positions in the cache, while prefilling
        self.target = len(self.prompt)  # positions to prefill (after a preemption: the prompt and tokens but the last)
        self.detok = Detokenizer(tokenizer, self.prompt, p.skip_special_tokens)
        self.stops = StopStrings(p.stop)
        self.sampling = p.sampling()
        self.ids = torch.tensor(self.prompt + [0] * p.max_tokens)  # prompt + tokens, as generate's input_ids
        self.matcher = None  # structured output: the grammar's state
        self.mask: torch.Tensor | None = None  # and the tokens it allows next [V] bool
        # the prompt's logprobs so far (position i: token i given those before); sent on its first event
        self.scores = None if p.prompt_logprobs is None else [TokenLogprob(self.prompt[0], None, [])]
        self.scores_sent = False
        self.submitted = time.perf_counter()
        self.last_time: float | None = None

    def scoring(self) -> bool:
        """Its prompt logprobs are asked for and not all computed yet."""
        return self.scores is not None and len(self.scores) < len(self.prompt)


class Engine:
    """Continuous batching over a SlotCache; see the module docstring. `metrics`, if given, gets
    prompt_tokens(n), generation_tokens(n), ttft(s), itl(s), finished(reason, e2e seconds) and, when speculating,
    speculated(drafted, kept) for each checked draft. speculative: a SpeculativeConfig (or its JSON / dict);
    draft_model: the loaded draft model of its method 'draft_model'. KV: blocks of `block_size` positions (None:
    one contiguous row of max_model_len per sequence), `num_blocks` of them, or as many as `kv_cache_memory` bytes
    hold, by default enough for every row to reach max_model_len; `enable_prefix_caching` (default: on, except
    with MTP drafting, whose head needs the hidden states of every position). adapters: the LoRA adapters loaded
    onto the model (moelm.serve.lora.Adapters), chosen per request by SamplingParams.adapter. expert_metrics: count
    in `expert_counts` [MoE layers, E] int64 the experts each token the model runs is routed to (by its MoE block's
    `routed`, in `expert_layers`, the decoder layers of those blocks); warm-up steps do not count."""

    def __init__(self, model, tokenizer, max_num_seqs: int = 8, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 256, max_waiting: int = 256, seed: int | None = None, metrics=None,
                 speculative: SpeculativeConfig | str | dict | None = None, draft_model=None,
                 block_size: int | None = 16, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool | None = None, adapters=None, expert_metrics: bool = False):
        config = model.config
        context = config.max_position_embeddings
        max_model_len = min(context, DEFAULT_MAX_MODEL_LEN) if max_model_len is None else max_model_len
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("max_waiting", max_waiting),
                            ("block_size", block_size), ("num_blocks", num_blocks),
                            ("kv_cache_memory", kv_cache_memory)):
            if value is None and name in ("block_size", "num_blocks", "kv_cache_memory"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_model_len > context:
            raise ValueError(f"max_model_len {max_model_len} is more than the model's context of {context} positions")
        reset = next((t for t in range(2, max_model_len + 1) if model.needs_cache_reset(t - 1, t)), None)
        if reset is not None:
            limit = reset - 1
            raise ValueError(f"max_model_len {max_model_len}: past {limit} positions this model's rotary embedding "
                             f"switches scaling and the reference re-runs the whole sequence; serve up to {limit}")
        blocks = moe_blocks(model) if expert_metrics else []
        if expert_metrics and not blocks:
            raise ValueError(f"expert_metrics: {type(model).__name__} is a dense model (no MoE layers): it has no "
                             "experts to count")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs + 1)
        self.max_waiting = max_waiting
        self.vocab_size = config.vocab_size
        self.metrics = metrics
        self.grammars = Grammars(tokenizer, config.vocab_size, [])  # its eos: self.eos, below
        self.random = random.Random(seed)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if getattr(tokenizer, "eos_token_id", None) is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos = eos
        self.grammars.eos = eos
        dtype = model.get_input_embeddings().weight.dtype
        if speculative is not None and not isinstance(speculative, SpeculativeConfig):
            speculative = SpeculativeConfig.parse(speculative)
        mtp = speculative is not None and speculative.method == "mtp"
        if enable_prefix_caching and mtp:
            raise ValueError("prefix caching cannot be combined with MTP drafting: the MTP head needs the model's "
                             "hidden states of every prompt position, which a cached prefix skips")
        if block_size is None and (num_blocks or kv_cache_memory or enable_prefix_caching):
            raise ValueError("num_blocks, kv_cache_memory and prefix caching need a block_size")
        if block_size is not None and num_blocks is None and kv_cache_memory is not None:
            per_block = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_size * block_size \
                * dtype.itemsize
            num_blocks = kv_cache_memory // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory {kv_cache_memory} bytes is less than one KV block "
                                 f"({per_block} bytes)")
        self.cache = SlotCache(config, max_num_seqs, max_model_len, dtype, model.device,
                               getattr(model.model, "sliding_window", None), block_size, num_blocks,
                               block_size is not None and enable_prefix_caching is not False and not mtp)
        from ..inference.modules import FastAttention

        self.ragged = all(isinstance(m, FastAttention) for m in model.modules() if hasattr(m, "q_proj"))
        self.free_rows = list(range(max_num_seqs))
        self.adapters = adapters
        self.row_adapter = [0] * max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in a slot: prefilling (filled < prompt) or decoding
        self.inbox: list[Sequence] = []
        self.cancels: set[int] = set()
        self.queued = 0  # sequences submitted and not yet in a slot
        self.ids = itertools.count()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.aborting = False  # abort(): cancel every request in the engine at its next step
        self.steps = 0
        self.speculative = speculative
        self.drafter = None if speculative is None else drafter_for(speculative, self, draft_model)
        self.pace = Pace() if speculative is not None and speculative.adaptive else Always()
        self.expert_layers = [i for i, _ in blocks]
        self.expert_blocks = [b for _, b in blocks]
        self.expert_counts = torch.zeros(len(blocks), blocks[0][1].gate.weight.shape[0], dtype=torch.long) \
            if blocks else None

    # ------------------------------------------------------------ public API

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="moelm-engine", daemon=True)
        self.thread.start()
        return self

    def warmup(self, seconds: float | None = None):
        """Run the step shapes serving will meet (one-token rows 1, 2, 4, .. max_num_seqs; chunks of 1, 2, 4, ..
        max_num_batched_tokens tokens) once on random tokens, so that the kernel paths are measured now (and
        remembered for this CPU) rather than stalling the first requests; call before start(). Stops early after
        `seconds`."""
        if self.alive():
            raise RuntimeError("warm up the engine before starting it")
        deadline = None if seconds is None else time.perf_counter() + seconds
        g = torch.Generator().manual_seed(0)
        counts = [1 << i for i in range(self.max_num_batched_tokens.bit_length()) if 1 << i <= self.max_model_len]
        rows = [1 << i for i in range(self.max_num_seqs.bit_length())] + [self.max_num_seqs]
        steps = [[(r, 1) for r in range(n)] for n in sorted(set(rows))] + [[(0, c)] for c in counts]
        if self.speculative is not None:  # each row with its last token and k drafts
            k = self.speculative.num_speculative_tokens + 1
            steps += [[(r, k) for r in range(n)] for n in sorted(set(rows)) if n * k <= self.max_num_batched_tokens]
        with torch.inference_mode():
            for segments in steps:
                tokens = torch.randint(0, self.vocab_size, (sum(c for _, c in segments),), generator=g)
                for row, count in segments:
                    self.cache.grow(row, count)
                self._forward(segments, tokens.tolist(), [0], commit=False, hidden=self.drafter is not None
                              and self.drafter.hidden)
                for row, _ in segments:
                    self.cache.free(row)
                if deadline is not None and time.perf_counter() > deadline:
                    break

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self, timeout: float | None = 10):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(self, prompt: list[int], params: SamplingParams,
               callback: Callable[[Output], None] | None = None) -> Request:
        """Queue a prompt (token ids); raises RequestError for a request that cannot run, EngineFull when the
        waiting queue is full."""
        self.check(prompt, params)
        request = Request(self, next(self.ids), list(prompt), params, callback)
        seqs = [Sequence(request, i, self._generator(params, i), self.tokenizer) for i in range(params.n)]
        if params.grammar is not None:
            for seq in seqs:
                seq.matcher = self.grammars.matcher(params.grammar)
        with self.cond:
            if not self.alive():
                raise RuntimeError("the engine is not running")
            if self.queued + len(seqs) > self.max_waiting:
                raise EngineFull(f"{self.queued} sequences are waiting (the queue holds {self.max_waiting}); "
                                 "try again later")
            self.queued += len(seqs)
            self.inbox += seqs
            self.cond.notify()
        if self.metrics is not None:
            self.metrics.prompt_tokens(len(prompt) * params.n)
        return request

    def cancel(self, request: Request):
        """Stop the request's choices: their slots are free at the next step, each ends with finish_reason
        "abort" (unless it already finished)."""
        with self.cond:
            self.cancels.add(request.id)
            self.cond.notify()

    def abort(self):
        """Cancel every request submitted so far, as cancel() does each (a server shutting down)."""
        with self.cond:
            self.aborting = True
            self.cond.notify()

    def check(self, prompt: list[int], params: SamplingParams):
        """RequestError naming the field for a prompt or parameters the engine cannot run."""
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary (size {self.vocab_size})", "prompt")
        try:
            params.sampling()
        except SamplingError as e:
            raise RequestError(str(e), e.field) from None
        if not isinstance(params.max_tokens, int) or params.max_tokens < 0:
            raise RequestError(f"max_tokens must be an integer >= 0, got {params.max_tokens!r}", "max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= self.vocab_size):
                raise RequestError(f"{name} must be an integer in [0, {self.vocab_size}], got {value!r}", name)
        for name in ("logit_bias", "stop_token_ids"):
            ids = getattr(params, name)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"{name}: token id {bad} is outside the vocabulary (size {self.vocab_size})",
                                   name)
        if params.structured is not None and params.grammar is None:
            kind, spec, name = params.structured
            try:
                params.grammar = self.grammars.compile(kind, spec)
            except GrammarError as e:
                raise RequestError(f"{name}: {e}", name) from None
            matcher = self.grammars.matcher(params.grammar)
            if not allowed(matcher, self.vocab_size).any() or matcher.is_error():
                raise RequestError(f"{name}: the constraint allows no first token of this model's vocabulary "
                                   "(llguidance needs a tokenizer that can spell every byte string): "
                                   f"{matcher.get_error().splitlines()[0] if matcher.is_error() else ''}", name)
        if params.adapter and (self.adapters is None or params.adapter not in self.adapters.names.values()):
            raise RequestError(f"no LoRA adapter {params.adapter} is loaded", "model")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(f"the prompt is {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                               f"{len(prompt) + params.max_tokens} is more than the model's context of "
                               f"{self.max_model_len} tokens", "max_tokens")

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return self.queued

    def kv_usage(self) -> float:
        """Fraction of the KV cache's positions held by sequences (paged: whole blocks)."""
        return self.cache.used() / self.cache.capacity()

    # ------------------------------------------------------------ the loop

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        seed = params.seed if params.seed is not None else self.random.getrandbits(63)
        if index:
            seed = hash((seed, index)) & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def _loop(self):
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.inbox or self.cancels or self.running or self.waiting or self.stopping
                               or self.aborting):
                        self.cond.wait()
                    if self.stopping:
                        break
                    self.waiting.extend(self.inbox)
                    self.inbox = []
                    cancels, self.cancels = self.cancels, set()
                    if self.aborting:
                        cancels |= {s.request.id for s in [*self.running, *self.waiting]}
                        self.aborting = False
                if cancels:
                    self._cancel(cancels)
                if self.running or self.waiting:
                    try:
                        self._step()
                    except Exception as e:  # a bug or out of memory: fail this step's requests, keep serving
                        traceback.print_exc(file=sys.stderr)
                        for seq in list(self.running):
                            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
        for seq in list(self.running) + list(self.waiting) + self.inbox:
            self._finish(seq, "abort")

    def _cancel(self, ids: set[int]):
        for seq in [s for s in self.running if s.request.id in ids]:
            self._finish(seq, "abort")
        for seq in [s for s in self.waiting if s.request.id in ids]:
            self.waiting.remove(seq)
            with self.cond:
                self.queued -= 1
            self._finish(seq, "abort")

    def _admit(self):
        """Waiting sequences into free rows, each from its longest cached prefix, while the cache has room for
        their next position."""
        cache = self.cache
        while self.waiting and self.free_rows:
            seq = self.waiting[0]
            row = min(self.free_rows)
            adapter = seq.request.params.adapter
            # a sequence still owing prompt logprobs computes every position (it leaves its blocks for others)
            fresh = seq.scoring()
            reused = cache.reuse(row, seq.ids[:1 if fresh else seq.target], salt_of(seq.request.params))
            if cache.room(row) <= reused:  # no block for its next position: wait for sequences to finish
                cache.free(row)
                break
            self.waiting.popleft()
            self.free_rows.remove(row)
            seq.row, seq.filled = row, reused
            self.row_adapter[row] = adapter
            with self.cond:
                self.queued -= 1
            self.running.append(seq)
            if cache.prefix_caching and self.metrics is not None and not fresh:
                self.metrics.prefix_cache(seq.target, reused)
            if not seq.tokens and seq.index == 0:
                seq.request.cached_tokens = reused

    def _preempt(self, seq: Sequence):
        """Give seq's blocks back and queue it first, to be prefilled again with its tokens so far."""
        self.running.remove(seq)
        self.cache.free(seq.row)
        if self.drafter is not None:
            self.drafter.free(seq.row)
        self.free_rows.append(seq.row)
        seq.row, seq.filled = None, 0
        seq.target = len(seq.prompt) + max(len(seq.tokens) - 1, 0)
        self.waiting.appendleft(seq)
        with self.cond:
            self.queued += 1
        if self.metrics is not None:
            self.metrics.preempted()

    def _decoding(self) -> list[Sequence]:
        """The decoding sequences (by row), each given the block of its next position: when none is free, the
        sequence admitted last is preempted, this one included."""
        out = []
        for seq in [s for s in self.running if s.filled == s.target]:  # admission order: the oldest first
            if seq.row is None:  # preempted for an older one
                continue
            while not self.cache.grow(seq.row, self.cache.lengths[seq.row] + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                out.append(seq)
        return sorted(out, key=lambda s: s.row)

    def _step(self):
        self._admit()
        self.pace.start()
        budget = self.max_num_batched_tokens
        decoding = self._decoding()
        # (sequence, first token, tokens, drafts or None for a prompt chunk, their q, prompt positions scored)
        parts = []
        segments, tokens, keep = [], [], []
        for seq, (drafts, q) in zip(decoding, self._drafts(decoding, budget)):
            parts.append((seq, len(tokens), 1 + len(drafts), drafts, q, 0))
            segments.append((seq.row, 1 + len(drafts)))
            keep += range(len(tokens), len(tokens) + 1 + len(drafts))
            tokens += [seq.tokens[-1]] + drafts
        budget -= len(tokens)
        for seq in [s for s in self.running if s.filled < s.target]:
            if budget <= 0:
                break
            count = min(seq.target - seq.filled, budget, self.cache.room(seq.row) - seq.filled)
            if count <= 0 or not self.cache.grow(seq.row, seq.filled + count):
                continue  # no block free: it waits
            scored = 0
            if seq.scoring():  # the rows of the positions whose next prompt token has no logprob yet
                start = max(seq.filled, len(seq.scores) - 1)
                scored = max(0, min(seq.filled + count, len(seq.prompt) - 1) - start)
                keep += range(len(tokens) + start - seq.filled, len(tokens) + start - seq.filled + scored)
            parts.append((seq, len(tokens), count, None, None, scored))
            segments.append((seq.row, count))
            tokens += seq.ids[seq.filled:seq.filled + count].tolist()
            seq.filled += count
            budget -= count
            if seq.filled == seq.target and not seq.tokens and seq.request.params.max_tokens:
                keep.append(len(tokens) - 1)
        if not segments:  # every running sequence waits for a block: the last admitted holding some gives its back
            holder = next((s for s in reversed(self.running) if self.cache.blocks[s.row]), None)
            if holder is not None:
                self._preempt(holder)
            return
        hidden_too = self.drafter is not None and self.drafter.hidden
        logits, hidden = self._forward(segments, tokens, keep, hidden=hidden_too)
        self.steps += 1
        at, emitted, drafted = 0, 0, False
        for seq, first, count, drafts, q, scored in parts:
            if drafts is None:  # a prompt chunk, and the first token where the prompt is done
                if hidden_too:
                    self.drafter.observe(seq, hidden[first:first + count])
                if scored:
                    self._score(seq, logits[at:at + scored])
                    at += scored
                if seq.filled == seq.target and not seq.tokens:
                    self.cache.remember(seq.row, seq.ids)  # before a first token that may finish it
                    if seq.request.params.max_tokens:
                        self._advance(seq, logits[at])
                        at += 1
                    else:
                        self._finish(seq, "length")
                continue
            start = self.cache.lengths[seq.row] - count
            kept = self._verify(seq, logits[at:at + count], drafts, q)
            at += count
            emitted += kept + 1
            drafted |= bool(drafts)
            if drafts and self.metrics is not None:
                self.metrics.speculated(len(drafts), kept)
            if self.drafter is not None and seq in self.running:
                self.cache.lengths[seq.row] = start + 1 + kept  # the rejected drafts' positions are free again
                self.drafter.verified(seq, start + 1 + kept)
                if hidden_too:
                    self.drafter.observe(seq, hidden[first:first + 1 + kept])
        if self.drafter is not None and decoding and len(parts) == len(decoding):  # a decode-only step: timed
            self.pace.done(drafted, emitted)
        if self.cache.prefix_caching:
            for seq, *_ in parts:
                if seq.row is not None and seq in self.running:
                    self.cache.remember(seq.row, seq.ids)

    def _drafts(self, decoding: list[Sequence], budget: int) -> list[tuple[list[int], torch.Tensor | None]]:
        """Each decoding sequence's drafts (token ids) and their probabilities [k, V] (None: greedy or fixed
        drafts), within the step's token budget, the sequence's max_tokens and its KV row."""
        config = self.speculative
        off = (config is None or not self.pace.drafting() or (config.disable_by_batch_size is not None and
               len(self.running) + self.queued >= config.disable_by_batch_size))
        if off or not decoding:
            return [([], None)] * len(decoding)
        spare = budget - len(decoding)
        ks = []
        for seq in decoding:
            length = len(seq.prompt) + len(seq.tokens)  # the last token's KV is written this step
            k = max(0, min(config.num_speculative_tokens, self.cache.room(seq.row) - length, spare,
                           seq.request.params.max_tokens - len(seq.tokens) - 1))
            k = 0 if seq.matcher is not None else k  # a grammar's mask is known one token at a time
            k = k if self.cache.grow(seq.row, length + k) else 0
            spare -= k
            ks.append(k)
        if not any(ks):
            return [([], None)] * len(decoding)
        return self.drafter.propose(self, decoding, ks)

    def draft_token(self, seq: Sequence, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        """A drafter's next token for seq from its logits [V] after seq's tokens and `drafts`, chosen with seq's
        parameters and generator, and the distribution it was drawn from [V] (None when greedy)."""
        scores = self._scores(seq, logits, drafts)
        token = int(choose(scores, seq.sampling, seq.generator)[0])
        return token, None if seq.sampling.greedy else scores.softmax(-1)[0]

    def _verify(self, seq: Sequence, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None) -> int:
        """Emit seq's tokens from the logits [1 + k, V] after its last token and its k drafts: each draft while it
        is kept, then the model's token; returns the drafts kept (fewer when the sequence finishes among them)."""
        for j, draft in enumerate(drafts):
            accepted, finished = self._advance(seq, logits[j], draft, None if q is None else q[j])
            if finished or not accepted:
                return j
        self._advance(seq, logits[len(drafts)])
        return len(drafts)

    def _forward(self, segments: list[tuple[int, int]], tokens: list[int], keep: list[int],
                 commit: bool = True, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model over one step laid out as `segments` (slot row, tokens): logits [len(keep), V] fp32 on CPU of
        the tokens at `keep`, and with hidden=True the last decoder layer's output [T, H] (before the final norm)
        of every token; the positions written count from then on unless commit=False (warm-up)."""
        device = self.model.device
        plan = self.cache.schedule(segments)
        inputs = dict(input_ids=torch.tensor([tokens], device=device), position_ids=plan.positions[None],
                      attention_mask=None if self.ragged else self.cache.mask(), past_key_values=self.cache,
                      use_cache=True)
        rows = torch.tensor(keep, dtype=torch.long, device=device)
        # one token of each of several sequences: its rows need not round as each would alone (int8/int4 weights
        # may take the integer path); a prompt chunk's rows are one sequence's, as in generate
        rows_apart = independent_rows() if len(segments) > 1 and all(n == 1 for _, n in segments) \
            else contextlib.nullcontext()
        if self.adapters is not None:  # each token's adapter
            self.adapters.rows.set(torch.tensor([self.row_adapter[r] for r, n in segments for _ in range(n)]),
                                   rows.cpu())
        count = commit and self.expert_counts is not None
        try:
            if not hidden and not count:
                with rows_apart:
                    return self.model(**inputs, logits_to_keep=rows).logits[0].float().cpu(), None
            # the body and the head as the model's forward runs them (without its aux loss, the last layer trimmed
            # to the kept rows unless every hidden state is wanted), with the router logits of each MoE layer
            seen = []
            hook = self.model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0])) \
                if hidden else None
            try:
                with rows_apart:
                    out = self.model.model(**inputs, output_router_logits=count,
                                           keep=None if hidden else logits_kept(rows, len(tokens)))
                    head = self.model.lm_head(out.last_hidden_state[:, rows] if hidden else out.last_hidden_state)
            finally:
                if hook is not None:
                    hook.remove()
            if count:
                self._count_experts(out.router_logits or ())
            return head[0].float().cpu(), seen[-1][0] if hidden else None
        finally:
            if self.adapters is not None:
                self.adapters.rows.clear()
            if commit:
                self.cache.commit()
            else:
                self.cache.plan = None

    def _count_experts(self, router_logits: tuple[torch.Tensor, ...]):
        """Add to expert_counts the experts each MoE block chose (its `routed`) from its router logits [T, E] (the
        last layer's: of the tokens it ran, see _forward)."""
        if len(router_logits) != len(self.expert_blocks):
            raise RuntimeError(f"the model returned router logits of {len(router_logits)} layers for its "
                               f"{len(self.expert_blocks)} MoE layers")
        experts = self.expert_counts.shape[1]
        picks = [block.routed(logits.reshape(-1, experts))[1].reshape(-1) + i * experts
                 for i, (block, logits) in enumerate(zip(self.expert_blocks, router_logits))]
        counts = torch.bincount(torch.cat(picks).cpu(), minlength=self.expert_counts.numel())
        self.expert_counts += counts.view_as(self.expert_counts)  # in place: a scrape reads it as it is

    def _advance(self, seq: Sequence, logits: torch.Tensor, draft: int | None = None,
                 q: torch.Tensor | None = None) -> tuple[bool, bool]:
        """Sample seq's next token from its logits [V] (or judge `draft` drawn from q [V]), emit it, finish the
        sequence if it ends here; returns (the draft was kept, the sequence finished)."""
        p = seq.request.params
        if seq.matcher is not None:
            seq.mask = allowed(seq.matcher, logits.shape[-1])
            if not seq.mask.any() or seq.matcher.is_error():
                self._finish(seq, "error", error="the grammar allows no token of the model's vocabulary here (its "
                                                 f"matcher: {seq.matcher.get_error() or 'no error'}); llguidance "
                                                 "needs a tokenizer that can spell every byte string")
                return False, True
        token, accepted, logprobs = self._sample(seq, logits, draft, q)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            self._finish(seq, "error", error=f"the grammar refused token {token}: {seq.matcher.get_error()}")
            return False, True
        seq.ids[len(seq.prompt) + len(seq.tokens)] = token
        seq.tokens.append(token)
        seq.request.completion_tokens += 1
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.generation_tokens(1)
            if seq.last_time is None:
                self.metrics.ttft(now - seq.submitted)
            else:
                self.metrics.itl(now - seq.last_time)
        seq.last_time = now
        reason = None
        text = ""
        if token in p.stop_token_ids or (token in self.eos and not p.ignore_eos):
            reason = "stop"
        else:
            text = seq.stops.feed(seq.detok.add(token))
            if seq.stops.hit is not None:
                reason = "stop"
        full = len(seq.prompt) + len(seq.tokens) >= self.max_model_len
        if reason is None and seq.matcher is not None and seq.matcher.is_stopped():
            reason = "stop"  # the grammar is complete and nothing may follow
        if reason is None and (len(seq.tokens) >= p.max_tokens or full):
            reason = "length"
        if reason is None:
            seq.request.callback(Output(seq.index, [token], text, logprobs, prompt_logprobs=self._prompt_out(seq)))
        else:
            self._finish(seq, reason, [token], text, logprobs)
        return accepted, reason is not None

    def _finish(self, seq: Sequence, reason: str, token_ids=(), text: str = "", logprobs=(), error: str | None = None):
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(seq.row)
            if self.drafter is not None:
                self.drafter.free(seq.row)
            self.free_rows.append(seq.row)
        if reason in ("stop", "length"):
            text += seq.stops.feed(seq.detok.flush())
            text += seq.stops.flush()
            if seq.stops.hit is not None:  # a stop string completed by the text held back until now
                reason = "stop"
        if self.metrics is not None:
            self.metrics.finished(reason, time.perf_counter() - seq.submitted)
        seq.request.callback(Output(seq.index, list(token_ids), text, list(logprobs), reason, error,
                                    self._prompt_out(seq)))

    def _score(self, seq: Sequence, logits: torch.Tensor):
        """Record the logprobs of seq's next prompt tokens from the logits [k, V] (fp32) of the k positions before
        them: each token's logprob and rank and the prompt_logprobs most likely."""
        lp = logits.log_softmax(-1)
        at = len(seq.scores)
        ids = seq.ids[at:at + len(lp)]
        chosen = lp.gather(1, ids[:, None])
        ranks = (lp >= chosen).sum(-1).tolist()
        k = seq.request.params.prompt_logprobs
        top = lp.topk(k) if k else None
        for j, (token, value) in enumerate(zip(ids.tolist(), chosen[:, 0].tolist())):
            seq.scores.append(TokenLogprob(token, value, [] if top is None else
                                           list(zip(top.indices[j].tolist(), top.values[j].tolist())), ranks[j]))

    def _prompt_out(self, seq: Sequence) -> list[TokenLogprob] | None:
        """seq's prompt logprobs, once (on its first event), when they are complete."""
        if seq.scores is None or seq.scoring() or seq.scores_sent:
            return None
        seq.scores_sent = True
        return seq.scores

    def _scores(self, seq: Sequence, logits: torch.Tensor, drafts: list[int] = ()) -> torch.Tensor:
        """seq's processed scores [1, V] from logits [V] (fp32) after its tokens and `drafts`: generate's penalties,
        min_tokens' banned ids and warpers with the sequence's knobs."""
        p, s = seq.request.params, seq.sampling
        generated = len(seq.tokens) + len(drafts)
        at = len(seq.prompt) + len(seq.tokens)
        if drafts:
            seq.ids[at:at + len(drafts)] = torch.tensor(drafts)  # overwritten by the tokens emitted
        banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos) if generated < p.min_tokens else []
        if seq.matcher is not None:  # the grammar's tokens only (min_tokens yields to a grammar that must end)
            logits = logits.masked_fill(~seq.mask, float("-inf"))
            if banned:
                free = torch.ones(logits.shape[-1], dtype=torch.bool)
                free[banned] = False
                banned = banned if logits[free].isfinite().any() else []
        scores = apply_penalties(logits[None], s, seq.ids[None, :len(seq.prompt) + generated], len(seq.prompt),
                                 banned=torch.tensor(banned) if banned else None)
        return warp(scores, s)

    def _sample(self, seq: Sequence, logits: torch.Tensor, draft: int | None = None,
                q: torch.Tensor | None = None) -> tuple[int, bool, list[TokenLogprob]]:
        """The next token from logits [V] (fp32) by generate's sampler (moelm.generation.sampling) with the
        sequence's knobs, min_tokens' banned ids and generator, or the judgement of a draft (drawn from q [V], None
        for a fixed draft); (token, the draft was kept, logprobs). Logprobs are the model's (before any of these), as
        vLLM reports them."""
        p, s = seq.request.params, seq.sampling
        scores = self._scores(seq, logits)
        if draft is None:
            token, accepted = int(choose(scores, s, seq.generator)[0]), False
        else:
            chosen, ok = judge_draft(scores, torch.tensor([draft]), None if q is None else q[None], s, seq.generator)
            token, accepted = int(chosen[0]), bool(ok[0])
        logprobs = []
        if p.logprobs is not None:
            lp = logits.log_softmax(-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs = [TokenLogprob(token, float(lp[token]), [] if top is None else
                                     list(zip(top.indices.tolist(), top.values.tolist())))]
        return token, accepted, logprobs
