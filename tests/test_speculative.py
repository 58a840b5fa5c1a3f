"""Speculative decoding (moelm.generation.speculative) and ERNIE's MTP head.

Greedy: the same tokens as plain greedy decoding (itself checked against transformers in test_generation), for the
three families, batched with left padding, EOS inside an accepted run, fast paths on and off. Sampling: the
empirical distribution of the 2nd and 3rd new tokens over 4000 rows equals the model's own (chi-square, fixed seeds).
MTP: its logits equal ERNIE's training-code formula written out here; checkpoints with MTP tensors round-trip.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelm
from moelm.generation import speculative
from moelm.nn.layers import DynamicCache
from reference import mtp_by_hand, mtp_chain_by_hand, randomise_scaled

TINY = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}


def model(family: str, seed: int = 0, mtp: bool = False, vocab: int | None = None, tmp=None, fast: bool = True,
          built: bool = True, **load):
    """A tiny random model saved and loaded back (every weight randomised, scaled so greedy decoding wanders); with
    `built`, its MTP head is built (from_pretrained leaves it in the checkpoint until model.mtp is first used)."""
    config = moelm.named_config(TINY[family])
    if vocab:
        config.vocab_size = vocab
    m = randomise_scaled(moelm.AutoModelForCausalLM.from_config(config, seed=seed, fast=False), seed, 4.0, mtp)
    if tmp is None:
        return m
    path = tmp / f"{family}-{seed}-{mtp}-{vocab}"
    m.save_pretrained(path)
    m = moelm.AutoModelForCausalLM.from_pretrained(path, fast=fast, **load)
    assert not (mtp and built) or m.mtp is not None
    return m


REAL_PACE = speculative.Pace


@pytest.fixture(autouse=True)
def always_draft(monkeypatch):
    """Drafts at every step (generate's default Pace times plain steps first and stops drafting while it loses,
    which would leave a check without drafts)."""
    monkeypatch.setattr(speculative, "Pace", speculative.Always)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("speculative")


def repetitive(batch: int = 1, seed: int = 1, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (lengths 14, 9, 12, ...) that repeat themselves, so that n-gram lookup drafts."""
    g = torch.Generator().manual_seed(seed)
    lengths = [14, 9, 12][:batch] if batch > 1 else [14]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        half = torch.randint(3, vocab, (n // 2 + 1,), generator=g)
        ids[r, width - n:] = torch.cat([half, half])[:n]
        mask[r, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("fast", (True, False), ids=("fast", "plain"))
@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("family", tuple(TINY))
def test_greedy_drafts_give_the_plain_greedy_tokens(family, batch, fast, tmp, monkeypatch):
    target = model(family, tmp=tmp, fast=fast)
    draft = model("ernie4_5" if family != "ernie4_5" else "ernie4_5_moe", seed=7, tmp=tmp, fast=fast)
    ids, mask = repetitive(batch)
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    # an EOS that the plain run emits midway: rows finish inside accepted runs
    eos = int(plain[0, ids.shape[1] + 9])
    plain_eos = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    for kw in (dict(prompt_lookup_num_tokens=3), dict(prompt_lookup_num_tokens=6, max_matching_ngram_size=3),
               dict(assistant_model=draft, num_assistant_tokens=3),
               dict(assistant_model=draft, num_assistant_tokens=2, num_assistant_tokens_schedule="constant"),
               dict(assistant_model=target, num_assistant_tokens=4, cache_implementation="dynamic")):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, **kw)
        assert torch.equal(out, plain), kw
        out = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos, **kw)
        assert torch.equal(out, plain_eos), (kw, "eos")
    monkeypatch.setattr(speculative, "Pace", REAL_PACE)  # generate's default: drafting while it pays
    out = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, assistant_model=draft)
    assert torch.equal(out, plain)


FACTORS = ([1.0, 1.2, 1.5, 1.9, 2.4, 3.0, 3.7, 4.5], [1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0, 20.0])
LENGTH_ROPES = [  # frequencies that change with the forward's length: past 20 positions
    ("ernie4_5", dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0), 20),
    ("ernie4_5_moe", dict(rope_type="longrope", short_factor=FACTORS[0], long_factor=FACTORS[1],
                          original_max_position_embeddings=20, rope_theta=10000.0), 64),
    ("phimoe", dict(rope_type="longrope", short_factor=FACTORS[0], long_factor=FACTORS[1], short_mscale=1.15,
                    long_mscale=1.45, original_max_position_embeddings=20, rope_theta=10000.0), 64),
]


