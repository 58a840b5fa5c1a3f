"""Prompt logprobs through the real server: completions' `echo` with `logprobs` (lm-evaluation-harness's
loglikelihood requests), vLLM's `prompt_logprobs` on completions and chat, against transformers' log-softmax in
fp32; with the prefix cache, chunked prompts and preemption; and vLLM's GET /tokenizer_info."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import re

import pytest
import torch

import serve_fixtures
from serve_fixtures import running_server
from tokenizer_fixtures import ERNIE_TEMPLATE

httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

from moelm import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402
from moelm.serve import routes  # noqa: E402
from moelm.serve.engine import Engine, SamplingParams  # noqa: E402
from moelm.serve.server import add_arguments  # noqa: E402

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]
BATCHED = 16  # max_num_batched_tokens: a 40-token prompt takes three chunks


class Served:
    def __init__(self, path, url, engine, tokenizer):
        self.path, self.url, self.engine, self.tokenizer = path, url, engine, tokenizer
        self.ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """transformers' log-softmax [L, V] (fp32) after each position of ids."""
        with torch.no_grad():
            return self.ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def post(self, path: str, body: dict, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)

    def text(self, token: int) -> str:
        return routes.token_text(self.tokenizer, token)[0]


@contextlib.contextmanager
def info_server(path, **kwargs):
    """running_server with GET /tokenizer_info, as `moelm serve --enable-tokenizer-info-endpoint` adds it."""
    def create_app(*args, **kw):
        serve_fixtures.create_app = plain  # this server's app only
        return plain(*args, tokenizer_info=True, **kw)

    plain = serve_fixtures.create_app
    serve_fixtures.create_app = create_app
    try:
        with running_server(path, **kwargs) as running:
            yield running
    finally:
        serve_fixtures.create_app = plain


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """served(family): a server of a random fp32 checkpoint of that family (started once), its transformers twin."""
    with contextlib.ExitStack() as stack:
        cache = {}

        def get(family: str) -> Served:
            if family not in cache:
                path = new_checkpoint(family, tmp_path_factory.mktemp(family), seed=0)
                running = info_server(path, dtype="float32", chat_template=ERNIE_TEMPLATE, max_num_seqs=4,
                                      max_model_len=128, max_num_batched_tokens=BATCHED, block_size=4)
                cache[family] = Served(path, *stack.enter_context(running))
            return cache[family]

        yield get


def prompt_ids(s: Served, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, s.engine.vocab_size, (n,), generator=g).tolist()


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval 0.4.13's LocalCompletionsAPI.parse_logprobs for one choice."""
    lp = choice["logprobs"]
    tokens, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
    return sum(tokens), all(t == max(top.values()) for t, top in zip(tokens, tops))


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_eval_loglikelihood_requests_equal_transformers(served, family):
    """lm-eval's exact request (several token-id prompts, logprobs 1, echo, max_tokens 1): each choice echoes its
    prompt, whose tokens' logprobs (the first null) are transformers' log-softmax within 1e-4, then the greedy
    token; lm-eval's sum over the continuation and its greedy flag come out as transformers' do."""
    s = served(family)
    prompts = [prompt_ids(s, n, seed) for n, seed in ((7, 1), (40, 2), (19, 3))]  # 40 tokens: three chunks
    r = s.post("/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
                                   "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, choices):
        want = s.logprobs(prompt)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:-1]), expected, atol=1e-4, rtol=0)
        token = int(want[-1].argmax())
        assert lp["tokens"][-1] == s.text(token) and abs(lp["token_logprobs"][-1] - want[-1, token]) < 1e-4
        assert choice["text"].startswith(s.tokenizer.decode(prompt))
        assert choice["finish_reason"] in ("length", "stop")
        ctxlen = len(prompt) // 2
        total, greedy = lm_eval_parse(choice, ctxlen)
        assert total == pytest.approx(float(expected[ctxlen - 1:].sum()), abs=1e-3)
        assert greedy == bool((want[ctxlen - 1:-1].argmax(-1) == torch.tensor(prompt[ctxlen:])).all())
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, prompts)) and usage["completion_tokens"] == 3


