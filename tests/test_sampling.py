"""The one sampler (moelm.generation.sampling) of generate and the serve engine, with the engine's parameters, against
transformers 5.23.0's logits processors in their order: the scores of random [N, V] logits to 1e-6, the same token
drawn by the engine and by torch.multinomial on transformers' scores under the same seed, temperature 0 as the
argmax without a draw. OpenAI's presence / frequency penalties (no transformers processor) against their formula;
the one validator, through SamplingParams, GenerationConfig and the engine."""
from __future__ import annotations

import math

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.generation import GenerationConfig, Sampling, SamplingError, apply_penalties, choose, warp
from moelm.models.scaffold import new_checkpoint
from moelm.serve.engine import Engine, Request, RequestError, SamplingParams, Sequence

lp = pytest.importorskip("transformers.generation.logits_process")

TOL = dict(atol=1e-6, rtol=1e-6)
ROWS, PROMPT = 4, 12

ENGINE_CASES = [  # SamplingParams fields
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=1.0, repetition_penalty=1.3),
    dict(temperature=0.5, repetition_penalty=0.7, top_p=1e-6),
    dict(temperature=1.0, min_tokens=4, stop_token_ids=[7]),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2, min_tokens=3, stop_token_ids=[9]),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine (not started) of a tiny model: its _sample is what serving runs."""
    path = new_checkpoint("ernie4_5-tiny", tmp_path_factory.mktemp("sampling"), seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    return Engine(model, tokenizer, max_num_seqs=1, max_model_len=64)


def history(vocab: int, generated: int, seed: int = 0) -> torch.Tensor:
    """input_ids [ROWS, PROMPT + generated] drawn from few ids, so that tokens repeat."""
    return torch.randint(0, min(vocab, 24), (ROWS, PROMPT + generated), generator=torch.Generator().manual_seed(seed))


def random_logits(vocab: int, seed: int = 1) -> torch.Tensor:
    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[0, :20] += 6  # most of the mass on a few tokens, some of them in the history
    return logits


def transformers_processors(p: SamplingParams, banned: list[int]) -> lp.LogitsProcessorList:
    """transformers' processors for p, in generate's order (repetition penalty, min new tokens, then the warpers)."""
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.min_tokens:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(PROMPT, p.min_tokens, banned))
    if p.temperature:
        procs.append(lp.TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k:
            procs.append(lp.TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(p.top_p))
        if p.min_p:
            procs.append(lp.MinPLogitsWarper(p.min_p))
    return lp.LogitsProcessorList(procs)


def sequence(engine: Engine, ids: torch.Tensor, p: SamplingParams, seed: int | None) -> Sequence:
    """A sequence of the engine whose prompt is ids[:PROMPT] and whose tokens so far are the rest, as _advance
    leaves them."""
    request = Request(engine, 0, ids[:PROMPT].tolist(), p, callback=lambda out: None)
    seq = Sequence(request, 0, None if seed is None else torch.Generator().manual_seed(seed), engine.tokenizer)
    seq.tokens = ids[PROMPT:].tolist()
    seq.ids[:len(ids)] = ids
    return seq


def assert_scores(ours: torch.Tensor, theirs: torch.Tensor, msg: str = ""):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), msg
    torch.testing.assert_close(ours, theirs, **TOL, msg=msg)


@pytest.mark.parametrize("generated", [0, 2, 6])
@pytest.mark.parametrize("case", ENGINE_CASES, ids=[repr(c) for c in ENGINE_CASES])
def test_engine_sampling_matches_transformers_processors(engine, case, generated):
    p = SamplingParams(max_tokens=16, **case)
    banned = p.stop_token_ids + engine.eos
    ids, logits = history(engine.vocab_size, generated), random_logits(engine.vocab_size)
    theirs = transformers_processors(p, banned)(ids, logits.clone())
    s = p.sampling()
    ours = warp(apply_penalties(logits, s, ids, PROMPT, banned=torch.tensor(banned) if generated < p.min_tokens
                                else None), s)
    assert_scores(ours, theirs, repr(case))
    for row in range(ROWS):
        for seed in range(5):
            want = int(torch.multinomial(theirs[row].softmax(-1), 1, generator=torch.Generator().manual_seed(seed)))
            token, accepted, _ = engine._sample(sequence(engine, ids[row], p, seed), logits[row])
            assert not accepted  # no draft to keep
            assert token == want, (case, row, seed)


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[repr(c) for c in ENGINE_CASES])
def test_engine_temperature_0_is_the_argmax_without_a_draw(engine, case):
    p = SamplingParams(max_tokens=16, **dict(case, temperature=0))
    ids, logits = history(engine.vocab_size, 2), random_logits(engine.vocab_size)
    theirs = transformers_processors(p, p.stop_token_ids + engine.eos)(ids, logits.clone())  # no warpers
    assert engine._generator(p, 0) is None
    state = torch.get_rng_state()
    for row in range(ROWS):
        token, accepted, _ = engine._sample(sequence(engine, ids[row], p, None), logits[row])
        assert not accepted
        assert token == int(theirs[row].argmax()), (case, row)
        if p.repetition_penalty == 1.0 and not p.min_tokens:
            assert token == int(logits[row].argmax())
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn


def test_left_padding_is_ignored_by_the_repetition_penalty_as_transformers():
    """generate's rows: the first ignore[n] positions (left padding) do not count."""
    ids, logits = history(64, 3), random_logits(64)
    ignore = torch.tensor([0, 3, 5, 14])
    theirs = lp.RepetitionPenaltyLogitsProcessor(1.4, prompt_ignore_length=ignore)(ids, logits.clone())
    assert_scores(apply_penalties(logits, Sampling(repetition_penalty=1.4), ids, PROMPT, ignore), theirs)


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (1.5, 0.0), (0.0, 0.7), (-0.5, 1.2), (2.0, -2.0)])
def test_presence_frequency_and_logit_bias_follow_openai(engine, presence, frequency):
    """logits + bias - frequency * count - presence * (count > 0), counts over the generated tokens only; the bias
    before the repetition penalty as transformers' sequence_bias."""
    bias = {3: 2.5, 7: -100.0, int(engine.vocab_size) - 1: 4.0}
    ids, logits = history(engine.vocab_size, 6), random_logits(engine.vocab_size)
    counts = torch.zeros_like(logits)
    for row in range(ROWS):
        counts[row] = torch.bincount(ids[row, PROMPT:], minlength=logits.shape[1]).float()
    want = logits.clone()
    for token, b in bias.items():
        want[:, token] += b
    want = want - frequency * counts - presence * (counts > 0).float()
    p = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    assert_scores(apply_penalties(logits, p.sampling(), ids, PROMPT), want)
    for row in range(ROWS):
        assert engine._sample(sequence(engine, ids[row], p, None), logits[row])[0] == int(want[row].argmax())

    sequence_bias = lp.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    theirs = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, sequence_bias(ids, logits.clone()))
    theirs = theirs - frequency * counts - presence * (counts > 0).float()
    s = Sampling(temperature=0, repetition_penalty=1.3, presence_penalty=presence, frequency_penalty=frequency,
                 logit_bias=bias)
    assert_scores(apply_penalties(logits, s, ids, PROMPT), theirs)