@pytest.mark.parametrize("family,rope,max_pos", LENGTH_ROPES, ids=[f"{f}-{r['rope_type']}" for f, r, _ in LENGTH_ROPES])
def test_drafts_across_a_length_dependent_rope(family, rope, max_pos, tmp_path, monkeypatch):
    """Past the length where the rotation changes (ERNIE's dynamic / longrope frequencies follow a forward's largest
    position; PhiMoE drops its cache for long RoPE), a check of several drafts in one forward would rotate them
    otherwise than plain steps do: the drafts are cut to what one forward checks the same, and greedy decoding
    still gives the plain tokens. The assistant has the target's weights, so every draft is kept."""
    config = moelm.named_config(TINY[family]).to_dict()
    config.update(rope_parameters=rope, max_position_embeddings=max_pos)
    config = type(moelm.named_config(TINY[family]))(**config)
    m = randomise_scaled(moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False), 0, 4.0)
    m.save_pretrained(tmp_path / "m")
    target, twin = (moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "m") for _ in range(2))
    ids, _ = repetitive(1)
    plain = target.generate(ids, max_new_tokens=20, do_sample=False)
    fed, real = [], type(target).forward

    def counted(self, *args, **kwargs):
        if self is target:
            cache = kwargs["past_key_values"]
            fed.append((0 if cache is None else cache.get_seq_length(), kwargs["input_ids"].shape[1]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "forward", counted)
    for kw in (dict(prompt_lookup_num_tokens=4),
               dict(assistant_model=twin, num_assistant_tokens=4, num_assistant_tokens_schedule="constant")):
        fed.clear()
        assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=20, **kw), plain), kw
    checks = [(past, n) for past, n in fed if n > 1 and past]  # the twin's checks (not a whole-sequence forward)
    assert any(past + n <= 20 for past, n in checks), f"no drafts checked before the change: weak test {fed}"
    assert not any(past < 20 < past + n for past, n in checks), f"a check across the change: {fed}"
    if rope["rope_type"] == "dynamic":  # its frequencies change at every length past max_position_embeddings
        assert not any(past + n > 20 for past, n in checks), fed
    else:  # long RoPE's are the same past it
        assert any(past >= 20 for past, n in checks), f"no drafts checked after the change: weak test {fed}"


def test_finished_rows_are_fed_pad_and_score_as_plain_steps(tmp):
    """A row that ends (EOS) inside a run of kept drafts is pad from then on, and plain steps feed it pad: the
    check feeds it pad too and keeps no token past the one after its end, so the scores and logits of every row,
    finished ones included, are plain decoding's."""
    target = model("ernie4_5_moe", mtp=True, tmp=tmp)
    ids, mask = repetitive(3)
    free = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=int(free[1, ids.shape[1] + 3]),
              return_dict_in_generate=True, output_scores=True, output_logits=True, repetition_penalty=1.2)
    plain = target.generate(ids, **kw)
    new = plain.sequences[:, ids.shape[1]:]
    ended = (new == kw["eos_token_id"]).any(1)
    assert ended.tolist() == [False, True, False] and new[1, -1] == 0  # one row ends early, the others run on
    for sk in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=target, num_assistant_tokens=4),
               dict(speculative="mtp", num_assistant_tokens=3, num_assistant_tokens_schedule="constant")):
        out = target.generate(ids, **kw, **sk)
        assert torch.equal(out.sequences, plain.sequences), sorted(sk)
        for name in ("scores", "logits"):
            for a, b in zip(getattr(out, name), getattr(plain, name), strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{sorted(sk)} {name}: {m}")


def test_rows_past_a_stop_string_decode_on_without_eos(tmp):
    """Without EOS a row that meets a stop string is not padded: it decodes on (as plain decoding and transformers
    do) until every row has stopped, so its drafts are checked as any other row's."""
    from moelm.models.scaffold import new_checkpoint

    path = tmp / "tokenizer"
    if not path.exists():
        new_checkpoint(TINY["ernie4_5"], path)
    tokenizer = moelm.AutoTokenizer.from_pretrained(path)
    target = model("ernie4_5", tmp=tmp)
    ids, mask = repetitive(2, seed=10)  # row 1's own n-grams draft for it after row 0 has stopped
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    free = target.generate(ids, **kw)[:, ids.shape[1]:]
    texts = [tokenizer.decode(row) for row in free.tolist()]
    stop = next(t for t in (tokenizer.decode(free[0, j:j + 1]) for j in range(2, 6)) if t.strip()
                and t not in texts[1])  # row 0 stops after a few tokens, row 1 runs to the end
    kw.update(stop_strings=[stop], tokenizer=tokenizer)
    plain = target.generate(ids, **kw)
    assert torch.equal(plain[:, ids.shape[1]:], free)
    for sk in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=model("ernie4_5_moe", seed=7, tmp=tmp),
                                                        num_assistant_tokens=3)):
        assert torch.equal(target.generate(ids, **kw, **sk), plain), sorted(sk)