def test_echo_logprobs_top_offsets_and_generated_part(served):
    """With echo and logprobs 2: each position's top_logprobs holds the token and the two most likely (by text, as
    OpenAI and vLLM key them), text_offset adds up the tokens' texts from 0, and the part after the prompt is the
    answer without echo; echo without logprobs echoes the text only."""
    s = served("ernie4_5_moe-tiny")
    prompt = s.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = s.post("/v1/completions", {**body, "logprobs": 2}).json()["choices"][0]
    echoed = s.post("/v1/completions", {**body, "logprobs": 2, "echo": True}).json()["choices"][0]
    prompt_text = s.tokenizer.decode(prompt)
    assert echoed["text"] == prompt_text + plain["text"]
    lp, gen = echoed["logprobs"], plain["logprobs"]
    assert lp["tokens"] == [s.text(t) for t in prompt] + gen["tokens"]
    assert lp["tokens"][len(prompt):] == gen["tokens"] and len(gen["tokens"]) == 4
    assert lp["token_logprobs"][len(prompt):] == pytest.approx(gen["token_logprobs"], abs=1e-5)
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert gen["text_offset"][0] == 0  # without echo the offsets count from the generated text's start
    ids = list(prompt)
    for _ in range(4):  # transformers' greedy tokens
        ids.append(int(s.logprobs(ids)[-1].argmax()))
    assert lp["tokens"][len(prompt):] == [s.text(t) for t in ids[len(prompt):]]
    want = s.logprobs(ids)
    for i in range(1, len(ids)):
        row = want[i - 1]
        top = row.topk(2)
        expected = {}
        for t, v in [(ids[i], row[ids[i]])] + list(zip(top.indices.tolist(), top.values)):
            expected[s.text(t)] = float(v)
        assert lp["top_logprobs"][i].keys() == expected.keys()
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(list(expected.values()), abs=1e-4)
        assert lp["token_logprobs"][i] == pytest.approx(float(row[ids[i]]), abs=1e-4)
    only_text = s.post("/v1/completions", {**body, "echo": True}).json()["choices"][0]
    assert only_text["text"] == prompt_text + plain["text"] and only_text["logprobs"] is None
    assert "prompt_logprobs" not in only_text


def test_max_tokens_0_with_echo_is_the_prompt_alone(served):
    s = served("ernie4_5-tiny")
    prompt = prompt_ids(s, 12, 5)
    r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == s.tokenizer.decode(prompt) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(prompt) and body["usage"]["completion_tokens"] == 0
    want = s.logprobs(prompt)
    expected = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"][1:]), expected, atol=1e-4, rtol=0)
    assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the token alone
    text_only = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True}).json()["choices"][0]
    assert text_only["text"] == s.tokenizer.decode(prompt) and text_only["logprobs"] is None
    refused = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_echo_logprobs_streamed(served):
    """Streamed, the first chunk of a choice carries the prompt's text and entries, the rest as without echo."""
    s = served("ernie4_5_moe-tiny")
    prompt = prompt_ids(s, 10, 6)
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 1, "echo": True}
    whole = s.post("/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[0]["choices"][0]["text"].startswith(s.tokenizer.decode(prompt))
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    merged = {k: [x for c in chunks for x in c["choices"][0]["logprobs"][k]] for k in whole["logprobs"]}
    assert merged["tokens"] == whole["logprobs"]["tokens"] and merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_prompt_logprobs_field_in_vllms_shape(served):
    """vLLM's prompt_logprobs: null for the first token, then {token id: {logprob, rank, decoded_token}} of the
    prompt's token (its rank among the vocabulary) and the k most likely (ranks 1..k); on chat, the response's."""
    s = served("phimoe-tiny")
    prompt = prompt_ids(s, 15, 7)
    r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "prompt_logprobs": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None
    got = choice["prompt_logprobs"]
    want = s.logprobs(prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        row, token = want[i - 1], prompt[i]
        entry = got[i]
        assert str(token) in entry and set(entry[str(token)]) == {"logprob", "rank", "decoded_token"}
        assert entry[str(token)]["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        assert entry[str(token)]["decoded_token"] == s.tokenizer.decode([token])
        top = row.topk(3)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[str(t)]["rank"] == rank and entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4)
        assert len(entry) == (3 if token in top.indices.tolist() else 4)
    assert any(got[i][str(prompt[i])]["rank"] > 3 for i in range(1, len(prompt)))  # a random prompt: not all top
    messages = [{"role": "user", "content": "Hello there"}]
    chat = s.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "prompt_logprobs": 1}).json()
    ids = s.post("/tokenize", {"messages": messages}).json()["tokens"]
    assert len(chat["prompt_logprobs"]) == len(ids) and chat["prompt_logprobs"][0] is None
    assert chat["prompt_logprobs"][1][str(ids[1])]["logprob"] == pytest.approx(float(s.logprobs(ids)[0, ids[1]]),
                                                                               abs=1e-4)
    for path, body in (("/v1/completions", {"prompt": prompt}), ("/v1/chat/completions", {"messages": messages})):
        streamed = s.post(path, {**body, "prompt_logprobs": 1, "stream": True})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"
        too_many = s.post(path, {**body, "prompt_logprobs": 21})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt_logprobs"


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(match.group(1))


