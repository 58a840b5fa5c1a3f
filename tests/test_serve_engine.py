"""The serving engine without HTTP: the slot cache against the plain forward, continuous batching against
`generate`, per-request sampling, cancellation, the queue bound, and the streaming text helpers."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.config import named_config
from moelm.inference.slots import SlotCache
from moelm.models.scaffold import new_checkpoint
from moelm.serve.engine import Engine, EngineFull, RequestError, SamplingParams
from moelm.text import Detokenizer, StopStrings

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]


def randomize(model, seed=0):
    """Every weight random (norms, biases, the correction bias too), so that no default of 0 or 1 hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else 0.08) + (1.0 if "norm" in name else 0))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return new_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, tokenizer) of the checkpoint, shared by the tests that leave the model as they found it."""
    return AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)


def run(engine, prompt, params):
    tokens, text, finish = [], "", None
    for out in engine.submit(prompt, params):
        tokens += out.token_ids
        text += out.text
        finish = out.finish_reason or finish
    return tokens, text, finish


# ---------------------------------------------------------------- the slot cache

@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block", [None, 4])
def test_slot_steps_equal_the_full_forward(name, fast, window, block):
    """Ragged steps (a prompt in chunks, one-token rows, rows at other lengths) give the logits of each sequence's
    own full forward, through FastAttention's in-row attention and through the plain attention's concatenated
    keys with the block-diagonal mask; with a sliding window too; contiguous rows and a paged pool whose blocks the
    rows take in turns (so no row's blocks are adjacent)."""
    config = named_config(name)
    if window is not None:
        config.sliding_window = window
    model = randomize(AutoModelForCausalLM.from_config(config, seed=0, fast=fast).eval())
    if window is not None:
        model.model.sliding_window = window
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, config.vocab_size, (14,), generator=g)
    b = torch.randint(0, config.vocab_size, (9,), generator=g)
    with torch.no_grad():
        full_a, full_b = model(a[None]).logits[0], model(b[None]).logits[0]
    cache = SlotCache(config, 4, 32, torch.float32, sliding_window=window, block_size=block)

    def step(segments, ids):
        for row, count in segments:
            assert cache.grow(row, cache.lengths[row] + count)
        plan = cache.schedule(segments)
        extra = {} if fast else {"attention_mask": cache.mask()}
        with torch.no_grad():
            out = model(input_ids=ids[None], position_ids=plan.positions[None], past_key_values=cache,
                        use_cache=True, **extra).logits[0]
        cache.commit()
        return out

    got = [step([(3, 10)], a[:10])]
    got.append(step([(3, 1), (1, 5)], torch.cat([a[10:11], b[:5]])))
    got.append(step([(1, 4), (3, 1)], torch.cat([b[5:9], a[11:12]])))
    got.append(step([(3, 1)], a[12:13]))
    got.append(step([(3, 1), (0, 2)], torch.cat([a[13:14], b[:2]])))  # a third row beside
    pairs = [(got[0], full_a[:10]), (got[1][:1], full_a[10:11]), (got[1][1:], full_b[:5]), (got[2][:4], full_b[5:9]),
             (got[2][4:], full_a[11:12]), (got[3], full_a[12:13]), (got[4][:1], full_a[13:14]),
             (got[4][1:], full_b[:2])]
    for got_, want in pairs:
        torch.testing.assert_close(got_, want, atol=1e-4, rtol=1e-4)
    assert cache.lengths == [2, 9, 0, 14]
    if block is not None:
        assert [len(b) for b in cache.blocks] == [1, 3, 0, 4] and sorted(sum(cache.blocks, [])) == list(range(8))
        assert cache.blocks[3] != sorted(cache.blocks[3]) or cache.blocks[3][-1] - cache.blocks[3][0] > 3


@pytest.mark.parametrize("name,dtype,block", [(name, torch.float32, None) for name in FAMILIES]
                         + [(name, torch.float32, 4) for name in FAMILIES]
                         + [("ernie4_5-tiny", torch.bfloat16, None), ("ernie4_5-tiny", torch.bfloat16, 4)])