@pytest.mark.parametrize("quantization", ("int8", "int4"))
def test_quantized_checks_keep_a_decoding_steps_rows(quantization, tmp):
    """With int8 / int4 weights on CPU a forward of more than kernels.MAX_ROWS rows takes the prefill's paths, which
    round the activations to int8: a check (3 rows of 6 tokens) is cut to MAX_ROWS rows, and the MTP head's
    prompt forward runs the last layer on no more rows than a plain prompt forward, so the logits are plain
    decoding's up to rounding (not the ~1 apart that rounded activations give; int4 kernels for 2-16 rows, chosen
    by timing, round up to ~1e-2 away from the one-row kernel's)."""
    target = model("ernie4_5_moe", mtp=True, tmp=tmp, quantization=quantization)
    ids, mask = repetitive(3)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    plain = target.generate(ids, **kw)
    for sk in (dict(assistant_model=target, num_assistant_tokens=5, num_assistant_tokens_schedule="constant"),
               dict(speculative="mtp", num_assistant_tokens=5, num_assistant_tokens_schedule="constant")):
        out = target.generate(ids, **kw, **sk)
        assert speculative.last_run["drafted_steps"] > 0
        for a, b in zip(out.logits, plain.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-2 if quantization == "int8" else 5e-2, rtol=0,
                                       msg=lambda m: f"{sorted(sk)}: {m}")


def test_drafts_are_used_and_checked_in_blocks(tmp, monkeypatch):
    """The target checks the drafts of a step in one forward: with an assistant that always agrees (the same
    weights), 16 new tokens take the prompt's forward and three of 5 tokens (4 drafts + 1 of its own)."""
    target = model("ernie4_5", tmp=tmp)
    twin = moelm.AutoModelForCausalLM.from_pretrained(tmp / "ernie4_5-0-False-None")
    ids, _ = repetitive(1)
    fed = []
    real = type(target).forward

    def counted(self, *args, **kwargs):
        if self is target:
            fed.append(kwargs["input_ids"].shape[1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "forward", counted)
    out = target.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=twin, num_assistant_tokens=4,
                          num_assistant_tokens_schedule="constant")
    assert out.shape[1] == ids.shape[1] + 16
    assert fed == [ids.shape[1], 5, 5, 5], fed


@pytest.mark.parametrize("fast", (True, False), ids=("fast", "plain"))
@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("cache", ("static", "dynamic"))
@pytest.mark.parametrize("tokens", (None, 3))
def test_mtp_greedy_gives_the_plain_greedy_tokens(batch, cache, fast, tokens, tmp):
    """One draft a step (default), or 3 (constant): the 2nd and 3rd from the head's own output."""
    target = model("ernie4_5_moe", mtp=True, tmp=tmp, fast=fast)
    assert target.mtp is not None
    ids, mask = repetitive(batch)
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache_implementation=cache)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache_implementation=cache,
                          speculative="mtp", num_assistant_tokens=tokens,
                          num_assistant_tokens_schedule=tokens and "constant")
    assert torch.equal(out, plain)
    if tokens:
        assert speculative.last_run["proposed"] > speculative.last_run["drafted_steps"]  # more than one a step


