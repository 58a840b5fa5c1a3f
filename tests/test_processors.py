"""transformers 5.23's logits processors that generate() implements beyond the shared sampler's
(moelm.generation.processors): tokens and output_scores against transformers' generate on one tiny model, with
greedy search, sampling (same seed) and beam search over a left-padded batch; the keys still unimplemented refused."""
from __future__ import annotations

import functools

import pytest
import torch

from moelm.generation import GenerationConfig
from moelm.generation.config import SAMPLING_ONLY, UNIMPLEMENTED
from reference import assert_close
from test_generation import PAD, both, build, padded

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.lru_cache(maxsize=None)
def _tokens():
    """The model, the padded batch and its new greedy tokens [3, 3] (to aim the processors at)."""
    ref, ours = build("ernie4_5")
    ids, mask = padded()
    free = ours.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, pad_token_id=PAD, max_new_tokens=3)
    return ref, ours, ids, mask, free[:, ids.shape[1]:].tolist()


SAMPLE = dict(do_sample=True, num_return_sequences=2, temperature=1.5, top_k=0)
BEAM = dict(num_beams=3, num_return_sequences=2)
CASES = {  # name: (mode, settings from the free tokens t)
    "no-repeat-ngram": ({}, lambda t: dict(no_repeat_ngram_size=2)),
    "no-repeat-ngram-beams": (BEAM, lambda t: dict(no_repeat_ngram_size=1)),
    "bad-words": ({}, lambda t: dict(bad_words_ids=[[t[0][0]], [t[1][0], t[1][1]], [t[2][1]]], eos_token_id=t[2][1])),
    "bad-words-beams": (BEAM, lambda t: dict(bad_words_ids=[[t[0][1]], [t[1][0], t[1][1]]])),
    "sequence-bias": ({}, lambda t: dict(sequence_bias={(t[0][0],): -4.0, (t[1][0], t[1][1]): -9.0, (t[2][2],): 3.0})),
    "sequence-bias-list-sampling": (SAMPLE, lambda t: dict(sequence_bias=[[[t[0][0]], -2.0], [[t[1][1]], 1.5]])),
    "suppress": ({}, lambda t: dict(suppress_tokens=[t[0][0], t[1][1]])),
    "begin-suppress-beams": (BEAM, lambda t: dict(begin_suppress_tokens=[t[0][0], t[1][0], t[2][0]])),
    "forced-bos-begin-suppress": ({}, lambda t: dict(forced_bos_token_id=t[0][2], begin_suppress_tokens=[t[1][0]],
                                                     first=True)),
    "forced-eos": (SAMPLE, lambda t: dict(forced_eos_token_id=[5, 9])),
    "decay-renormalize": ({}, lambda t: dict(exponential_decay_length_penalty=(1, 1.6), eos_token_id=[t[0][2], 7],
                                             renormalize_logits=True)),
    "invalid-values-beams": (dict(BEAM, do_sample=True), lambda t: dict(remove_invalid_values=True,
                                                                        suppress_tokens=[t[0][0]])),
    "typical": (SAMPLE, lambda t: dict(typical_p=0.4)),
    "epsilon": (SAMPLE, lambda t: dict(epsilon_cutoff=0.03)),
    "eta-beam-sampling": (dict(BEAM, do_sample=True), lambda t: dict(eta_cutoff=0.05, typical_p=0.9)),
}


@pytest.mark.parametrize("case", CASES)
def test_processors_match_transformers(case):
    ref, ours, ids, mask, t = _tokens()
    mode, settings = CASES[case]
    kwargs = dict(input_ids=ids, attention_mask=mask, eos_token_id=None, pad_token_id=PAD, max_new_tokens=3,
                  return_dict_in_generate=True, output_scores=True, **mode)
    kwargs.update(settings(t))
    if kwargs.pop("first", False):  # a one-token prompt (forced BOS)
        kwargs.update(input_ids=ids[:, -1:], attention_mask=None)
    a, b = both(ref, ours, seed=3, **kwargs)
    assert torch.equal(a.sequences, b.sequences), f"reference {a.sequences.tolist()}\nmoelm {b.sequences.tolist()}"
    assert len(a.scores) == len(b.scores)
    for i, (x, y) in enumerate(zip(a.scores, b.scores)):
        assert_close(y, x, msg=f"scores[{i}]")
    if "num_beams" in mode:
        assert_close(b.sequences_scores, a.sequences_scores, msg="sequences_scores")
        assert torch.equal(a.beam_indices, b.beam_indices)
    plain = ours.generate(**{k: v for k, v in kwargs.items() if k not in settings(t)}, **{
        k: v for k, v in settings(t).items() if k == "eos_token_id"})
    if mode is not SAMPLE:  # the processor made a difference
        assert not torch.equal(plain.sequences, b.sequences) or any(
            not torch.equal(x, y) for x, y in zip(plain.scores, b.scores))


def test_unimplemented_keys_are_refused_by_name():
    _, ours, ids, mask, _ = _tokens()
    for key in UNIMPLEMENTED:
        with pytest.raises(ValueError, match=f"{key}=0.5"):
            ours.generate(input_ids=ids, max_new_tokens=2, do_sample=key in SAMPLING_ONLY, **{key: 0.5})



@pytest.mark.parametrize("settings", [dict(suppress_tokens=[5, 9]), dict(no_repeat_ngram_size=2),
                                      dict(bad_words_ids=[[7], [3, 4]], sequence_bias={(6,): 2.0}),
                                      dict(forced_eos_token_id=4, renormalize_logits=True)])
def test_speculative_decoding_applies_them(settings):
    """Greedy with drafts (n-gram lookup, an assistant) gives the tokens and scores of plain greedy decoding."""
    _, ours, ids, mask, _ = _tokens()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
              output_scores=True, **settings)
    plain = ours.generate(**kw)
    for drafts in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=ours, num_assistant_tokens=3)):
        got = ours.generate(**kw, **drafts)
        assert torch.equal(got.sequences, plain.sequences), drafts
        for x, y in zip(got.scores, plain.scores):
            assert_close(x, y)


@pytest.mark.parametrize("settings, name", [
    (dict(typical_p=0.0), "typical_p"), (dict(eta_cutoff=1.0), "eta_cutoff"), (dict(bad_words_ids=[]), "bad_words_ids"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(sequence_bias={(5,): 1}), "sequence_bias"),
    (dict(forced_eos_token_id=[-1]), "forced_eos_token_id"),
    (dict(forced_bos_token_id=4, suppress_tokens=[4]), "forced_bos_token_id"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty")])
def test_invalid_processor_settings_raise(settings, name):
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**settings)


def test_sequence_bias_round_trips_through_json(tmp_path):
    cfg = GenerationConfig(sequence_bias={(3, 4): -1.5}, no_repeat_ngram_size=3, suppress_tokens=[1, 2])
    cfg.save_pretrained(tmp_path)
    again = GenerationConfig.from_pretrained(tmp_path)
    assert again.sequence_bias == [[[3, 4], -1.5]] and again.no_repeat_ngram_size == 3
    assert again.to_dict() == cfg.to_dict()
