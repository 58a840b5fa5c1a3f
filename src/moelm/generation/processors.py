"""transformers 5.23's logits processors beyond the shared sampler's (moelm.generation.sampling), for generate only:
scores [N, V] and the sequences so far input_ids [N, L]. generate.process applies them in transformers' order."""
from __future__ import annotations

import math

import torch

from .sampling import suppress

# the fields these processors read, with the values that leave them off
FIELDS = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
          "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
          "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "remove_invalid_values": False,
          "renormalize_logits": False}


def active(cfg) -> list[str]:
    """The fields of FIELDS set to values that change the scores (typical_p, epsilon / eta cutoffs: when sampling)."""
    warpers = {"typical_p", "epsilon_cutoff", "eta_cutoff"}
    return [k for k, off in FIELDS.items()
            if getattr(cfg, k) not in (off, None, []) and (cfg.do_sample or k not in warpers)]


def check(cfg):
    """ValueError naming the field for a value transformers' processors refuse (or that is no such value)."""
    def need(ok: bool, name: str, rule: str):
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {getattr(cfg, name)!r}")

    def ints(value, low: int = 0) -> bool:
        return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= low
                                               for i in value)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    need(number(cfg.typical_p) and 0 < cfg.typical_p <= 1, "typical_p", "in (0, 1] (1 is off)")
    for name in ("epsilon_cutoff", "eta_cutoff"):
        need(number(getattr(cfg, name)) and 0 <= getattr(cfg, name) < 1, name, "in [0, 1) (0 is off)")
    need(ints([cfg.no_repeat_ngram_size]), "no_repeat_ngram_size", "an integer >= 0 (0 is off)")
    bad = cfg.bad_words_ids
    need(bad is None or isinstance(bad, list) and bad and all(ints(w) for w in bad), "bad_words_ids",
         "a non-empty list of lists of token ids")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        need(getattr(cfg, name) is None or ints(getattr(cfg, name)), name, "a list of token ids")
    need(cfg.forced_bos_token_id is None or ints([cfg.forced_bos_token_id]), "forced_bos_token_id", "a token id")
    eos = cfg.forced_eos_token_id
    need(eos is None or ints(eos if isinstance(eos, list) else [eos]), "forced_eos_token_id",
         "a token id or a list of them")
    decay = cfg.exponential_decay_length_penalty
    need(decay is None or isinstance(decay, (tuple, list)) and len(decay) == 2 and ints([decay[0]])
         and number(decay[1]), "exponential_decay_length_penalty", "(start index, decay factor)")
    for name in ("remove_invalid_values", "renormalize_logits"):
        need(isinstance(getattr(cfg, name), bool), name, "True or False")
    if cfg.sequence_bias is not None:
        biases(cfg.sequence_bias)
    for name in ("forced_bos_token_id", "forced_eos_token_id"):  # as transformers: every score -inf there
        forced = getattr(cfg, name)
        forced = set(forced if isinstance(forced, list) else [] if forced is None else [forced])
        if cfg.suppress_tokens is not None and forced and forced <= set(cfg.suppress_tokens):
            raise ValueError(f"every token of {name} ({sorted(forced)}) is also in suppress_tokens: forcing a token "
                             "while suppressing it leaves no token to choose")


def biases(sequence_bias) -> dict[tuple[int, ...], float]:
    """sequence_bias ({(ids...): bias} or [[[ids...], bias], ...]) as a dict, checked as transformers does (float
    biases, non-empty sequences of token ids)."""
    def ids(seq) -> bool:
        return len(seq) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in seq)

    if isinstance(sequence_bias, dict):
        ok = all(isinstance(k, tuple) and ids(k) and isinstance(v, float) for k, v in sequence_bias.items())
        pairs = sequence_bias.items()
    else:
        ok = isinstance(sequence_bias, list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], list) and ids(p[0])
            and isinstance(p[1], float) for p in sequence_bias)
        pairs = [(tuple(p[0]), p[1]) for p in sequence_bias] if ok else []
    if not (ok and sequence_bias):
        raise ValueError("sequence_bias must be a non-empty dict of token id tuples to float biases, or a list of "
                         f"[[token ids], float bias] pairs, got {sequence_bias!r}")
    return dict(pairs)


# ------------------------------------------------------------------ the processors

def sequence_bias(scores: torch.Tensor, input_ids: torch.Tensor, bias: dict[tuple[int, ...], float]) -> torch.Tensor:
    """Add each sequence's bias to the score of its last token in the rows that end with the rest of it."""
    vocab = scores.shape[-1]
    outside = sorted({i for seq in bias for i in seq if i >= vocab})
    if outside:
        raise ValueError(f"The model vocabulary size is {vocab}, but the following tokens were being biased: "
                         f"{outside}")
    add = torch.zeros_like(scores)
    for seq, value in bias.items():
        prefix = torch.tensor(seq[:-1], dtype=input_ids.dtype, device=input_ids.device)
        if len(prefix) > input_ids.shape[1]:
            continue
        rows = (input_ids[:, input_ids.shape[1] - len(prefix):] == prefix).all(-1)
        add[:, seq[-1]] += torch.where(rows, value, 0.0).to(scores.device)
    return scores + add