def test_slot_decode_steps_take_the_c_kernels(name, dtype, block, monkeypatch):
    """Steps of one token per sequence, rows in any order with holes between them, run the decoder layer (ERNIE)
    or its attention (PhiMoE) in one C call writing each row at its own position, contiguous rows or reading
    through the rows' block tables; the logits are each sequence's own forward's (bf16: within bf16's rounding; a
    dense model, as an MoE's routing may flip on a rounding)."""
    from moelm.inference import cpu, kernels

    if not kernels.available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("MOELM_KERNELS", "decode_layer=gemv")
    cpu.reset()
    config = named_config(name)
    model = randomize(AutoModelForCausalLM.from_config(config, seed=0, dtype=dtype).eval())
    g = torch.Generator().manual_seed(2)
    seqs = {0: torch.randint(0, config.vocab_size, (16,), generator=g), 2: torch.randint(0, config.vocab_size, (16,),
            generator=g), 5: torch.randint(0, config.vocab_size, (16,), generator=g)}
    calls = []
    for fn in ("decode_layer", "decode_layers", "attend"):
        original = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=original, _n=fn, **k: calls.append((_n, k.get("table") is
                                                                                            not None or a[-2] is not
                                                                                            None)) or _f(*a, **k))
    cache = SlotCache(config, 6, 32, dtype, block_size=block)
    fed = {row: 0 for row in seqs}
    steps = [[(2, 8), (0, 5)], [(0, 1), (2, 1)], [(2, 1), (0, 1), (5, 4)], [(5, 1), (2, 1), (0, 1)],
             [(0, 1), (5, 1)], [(2, 1), (5, 1), (0, 1)]]
    try:
        for segments in steps:
            ids = torch.cat([seqs[row][fed[row]:fed[row] + count] for row, count in segments])
            for row, count in segments:
                assert cache.grow(row, cache.lengths[row] + count)
            plan = cache.schedule(segments)
            with torch.no_grad():
                got = model(input_ids=ids[None], position_ids=plan.positions[None], past_key_values=cache,
                            use_cache=True).logits[0].float()
            cache.commit()
            token = 0
            for row, count in segments:
                end = fed[row] + count
                with torch.no_grad():
                    want = model(seqs[row][None, :end]).logits[0, fed[row]:end].float()
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(got[token:token + count], want, atol=tol, rtol=tol)
                token, fed[row] = token + count, end
    finally:
        cpu.reset()
    assert any(with_rows for _, with_rows in calls), calls


def test_slot_cache_refuses_more_than_a_row_holds():
    cache = SlotCache(named_config("ernie4_5-tiny"), 2, 8, torch.float32)
    with pytest.raises(ValueError, match="slot 1 holds 8 positions; 9"):
        cache.schedule([(1, 9)])
    paged = SlotCache(named_config("ernie4_5-tiny"), 2, 8, torch.float32, block_size=4)
    assert paged.grow(1, 3)
    with pytest.raises(ValueError, match="slot 1 holds 4 positions; 5"):
        paged.schedule([(1, 5)])
    assert not paged.grow(1, 9)  # past max_length
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        SlotCache(named_config("ernie4_5-tiny"), 2, 8, torch.float32, block_size=4, num_blocks=1)


# ---------------------------------------------------------------- continuous batching

