"""generate(past_key_values=out.past_key_values) continuing a chat, against transformers 5.23.0: the cached positions
are not fed again, the tokens and scores are transformers'; what transformers cannot continue (beams, several
return sequences) equals a fresh run; a cache that does not fit is one clear error."""
from __future__ import annotations

import copy

import pytest
import torch

from moelm import DynamicCache
from reference import assert_close
from test_generation import FAMILIES, PAD, PHI_LONGROPE, build, padded, prompt

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KW = dict(eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)


def turn(out, mask, length: int, seed: int):
    """out.sequences with `length` new tokens after it, and the mask grown to match."""
    ids = torch.cat([out.sequences, prompt(out.sequences.shape[0], length, seed)], 1)
    return ids, torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - mask.shape[1])], 1)


def same(a, b, msg: str):
    assert torch.equal(a.sequences, b.sequences), f"{msg}: {a.sequences.tolist()}\nmoelm {b.sequences.tolist()}"
    for i, (x, y) in enumerate(zip(a.scores, b.scores)):
        assert_close(y, x, msg=f"{msg} scores[{i}]")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_continued_generation_matches_transformers(family, cache):
    ref, ours = build(family, **({"sliding_window": 4} if family == "phimoe" else {}))
    ids, mask = padded((5, 3, 4))
    a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **KW)
    b = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, cache_implementation=cache, **KW)
    same(a, b, "first turn")
    for i in range(2):
        ids, mask = turn(a, mask, 2 + i, seed=7 + i)
        a = ref.generate(input_ids=ids, attention_mask=mask, past_key_values=a.past_key_values, max_new_tokens=4, **KW)
        b = ours.generate(input_ids=ids, attention_mask=mask, past_key_values=b.past_key_values, max_new_tokens=4, **KW)
        same(a, b, f"turn {i + 1}")
        assert b.past_key_values.get_seq_length() == a.past_key_values.get_seq_length() == b.sequences.shape[1] - 1


@pytest.mark.parametrize("extra", [dict(num_beams=3, num_return_sequences=2),
                                   dict(do_sample=True, num_return_sequences=2, top_k=0)])
def test_continued_cache_repeats_rows_for_beams_and_samples(extra):
    """transformers does not repeat a given cache's rows (a size mismatch); moelm does, as a fresh run."""
    ref, ours = build("ernie4_5_moe")
    ids, mask = padded((5, 3, 4))
    for cache in ("static", "dynamic"):
        first = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, cache_implementation=cache, **KW)
        ids2, mask2 = turn(first, mask, 2, seed=9)
        torch.manual_seed(3)
        a = ref.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=4, **KW, **extra)
        torch.manual_seed(3)
        b = ours.generate(input_ids=ids2, attention_mask=mask2, past_key_values=first.past_key_values,
                          max_new_tokens=4, **KW, **extra)
        same(a, b, cache)


def test_continued_phimoe_longrope_crossing_drops_the_cache_as_transformers():
    """original_max_position_embeddings 8: a continued prompt of 10 tokens over a cache of 6 (short mscale) is run
    again whole, as transformers' prepare_inputs_for_generation does."""
    ref, ours = build("phimoe", rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)
    ids, mask = padded((5, 3, 4))
    a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, **KW)
    b = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, **KW)
    ids, mask = turn(a, mask, 3, seed=5)
    assert b.past_key_values.get_seq_length() == 6 and ids.shape[1] == 10
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, logits_to_keep=3, **KW)
    a = ref.generate(past_key_values=a.past_key_values, **kwargs)
    b = ours.generate(past_key_values=b.past_key_values, **kwargs)
    same(a, b, "across original_max_position_embeddings")


def test_continued_cache_errors():
    _, ours = build("ernie4_5")
    deeper = DynamicCache()  # 3 layers
    for i in range(3):
        deeper.update(torch.zeros(2, 2, 7, 8), torch.zeros(2, 2, 7, 8), i)
    ids = prompt(2, 5)
    out = ours.generate(input_ids=ids, max_new_tokens=3, **KW)

    def refused(error, match, **kwargs):
        with pytest.raises(error, match=match):
            ours.generate(**dict(dict(input_ids=out.sequences, max_new_tokens=2, eos_token_id=None,
                                       past_key_values=copy.deepcopy(out.past_key_values)), **kwargs))

    refused(ValueError, "holds 7 positions but input_ids has 7", input_ids=out.sequences[:, :-1])
    refused(ValueError, "batch 2.*batch 4", input_ids=torch.cat([out.sequences] * 2))
    refused(ValueError, "3 layers.*need 2 layers", past_key_values=deeper)
    refused(ValueError, "past_key_values or cache_implementation", cache_implementation="dynamic")
    refused(ValueError, "use_cache=False", use_cache=False)
    refused(ValueError, "tuple", past_key_values=((torch.zeros(1), torch.zeros(1)),))
    refused(TypeError, "transformers.cache_utils.DynamicCache", past_key_values=transformers.DynamicCache())
    refused(ValueError, "inputs_embeds", input_ids=None, inputs_embeds=torch.zeros(2, 9, 32))
    refused(ValueError, "speculative decoding does not continue a cache", prompt_lookup_num_tokens=2)
    refused(ValueError, "logits_to_keep must be an integer", logits_to_keep=torch.tensor([0]))
    # an empty cache is a fresh one
    fresh = ours.generate(input_ids=ids, max_new_tokens=3, eos_token_id=None)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=3, eos_token_id=None,
                                     past_key_values=DynamicCache()), fresh)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cache_row_methods_as_transformers(kind):
    """batch_repeat_interleave, batch_select_indices and reset do to moelm's caches what they do to transformers'
    DynamicCache: the same rows and lengths, and a reset cache fills again from position 0."""
    from transformers import DynamicCache as Reference

    from moelm import named_config
    from moelm.inference.cache import StaticCache

    config = named_config("ernie4_5-tiny")
    g = torch.Generator().manual_seed(0)
    shape = (2, config.num_key_value_heads, 3, config.head_size)
    kv = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(config.num_hidden_layers)]
    ours = DynamicCache() if kind == "dynamic" else StaticCache(config, 2, 8, torch.float32)
    ref = Reference()
    for i, (k, v) in enumerate(kv):
        ours.update(k, v, i)
        ref.update(k, v, i)

    def same():
        assert ours.get_seq_length() == ref.get_seq_length()
        n = ref.get_seq_length()
        for i, layer in enumerate(ref.layers):
            assert torch.equal(ours.keys[i][:, :, :n], layer.keys)
            assert torch.equal(ours.values[i][:, :, :n], layer.values)

    for call, arg in (("batch_repeat_interleave", 3), ("batch_select_indices", torch.tensor([5, 0, 2]))):
        getattr(ours, call)(arg)
        getattr(ref, call)(arg)
        same()
    ours.reset()
    ref.reset()
    assert ours.get_seq_length() == ref.get_seq_length() == 0
    k, v = (t[:1].repeat(3, 1, 1, 1) for t in kv[0])
    ours.update(k, v, 0)
    ref.update(k, v, 0)
    assert ours.get_seq_length() == ref.get_seq_length() == 3
    assert torch.equal(ours.keys[0][:, :, :3], ref.layers[0].keys)