def test_pace_stops_drafting_while_it_loses():
    """Plain steps first; a try of drafted steps slower a token than plain ones turns drafting off: at a step that
    kept nothing while the try so far loses, at once, for 4 times as long as last time (16 steps at first); else
    after its window of 2 steps, for the back-off, which then doubles; at most 256. A try that pays keeps drafting
    on and resets the back-off to 4; after 32 drafted steps in a row, 2 plain ones."""
    now = [0.0]
    pace = REAL_PACE(warmup=2, clock=lambda: now[0])
    assert pace.WINDOW == 2

    def step(seconds: float, tokens: int) -> bool:
        drafting = pace.drafting()
        pace.start()
        now[0] += seconds
        pace.done(drafting, tokens)
        return drafting

    assert [step(1.0, 1) for _ in range(2)] == [False, False]
    assert step(1.5, 1)  # drafted, slower than a plain step, nothing kept: off for 16
    assert [step(1.0, 1) for _ in range(16)] == [False] * 16
    # a try is judged on its 2 steps together: 1.2 s for 2 tokens, then 2.8 s for 2: 4.0 s for 4 ties and stays on
    assert step(1.2, 2) and step(2.8, 2)
    assert pace.drafting() and pace.backoff == 4
    assert [step(2.4, 2) for _ in range(2)] == [True] * 2  # 1.2 s a token over the window: off for 4, then 8
    assert [step(1.0, 1) for _ in range(4)] == [False] * 4
    assert pace.backoff == 8
    assert [step(0.8, 2) for _ in range(32)] == [True] * 32  # pays: on, and after 32 in a row, 2 plain steps
    assert [step(1.0, 1) for _ in range(2)] == [False, False] and pace.drafting() and pace.backoff == 4
    # a step that keeps nothing in a try that pays so far (0.5 s for 3 tokens, then 1.2 s for 1) does not stop it
    assert step(0.5, 3) and step(1.2, 1) and pace.drafting()
    offs = []
    # tries that keep nothing: off 16, 64, 256, 256
    for _ in range(4):
        assert step(1.5, 1)
        offs.append(0)
        while not pace.drafting():
            step(1.0, 1)
            offs[-1] += 1
    assert offs == [16, 64, 256, 256] and pace.backoff == 256


def test_lookup_takes_the_earliest_occurrence():
    """The continuation of the earliest earlier occurrence of the longest matching n-gram (transformers' prompt
    lookup, vLLM's n-gram proposer: [1, 2, 3, 4, 2, 3], n = 2, k = 4 -> [4, 2, 3]); in a loop that leaves k tokens."""
    row = torch.tensor
    assert speculative.lookup(row([1, 2, 3, 4, 2, 3]), 2, 4).tolist() == [4, 2, 3]
    assert speculative.lookup(row([5, 7, 5, 7, 5, 7, 5, 7]), 2, 4).tolist() == [5, 7, 5, 7]
    assert speculative.lookup(row([9, 1, 2, 8, 1, 2, 6, 2]), 3, 2).tolist() == [8, 1]  # n = 1: the first 2
    assert speculative.lookup(row([9, 1, 2, 8, 1, 2]), 3, 3, min_ngram=3).tolist() == []
    assert speculative.lookup(row([9, 1, 2, 8, 1, 2]), 3, 3).tolist() == [8, 1, 2]


def test_prompt_lookup_drafts_more_while_they_are_kept():
    """Prompt lookup drafts one token at first, two more after a step that kept all, one fewer after one that did
    not, between 1 and prompt_lookup_num_tokens."""
    drafter = speculative.PromptLookup(5)
    ks = [drafter.k]
    for kept in (1, 3, 5, 2, 0, 0, 0):
        drafter.accepted(min(kept, drafter.k), drafter.k)
        ks.append(drafter.k)
    assert ks == [1, 3, 5, 5, 4, 3, 2, 1]


# ------------------------------------------------------------------ sampling keeps the distribution

VOCAB = 16