def test_prompt_logprobs_beside_a_cached_prefix(served):
    """While a request that shares the prompt's prefix decodes (its blocks remembered), a prompt-logprobs request
    computes every position itself (no cached tokens, values unchanged, not counted as a prefix-cache query) and
    leaves its blocks for the next plain request."""
    s = served("ernie4_5_moe-tiny")
    stem = prompt_ids(s, 33, 8)
    prompt = stem + prompt_ids(s, 6, 9)
    want = s.logprobs(prompt)
    expected = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    s.post("/v1/completions", {"prompt": stem + [7], "max_tokens": 1})  # the prefix into the cache
    queries = metric(s.url, "moelm:prefix_cache_queries_total")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(s.post, "/v1/completions", {"prompt": stem + [5], "max_tokens": 40, "ignore_eos": True})
        r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True}).json()
        shared = long.result().json()
    assert shared["usage"]["prompt_tokens_details"]["cached_tokens"] == 32  # the other one took the stem's blocks
    assert metric(s.url, "moelm:prefix_cache_queries_total") - queries == len(stem) + 1  # its query alone
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    torch.testing.assert_close(torch.tensor(r["choices"][0]["logprobs"]["token_logprobs"][1:-1]), expected,
                               atol=1e-4, rtol=0)
    fresh = prompt_ids(s, 30, 10)
    s.post("/v1/completions", {"prompt": fresh, "max_tokens": 1, "prompt_logprobs": 0})
    after = s.post("/v1/completions", {"prompt": fresh + [9], "max_tokens": 1}).json()
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 28  # the full blocks it left


