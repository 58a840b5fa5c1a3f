"""Text generation as transformers 5.23's `generate` does it, token for token.

Small pieces (GenerationConfig in .config, the sampler in .sampling): `prefill` and `decode_step` (a step is
`step(model, state) -> next-token logits`, so a static cache or a compiled step can replace `decode_step`);
`decode_tokens`, an iterator of new tokens (greedy and sampling) that `generate` and the CLI stream from;
`beam_search`; and `GenerationMixin.generate` on top.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from . import processors
from .config import DEFAULT_NEW_TOKENS, FIELDS, INERT, UNIMPLEMENTED, GenerationConfig
from .sampling import apply_penalties, choose, warp


@dataclass
class GenerateOutput:
    """generate(..., return_dict_in_generate=True): transformers' GenerateDecoderOnlyOutput and, with
    sequences_scores and beam_indices, GenerateBeamDecoderOnlyOutput."""

    sequences: torch.Tensor                              # [B * num_return_sequences, L]
    sequences_scores: torch.Tensor | None = None         # [B * num_return_sequences] beam search, with output_scores
    scores: tuple[torch.Tensor, ...] | None = None       # processed scores per step, each [B * n, V]
    logits: tuple[torch.Tensor, ...] | None = None       # raw logits per step, each [B * n, V]
    beam_indices: torch.Tensor | None = None             # [B * num_return_sequences, new tokens]
    past_key_values: Any = None
    hidden_states: tuple | None = None  # per step, the forward's (embeddings + each layer), each [N, fed, H]
    attentions: tuple | None = None     # per step, each layer's [N, heads, fed, T]

    def __getitem__(self, key):
        return getattr(self, key)


# ------------------------------------------------------------------ state and model steps

@dataclass
class DecodeState:
    """What a generation run carries from step to step, and its constants."""

    input_ids: torch.Tensor                     # [N, L] prompt (left padded) + new tokens; [N, 0] for an embeds prompt
    attention_mask: torch.Tensor | None         # [N, T] over all fed positions, None when nothing is padded
    position_ids: torch.Tensor                  # [N, T]
    max_length: int
    min_length: int
    prompt_length: int                          # input_ids columns that are prompt
    eos: torch.Tensor | None = None             # [E]
    pad: int | None = None
    pad_lengths: torch.Tensor | None = None     # [N] left padding, which the repetition penalty ignores
    inputs_embeds: torch.Tensor | None = None   # [N, T, H] the prompt when given as embeddings
    cache: Any = None
    use_cache: bool = True
    stop_strings: list[str] | None = None
    tokenizer: Any = None                       # decodes rows for stop_strings
    deadline: float | None = None               # time.monotonic() past which every row stops (max_time)
    hidden_states: list | None = None           # filled when return_dict_in_generate and output_hidden_states
    attentions: list | None = None              # filled when return_dict_in_generate and output_attentions
    unfinished: torch.Tensor | None = None      # [N] bool
    scores: list | None = None                  # filled when return_dict_in_generate and output_scores
    logits: list | None = None                  # filled when return_dict_in_generate and output_logits


def prefill(model, state: DecodeState) -> torch.Tensor:
    """The prompt's forward pass; returns the next-token logits [N, V] in fp32."""
    if state.inputs_embeds is not None:
        return _forward(model, state, inputs_embeds=state.inputs_embeds)
    past = 0 if state.cache is None else state.cache.get_seq_length()  # a continued cache's positions are not fed
    if past and model.needs_cache_reset(past, state.input_ids.shape[1]):
        state.cache, past = None, 0
    return _forward(model, state, input_ids=state.input_ids[:, past:])


def decode_step(model, state: DecodeState) -> torch.Tensor:
    """Feed the last token of each row through the cache; returns the next-token logits [N, V] in fp32.

    Without a cache, or when the model asks for a fresh one (PhiMoE reaching long RoPE), the whole sequence is run."""
    if state.cache is not None and model.needs_cache_reset(state.cache.get_seq_length(), state.input_ids.shape[1]):
        state.cache = None
    if state.cache is None:
        return _forward(model, state, input_ids=state.input_ids)
    return _forward(model, state, input_ids=state.input_ids[:, -1:])


def _forward(model, state: DecodeState, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    fed = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=state.attention_mask,
                position_ids=state.position_ids[:, -fed:], past_key_values=state.cache, use_cache=state.use_cache,
                logits_to_keep=1, output_hidden_states=state.hidden_states is not None,
                output_attentions=state.attentions is not None)  # not config.json's switches, as transformers'
    state.cache = out.past_key_values
    if state.hidden_states is not None:
        state.hidden_states.append(out.hidden_states)
    if state.attentions is not None:
        state.attentions.append(out.attentions)
    return out.logits[:, -1].float()