def exact_marginals(m, prompt: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    """P(1st), P(2nd), P(3rd new token) [V] of sampling from m at temperature, by enumerating the prefixes."""
    with torch.no_grad():
        def probs(prefixes: torch.Tensor) -> torch.Tensor:  # [P, L] -> [P, V]
            ids = torch.cat([prompt.expand(prefixes.shape[0], -1), prefixes], 1)
            return (m(input_ids=ids).logits[:, -1].double() / temperature).softmax(-1)

        empty = torch.zeros(1, 0, dtype=torch.long)
        p1 = probs(empty)[0]  # [V]
        one = torch.arange(VOCAB)[:, None]
        p2 = probs(one)  # [V, V]: P(t2 | t1)
        two = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [(t1, t2)]
        p3 = probs(two).view(VOCAB, VOCAB, VOCAB)  # P(t3 | t1, t2)
    joint12 = p1[:, None] * p2
    return [p1, joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))]


def chi2(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    e = expected * tokens.numel()
    seen = e > 0
    assert counts[~seen].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[seen] - e[seen]) ** 2 / e[seen]).sum())


@pytest.mark.parametrize("method", ("lookup", "assistant", "twin", "mtp", "mtp:2"))
def test_sampling_keeps_the_model_distribution(method, tmp):
    """A batch keeps the fewest drafts any of its rows kept: over 4000 rows nearly always none, so the others check
    the first draft's judgement. twin: the model as its own assistant (p = q), so every row keeps every draft, and
    the tokens after the first come from the later drafts (each judged by its own q) and the token after them."""
    family = "ernie4_5_moe" if method.startswith("mtp") else "ernie4_5"
    target = model(family, mtp=method.startswith("mtp"), vocab=VOCAB, tmp=tmp)
    # lookup: every token occurs before, so lookup always finds a continuation; the others: short, so cheap
    prompt = torch.arange(VOCAB + 1)[None] % VOCAB if method == "lookup" else torch.arange(3, 7)[None]
    kw = {"lookup": dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=1),
          "assistant": dict(assistant_model=model("ernie4_5", seed=5, vocab=VOCAB, tmp=tmp), num_assistant_tokens=2,
                            num_assistant_tokens_schedule="constant"),
          "twin": dict(assistant_model=target, num_assistant_tokens=2, num_assistant_tokens_schedule="constant"),
          "mtp": dict(speculative="mtp"),
          "mtp:2": dict(speculative="mtp", num_assistant_tokens=2, num_assistant_tokens_schedule="constant")}[method]
    rows, temperature = 4000, 0.7
    torch.manual_seed(1234)
    ids = prompt.expand(rows, -1)
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4 if method == "twin" else 3,
                          do_sample=True, temperature=temperature, top_k=None, eos_token_id=None, pad_token_id=0, **kw)
    if method == "twin":  # one check of 2 drafts, both kept
        assert speculative.last_run == dict(steps=1, drafted_steps=1, proposed=2, kept=2), speculative.last_run
    new = out[:, prompt.shape[1]:]
    for i, expected in enumerate(exact_marginals(target, prompt, temperature)):
        # 15 degrees of freedom: P(chi2 > 45) ~ 8e-5; the seed is fixed, so this is not flaky
        assert chi2(new[:, i], expected) < 45.0, (method, i)


# ------------------------------------------------------------------ the MTP head


@pytest.mark.parametrize("fast", (True, False), ids=("fast", "plain"))
def test_mtp_logits_follow_the_formula_with_its_cache(fast, tmp):
    m = model("ernie4_5_moe", mtp=True, tmp=tmp, fast=fast)
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = mtp_by_hand(m, ids)
    seen = []
    hook = m.model.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m.model(input_ids=ids, use_cache=False)
        hook.remove()
        hidden = seen[-1]
        cache, got = DynamicCache(), []
        for a, b in ((0, 4), (4, 5), (5, 10)):  # the head's own cache, fed in pieces
            pos = torch.arange(a, b)[None].expand(2, -1)
            got.append(m.mtp(ids[:, a + 1:b + 1], hidden[:, a:b], pos, cache))
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)