def bad_words(scores: torch.Tensor, input_ids: torch.Tensor, bad_words_ids: list[list[int]],
              eos: torch.Tensor | None) -> torch.Tensor:
    """-inf for the last token of each bad word whose rest ends the row (single-token EOS words are kept)."""
    eos_ids = [] if eos is None else eos.tolist()
    words = [w for w in bad_words_ids if all(w != [e] for e in eos_ids)]
    return sequence_bias(scores, input_ids, {tuple(w): -math.inf for w in words})


def no_repeat_ngram(scores: torch.Tensor, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for tokens that would complete an n-gram already in the row."""
    length, vocab = input_ids.shape[1], scores.shape[-1]
    if length < n:
        return scores
    windows = input_ids.unfold(1, n, 1)
    matches = (windows[..., :-1] == input_ids[:, length + 1 - n:].unsqueeze(1)).all(-1)
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -math.inf)


def force(scores: torch.Tensor, token_ids) -> torch.Tensor:
    """Every score -inf but token_ids' (0)."""
    forced = torch.full_like(scores, -math.inf)
    forced[:, token_ids] = 0
    return forced


def remove_invalid(scores: torch.Tensor) -> torch.Tensor:
    """nan as 0, +-inf as the dtype's largest / smallest value."""
    info = torch.finfo(scores.dtype)
    return torch.nan_to_num(scores, nan=0.0, posinf=info.max, neginf=info.min)


def exponential_decay(scores: torch.Tensor, length: int, start: int, factor: float, eos: torch.Tensor) -> torch.Tensor:
    """EOS scores raised by |score| * (factor ** (length - start) - 1) past `start` (finite scores only)."""
    if length <= start:
        return scores
    eos_scores = scores[:, eos]
    penalty = (eos_scores.abs() * (pow(factor, length - start) - 1)).masked_fill(~torch.isfinite(eos_scores), 0.0)
    add = torch.zeros_like(scores)
    add[:, eos] = penalty
    return scores + add


def typical(scores: torch.Tensor, mass: float, keep: int = 1) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, up to probability `mass`."""
    normalized = scores.log_softmax(-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted, order = torch.sort((-normalized - entropy).abs())
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(1).clamp_(max=shifted.shape[-1] - 1)
    drop = shifted > shifted.gather(1, last.view(-1, 1))
    drop[..., :keep] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


def epsilon(scores: torch.Tensor, cutoff: float, keep: int = 1) -> torch.Tensor:
    """Drop tokens of probability below cutoff (keeping the `keep` best)."""
    return _below(scores, scores.softmax(-1) < cutoff, keep)


def eta(scores: torch.Tensor, cutoff: float, keep: int = 1) -> torch.Tensor:
    """Drop tokens of probability below min(cutoff, sqrt(cutoff) * exp(-entropy)) (keeping the `keep` best)."""
    cutoff = torch.tensor(cutoff, device=scores.device)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    bound = torch.min(cutoff, cutoff.sqrt() * torch.exp(-entropy))[..., None]
    return _below(scores, scores.softmax(-1) < bound, keep)


def _below(scores: torch.Tensor, drop: torch.Tensor, keep: int) -> torch.Tensor:
    kth = torch.topk(scores, min(keep, scores.shape[-1]))[0][..., -1:]
    return scores.masked_fill(drop & (scores < kth), -math.inf)


# ------------------------------------------------------------------ in transformers' order

def constrain(scores: torch.Tensor, state, cfg) -> torch.Tensor:
    """After the repetition penalty and min length: n-grams, bad words, forced BOS / EOS, invalid values, the
    exponential decay length penalty, suppressed tokens. state: generate's DecodeState."""
    ids, length = state.input_ids, state.input_ids.shape[1]
    if cfg.no_repeat_ngram_size:
        scores = no_repeat_ngram(scores, ids, cfg.no_repeat_ngram_size)
    if cfg.bad_words_ids is not None:
        scores = bad_words(scores, ids, cfg.bad_words_ids, state.eos)
    if cfg.forced_bos_token_id is not None and length == 1:
        scores = force(scores, cfg.forced_bos_token_id)
    if cfg.forced_eos_token_id is not None and length == state.max_length - 1:
        scores = force(scores, cfg.forced_eos_token_id)
    if cfg.remove_invalid_values:
        scores = remove_invalid(scores)
    if cfg.exponential_decay_length_penalty is not None:
        if state.eos is None or bool((state.eos < 0).any()):
            raise ValueError("exponential_decay_length_penalty needs eos_token_id (token ids >= 0)")
        start, factor = cfg.exponential_decay_length_penalty
        scores = exponential_decay(scores, length, start + state.prompt_length, factor, state.eos)
    if cfg.suppress_tokens is not None:
        scores = suppress(scores, torch.tensor(cfg.suppress_tokens, dtype=torch.long))
    if cfg.begin_suppress_tokens is not None:
        begin = state.prompt_length + (state.prompt_length <= 1 and cfg.forced_bos_token_id is not None)
        if length == begin:
            scores = suppress(scores, torch.tensor(cfg.begin_suppress_tokens, dtype=torch.long))
    return scores


def cut(scores: torch.Tensor, cfg, keep: int) -> torch.Tensor:
    """After the sampler's warpers, when sampling: typical, epsilon and eta sampling."""
    if cfg.typical_p < 1.0:
        scores = typical(scores, cfg.typical_p, keep)
    if cfg.epsilon_cutoff:
        scores = epsilon(scores, cfg.epsilon_cutoff, keep)
    if cfg.eta_cutoff:
        scores = eta(scores, cfg.eta_cutoff, keep)
    return scores