def advance(state: DecodeState, input_ids: torch.Tensor):
    """The sequences [N, L+1] after a step: the attention mask and positions grow by one."""
    state.input_ids = input_ids
    state.position_ids = torch.cat([state.position_ids, state.position_ids[:, -1:] + 1], dim=-1)
    if state.attention_mask is not None:
        state.attention_mask = F.pad(state.attention_mask, (0, 1), value=1)


def process(logits: torch.Tensor, state: DecodeState, cfg: GenerationConfig) -> torch.Tensor:
    """The scores [N, V] of logits [N, V] through transformers' logits processors in its order: sequence bias,
    repetition penalty, no-repeat n-grams and bad words (after min length / min new tokens, EOS masked: the same),
    forced BOS / EOS, invalid values, the exponential decay length penalty, suppressed tokens, then, when sampling,
    temperature, top-k, top-p, min-p, typical, epsilon and eta; and renormalisation last."""
    s = cfg.sampling()
    if cfg.sequence_bias is not None:
        logits = processors.sequence_bias(logits, state.input_ids, processors.biases(cfg.sequence_bias))
    banned = state.eos if state.eos is not None and state.input_ids.shape[1] < state.min_length else None
    scores = apply_penalties(logits, s, state.input_ids, state.prompt_length, state.pad_lengths, banned)
    scores = processors.constrain(scores, state, cfg)
    # beam sampling keeps one more token than there are EOS tokens
    keep = 1 if cfg.num_beams == 1 else (len(state.eos) + 1 if state.eos is not None else 2)
    scores = warp(scores, s, keep)
    if cfg.do_sample:
        scores = processors.cut(scores, cfg, keep)
    return scores.log_softmax(-1) if cfg.renormalize_logits else scores