class EveryThird(speculative.Always):
    """Drafting at one step in three: the head's input of the plain steps between is kept for it."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def drafting(self) -> bool:
        self.step += 1
        return self.step % 3 == 0


@pytest.mark.parametrize("cache", ("static", "dynamic"))
@pytest.mark.parametrize("fast", (True, False), ids=("fast", "plain"))
def test_mtp_drafts_in_generate_are_the_formulas(fast, cache, tmp, monkeypatch):
    """Each draft generate takes from the head, with plain steps between drafted ones, is the head's choice by the
    formula over the whole sequence so far (mtp_by_hand): its input from the plain steps and the checks is
    complete and in order."""
    m = model("ernie4_5_moe", mtp=True, tmp=tmp, fast=fast)
    monkeypatch.setattr(speculative, "Pace", EveryThird)
    proposals = []
    real = speculative.Mtp.propose

    def propose(self, model, state, k, process, generator):
        drafts, q = real(self, model, state, k, process, generator)
        if k:
            proposals.append((state.input_ids.clone(), drafts[:, 0]))
        return drafts, q

    monkeypatch.setattr(speculative.Mtp, "propose", propose)
    ids, _ = repetitive(1)
    plain = m.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation=cache)
    out = m.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation=cache, speculative="mtp")
    assert torch.equal(out, plain) and len(proposals) >= 4
    for seq, draft in proposals:
        with torch.no_grad():
            want = mtp_by_hand(m, seq)[:, -1]  # from the last position's hidden state and the last token
        assert torch.equal(draft, want.argmax(-1)), seq.shape


@pytest.mark.parametrize("cache", ("static", "dynamic"))
@pytest.mark.parametrize("fast", (True, False), ids=("fast", "plain"))
def test_mtp_drafts_after_the_first_follow_the_chain_formula(fast, cache, tmp, monkeypatch):
    """With num_assistant_tokens=3 (constant), each step's drafts are the head applied 3 times as vLLM's MTP
    proposer does (mtp_chain_by_hand: the 2nd and 3rd from the head's own output and the draft before), and the
    head's cache keeps only the positions of the main model's states afterwards."""
    m = model("ernie4_5_moe", mtp=True, tmp=tmp, fast=fast)
    proposals = []
    real = speculative.Mtp.propose

    def propose(self, model, state, k, process, generator):
        drafts, q = real(self, model, state, k, process, generator)
        if k:
            assert self.cache.get_seq_length() == state.input_ids.shape[1] - 1
            proposals.append((state.input_ids.clone(), drafts))
        return drafts, q

    monkeypatch.setattr(speculative.Mtp, "propose", propose)
    ids, _ = repetitive(1)
    plain = m.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation=cache)
    out = m.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation=cache, speculative="mtp",
                     num_assistant_tokens=3, num_assistant_tokens_schedule="constant")
    assert torch.equal(out, plain) and len(proposals) >= 4
    for seq, drafts in proposals:
        with torch.no_grad():
            want = mtp_chain_by_hand(m, seq, drafts.shape[1])
        assert torch.equal(drafts, want), seq.shape


@pytest.mark.parametrize("cache", ("static", "dynamic"))
@pytest.mark.parametrize("batch", (1, 3))
def test_mtp_head_starts_again_from_recent_positions(batch, cache, tmp, monkeypatch):
    """With more than 2 * CONTEXT positions waiting (a long prompt, a stretch without drafts) the head is fed only
    the last CONTEXT of them, from a fresh cache whose mask columns follow (left-padded rows): greedy still gives
    plain greedy's tokens, and the drafts are the head's over those positions."""
    m = model("ernie4_5_moe", mtp=True, tmp=tmp)
    monkeypatch.setattr(speculative.Mtp, "CONTEXT", 4)
    monkeypatch.setattr(speculative, "Pace", EveryThird)
    seen = []
    real = speculative.Mtp.propose

    def propose(self, model, state, k, process, generator):
        drafts, q = real(self, model, state, k, process, generator)
        seen.append((self.start, self.cache.get_seq_length(), state.input_ids.shape[1]))
        return drafts, q

    monkeypatch.setattr(speculative.Mtp, "propose", propose)
    ids, mask = repetitive(batch)
    plain = m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache_implementation=cache)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache_implementation=cache,
                     speculative="mtp")
    assert torch.equal(out, plain)
    assert seen and all(start + length == total - 1 for start, length, total in seen)  # up to the last token
    assert seen[0][0] > 0 and seen[0][1] <= 4 + 2  # from the prompt's last 4 positions and 2 plain steps after


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_mtp_step_is_the_head_in_fewer_calls(dtype, tmp):
    """inference.mtp.MtpStep (the drafter's head while decoding: norms, projection and LM head straight to the C
    kernels) gives the head's states and logits up to rounding, through its own static cache, for the first
    positions (several rows) and one at a time after; it does not apply with gradients (the modules run then)."""
    from moelm.inference.cache import StaticCache
    from moelm.inference.mtp import MtpStep

    m = model("ernie4_5_moe", mtp=True, tmp=tmp, dtype=dtype)
    ids = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    hidden = torch.randn(1, 8, m.config.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)
    layout = SimpleNamespace(num_key_value_heads=m.config.num_key_value_heads, head_size=m.config.head_size,
                             num_hidden_layers=1)  # the head's one layer
    caches = [StaticCache(layout, 1, 16, dtype) for _ in range(2)]
    fast = MtpStep(m)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    with torch.no_grad():
        for a, b in ((0, 3), (3, 4), (4, 8)):  # prefix rows, then steps; the cache is written at position a
            pos = torch.arange(a, b)[None]
            want = m.mtp.states(ids[:, a + 1:b + 1], hidden[:, a:b], pos, caches[0])
            got = fast.states(ids[:, a + 1:b + 1], hidden[:, a:b], pos, caches[1])
            assert got is not None and got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), **tol)
            torch.testing.assert_close(fast.logits(got), m.mtp.logits(want).float(), **tol)
    with torch.enable_grad():
        assert fast.states(ids[:, 1:2], hidden[:, :1], torch.zeros(1, 1, dtype=torch.long), None) is None


def test_mtp_checkpoint_round_trips(tmp, capsys):
    m = model("ernie4_5_moe", mtp=True, tmp=tmp)
    path = tmp / "ernie4_5_moe-0-True-None"
    stored = {k: v for k, v in load_file(path / "model.safetensors").items() if ".mtp_" in k}
    assert {k.split(".")[1] for k in stored} == {"mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block"}
    assert not m.kept_aside
    again = tmp / "again"
    m.save_pretrained(again)
    written = load_file(again / "model.safetensors")
    for k, v in stored.items():
        assert torch.equal(written[k], v), k
    # the 300B-A47B-PT layout: linear_proj stored [2H, H]
    tensors = load_file(path / "model.safetensors")
    key = "model.mtp_linear_proj.0.weight"
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, again / "model.safetensors", metadata={"format": "pt"})
    flipped = moelm.AutoModelForCausalLM.from_pretrained(again)
    assert flipped.mtp is not None and torch.equal(flipped.model.mtp_linear_proj[0].weight, stored[key])
    # an MTP weight stored as integers is refused, not cast
    tensors[key] = stored[key].mul(10).to(torch.int32)
    save_file(tensors, again / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"MTP tensor {key} is torch.int32, not a float tensor"):
        moelm.AutoModelForCausalLM.from_pretrained(again).mtp
    # a config asking for MTP, a checkpoint without it: said once, MTP off
    tensors = {k: v for k, v in tensors.items() if ".mtp_" not in k}
    save_file(tensors, again / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((again / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (again / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    bare = moelm.AutoModelForCausalLM.from_pretrained(again)
    assert bare.mtp is None and "no MTP tensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no MTP head"):
        bare.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, speculative="mtp")


@pytest.mark.parametrize("fast", (True, False))
def test_the_mtp_head_is_built_at_its_first_use(tmp, fast):
    """from_pretrained leaves the MTP tensors in the checkpoint (mapped, kept aside: no parameters, 0.49 GB of
    fp32 on ERNIE-4.5-21B-A3B) until model.mtp is first asked for; the head is then built with the fast paths the
    rest of the model has, its weights the stored ones, and drafts as one built by hand. Saved before its use, the
    head is written as stored."""
    m = model("ernie4_5_moe", mtp=True, tmp=tmp, fast=fast, built=False)
    path = tmp / "ernie4_5_moe-0-True-None"
    stored = {k: v for k, v in load_file(path / "model.safetensors").items() if ".mtp_" in k}
    assert not hasattr(m.model, "mtp_block") and not [n for n, _ in m.named_parameters() if ".mtp_" in n]
    assert sorted(m.kept_aside) == sorted(stored)
    early = tmp / f"early-{fast}"
    m.save_pretrained(early)
    written = load_file(early / "model.safetensors")
    assert all(torch.equal(written[k], v) and written[k].dtype == v.dtype for k, v in stored.items())
    head = m.mtp
    assert head is not None and not m.kept_aside and m.mtp is not None
    block = m.model.mtp_block[0]
    assert (type(block).__name__ == "FastDecoderLayer") == fast
    assert (getattr(block.self_attn, "fused_qkv", None) is not None) == fast
    params = dict(m.named_parameters())
    assert all(torch.equal(params[k], v.float()) for k, v in stored.items())
    by_hand = moelm.AutoModelForCausalLM.from_pretrained(path, fast=False)  # the head built with the rest
    by_hand.kept_aside = by_hand.take_mtp(by_hand.kept_aside)
    if fast:
        moelm.inference.optimize(by_hand)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(mtp_by_hand(m, ids), mtp_by_hand(by_hand, ids))
        drafts = m.generate(ids, max_new_tokens=6, do_sample=False, speculative="mtp")
        assert torch.equal(drafts, by_hand.generate(ids, max_new_tokens=6, do_sample=False, speculative="mtp"))


def test_from_config_adds_the_mtp_head_a_config_asks_for(tmp_path):
    """A config with num_nextn_predict_layers (as a -PT config.json, or a recipe's config_overrides) built with
    from_config has the MTP head, initialised as the rest (normal(0, initializer_range) weights, unit norms) after
    it, so the other weights are those of the same seed without a head; it round-trips bit-exactly and drafts."""
    config = moelm.named_config(TINY["ernie4_5_moe"])
    plain = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    assert plain.mtp is None
    config.num_nextn_predict_layers = 1
    m = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    assert m.mtp is not None and len(m.model.mtp_block) == 1
    head = {n: p for n, p in m.model.named_parameters() if n.startswith("mtp_")}
    assert {n.split(".")[0] for n in head} == {"mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block"}
    std = config.initializer_range
    for name, p in head.items():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # not nn.Linear's default (uniform, std 1/sqrt(3 * fan_in): 0.07 here), not zero
            assert p.std().item() == pytest.approx(std, rel=0.1) and abs(p.mean().item()) < std / 4, name
    ours = m.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in plain.state_dict().items())
    assert m.num_parameters() == plain.num_parameters() + sum(p.numel() for p in head.values())
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    back = moelm.AutoModelForCausalLM.from_pretrained(tmp_path, fast=False)
    assert back.mtp is not None and not back.kept_aside
    theirs = back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(theirs[k], v) for k, v in ours.items())
    half = moelm.AutoModelForCausalLM.from_config(config, seed=0, dtype=torch.bfloat16)  # fast paths on
    assert half.model.mtp_linear_proj[0].weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(half.generate(ids, max_new_tokens=6, do_sample=False, speculative="mtp"),
                       half.generate(ids, max_new_tokens=6, do_sample=False))


def test_speculative_arguments_are_checked(tmp):
    target = model("ernie4_5", tmp=tmp)
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    other = model("ernie4_5", vocab=300, tmp=tmp)
    cases = [(dict(assistant_model=other), "share the tokenizer"),
             (dict(prompt_lookup_num_tokens=2, assistant_model=target), "one way of drafting"),
             (dict(prompt_lookup_num_tokens=2, num_beams=2), "beam search"),
             (dict(speculative="eagle"), "speculative must be 'mtp'"),
             (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an integer >= 1"),
             (dict(prompt_lookup_num_tokens=2, use_cache=False), "needs the KV cache"),
             (dict(assistant_model=target, num_assistant_tokens_schedule="sometimes"), "num_assistant_tokens_sch"),
             (dict(assistant_model=torch.nn.Linear(2, 2)), "assistant_model must be a moelm model .* got "
                                                           "torch.nn.modules.linear.Linear")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            target.generate(ids, max_new_tokens=4, **kw)
