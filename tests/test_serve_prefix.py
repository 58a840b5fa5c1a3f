"""The paged KV cache of the serving engine: automatic prefix caching (a request sharing a prefix with an earlier one
prefills only what is new, and answers as the server without caching), blocks given back and evicted least recently
used first, and preemption when the pool runs out (the preempted sequences go on where they were)."""
from __future__ import annotations

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.inference.slots import BlockPool, OutOfBlocks
from moelm.models.scaffold import new_checkpoint
from moelm.serve.engine import Engine, SamplingParams

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    path = new_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    return request.param, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class Counting:
    """Engine metrics hooks that count the prefix cache's queries and hits, the preemptions and the tokens fed."""

    def __init__(self):
        self.queries = self.hits = self.preemptions = 0

    def prefix_cache(self, queried, hit):
        self.queries += queried
        self.hits += hit

    def preempted(self):
        self.preemptions += 1

    def __getattr__(self, name):
        return lambda *args: None


def greedy(engine, prompts, max_tokens=10):
    requests = [engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
                for p in prompts]
    outs = [[t for out in r for t in out.token_ids] for r in requests]
    return outs, [r.cached_tokens for r in requests]


def fed_tokens(engine) -> list[int]:
    """Wrap the engine's forward to record the tokens of each step."""
    fed, forward = [], engine._forward
    engine._forward = lambda segments, tokens, *a, **k: fed.append(len(tokens)) or forward(segments, tokens, *a, **k)
    return fed


@pytest.mark.parametrize("window", [None, 8])
def test_a_shared_prefix_is_prefilled_once_and_answers_as_without_caching(loaded, window):
    """A long prompt, then one sharing its first 37 tokens: the second reuses 36 (whole blocks of 4, its last token
    always computed) and prefills the rest only; every output equals the engine's without prefix caching and with
    contiguous rows (PhiMoE and the others with a sliding window too)."""
    name, model, tokenizer = loaded
    previous = model.model.sliding_window if hasattr(model.model, "sliding_window") else None
    if window is not None:
        model.config.sliding_window = model.model.sliding_window = window
    try:
        g = torch.Generator().manual_seed(3)
        first = torch.randint(3, model.config.vocab_size, (50,), generator=g).tolist()
        second = first[:37] + torch.randint(3, model.config.vocab_size, (12,), generator=g).tolist()
        third = second + [5, 6, 7]  # the second's prompt and more: its blocks were remembered while it ran
        want = []
        with Engine(model, tokenizer, max_num_seqs=2, max_model_len=96, block_size=None).start() as plain:
            for prompt in (first, second, third):
                want.append(greedy(plain, [prompt])[0][0])
        counts = Counting()
        with Engine(model, tokenizer, max_num_seqs=2, max_model_len=96, block_size=4, max_num_batched_tokens=16,
                    metrics=counts).start() as engine:
            fed = fed_tokens(engine)
            got, cached = [], []
            for prompt in (first, second, third):
                before = len(fed)
                outs, hit = greedy(engine, [prompt])
                got.append(outs[0])
                cached.append(hit[0])
                if prompt is second:
                    assert sum(fed[before:]) == len(second) - 36 + 9  # the new tokens, then 9 decoding steps
        assert got == want
        assert cached == [0, 36, 48]
        assert counts.hits == 84 and counts.queries == len(first) + len(second) + len(third)
    finally:
        if window is not None:
            model.config.sliding_window = model.model.sliding_window = previous


def test_batched_requests_with_a_common_prefix_and_preemption(loaded):
    """Six requests on three rows and a pool of 10 blocks of 4 (each sequence needs up to 9): sequences are
    preempted and prefilled again, reusing what is still remembered; every greedy output is the one of the engine
    with rows of its own."""
    name, model, tokenizer = loaded
    g = torch.Generator().manual_seed(4)
    stem = torch.randint(3, model.config.vocab_size, (13,), generator=g).tolist()
    prompts = [stem + torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
               for n in (3, 8, 1, 11, 5, 2)]
    with Engine(model, tokenizer, max_num_seqs=3, max_model_len=36, block_size=None).start() as plain:
        want, _ = greedy(plain, prompts, max_tokens=12)
    counts = Counting()
    with Engine(model, tokenizer, max_num_seqs=3, max_model_len=36, block_size=4, num_blocks=10,
                max_num_batched_tokens=8, metrics=counts).start() as engine:
        got, _ = greedy(engine, prompts, max_tokens=12)
        assert engine.cache.pool.held() == 0 and engine.free_rows and engine.kv_usage() == 0
    assert got == want
    assert counts.preemptions > 0 and counts.hits > 0


def test_prefix_caching_off_and_bad_sizes_are_refused(loaded):
    _, model, tokenizer = loaded
    counts = Counting()
    prompt = list(range(3, 40))
    with Engine(model, tokenizer, max_num_seqs=2, max_model_len=64, enable_prefix_caching=False,
                metrics=counts).start() as engine:
        assert greedy(engine, [prompt, prompt])[1] == [0, 0]
        assert greedy(engine, [prompt])[1] == [0]
    assert counts.queries == 0
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, tokenizer, max_model_len=64, block_size=16, num_blocks=3)
    with pytest.raises(ValueError, match="kv_cache_memory 10 bytes is less than one KV block"):
        Engine(model, tokenizer, max_model_len=64, kv_cache_memory=10)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        Engine(model, tokenizer, block_size=0)
    with pytest.raises(ValueError, match="need a block_size"):
        Engine(model, tokenizer, block_size=None, enable_prefix_caching=True)
    engine = Engine(model, tokenizer, max_model_len=64, block_size=16,
                    kv_cache_memory=2 * model.config.num_hidden_layers * model.config.num_key_value_heads
                    * model.config.head_size * 16 * 4 * 5 + 7)
    assert engine.cache.num_blocks == 5


def test_block_pool_evicts_the_least_recently_used_remembered_block():
    pool = BlockPool(3)
    a, b, c = pool.take(), pool.take(), pool.take()
    with pytest.raises(OutOfBlocks):
        pool.take()
    pool.remember(a, b"A")
    pool.remember(b, b"B")
    pool.remember(c, b"A")  # the prefix A keeps its first block
    assert pool.find(b"A") == a and pool.find(b"B") == b
    pool.release(b)
    pool.release(a)
    pool.release(c)  # not remembered: free at once
    assert pool.available() == 3 and pool.held() == 0
    assert pool.take() == c  # a free block before a remembered one
    pool.share(b)  # B used again: A is now the least recently used
    pool.release(b)
    assert pool.take() == a and pool.find(b"A") is None and pool.find(b"B") == b
    assert pool.take() == b and pool.find(b"B") is None
