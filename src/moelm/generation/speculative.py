"""Speculative decoding for generate(): drafted tokens checked by one forward of the model.

Each step a drafter proposes up to k tokens a row; the model runs the last token and the drafts in one forward and
gives the logits after each. Greedy keeps the drafts while they equal the model's own choice, then adds the model's
token; sampling keeps a draft with probability min(1, p/q) and replaces the first rejected one by a draw from the
residual max(p - q, 0), renormalised (Leviathan et al. 2023, Chen et al. 2023), so the tokens follow the model's
own distribution (p: the processed scores' softmax, q: the drafter's; a prompt-lookup draft has q = 1). The rows of
a batch keep the same number of tokens per step, the fewest any unfinished row accepted, so the KV cache stays one
block; it is cropped to what was kept.

Drafters: PromptLookup (the sequence's own n-grams, transformers' prompt_lookup_num_tokens), Assistant (a smaller
model with the same vocabulary and its own cache, transformers' assistant_model), Mtp (ERNIE's multi-token
prediction head: one token a step, or up to num_assistant_tokens, its output fed back as vLLM's MTP
proposer does).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F

from . import processors
from .sampling import choose

# ------------------------------------------------------------------ drafters


class PromptLookup:
    """Drafts by n-gram lookup: the continuation of the earliest occurrence of the row's last n tokens
    (n = max_ngram down to 1). A batch drafts as many tokens as its shortest row found."""

    needs_hidden = False

    def __init__(self, tokens: int, max_ngram: int = 2):
        self.most, self.max_ngram = tokens, max_ngram
        self.k = 1  # drafts a step: one at first, up to `tokens` while they are all kept (accepted())

    def propose(self, model, state, k: int, process, generator) -> tuple[torch.Tensor, None]:
        ids = state.input_ids
        if not k:
            return ids[:, :0], None
        rows, live = [], open_rows(state)
        for r in range(ids.shape[0]):
            if not bool(live[r]):
                continue
            start = int(state.pad_lengths[r]) if state.pad_lengths is not None else 0
            rows.append(lookup(ids[r, start:], self.max_ngram, k))
        n = min((len(r) for r in rows), default=0)
        drafts = torch.zeros(ids.shape[0], n, dtype=ids.dtype, device=ids.device)
        live = live.nonzero().squeeze(1)
        if n:
            drafts[live] = torch.stack([r[:n] for r in rows])
        return drafts, None

    def update(self, state, hidden, fed: int):
        pass

    def accepted(self, kept: int, proposed: int):
        """The heuristic schedule up to `tokens`: a check of k + 1 tokens reads the union of their experts, so a
        losing try costs least at k = 1."""
        self.k = min(self.most, heuristic(self.k, kept, proposed))


def heuristic(k: int, kept: int, proposed: int) -> int:
    """transformers' "heuristic" draft length: 2 more drafts after a step that kept all it proposed, 1 fewer (at
    least 1) after one that did not, k after a step without drafts."""
    if not proposed:
        return k
    return k + 2 if kept == proposed else max(1, k - 1)


def lookup(row: torch.Tensor, max_ngram: int, k: int, min_ngram: int = 1) -> torch.Tensor:
    """Up to k tokens following the earliest occurrence of row's last n tokens before them (the longest n, from
    max_ngram down to min_ngram, that has one), as transformers' prompt lookup and vLLM's n-gram proposer take it:
    in a repeated stretch it has the most tokens after it."""
    length = row.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        windows = row.unfold(0, n, 1)[:-1]  # every n-gram but the last one itself
        hits = (windows == row[-n:]).all(-1).nonzero().squeeze(1)
        if hits.numel():
            start = int(hits[0]) + n
            return row[start:start + k]
    return row[:0]


class Assistant:
    """Drafts with a smaller model of the same vocabulary, greedily or sampled from its processed scores, with its
    own KV cache (cropped to the tokens both models agree on before each draft)."""

    needs_hidden = False

    def __init__(self, assistant, tokens: int, schedule: str):
        self.model, self.k, self.schedule = assistant, tokens, schedule
        self.cache = None

    def propose(self, model, state, k: int, process, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        from ..nn.layers import DynamicCache

        ids, length = state.input_ids, state.input_ids.shape[1]
        if self.cache is None:
            self.cache = DynamicCache()
        have = min(self.cache.get_seq_length(), length - 1)
        self.cache.crop(have)
        drafts, probs = [], []
        feed, mask, pos = ids[:, have:], state.attention_mask, state.position_ids
        for j in range(k):
            fed = feed.shape[1]
            out = self.model(input_ids=feed, attention_mask=mask, position_ids=pos[:, -fed:],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            prefix = torch.cat([ids, *[d[:, None] for d in drafts]], 1)
            scores = process(out.logits[:, -1].float(), prefix)
            token = choose(scores, process.sampling, generator)
            drafts.append(token)
            if process.sampling.temperature:
                probs.append(scores.softmax(-1))
            feed = token[:, None]
            mask = None if mask is None else F.pad(mask, (0, 1), value=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        drafts = torch.stack(drafts, 1) if drafts else ids[:, :0]
        return drafts, torch.stack(probs, 1) if probs else None

    def update(self, state, hidden, fed: int):
        pass

    def accepted(self, kept: int, proposed: int):
        if self.schedule == "heuristic":
            self.k = heuristic(self.k, kept, proposed)


class Mtp:
    """ERNIE's MTP head (Ernie4_5_MoeForCausalLM.mtp): the first draft from the main model's last hidden state of
    the position before the last token and that token; each further one (up to `tokens`, as vLLM's MTP proposer
    drafts with a one-layer head) from the head's own output and the draft before it. The head's own cache holds
    the positions fed so far; the further drafts' positions are dropped from it after drafting. More than CONTEXT
    positions waiting for the head (a long prompt, or a long stretch with drafting off) are not all fed: the head
    starts again from the last CONTEXT of them, so that a model that does not draft much pays little for its head
    (the drafts then see less context; the model checks them all the same). Schedule "heuristic": one draft a step
    at first, two more while all are kept (as PromptLookup); "constant": `tokens`."""

    needs_hidden = True
    CONTEXT = 16

    def __init__(self, model, tokens: int = 1, schedule: str = "heuristic"):
        from ..inference.mtp import MtpStep

        self.head, self.most, self.schedule, self.cache = model.mtp, tokens, schedule, None
        self.fast = MtpStep(model)  # the head in fewer calls while decoding (else its modules)
        self.k = 1 if schedule == "heuristic" else tokens
        self.last = None  # the head's output at the last position fed [N, 1, H]
        self.pending: list[tuple] = []  # (hidden, ids, positions) of the positions not yet fed to the head
        self.waiting = 0  # positions in pending
        self.start, self.restart = 0, False  # the sequence index of the head cache's first position; start again

    def _cache(self, state):
        """The head's own cache: static (its one layer then runs as the model's decode steps do, in one C call)
        when the model's is."""
        from ..inference.cache import StaticCache
        from ..nn.layers import DynamicCache

        if not isinstance(state.cache, StaticCache):
            return DynamicCache()
        config = self.head.model.config
        layout = SimpleNamespace(num_key_value_heads=config.num_key_value_heads, head_size=config.head_size,
                                 num_hidden_layers=1)
        return StaticCache(layout, state.input_ids.shape[0], state.cache.max_length, state.cache.keys[0].dtype,
                           state.cache.keys[0].device)

    def update(self, state, hidden: torch.Tensor, fed: int):
        """hidden [N, fed, H]: the main model's pre-norm states of the `fed` positions whose next tokens are now
        the last `fed` tokens of state.input_ids; kept until the head runs (a step that drafts)."""
        self.pending.append((hidden, state.input_ids[:, -fed:], state.position_ids[:, -fed - 1:-1]))
        self.waiting += fed
        if self.waiting > 2 * self.CONTEXT:  # the head will start again from the last CONTEXT positions
            self.pending = [tuple(torch.cat(parts, 1)[:, -self.CONTEXT:] for parts in zip(*self.pending))]
            self.waiting, self.restart = self.CONTEXT, True

    def feed(self, state) -> torch.Tensor:
        """The pending positions through the head into its cache (after the prompt: the head's own prefill, done
        before drafting starts, so that the first drafted step is timed as any other); the head's output at the
        last one [N, 1, H]."""
        if self.cache is None:
            self.cache = self._cache(state)
        if self.pending:
            hidden, ids, positions = (torch.cat(parts, 1) for parts in zip(*self.pending))
            if self.waiting > self.CONTEXT:
                hidden, ids, positions = (t[:, -self.CONTEXT:] for t in (hidden, ids, positions))
                self.restart = True
            self.pending, self.waiting = [], 0
            if self.restart:
                self.cache.crop(0)
                self.start, self.restart = state.input_ids.shape[1] - 1 - ids.shape[1], False
            mask = self._mask(state, self.cache.get_seq_length() + ids.shape[1])
            self.last = self._states(ids, hidden, positions, mask)[:, -1:]
        return self.last

    def _mask(self, state, length: int, extra: int = 0) -> torch.Tensor | None:
        """The attention mask [N, length] over the head cache's positions (`extra` past the sequence: drafts)."""
        if state.attention_mask is None:
            return None
        mask = F.pad(state.attention_mask, (0, extra), value=1) if extra else state.attention_mask
        return mask[:, self.start:self.start + length]

    def propose(self, model, state, k: int, process, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not k:
            return state.input_ids[:, :0], None
        x = self.feed(state)
        length = self.cache.get_seq_length()  # the head's positions with the main model's states
        drafts, probs = [], []
        plain = process.plain_greedy(state.input_ids.shape[1])  # the shortest prefix a draft has
        for j in range(k):
            if j:  # the head's output and the draft before: the next position's input
                x = self._states(drafts[-1], x, state.position_ids[:, -1:] + (j - 1),
                                 self._mask(state, length + j, k - 1))
            logits = self.fast.logits(x)[:, -1]
            if plain:  # the scores are the logits
                drafts.append(logits.argmax(-1, keepdim=True))
                continue
            scores = process(logits, torch.cat([state.input_ids, *drafts], 1))
            drafts.append(choose(scores, process.sampling, generator)[:, None])
            if process.sampling.temperature:
                probs.append(scores.softmax(-1))
        self.cache.crop(length)
        return torch.cat(drafts, 1), torch.stack(probs, 1) if probs else None

    def _states(self, ids, hidden, positions, mask) -> torch.Tensor:
        x = self.fast.states(ids, hidden, positions, self.cache, mask)
        return self.head.states(ids, hidden, positions, self.cache, mask) if x is None else x

    def accepted(self, kept: int, proposed: int):
        if self.schedule == "heuristic":
            self.k = min(self.most, heuristic(self.k, kept, proposed))


# ------------------------------------------------------------------ the loop

# the last speculative run's counts (for benchmarks): checks of the model, those with drafts, drafts proposed, kept
last_run: dict[str, int] = {}


class Pace:
    """Drafting only while it pays. Plain steps' seconds a token are averaged (k = 0: the drafter skipped); drafted
    steps are judged a try at a time, by the seconds a token of WINDOW (2) drafted steps together (one step keeps
    one draft, the next none: a single step says little). A try slower a token than the plain steps turns drafting
    off for the back-off (4 steps at first, twice as long after each further losing try); a drafted step that keeps
    nothing while its try so far loses ends the try at once, off for 4 times as long as last time (16 steps at
    first); at most 256 steps. A try that pays keeps drafting on and the back-off at 4; after every RECHECK drafted
    steps in a row, 2 plain ones keep the plain pace recent. The first `warmup` steps are plain, to know their pace.
    The tokens are the same either way (greedy) or follow the same distribution (sampling)."""

    LONGEST, WINDOW, RECHECK = 256, 2, 32

    def __init__(self, warmup: int = 2, clock=time.perf_counter):
        self.clock, self.off, self.backoff = clock, warmup, 4
        self.plain: float | None = None  # seconds a token of plain steps (moving average)
        self.t = 0.0
        self.trial = [0.0, 0, 0]  # the current try: seconds, tokens, drafted steps
        self.run = 0  # drafted steps since the last plain one

    def drafting(self) -> bool:
        return self.off <= 0

    def start(self):
        self.t = self.clock()

    def done(self, drafted: bool, tokens: int):
        took = self.clock() - self.t
        if not drafted:
            rate = took / max(tokens, 1)
            self.plain = rate if self.plain is None else 0.7 * self.plain + 0.3 * rate
            self.off, self.run = self.off - 1, 0
            return
        trial = self.trial
        trial[0], trial[1], trial[2] = trial[0] + took, trial[1] + tokens, trial[2] + 1
        if self.plain is None:
            return
        if tokens <= 1 and trial[0] / trial[1] > self.plain:  # nothing kept, and the try so far loses
            self.backoff = min(self.LONGEST, 4 * self.backoff)
            self._pause(self.backoff)
        elif trial[2] >= self.WINDOW:
            if trial[0] / trial[1] > self.plain:
                self._pause(self.backoff)
                self.backoff = min(self.LONGEST, 2 * self.backoff)
            else:
                self.backoff, self.run, self.trial = 4, self.run + trial[2], [0.0, 0, 0]
                if self.run >= self.RECHECK:
                    self.off = 2

    def _pause(self, steps: int):
        self.off, self.trial = steps, [0.0, 0, 0]


class Always(Pace):
    """Drafting at every step (tests, and measuring a drafter's own acceptance)."""

    def __init__(self):
        super().__init__(warmup=0)

    def done(self, drafted: bool, tokens: int):
        pass


def _model_forward(model, state, inputs: dict, attention_mask, position_ids, keep: int, want_hidden: bool):
    """logits [N, keep, V] fp32 of the last `keep` positions of `inputs` (input_ids= or inputs_embeds=), through
    the KV cache, and, when want_hidden (the MTP head's input), the pre-norm hidden states of every position fed."""
    if not want_hidden:
        out = model(**inputs, attention_mask=attention_mask, position_ids=position_ids, past_key_values=state.cache,
                    use_cache=True, logits_to_keep=keep)
        state.cache = out.past_key_values
        return out.logits.float(), None
    # every position's state for the head; with int8 / int4 weights only as many of the last as keep the last
    # layer's feed-forward on the rows a plain forward of `keep` positions has (_row_limit), so that the logits are
    # a plain step's (the head then starts from those)
    rows, fed = _row_limit(model, state), next(iter(inputs.values())).shape[1]
    last = None if rows is None else slice(-min(fed, max(keep, rows // state.input_ids.shape[0])), None)
    with PreNorm(model) as seen:
        out = model.model(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=state.cache, use_cache=True, keep=last)
    state.cache = out.past_key_values
    return model.lm_head(out.last_hidden_state[:, -keep:]).float(), seen.last


class PreNorm:
    """While open: `last`, the input [N, S, H] of the main model's final norm in its latest forward (the MTP head's
    input: the last decoder layer's output of every position the forward kept)."""

    def __init__(self, model):
        self.model, self.last, self.hook = model, None, None

    def __enter__(self) -> "PreNorm":
        self.hook = self.model.model.norm.register_forward_pre_hook(self._seen)
        return self

    def _seen(self, module, args):
        self.last = args[0]

    def __exit__(self, *exc):
        self.hook.remove()


class _Process:
    """process(logits [N, V], prefix [N, L]) -> scores: generate's processors as if the sequences were prefix."""

    def __init__(self, state, cfg, process):
        self.state, self.cfg, self.fn, self.sampling = state, cfg, process, cfg.sampling()

    def __call__(self, logits: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, dataclasses.replace(self.state, input_ids=prefix), self.cfg)

    def plain_greedy(self, length: int) -> bool:
        """Whether the processors leave the logits of sequences of `length` tokens as they are, greedily."""
        s, state = self.sampling, self.state
        return (s.greedy and s.repetition_penalty == 1.0 and not s.logit_bias and not s.presence_penalty
                and not s.frequency_penalty and (state.eos is None or length >= state.min_length)
                and not processors.active(self.cfg))


@torch.no_grad()
def speculative_tokens(model, state, cfg, drafter, process, advance, stopped, tuned, decode_step,
                       generator: torch.Generator | None = None, pace: "Pace | None" = None) -> Iterator[torch.Tensor]:
    """Like generate's decode_tokens (the next tokens [N] one at a time, pad for finished rows, state.input_ids
    growing), with drafts checked a block at a time. process / advance / stopped / tuned / decode_step:
    generate's; pace: when to draft (default Pace())."""
    if not state.use_cache:
        raise ValueError("speculative decoding needs the KV cache (use_cache=True)")
    proc = _Process(state, cfg, process)
    sampling = proc.sampling
    hidden_too = drafter.needs_hidden
    prompt = state.input_ids if state.inputs_embeds is None else None
    if prompt is None and hidden_too:
        raise ValueError("the MTP head drafts from token ids: pass input_ids, not inputs_embeds")
    inputs = dict(inputs_embeds=state.inputs_embeds) if prompt is None else dict(input_ids=prompt)
    logits, hidden = _model_forward(model, state, inputs, state.attention_mask, state.position_ids, 1, hidden_too)
    logits = logits[:, -1]
    # the prompt's next token, as plain decoding chooses it
    scores = process(logits, state, cfg)
    token = choose(scores, sampling, generator)
    if _emit(state, token, scores, logits, advance, stopped):
        yield _last(state)
        return
    yield _last(state)
    if hidden_too:
        drafter.update(state, hidden, hidden.shape[1])
        drafter.restart = drafter.restart or hidden.shape[1] < state.prompt_length  # the prompt's last positions
        drafter.feed(state)
    pace = pace if pace is not None else Pace()
    last_run.clear()
    last_run.update(steps=0, drafted_steps=0, proposed=0, kept=0)
    # the thread count timed as decode_tokens times it
    with (tuned(lambda run: run(), state, model, "speculative") as step,
          PreNorm(model) if hidden_too else nullcontext() as seen):
        yield from _steps(model, state, drafter, proc, generator, pace, step, seen, advance, stopped, decode_step)


def _row_limit(model, state) -> int | None:
    """The most rows a forward computes as a decoding step does (kernels.MAX_ROWS) for a model with int8 / int4
    weights on CPU, whose forwards of more rows take the prefill's paths, which round the activations to int8;
    None for others."""
    if getattr(model, "quantization", None) is None or state.input_ids.device.type != "cpu":
        return None
    from ..inference import kernels

    return kernels.MAX_ROWS


def _checkable(model, state, k: int) -> int:
    """The most of k drafts that one forward checks as plain steps would compute them: not past the length at which
    the model drops its cache (PhiMoE's long RoPE: a plain step then runs the whole sequence again), nor where its
    rotation follows the forward's length (ERNIE's dynamic / longrope RoPE), nor, with int8 / int4 weights on CPU,
    more rows in all than kernels.MAX_ROWS (more take the prefill's paths, which round the activations to int8)."""
    rows = _row_limit(model, state)
    if rows is not None:
        k = min(k, rows // state.input_ids.shape[0] - 1)
    past = state.cache.get_seq_length() if state.cache is not None else None
    last = int(state.position_ids[:, -1].max()) + 1  # the fed token's largest position + 1
    while k and (past is None or model.needs_cache_reset(past, past + k + 1)
                 or model.model.rotation_changes(last, last + k)):
        k -= 1
    return k


def _steps(model, state, drafter, proc, generator, pace, step, seen, advance, stopped, decode_step):
    """seen: the PreNorm of the model when the drafter reads its hidden states (MTP), else None."""
    while True:
        room = state.max_length - state.input_ids.shape[1] - 1
        k = max(0, min(drafter.k, room)) if pace.drafting() else 0
        k = _checkable(model, state, k)
        pace.start()
        if not k:  # a plain decoding step, as generate's own
            logits = step(lambda: decode_step(model, state))
            scores = proc.fn(logits, state, proc.cfg)
            done = _emit(state, choose(scores, proc.sampling, generator), scores, logits, advance, stopped)
            pace.done(False, 1)
            last_run["steps"] += 1
            yield _last(state)
            if done:
                return
            if seen is not None:
                drafter.update(state, seen.last, 1)
            continue
        drafts, q = drafter.propose(model, state, k, proc, generator)
        k = drafts.shape[1]
        if state.eos is not None:  # finished rows are fed pad, as plain steps feed them
            drafts = torch.where(state.unfinished[:, None], drafts, state.pad)
        past = state.cache.get_seq_length()
        fed = torch.cat([state.input_ids[:, -1:], drafts], 1)
        mask = None if state.attention_mask is None else F.pad(state.attention_mask, (0, k), value=1)
        steps = torch.arange(1, k + 1, device=fed.device)
        pos = torch.cat([state.position_ids[:, -1:], state.position_ids[:, -1:] + steps], 1)
        # the thread count is timed on plain steps; every position's logits (and, through `seen`, hidden state)
        logits = getattr(step, "untimed", step)(
            lambda: _model_forward(model, state, dict(input_ids=fed), mask, pos, k + 1, False)[0])
        tokens, all_scores, kept = _judge(logits, drafts, q, state, proc, generator)
        emitted, done, j = [], False, 0
        while j <= kept and not done:
            before = state.unfinished.clone()
            done = _emit(state, tokens[:, j], all_scores[j], logits[:, j], advance, stopped)
            emitted.append(_last(state))
            if state.eos is not None and not torch.equal(before, state.unfinished):
                # a row that ends here is pad from the next token on: its position after that one was fed a draft
                kept = min(kept, j + 1)
            j += 1
        kept = j - 1
        state.cache.crop(past + 1 + kept)
        pace.done(k > 0, kept + 1)  # its tokens appended, as a plain step's time has its one
        last_run["steps"] += 1
        last_run["drafted_steps"] += k > 0
        last_run["proposed"] += k
        last_run["kept"] += kept
        if hasattr(drafter, "accepted"):
            drafter.accepted(kept, k)
        yield from emitted
        if done:
            return
        if seen is not None:
            drafter.update(state, seen.last[:, :kept + 1], kept + 1)


def _judge(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, state, proc, generator):
    """(tokens [N, k + 1], scores per position, drafts kept): position j's token for every row (its draft where
    kept, else the model's choice or the residual's draw), and how many drafts every unfinished row kept."""
    k = drafts.shape[1]
    if proc.plain_greedy(state.input_ids.shape[1]):  # the scores are the logits: one argmax
        tokens = logits.argmax(-1)
        kept_rows = torch.cumprod((tokens[:, :k] == drafts).long(), 1).sum(1)
        return tokens, list(logits.unbind(1)), int(kept_rows[open_rows(state)].min())
    scores = [proc(logits[:, j], torch.cat([state.input_ids, drafts[:, :j]], 1)) for j in range(k + 1)]
    tokens, ok = [], []
    for j in range(k + 1):
        if j == k:
            tokens.append(choose(scores[j], proc.sampling, generator))
            continue
        token, accept = judge_draft(scores[j], drafts[:, j], None if q is None else q[:, j], proc.sampling,
                                    generator)
        tokens.append(token)
        ok.append(accept)
    kept_rows = torch.cumprod(torch.stack(ok, 1).long(), 1).sum(1) if k else torch.zeros_like(tokens[0])
    return torch.stack(tokens, 1), scores, int(kept_rows[open_rows(state)].min())


def open_rows(state) -> torch.Tensor:
    """Rows [N] bool whose next tokens are the model's: the unfinished ones, or every row without EOS (a row that
    met a stop string then decodes on, as in transformers, its tokens not replaced by pad)."""
    if state.eos is None or not bool(state.unfinished.any()):
        return torch.ones_like(state.unfinished)
    return state.unfinished


def judge_draft(scores: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, sampling,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [N], accepted [N] bool) for one drafted position: scores [N, V] the model's processed scores there,
    draft [N] the drafted tokens, q [N, V] the drafter's probabilities (None: a fixed draft, q = 1 on it). Greedy
    accepts a draft equal to the model's choice; sampling accepts it with probability min(1, p/q) and otherwise
    draws from the residual max(p - q, 0), renormalised."""
    if not sampling.temperature:
        choice = choose(scores, sampling, generator)
        return choice, choice == draft
    p = scores.softmax(-1)
    pd = p.gather(1, draft[:, None]).squeeze(1)
    if q is None:
        qd, residual = torch.ones_like(pd), p.scatter(1, draft[:, None], 0.0)
    else:
        qd, residual = q.gather(1, draft[:, None]).squeeze(1), (p - q).clamp(min=0)
    u = torch.rand(pd.shape, generator=generator, device=pd.device)
    accept = u * qd < pd
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p)
    drawn = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return torch.where(accept, draft, drawn), accept


def _emit(state, token: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor, advance, stopped) -> bool:
    """One token [N] appended as decode_tokens does (pad for finished rows, scores recorded); True when every row
    is finished."""
    if state.scores is not None:
        state.scores.append(scores)
    if state.logits is not None:
        state.logits.append(logits)
    if state.eos is not None:
        token = torch.where(state.unfinished, token, state.pad)
    advance(state, torch.cat([state.input_ids, token[:, None]], dim=-1))
    state.unfinished &= ~stopped(state, state.input_ids)
    return not bool(state.unfinished.any())


def _last(state) -> torch.Tensor:
    return state.input_ids[:, -1]


def drafter_for(model, cfg, assistant_model=None, speculative: str | None = None):
    """The drafter generate's arguments ask for, or None: speculative="mtp", assistant_model=, or
    prompt_lookup_num_tokens= (one at a time)."""
    asked = [name for name, on in (("speculative", speculative is not None), ("assistant_model", assistant_model
             is not None), ("prompt_lookup_num_tokens", cfg.prompt_lookup_num_tokens is not None)) if on]
    if not asked:
        return None
    if len(asked) > 1:
        raise ValueError(f"generate() takes one way of drafting at a time; got {', '.join(asked)}")
    if cfg.num_beams > 1:
        raise ValueError(f"speculative decoding ({asked[0]}) does not run with beam search (num_beams > 1)")
    if getattr(getattr(model, "parallel", None), "generation_sync", lambda: None)() is not None:
        raise ValueError("speculative decoding is not implemented for models whose ranks decode different batches")
    if speculative is not None:
        if speculative != "mtp":
            raise ValueError(f"speculative must be 'mtp' (ERNIE's multi-token-prediction head), got {speculative!r};"
                             " for a draft model pass assistant_model=, for n-gram lookup prompt_lookup_num_tokens=")
        if getattr(model, "mtp", None) is None:
            raise ValueError(f"speculative='mtp': {type(model).__name__} has no MTP head (only ERNIE 4.5 MoE "
                             "checkpoints with model.mtp_* tensors do, loaded on one device without offload)")
        return Mtp(model, cfg.num_assistant_tokens or 1, cfg.num_assistant_tokens_schedule or "heuristic")
    if assistant_model is not None:
        from ..config import PretrainedConfig

        if not isinstance(getattr(assistant_model, "config", None), PretrainedConfig):  # a moelm model's
            kind = type(assistant_model)
            raise ValueError(f"assistant_model must be a moelm model (moelm.AutoModelForCausalLM.from_pretrained), got "
                             f"{kind.__module__}.{kind.__qualname__}")
        if assistant_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"assistant_model has a vocabulary of {assistant_model.config.vocab_size} tokens, the "
                             f"model {model.config.vocab_size}: they must share the tokenizer")
        schedule = cfg.num_assistant_tokens_schedule or "heuristic"
        if schedule not in ("constant", "heuristic"):
            raise ValueError(f"num_assistant_tokens_schedule must be 'constant' or 'heuristic', got {schedule!r}")
        return Assistant(assistant_model, cfg.num_assistant_tokens or 5, schedule)
    return PromptLookup(cfg.prompt_lookup_num_tokens, cfg.max_matching_ngram_size or 2)