def test_a_long_prompt_is_scored_over_several_chunks(served):
    s = served("ernie4_5-tiny")
    prompt = prompt_ids(s, 100, 11)
    steps = s.engine.steps
    r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert s.engine.steps - steps >= -(-len(prompt) // BATCHED)
    got = [e[str(t)]["logprob"] for e, t in zip(r["choices"][0]["prompt_logprobs"][1:], prompt[1:])]
    want = s.logprobs(prompt)
    torch.testing.assert_close(torch.tensor(got), want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                               atol=1e-4, rtol=0)


class Counting:
    def __init__(self):
        self.preemptions = 0

    def preempted(self):
        self.preemptions += 1

    def __getattr__(self, name):
        return lambda *args: None


def test_preempted_sequences_record_each_position_once(served):
    """Four prompt-logprobs requests on a pool too small for them all: sequences are preempted mid-prompt and
    after their first tokens, prefilled again, and each prompt's logprobs are recorded once per position, equal to
    transformers'."""
    s = served("ernie4_5_moe-tiny")
    model = AutoModelForCausalLM.from_pretrained(s.path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(s.path)
    prompts = [prompt_ids(s, n, 20 + n) for n in (21, 17, 25, 13)]
    counts = Counting()
    with Engine(model, tokenizer, max_num_seqs=4, max_model_len=40, block_size=4, num_blocks=12,
                max_num_batched_tokens=8, metrics=counts).start() as engine:
        preempt, seen = engine._preempt, []  # (still scoring its prompt, tokens so far) of each preempted one
        engine._preempt = lambda seq: seen.append((seq.scoring(), len(seq.tokens))) or preempt(seq)
        with engine.cond:  # all four in one batch
            requests = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        prompt_logprobs=1)) for p in prompts]
        outs = [list(r) for r in requests]
    assert counts.preemptions == len(seen) and any(s for s, _ in seen) and any(n for _, n in seen)
    for prompt, out in zip(prompts, outs):
        scores = out[0].prompt_logprobs
        assert all(o.prompt_logprobs is None for o in out[1:]) and len(scores) == len(prompt)
        assert [e.token_id for e in scores] == prompt and scores[0].logprob is None
        want = s.logprobs(prompt)
        torch.testing.assert_close(torch.tensor([e.logprob for e in scores[1:]]),
                                   want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
        assert [e.top[0][0] for e in scores[1:]] == want[:-1].argmax(-1).tolist()


def test_tokenizer_info(served, tmp_path):
    """vLLM's GET /tokenizer_info: the tokenizer's special tokens and settings, its class and the chat template;
    only with --enable-tokenizer-info-endpoint, and behind the API key like the other endpoints."""
    s = served("ernie4_5-tiny")
    info = httpx.get(s.url + "/tokenizer_info").json()
    tok = s.tokenizer
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["pad_token"] == tok.pad_token and info["model_max_length"] == tok.model_max_length
    assert info["tokenizer_class"] == type(tok).__name__ and info["chat_template"] == ERNIE_TEMPLATE
    assert "vocab_file" not in info
    path = new_checkpoint("ernie4_5-tiny", tmp_path / "m", seed=0)
    with running_server(path, max_model_len=64) as (url, engine, tokenizer):
        assert httpx.get(url + "/tokenizer_info").status_code == 404  # off by default, as in vLLM
    with info_server(path, api_key="secret", max_model_len=64) as (url, engine, tokenizer):
        assert httpx.get(url + "/tokenizer_info").status_code == 401
        keyed = httpx.get(url + "/tokenizer_info", headers={"Authorization": "Bearer secret"})
        assert keyed.status_code == 200 and keyed.json()["chat_template"] == tokenizer.chat_template
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["m", "--enable-tokenizer-info-endpoint"]).enable_tokenizer_info_endpoint
    assert not parser.parse_args(["m"]).enable_tokenizer_info_endpoint


def test_lm_eval_through_the_server_equals_lm_eval_on_transformers(served, monkeypatch):
    """The real client: lm-evaluation-harness's `local-completions` (tokenizing through the server's /tokenize,
    /detokenize and /tokenizer_info: tokenizer_backend=remote) on docs/lm_eval's multiple-choice task gives, document
    for document, the loglikelihoods (within 1e-4), greedy flags and accuracies of lm-eval's `hf` model running the
    transformers twin of the served checkpoint."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    root = serve_fixtures.__file__.rpartition("/tests/")[0]
    monkeypatch.chdir(root)  # the task's data_files are relative to the repository root
    s = served("ernie4_5_moe-tiny")
    tasks = TaskManager(include_path=f"{root}/docs/lm_eval", include_defaults=False)
    client = get_model("local-completions").create_from_arg_string(
        f"model=tiny,base_url={s.url}/v1/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1,"
        f"batch_size=8")
    reference = HFLM(pretrained=s.ref, tokenizer=transformers.AutoTokenizer.from_pretrained(s.path), batch_size=8)
    runs = [evaluate(lm, get_task_dict(["moelm_tiny_mc"], tasks), limit=8, log_samples=True)
            for lm in (client, reference)]
    got, want = ([resp[0] for r in run["samples"]["moelm_tiny_mc"] for resp in r["resps"]] for run in runs)
    assert len(got) == len(want) == 32
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in want]), atol=1e-4,
                               rtol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert runs[0]["results"]["moelm_tiny_mc"][metric] == runs[1]["results"]["moelm_tiny_mc"][metric]