@pytest.mark.parametrize("fast", [True, False])
def test_batched_greedy_equals_generate(checkpoint, fast):
    """Prompts of different lengths, more of them than slots, prompts prefilled in chunks beside decoding rows:
    each greedy answer is the tokens of `generate` for that prompt alone."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, fast=fast)
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog. " * 3, "a", "你好，世界", "def add(a, b):",
             "Mixture-of-experts models route every token"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(p):]
            .tolist() for p in prompts]
    with Engine(model, tokenizer, max_num_seqs=3, max_num_batched_tokens=8, max_model_len=128).start() as engine:
        requests = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
        got = []
        for r in requests:
            tokens = []
            for out in r:
                tokens += out.token_ids
            got.append(tokens)
    assert got == want
    assert engine.steps < sum(len(p) + 12 for p in prompts)  # sequences shared steps


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_alone_equals_generate_in_every_weight_format(checkpoint, kind):
    """A request alone runs the shapes generate runs (the prompt in one chunk, then one row per step), so its
    greedy tokens are generate's in bf16 and with quantized weights too."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **({"dtype": torch.bfloat16} if kind == "bfloat16" else
                                                                 {"quantization": kind}))
    prompt = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    with Engine(model, tokenizer, max_num_seqs=2, max_model_len=64).start() as engine:
        got = run(engine, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert got == want[0, len(prompt):].tolist()


def test_a_prompt_chunk_without_logits_on_int8_experts(tmp_path):
    """A step whose prompt chunk ends no prompt wants no logits: an empty last layer failed with int8 experts."""
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, quantization="int8")
    with Engine(model, AutoTokenizer.from_pretrained(path), max_num_seqs=2, max_model_len=64,
                max_num_batched_tokens=4).start() as engine:
        out = engine.submit(list(range(10, 21)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert [(o.error, len(o.token_ids)) for o in out] == [(None, 1)] * 3


def test_warmup_leaves_the_slots_empty(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64)
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape[1]) or original(*a, **k)
    engine.warmup()
    model.forward = original
    assert calls == [1, 2, 3, 1, 2, 4, 8, 16] and engine.cache.used() == 0 and engine.cache.plan is None
    prompt = tokenizer("Hello world")["input_ids"]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    engine.start()
    try:
        assert run(engine, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0] == \
            want[0, len(prompt):].tolist()
        with pytest.raises(RuntimeError, match="before starting"):
            engine.warmup()
    finally:
        engine.stop()


def test_seeded_sampling_is_the_same_whatever_else_runs(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_num_seqs=4, max_model_len=128).start() as engine:
        prompt = tokenizer("Hello world")["input_ids"]
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
        alone = run(engine, prompt, params)
        others = [engine.submit(tokenizer(t)["input_ids"], SamplingParams(max_tokens=20, temperature=1.0,
                                                                          ignore_eos=True))
                  for t in ("a b c", "The quick brown fox", "def f():")]
        crowded = run(engine, prompt, params)
        for r in others:
            list(r)
        other_seed = run(engine, prompt, SamplingParams(**{**params.__dict__, "seed": 99}))
        two = [[], []]
        for out in engine.submit(prompt, SamplingParams(**{**params.__dict__, "n": 2})):
            two[out.index] += out.token_ids
    assert alone == crowded
    assert other_seed[0] != alone[0]
    assert two[0] == alone[0] and two[1] != two[0]  # choice 0 is the seed's own draw, choice 1 another


def test_request_parameters_act(loaded):
    """logit_bias, stop_token_ids, min_tokens with EOS, repetition and presence penalties, max_tokens."""
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_num_seqs=2, max_model_len=128).start() as engine:
        prompt = tokenizer("Hello world")["input_ids"]
        greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        base, _, finish = run(engine, prompt, greedy)
        assert finish == "length" and len(base) == 10
        biased, _, _ = run(engine, prompt, SamplingParams(**{**greedy.__dict__, "logit_bias": {7: 100.0}}))
        assert biased == [7] * 10
        stopped, _, finish = run(engine, prompt, SamplingParams(**{**greedy.__dict__, "stop_token_ids": [base[3]]}))
        assert finish == "stop" and stopped == base[:base.index(base[3]) + 1]
        eos = engine.eos[0]
        forced = {"logit_bias": {eos: 100.0}, "ignore_eos": False}
        early, _, finish = run(engine, prompt, SamplingParams(**{**greedy.__dict__, **forced}))
        assert early == [eos] and finish == "stop"
        late, _, finish = run(engine, prompt, SamplingParams(**{**greedy.__dict__, **forced, "min_tokens": 4}))
        assert late[-1] == eos and len(late) == 5 and eos not in late[:4] and finish == "stop"
        # token 7 favoured by 3.0 (a random tiny model's logits are far smaller): greedy repeats it throughout;
        # presence + frequency penalties of 2.0 take it back after its first use, and every other token after its own
        repeat = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "logit_bias": {7: 3.0}}
        plain, _, _ = run(engine, prompt, SamplingParams(**repeat))
        penalised, _, _ = run(engine, prompt, SamplingParams(**repeat, presence_penalty=2.0, frequency_penalty=2.0))
        assert plain == [7] * 12
        assert penalised[0] == 7 and 7 not in penalised[1:] and len(set(penalised)) == 12
        repeated, _, _ = run(engine, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                            repetition_penalty=5.0))
        assert len(set(repeated)) > len(set(plain))


def test_logprobs_are_the_models(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_num_seqs=2, max_model_len=64).start() as engine:
        prompt = tokenizer("Hello world")["input_ids"]
        outs = list(engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=4)))
    entries = [e for o in outs for e in o.logprobs]
    tokens = [t for o in outs for t in o.token_ids]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    lp = logits.log_softmax(-1)
    for step, e in enumerate(entries):
        assert e.token_id == tokens[step] == e.top[0][0]
        assert abs(e.logprob - float(lp[step, e.token_id])) < 1e-4
        assert [t for t, _ in e.top] == torch.topk(lp[step], 4).indices.tolist()