def stopped(state: DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
    """Rows [N] that the last token of input_ids [N, L] ends: max length, EOS, or a stop string."""
    done = torch.full((input_ids.shape[0],), input_ids.shape[1] >= state.max_length, device=input_ids.device)
    if state.eos is not None:
        done |= torch.isin(input_ids[:, -1], state.eos)
    if state.stop_strings:
        done |= stop_string_hits(input_ids, state.stop_strings, state.tokenizer).to(done.device)
    if state.deadline is not None and time.monotonic() > state.deadline:
        done[:] = True
    return done


def stop_string_hits(input_ids: torch.Tensor, stop_strings: list[str], tokenizer) -> torch.Tensor:
    """Rows [N] whose last token completes a stop string: it occurs in the tail of the sequence and ends inside the
    last token (like transformers' StopStringCriteria, it may run on into the rest of that token). A byte-level or
    byte-fallback vocabulary is matched on the tokens' bytes as transformers does (a token holding part of a
    character is its bytes, not the U+FFFD that decoding it alone gives), others on the decoded text."""
    piece = token_bytes(tokenizer)
    targets = [s.encode() for s in stop_strings] if piece is not None else stop_strings
    longest = max(len(s) for s in targets)
    hits = []
    for row in input_ids.tolist():
        tail = row[-(longest + 1):]
        if piece is None:
            text, before = tokenizer.decode(tail), len(tokenizer.decode(tail[:-1]))
        else:
            parts = [piece(t) for t in tail]
            text, before = b"".join(parts), sum(len(p) for p in parts[:-1])
        hits.append(any(s in text[max(0, before - len(s) + 1):] for s in targets))
    return torch.tensor(hits, dtype=torch.bool)


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its token_bytes (or None)
_PREFIX = "abcdef"  # what transformers puts before a token to decode it with its leading space


def token_bytes(tokenizer) -> Callable[[int], bytes] | None:
    """token id -> its bytes as transformers' StopStringCriteria reads them, for a tokenizer (its `tokenizers`
    backend) whose decoder is byte-level or byte-fallback; None for other tokenizers."""
    try:
        if tokenizer in _PIECES:
            return _PIECES[tokenizer]
    except TypeError:  # not weakly referenceable, or unhashable
        return _token_bytes(tokenizer)
    _PIECES[tokenizer] = piece = _token_bytes(tokenizer)
    return piece


def _token_bytes(tokenizer) -> Callable[[int], bytes] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # noqa: BLE001 - a decoder without a JSON state
        state = None
    text = json.dumps(state)
    if type(decoder).__name__ == "ByteLevel":
        mode = "byte_level"
    elif '"type": "ByteFallback"' in text:
        mode = "byte_fallback"
    elif '"type": "ByteLevel"' in text:
        mode = "byte_level"
    else:
        return None
    base = backend.encode(_PREFIX, add_special_tokens=False).tokens
    chars = _byte_decoder()

    @functools.lru_cache(maxsize=None)
    def piece(index: int) -> bytes:
        token = backend.id_to_token(index)
        if token is None:
            return b""
        if mode == "byte_level" and all(c in chars for c in token):
            return bytes(chars[c] for c in token)
        if mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        string = decoder.decode(base + [token])
        return string[string.index(_PREFIX) + len(_PREFIX):].encode() if _PREFIX in string else string.encode()
    return piece


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# ------------------------------------------------------------------ preparing a run

def prepare(model, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
            inputs_embeds=None, tokenizer=None, past_key_values=None, logits_to_keep: int | None = None,
            **kwargs) -> tuple[GenerationConfig, DecodeState]:
    """The run's config (model defaults < generation_config < kwargs) and its starting state: special tokens, the
    default attention mask and positions, rows repeated for beams / return sequences, the length limits, and the
    cache (past_key_values continued, see continued_cache). logits_to_keep (transformers passes it to the model) may
    be any integer: generation reads the last position's logits only."""
    start = time.monotonic()
    cfg = merge_config(model, generation_config, kwargs)
    if cfg.max_time is not None and getattr(model, "parallel", None) is not None:
        raise ValueError("max_time on a sharded model would stop its ranks at different steps; use max_new_tokens")
    if logits_to_keep is not None and not (isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool)
                                           and logits_to_keep >= 0):  # an int changes nothing: the last is read
        raise ValueError(f"logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
    getattr(getattr(model, "parallel", None), "align_rng", lambda: None)()  # TP ranks must sample alike
    device = model.device
    eos = None if cfg.eos_token_id is None else torch.tensor(cfg.eos_token_id, device=device).reshape(-1)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None or eos is None else int(eos[0])
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.to(device)
        if input_ids is None:
            input_ids = torch.ones(inputs_embeds.shape[0], 0, dtype=torch.long, device=device)
    elif input_ids is None:
        if cfg.bos_token_id is None:
            raise ValueError("generate() needs input_ids, inputs_embeds or a bos_token_id to start from")
        input_ids = torch.full((1, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    input_ids = input_ids.to(device)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if cfg.stop_strings is not None and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass generate(..., tokenizer=...)")
    if attention_mask is None and input_ids.shape[1] == 0:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
    elif attention_mask is None:
        attention_mask = default_attention_mask(input_ids, pad, eos)
    attention_mask = attention_mask.to(device)
    if attention_mask.dim() != 2:
        raise ValueError("the attention_mask passed to generate() must be 2D [batch, length]")
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if bool((attention_mask == 1).all()):
        attention_mask = None
    pad_lengths = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)

    n = max(cfg.num_beams, cfg.num_return_sequences)  # rows per prompt
    input_ids, attention_mask, position_ids, pad_lengths, inputs_embeds = (
        t if t is None or n == 1 else t.repeat_interleave(n, dim=0)
        for t in (input_ids, attention_mask, position_ids, pad_lengths, inputs_embeds))

    length, embeds_length = input_ids.shape[1], 0 if inputs_embeds is None else inputs_embeds.shape[1]
    from_embeds = inputs_embeds is not None and length != embeds_length
    if cfg.max_new_tokens is not None:
        max_length = cfg.max_new_tokens + length
    elif cfg.max_length is None:
        max_length = min(DEFAULT_NEW_TOKENS + length, model.config.max_position_embeddings)
    else:
        max_length = cfg.max_length - embeds_length if from_embeds else cfg.max_length
    if cfg.min_new_tokens is not None:
        min_length = cfg.min_new_tokens + length
    else:
        min_length = max(cfg.min_length - embeds_length, 0) if from_embeds else cfg.min_length
    if length >= max_length:
        raise ValueError(f"the input is {length} tokens long but max_length is {max_length}: "
                         "set max_new_tokens (or a larger max_length)")
    record = cfg.return_dict_in_generate
    state = DecodeState(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, max_length=max_length,
        min_length=min_length, prompt_length=length, eos=eos, pad=pad, pad_lengths=pad_lengths,
        inputs_embeds=inputs_embeds, use_cache=cfg.use_cache or inputs_embeds is not None,
        stop_strings=[cfg.stop_strings] if isinstance(cfg.stop_strings, str) else cfg.stop_strings, tokenizer=tokenizer,
        unfinished=torch.ones(input_ids.shape[0], dtype=torch.bool, device=device),
        scores=[] if record and cfg.output_scores else None, logits=[] if record and cfg.output_logits else None,
        deadline=None if cfg.max_time is None else start + cfg.max_time,
        hidden_states=[] if record and cfg.output_hidden_states else None,
        attentions=[] if record and cfg.output_attentions else None)
    if past_key_values is not None:
        if inputs_embeds is not None:
            raise ValueError("generate() does not take past_key_values with inputs_embeds; pass input_ids")
        state.cache = continued_cache(model, cfg, past_key_values, input_ids, n, max_length)
    elif state.use_cache and cfg.cache_implementation != "dynamic":
        from ..inference.cache import StaticCache

        dtype = model.get_input_embeddings().weight.dtype
        tp = getattr(getattr(model, "parallel", None), "tp_size", 1)  # a sharded model holds its local kv heads
        state.cache = StaticCache(model.config, input_ids.shape[0], max_length + embeds_length, dtype, device, tp)
    return cfg, state


def continued_cache(model, cfg: GenerationConfig, cache, input_ids: torch.Tensor, n: int, max_length: int):
    """generate(past_key_values=cache): moelm's cache of an earlier run (its out.past_key_values) or forward, as
    transformers continues it: input_ids [B * n, L] are the whole sequence so far (its first rows cached, not fed
    again), each prompt's cached row is repeated n times for beams / return sequences, and a static cache grows to
    max_length."""
    from ..inference.cache import StaticCache
    from ..nn.layers import DynamicCache

    if isinstance(cache, (tuple, list)):
        raise ValueError("past_key_values as a tuple (the legacy cache format) is not supported, as in transformers "
                         "5: pass the cache object (out.past_key_values)")
    if not isinstance(cache, (DynamicCache, StaticCache)):
        kind = type(cache)
        raise TypeError(f"past_key_values must be a moelm DynamicCache or StaticCache (the past_key_values of moelm's "
                        f"generate or forward), got {kind.__module__}.{kind.__qualname__}")
    if cfg.cache_implementation is not None:
        raise ValueError(f"generate() takes past_key_values or cache_implementation (got "
                         f"{cfg.cache_implementation!r}), not both")
    if not cfg.use_cache:
        raise ValueError("generate() got past_key_values with use_cache=False: drop one of them")
    past, length = cache.get_seq_length(), input_ids.shape[1]
    if past >= length:
        raise ValueError(f"past_key_values holds {past} positions but input_ids has {length}: pass the whole "
                         "sequence so far (out.sequences) and at least one new token")
    config, batch = model.config, input_ids.shape[0] // n
    tp = getattr(getattr(model, "parallel", None), "tp_size", 1)
    want = (config.num_hidden_layers, batch, config.num_key_value_heads // tp, config.head_size)
    if cache.keys:
        got = (len(cache.keys), *cache.keys[0].shape[:2], cache.keys[0].shape[-1])
        if got != want:
            raise ValueError("past_key_values does not fit this model and input: it holds {} layers, batch {}, {} "
                             "key/value heads of size {}; they need {} layers, batch {}, {} heads of size {}"
                             .format(*got, *want))
    if n > 1:
        cache.batch_repeat_interleave(n)
    if isinstance(cache, StaticCache) and cache.max_length < max_length:
        cache.resize(max_length)
    return cache


def merge_config(model, generation_config, kwargs: dict) -> GenerationConfig:
    """A validated copy: generation_config (its fields not set, see GenerationConfig.is_set, and its missing extra
    keys filled from the model's) or the model's own, updated with kwargs. generation_config may be moelm's
    GenerationConfig, transformers' (its to_dict) or a dict: their unset (None or missing) keys come from the model's.
    Unknown kwargs are an error, and so is a key moelm does not implement set to a value that would change the output
    (config.UNIMPLEMENTED)."""
    base = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    given = as_generation_config(generation_config, base)
    cfg = copy.deepcopy(given if given is not None else base)
    if given is not None:
        for name in FIELDS:
            if not given.is_set(name):
                setattr(cfg, name, copy.deepcopy(getattr(base, name)))
        for key, value in base.extra.items():  # as transformers carries the model's custom entries over
            cfg.extra.setdefault(key, copy.deepcopy(value))
    kwargs = transformers_arguments(kwargs)
    # keys moelm does not implement go to extra (refused below unless their values change nothing), inert ones away
    cfg.extra.update({k: v for k, v in kwargs.items() if k in UNIMPLEMENTED})
    unused = cfg.update(**{k: v for k, v in kwargs.items() if k not in UNIMPLEMENTED and k not in INERT})
    if unused:
        raise ValueError(f"generate() does not use the arguments {sorted(unused)} (typos show up here too)")
    refused = cfg.unimplemented()
    if refused:
        argued = [k for k in refused if k in kwargs]
        passed = [k for k in refused if given is not None and k in given.extra and k not in argued]
        sources = {"model.generation_config: the checkpoint's generation_config.json or set on it":
                   [k for k in refused if k not in passed and k not in argued],
                   "the generation_config passed to generate()": passed, "the arguments of generate()": argued}
        parts = [f"{', '.join(f'{k}={refused[k]!r}' for k in keys)} (from {where})"
                 for where, keys in sources.items() if keys]
        defaults = ", ".join(f"{k}={UNIMPLEMENTED[k][-1]!r}" for k in refused)
        raise ValueError(f"generation config key(s) that moelm does not implement, set to values that would change "
                         f"the output: {'; '.join(parts)}. Remove them, or set them to transformers' defaults "
                         f"({defaults})")
    cfg.validate()
    return cfg


# transformers' generate() arguments that moelm has no use for, with the values that change nothing
TRANSFORMERS_ARGUMENTS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                          "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate"}
# fields that transformers' generate(field=None) leaves off (its processor out, or False), as these values do
NONE_IS_OFF = {"min_length": 0, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0,
               "early_stopping": False, "output_scores": False, "output_logits": False,
               "return_dict_in_generate": False, **{k: v for k, v in processors.FIELDS.items() if v is not None}}


def transformers_arguments(kwargs: dict) -> dict:
    """kwargs without transformers' own generate() arguments at their no-op values (None, False or an empty list;
    others are an error naming them), and with None for a field that it leaves off as that field's off value."""
    out = {}
    for key, value in kwargs.items():
        if key not in TRANSFORMERS_ARGUMENTS:
            out[key] = NONE_IS_OFF[key] if value is None and key in NONE_IS_OFF else value
        elif not (value is None or value is False or isinstance(value, list) and not value):
            raise ValueError(f"generate() does not implement {key} (got {value!r}); leave it unset")
    return out


def as_generation_config(value, base: GenerationConfig) -> GenerationConfig | None:
    """generate()'s generation_config argument as moelm's GenerationConfig: a dict or transformers' GenerationConfig
    (its to_dict) sets its keys that are not None on a copy of base (the model's)."""
    if value is None or isinstance(value, GenerationConfig):
        return value
    if type(value).__name__ == "GenerationConfig" and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    elif not isinstance(value, dict):
        raise TypeError(f"generation_config must be a moelm GenerationConfig, a transformers GenerationConfig or a "
                        f"dict, got {type(value).__name__}")
    else:  # a dict is checked as generate()'s keyword arguments are
        unknown = sorted(map(str, value.keys() - FIELDS - UNIMPLEMENTED.keys() - INERT))
        if unknown:
            raise ValueError(f"the generation_config dict has key(s) {unknown} that are no generation parameters "
                             "(typos show up here too)")
    cfg = copy.deepcopy(base)
    cfg.extra = {}
    for key, item in value.items():
        if item is not None and key not in INERT:
            setattr(cfg, key, copy.deepcopy(item))
    return cfg


def default_attention_mask(input_ids: torch.Tensor, pad: int | None, eos: torch.Tensor | None) -> torch.Tensor:
    """As transformers: `input_ids != pad` when pad occurs in the ids and is not an EOS token, else all ones."""
    ones = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
    if pad is None or input_ids.is_floating_point() or not bool((input_ids == pad).any()):
        return ones
    if eos is not None and bool((eos == pad).any()):
        return ones
    return (input_ids != pad).long()


# ------------------------------------------------------------------ decoding loops

@torch.no_grad()
def decode_tokens(model, state: DecodeState, cfg: GenerationConfig, step: Callable = decode_step,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding: yields the next tokens [N] each step (pad_token_id for rows already finished)
    until every row is finished; state.input_ids holds the sequences so far."""
    if cfg.num_beams > 1:
        raise ValueError("decode_tokens does greedy decoding and sampling; use beam_search for num_beams > 1")
    logits = prefill(model, state)
    sync, sampling = synced(model), cfg.sampling()
    with tuned(step, state, model) as step:
        while True:
            scores = process(logits, state, cfg)
            if state.scores is not None:
                state.scores.append(scores)
            if state.logits is not None:
                state.logits.append(logits)
            tokens = choose(scores, sampling, generator)
            if state.eos is not None:
                tokens = torch.where(state.unfinished, tokens, state.pad)
            advance(state, torch.cat([state.input_ids, tokens[:, None]], dim=-1))
            state.unfinished &= ~stopped(state, state.input_ids)
            yield tokens
            if decoding_ends(not bool(state.unfinished.any()), model, sync):
                return
            logits = step(model, state)


def synced(model):
    """A sharded model whose ranks decode different batches but meet in collectives (expert parallelism with
    all-to-all over data-parallel ranks) gives an object keeping them in step (moelm.parallel), else None."""
    return getattr(getattr(model, "parallel", None), "generation_sync", lambda: None)()


def decoding_ends(done: bool, model, sync) -> bool:
    """Whether decoding ends here. In step with other ranks (transformers' synced_gpus): each step every rank says
    whether it is done; one that is, runs idle forwards that join the others' collectives until all are."""
    if sync is None:
        return done
    if done:
        while not sync.all_done(True):
            sync.idle_forward(model)
        return True
    sync.all_done(False)
    return False


_TUNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(kind, threads, rows): ThreadTuner}
_TUNING = threading.Lock()  # held by the one call whose tuner sets torch's (process-wide) thread count
_RUNNING = [0, threading.Lock()]  # CPU generate calls running now (in any thread), and its lock


@contextlib.contextmanager
def tuned(step: Callable, state: DecodeState, model=None, kind: str = "decode"):
    """On CPU with several torch threads: the step under a ThreadTuner (the thread count measured while decoding,
    so that a machine whose cores other processes use does not stall every step), torch's count restored after;
    otherwise the step itself. The tuner of `model` for this kind of step, torch thread count and batch rows carries
    over from its last call (its probes stay rare). One call tunes at a time: calls in other threads meanwhile run
    the step itself (a tuner shared between calls, or two setting and restoring the count, would race), and while
    they run the tuner does not probe (their results would change with the count)."""
    if state.input_ids.device.type != "cpu":
        yield step
        return
    with _RUNNING[1]:
        _RUNNING[0] += 1
    try:
        if torch.get_num_threads() == 1:
            yield step
        else:
            with _tuner(step, state, model, kind) as step:
                yield step
    finally:
        with _RUNNING[1]:
            _RUNNING[0] -= 1


@contextlib.contextmanager
def _tuner(step: Callable, state: DecodeState, model, kind: str):
    if not _TUNING.acquire(blocking=False):
        yield step
        return
    from ..inference.threads import ThreadTuner

    try:
        try:
            tuners = _TUNERS.setdefault(model, {}) if model is not None else {}
        except TypeError:  # an object without weak references: a tuner for this call only
            tuners = {}
        key = (kind, torch.get_num_threads(), state.input_ids.shape[0])
        tuner = tuners[key].resume(step) if key in tuners else tuners.setdefault(key, ThreadTuner(step))
        tuner.shared = lambda: _RUNNING[0] > 1
        try:
            yield tuner
        finally:
            tuner.restore()
            tuner.step = None  # kept by _TUNERS between calls: a step holding the model would keep it alive
    finally:
        _TUNING.release()


def generate_tokens(model, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
                    tokenizer=None, step: Callable = decode_step, generator: torch.Generator | None = None,
                    **kwargs) -> Iterator[torch.Tensor]:
    """prepare + decode_tokens: the next tokens [B * num_return_sequences] of each step, for streaming."""
    cfg, state = prepare(model, input_ids, attention_mask, generation_config, tokenizer=tokenizer, **kwargs)
    return decode_tokens(model, state, cfg, step=step, generator=generator)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, K, ...] at beams index [B, J] -> [B, J, ...]."""
    return torch.take_along_dim(t, index.reshape(*index.shape, *[1] * (t.dim() - 2)), dim=1)


@torch.no_grad()
def beam_search(model, state: DecodeState, cfg: GenerationConfig, step: Callable = decode_step
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers 5.23's beam search (and beam sampling with do_sample). state holds batch * num_beams rows.
    Returns (sequences [B * num_return_sequences, L], their scores, beam_indices)."""
    beams, device = cfg.num_beams, state.input_ids.device
    rows, cur_len = state.input_ids.shape
    batch, prompt_len, max_len, lp = rows // beams, cur_len, state.max_length, cfg.length_penalty
    eos = state.eos
    keep = max(2, 1 + (len(eos) if eos is not None else 0)) * beams  # candidates kept per step
    top_beams = torch.arange(keep, device=device) < beams
    fill = -1 if eos is None else (state.pad if state.pad else int(eos[0]))  # transformers' `pad or eos[0]`

    running = torch.full((batch, beams, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :cur_len] = state.input_ids.view(batch, beams, cur_len)
    sequences = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations at the first step
    beam_scores = torch.full((batch, beams), -1e9, device=device)
    finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_indices = torch.full((batch, beams, max_len - cur_len), -1, dtype=torch.int32, device=device)
    beam_indices = running_indices.clone()

    logits = prefill(model, state)
    sync = synced(model)
    with tuned(step, state, model) as step:
        while True:
            log_probs = process(F.log_softmax(logits, dim=-1), state, cfg)
            if state.scores is not None:
                state.scores.append(log_probs.clone())
            if state.logits is not None:
                state.logits.append(logits.clone())
            vocab = log_probs.shape[-1]
            total = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)

            # the best `keep` continuations over all beams
            if cfg.do_sample:
                top = torch.multinomial(total.softmax(-1), num_samples=keep)
                top_scores = torch.gather(total, 1, top)
            else:
                top_scores, top = torch.topk(total, k=keep)
            source = top // vocab  # [B, K] beam each continuation extends
            top_indices = _gather(running_indices, source)
            top_sequences = _gather(running, source)
            top_sequences[:, :, cur_len] = top % vocab
            beam_rows = source + torch.arange(batch, device=device)[:, None] * beams
            top_indices[:, :, cur_len - prompt_len] = beam_rows.int()
            hits = stopped(state, top_sequences[:, :, :cur_len + 1].reshape(batch * keep, -1)).view(batch, keep)

            # the best unfinished continuations run on
            open_scores = top_scores + hits.float() * -1.0e9
            best = torch.topk(open_scores, k=beams).indices
            running, running_scores = _gather(top_sequences, best), _gather(open_scores, best)
            running_indices = _gather(top_indices, best)

            # finished continuations among the top `beams` join the finished hypotheses if they score better
            just_finished = hits & top_beams[None]
            done_scores = top_scores / ((cur_len + 1 - prompt_len) ** lp)
            done_scores += (finished.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * -1.0e9
            done_scores += (~improvable).float() * -1.0e9
            done_scores += (~just_finished) * -1.0e9
            merged = torch.topk(torch.cat((beam_scores, done_scores), dim=1), k=beams).indices
            sequences = _gather(torch.cat((sequences, top_sequences), dim=1), merged)
            beam_scores = _gather(torch.cat((beam_scores, done_scores), dim=1), merged)
            beam_indices = _gather(torch.cat((beam_indices, top_indices), dim=1), merged)
            finished = _gather(torch.cat((finished, just_finished), dim=1), merged)

            if state.cache is not None:
                state.cache.reorder_cache(running_indices[..., cur_len - prompt_len].reshape(-1))
            cur_len += 1

            # can a running beam still beat the worst finished one? (early_stopping=False guesses from the current
            # length, "never" from max_length when the length penalty favours long sequences)
            hypothetical = max_len - prompt_len if cfg.early_stopping == "never" and lp > 0.0 else cur_len - prompt_len
            best_running = running_scores[:, :1] / (hypothetical ** lp)
            worst_done = torch.where(finished, beam_scores.min(dim=1, keepdim=True).values, -1.0e9)
            improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
            all_done = bool(finished.all()) and cfg.early_stopping is True
            if decoding_ends(not bool(improvable.any()) or all_done or bool(hits.all()), model, sync):
                break
            advance(state, running[:, :, :cur_len].reshape(rows, cur_len))
            logits = step(model, state)

    n = cfg.num_return_sequences
    sequences, beam_scores = sequences[:, :n].reshape(batch * n, -1), beam_scores[:, :n].reshape(-1)
    beam_indices = beam_indices[:, :n].reshape(batch * n, -1)
    generated = int((beam_indices + 1).bool().sum(dim=1).max())
    return sequences[:, :prompt_len + generated], beam_scores, beam_indices[:, :generated]


# ------------------------------------------------------------------ the mixin

class GenerationMixin:
    """`generate` for causal LMs (mixed into modeling.CausalLM, which sets `generation_config`)."""

    generation_config: GenerationConfig

    def needs_cache_reset(self, past_length: int, total_length: int) -> bool:
        """Whether the next decode step must drop the KV cache and re-run the whole sequence (total_length tokens,
        past_length of them cached). No by default; PhiMoE's LongRoPE overrides it."""
        return False

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """forward's keyword arguments for one step of a decoding loop of one's own (or peft's), as transformers'
        GenerationMixin makes them: the last next_sequence_length input_ids (inputs_embeds instead on the first
        iteration), past_key_values, position_ids cut to their length, the 2-D attention_mask as given (moelm's
        forward takes it whatever the cache), then every other keyword but labels; tensors on the model's device.
        moelm's own generate() does not call it."""
        inputs: dict[str, Any] = {}
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds if next_sequence_length is None else inputs_embeds[:, -next_sequence_length:]
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = embeds.clone(memory_format=torch.contiguous_format)
            length = embeds.shape[1]
        else:
            ids = input_ids if next_sequence_length is None else input_ids[:, -next_sequence_length:]
            inputs["input_ids"] = ids.clone(memory_format=torch.contiguous_format)
            length = ids.shape[1]
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids if position_ids.shape[-1] == length else \
                position_ids[..., -length:].clone(memory_format=torch.contiguous_format)
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        inputs.update({k: v for k, v in kwargs.items() if k not in ("labels", "next_sequence_length")
                       and k not in inputs})
        first = inputs.get("inputs_embeds", inputs["input_ids"])
        device = self.device
        if device.type != "meta" and first is not None and first.device != device:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return inputs

    @torch.no_grad()
    def generate(self, input_ids=None, generation_config: GenerationConfig | None = None, *, attention_mask=None,
                 streamer=None, tokenizer=None, inputs_embeds=None, assistant_model=None, speculative=None,
                 **kwargs):
        """Prompt + new tokens [B * num_return_sequences, L] like transformers' generate (greedy, sampling, beam
        search), or a GenerateOutput with return_dict_in_generate. kwargs override generation_config fields. As
        transformers', the prompt and generation_config may be positional, the rest are keywords.

        Finished rows are filled with pad_token_id (default: the first EOS). `streamer.put` gets the prompt, then
        each new token [1, 1]; `streamer.end()` closes (batch 1, no beams). stop_strings need `tokenizer`.
        past_key_values= (an earlier run's out.past_key_values, with the whole sequence so far as the prompt)
        continues that cache as transformers does (see continued_cache).
        Speculative decoding (moelm.generation.speculative; the same tokens as without it when greedy, the same
        distribution when sampling): assistant_model= (a draft model sharing the tokenizer; num_assistant_tokens),
        prompt_lookup_num_tokens= (n-grams of the sequence), or speculative="mtp" (ERNIE's MTP head)."""
        from .speculative import drafter_for, speculative_tokens

        if "inputs" in kwargs:  # transformers' name for the prompt
            if input_ids is not None:
                raise ValueError("generate() got both inputs and input_ids: pass one of them")
            input_ids = kwargs.pop("inputs")
        cfg, state = prepare(self, input_ids, attention_mask, generation_config, inputs_embeds, tokenizer, **kwargs)
        drafter = drafter_for(self, cfg, assistant_model, speculative)
        if drafter is not None and kwargs.get("past_key_values") is not None:
            raise ValueError("speculative decoding does not continue a cache: drop past_key_values")
        if drafter is not None and (state.hidden_states is not None or state.attentions is not None):
            raise ValueError("speculative decoding does not record output_hidden_states / output_attentions")
        if streamer is not None:
            if cfg.num_beams > 1:
                raise ValueError("a streamer cannot be used with beam search (num_beams > 1)")
            if state.input_ids.shape[0] != 1:
                raise ValueError("a streamer supports one sequence (batch 1, num_return_sequences 1)")
            streamer.put(state.input_ids.cpu())
        sequences_scores = beam_indices = None
        if cfg.num_beams > 1:
            sequences, sequences_scores, beam_indices = beam_search(self, state, cfg)
        else:
            steps = decode_tokens(self, state, cfg) if drafter is None else \
                speculative_tokens(self, state, cfg, drafter, process, advance, stopped, tuned, decode_step)
            for tokens in steps:
                if streamer is not None:
                    streamer.put(tokens[:, None].cpu())
            sequences = state.input_ids
        if streamer is not None:
            streamer.end()
        if not cfg.return_dict_in_generate:
            return sequences
        return GenerateOutput(
            sequences=sequences, sequences_scores=sequences_scores if cfg.output_scores else None,
            scores=None if state.scores is None else tuple(state.scores),
            logits=None if state.logits is None else tuple(state.logits), beam_indices=beam_indices,
            past_key_values=state.cache,
            hidden_states=None if state.hidden_states is None else tuple(state.hidden_states),
            attentions=None if state.attentions is None else tuple(state.attentions))