def test_generate_and_engine_build_the_same_sampler():
    """GenerationConfig (do_sample) and SamplingParams with the same knobs give one Sampling; greedy generate is
    temperature 0."""
    knobs = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    assert GenerationConfig(do_sample=True, **knobs).sampling() == SamplingParams(**knobs).sampling()
    assert GenerationConfig(do_sample=False, **knobs).sampling() == Sampling(temperature=0, repetition_penalty=1.1)
    assert GenerationConfig(do_sample=True, top_k=None, min_p=None).sampling() == Sampling()
    logits = random_logits(50)
    assert torch.equal(choose(warp(logits, Sampling(temperature=0, top_k=3)), Sampling(temperature=0)),
                       logits.argmax(-1))


BAD = [  # Sampling fields, the field named in the error
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(logit_bias={3: math.nan}), "logit_bias"),
]


@pytest.mark.parametrize("fields,name", BAD, ids=[repr(f) for f, _ in BAD])
def test_one_validator_names_the_field(engine, fields, name):
    with pytest.raises(SamplingError, match=name) as error:
        Sampling(**fields)
    assert error.value.field == name
    with pytest.raises(RequestError, match=name) as error:
        engine.check([1, 2], SamplingParams(**fields))
    assert error.value.param == name
    # generate() takes top_p 0 as transformers' does (the best token only)
    if name in ("top_k", "top_p", "min_p", "repetition_penalty") and fields != dict(top_p=0.0):
        with pytest.raises(ValueError, match=name):
            GenerationConfig(do_sample=True, **fields)