def test_cancel_frees_the_slot_and_full_queue_refuses(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_num_seqs=1, max_model_len=2048, max_waiting=2).start() as engine:
        prompt = tokenizer("Hello")["input_ids"]
        long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
        first = engine.submit(prompt, long)
        deadline = time.time() + 5
        while not engine.num_running():
            assert time.time() < deadline
            time.sleep(0.005)
        waiting = [engine.submit(prompt, long), engine.submit(prompt, long)]
        with pytest.raises(EngineFull, match="2 sequences are waiting"):
            engine.submit(prompt, long)
        for r in [first] + waiting:
            r.cancel()
        reasons = [[o.finish_reason for o in r][-1] for r in [first] + waiting]
        assert reasons == ["abort"] * 3
        deadline = time.time() + 5
        while engine.num_running() or engine.num_waiting():
            assert time.time() < deadline
            time.sleep(0.01)
        assert engine.kv_usage() == 0 and engine.free_rows == [0]
        tokens, _, finish = run(engine, prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert finish == "length" and len(tokens) == 3


def test_bad_requests_name_the_fault(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_model_len=64)
    vocab = model.config.vocab_size
    with pytest.raises(RequestError, match=f"token id {vocab} is outside the vocabulary \\(size {vocab}\\)"):
        engine.check([1, vocab], SamplingParams())
    with pytest.raises(RequestError, match="logit_bias: token id -1"):
        engine.check([1], SamplingParams(logit_bias={-1: 1.0}))
    with pytest.raises(RequestError, match="the prompt is 3 tokens and max_tokens is 62: 65 is more than the "
                                           "model's context of 64"):
        engine.check([1, 2, 3], SamplingParams(max_tokens=62))
    with pytest.raises(RequestError, match="empty"):
        engine.check([], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len 100000 is more than the model's context"):
        Engine(model, tokenizer, max_model_len=100000)


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_model_len=64).start()
    prompt = tokenizer("Hello")["input_ids"]
    original = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        outs = list(engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0)))
        assert outs[-1].finish_reason == "error" and "boom" in outs[-1].error
        model.forward = original
        tokens, _, finish = run(engine, prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(tokens) == 3 and engine.alive() and engine.kv_usage() == 0
    finally:
        model.forward = original
        engine.stop()


def test_phimoe_longrope_limit():
    """Past original_max_position_embeddings PhiMoE's LongRoPE changes scale and the reference re-runs the whole
    sequence; the engine serves up to there and says so beyond."""
    from moelm.config import PhimoeConfig

    rope = dict(rope_type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[2.0, 3.0, 4.5, 6.0],
                short_mscale=1.15, long_mscale=1.45, original_max_position_embeddings=8, rope_theta=10000.0)
    config = PhimoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          num_local_experts=4, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(config, seed=0)
    with pytest.raises(ValueError, match="max_model_len 9: past 8 positions"):
        Engine(model, None, max_model_len=9)
    assert Engine(model, None, max_model_len=8).max_model_len == 8


# ---------------------------------------------------------------- streaming text

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(new_checkpoint("ernie4_5-tiny", tmp_path_factory.mktemp("tok"), seed=0))


def sentencepiece_tokenizer(tmp_path):
    from tokenizer_fixtures import build_sentencepiece_dir

    return AutoTokenizer.from_pretrained(build_sentencepiece_dir(tmp_path / "sp", model_type="bpe"))


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_detokenizer_never_emits_half_a_character(kind, byte_tokenizer, tmp_path):
    tokenizer = byte_tokenizer if kind == "byte-level" else sentencepiece_tokenizer(tmp_path)
    text = "Emoji 😀🎉🚀 and 你好，世界！ naïve café 👍🏽 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text must split a character across tokens"
    prompt = tokenizer("Start:", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, prompt)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(prompt + ids, skip_special_tokens=True)[
        len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def test_stop_strings_are_held_back_and_never_leak():
    stops = StopStrings(["END", "\n\n"])
    out = [stops.feed(p) for p in ["Hello E", "N", "D here"]]
    assert out == ["Hello ", "", ""] and stops.hit == "END"
    stops = StopStrings(["END"])
    out = [stops.feed(p) for p in ["Hello E", "NOUGH", " EN"]] + [stops.flush()]
    assert "".join(out) == "Hello ENOUGH EN" and out[0] == "Hello " and stops.hit is None
    stops = StopStrings(["ab", "b"])
    assert stops.feed("xab") == "x" and stops.hit == "ab"


def test_engine_stop_strings_cut_the_text(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_model_len=128).start() as engine:
        prompt = tokenizer("The quick brown fox")["input_ids"]
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
        _, full, _ = run(engine, prompt, params)
        stop = full[len(full) // 2:len(full) // 2 + 2]
        assert stop.strip(), full
        _, text, finish = run(engine, prompt, SamplingParams(**{**params.__dict__, "stop": [stop]}))
    assert finish == "stop" and text == full[:full.index(stop)] and stop not in text


def test_engine_thread_is_the_only_one_running_the_model(loaded):
    model, tokenizer = loaded
    threads = set()
    original = model.forward

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    model.forward = spy
    with Engine(model, tokenizer, max_model_len=64).start() as engine:
        run(engine, tokenizer("Hi")["input_ids"], SamplingParams(max_tokens=2, temperature=0))
    assert threads == {"moelm-engine"} and not engine.alive()
