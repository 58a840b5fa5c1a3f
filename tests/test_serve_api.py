"""`moelm serve` through real clients on loopback: the official `openai` package (chat and completions, streaming
and not), raw HTTP for what the client hides, concurrency, cancellation and bad input."""
from __future__ import annotations

import concurrent.futures
import json
import re
import time

import pytest
import torch

from serve_fixtures import running_server
from tokenizer_fixtures import ERNIE_TEMPLATE

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moelm.models.scaffold import new_checkpoint  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("serve"), seed=0)
    with running_server(path, names=["tiny", "alias"], chat_template=ERNIE_TEMPLATE, max_num_seqs=4, max_model_len=256,
                        max_num_batched_tokens=16, max_waiting=64) as (url, engine, tokenizer):
        yield url, engine, tokenizer


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(engine, tokenizer, ids: list[int], n: int) -> tuple[list[int], str]:
    """`generate` for the same prompt, greedy: the tokens and their text."""
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    eos = set(engine.eos)
    if any(t in eos for t in out):
        out = out[:next(i for i, t in enumerate(out) if t in eos) + 1]
    return out, tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         chat_template=ERNIE_TEMPLATE)  # the server's --chat-template
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# ---------------------------------------------------------------- the openai client

def test_chat_greedy_equals_generate(server, client):
    url, engine, tokenizer = server
    want_tokens, want_text = greedy(engine, tokenizer, chat_ids(tokenizer, MESSAGES), 12)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want_text
    assert r.choices[0].finish_reason == ("length" if len(want_tokens) == 12 else "stop")
    assert r.usage.prompt_tokens == len(chat_ids(tokenizer, MESSAGES))
    assert r.usage.completion_tokens == len(want_tokens) and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_stream_with_usage(server, client):
    url, engine, tokenizer = server
    _, want_text = greedy(engine, tokenizer, chat_ids(tokenizer, MESSAGES), 10)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                                stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_completions_greedy_stream_and_not(server, client):
    url, engine, tokenizer = server
    ids = tokenizer("The quick brown fox")["input_ids"]
    want_tokens, want_text = greedy(engine, tokenizer, ids, 16)
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want_text
    assert r.usage.completion_tokens == len(want_tokens)
    chunks = list(client.completions.create(model="alias", prompt="The quick brown fox", max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want_text and chunks[0].model == "alias"
    assert [c.choices[0].finish_reason for c in chunks].count(None) == len(chunks) - 1
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == want_text
    default = client.completions.create(model="tiny", prompt="Hi", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # completions default max_tokens


def test_n_seed_and_several_prompts(server, client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=42, n=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens == sum(1 for _ in range(3)) * 0 + a.usage.completion_tokens  # counted
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.message.content for c in a.choices]
    assert sum(1 for c in streamed if c.choices and c.choices[0].finish_reason) == 3
    many = client.completions.create(model="tiny", prompt=["Hello", "The quick"], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text and many.choices[2].text == many.choices[3].text


def test_stop_strings(server, client):
    full = client.completions.create(model="tiny", prompt="Hello world", max_tokens=24, temperature=1.0, seed=3,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    kwargs = dict(model="tiny", prompt="Hello world", max_tokens=24, temperature=1.0, seed=3, stop=[stop, "never"],
                  extra_body={"ignore_eos": True})
    cut = client.completions.create(**kwargs).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_in_the_held_back_text_is_a_stop(server):
    url, engine, tokenizer = server
    lead = tokenizer.convert_tokens_to_ids("\u00e4")  # byte 0xE4 alone: half a character, held until the end
    body = {"prompt": "Hello", "max_tokens": 1, "temperature": 0, "logit_bias": {str(lead): 100}, "stop": ["\ufffd"]}
    for stream in (False, True):
        r = httpx.post(url + "/v1/completions", json={**body, "stream": stream}, timeout=60)
        chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")] if stream else [r.json()]
        assert "".join(c["choices"][0]["text"] for c in chunks) == ""
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_shapes(server, client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content])


def test_models_health_tokenize(server, client):
    url, engine, tokenizer = server
    assert [m.id for m in client.models.list().data] == ["tiny", "alias"]
    assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/health").status_code == 200
    ids = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["tokens"] == tokenizer("Hello world")["input_ids"] and ids["count"] == len(ids["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == \
        tokenizer.decode(ids["tokens"])
    r = httpx.post(url + "/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})  # no /v1, no model
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert "/v1/chat/completions" in httpx.get(url + "/openapi.json").json()["paths"]


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


# ---------------------------------------------------------------- many clients

def test_eight_concurrent_streams_equal_one_at_a_time(server):
    url, engine, tokenizer = server
    prompts = [f"Prompt number {i}: " + "the quick brown fox " * (i % 3) for i in range(8)]

    def ask(prompt: str) -> str:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chunks = c.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        return "".join(ch.choices[0].text for ch in chunks)

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert all(greedy(engine, tokenizer, tokenizer(p)["input_ids"], 20)[1] == a for p, a in zip(prompts, alone))


def test_clients_that_time_out_free_their_slots(server):
    url, engine, tokenizer = server

    def impatient(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=0.2)
        try:
            if i % 2:
                list(c.completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True,
                                          extra_body={"ignore_eos": True}))
            else:
                c.completions.create(model="tiny", prompt="Hello", max_tokens=200, extra_body={"ignore_eos": True})
        except (openai.APITimeoutError, openai.APIConnectionError, httpx.ReadTimeout):
            return "timeout"
        return "done"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(impatient, range(50)))
    assert results.count("timeout") > 25
    start = time.time()
    r = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20).completions.create(
        model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text is not None and time.time() - start < 10
    deadline = time.time() + 10
    while metric(url, "moelm:num_requests_running") or metric(url, "moelm:num_requests_waiting"):
        assert time.time() < deadline, "slots still in use after the clients left"
        time.sleep(0.1)
    assert metric(url, "moelm:kv_cache_usage_perc") == 0 and engine.free_rows and len(engine.free_rows) == 4
    assert metric(url, 'moelm:request_success_total') >= 0
    assert 'finished_reason="abort"' in httpx.get(url + "/metrics").text


def test_metrics_count_tokens(server, client):
    url = server[0]
    before = metric(url, "moelm:generation_tokens_total"), metric(url, "moelm:prompt_tokens_total")
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = metric(url, "moelm:generation_tokens_total"), metric(url, "moelm:prompt_tokens_total")
    assert after[0] - before[0] == 5 and after[1] - before[1] == r.usage.prompt_tokens
    text = httpx.get(url + "/metrics").text
    for name in ("moelm:time_to_first_token_seconds_bucket", "moelm:inter_token_latency_seconds_bucket",
                 "moelm:e2e_request_latency_seconds_bucket", "moelm:num_requests_waiting"):
        assert name in text


def test_a_conversation_resent_reuses_its_prefix(server, client):
    """A chat client re-sends the conversation each turn: the second turn's prompt tokens up to the last whole
    block of the first turn's come from the prefix cache (usage.prompt_tokens_details.cached_tokens, vLLM's
    prefix_cache_queries/hits), and the answer is the one a cold engine gives."""
    url, engine, _ = server
    history = [{"role": "user", "content": "Tell me about mixture-of-experts models, " * 6}]
    first = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And how are they served?"}]
    before = metric(url, "moelm:prefix_cache_hits_total"), metric(url, "moelm:prefix_cache_queries_total")
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    size = engine.cache.block_size
    assert first.usage.prompt_tokens // size * size - size <= cached < second.usage.prompt_tokens
    assert cached > 0 and cached % size == 0
    after = metric(url, "moelm:prefix_cache_hits_total"), metric(url, "moelm:prefix_cache_queries_total")
    assert after[0] - before[0] == cached and after[1] - before[1] == second.usage.prompt_tokens
    engine.cache.pool.__init__(engine.cache.num_blocks)  # forget every prefix (no row holds a block now)
    cold = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == second.choices[0].message.content


# ---------------------------------------------------------------- bad input

BAD = [
    ("/v1/chat/completions", b"{not json", "not valid JSON", None),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, "temperature", "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 3}, "temperature", "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, "n", "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, "top_p", "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 1.5}, "top_p must be in (0, 1]", "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature must be >= 0", "temperature"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, "min_p must be in [0, 1]", "min_p"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty must be > 0",
     "repetition_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs",
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 5}, "presence_penalty", "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "role", "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"999999": 1}},
     "token id 999999 is outside the vocabulary (size 512)", "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias", "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"5": 500}}, "logit_bias", "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 250},
     "the prompt is 25 tokens and max_tokens is 250: 275 is more than the model's context of 256", "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", "tools"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": [""]}, "stop", "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only",
     "messages"),
    ("/v1/completions", {"prompt": ""}, "empty", "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, "token id 99999 is outside the vocabulary (size 512)", "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 300},
     "the prompt is 1 tokens and max_tokens is 300: 301 is more than the model's context of 256", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 30}, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix", "suffix"),
    ("/v1/completions", {"max_tokens": 3}, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids", "stop_token_ids"),
    # text that is not Unicode (JSON's lone surrogate escapes)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "lone surrogate U+D800",
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udcff"}], "stream": True}, "lone surrogate",
     "messages"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "lone surrogate U+D800", "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "lone surrogate", "stop"),
    ("/tokenize", {"prompt": "\ud800"}, "lone surrogate", "prompt"),
    # fields of vLLM and OpenAI that moelm does not run, at a value that would change the output
    ("/v1/chat/completions", {"messages": MESSAGES, "allowed_token_ids": [1, 2]},
     "allowed_token_ids is not supported by moelm serve (only null)", "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["x"]}, "bad_words is not supported", "bad_words"),
    ("/v1/chat/completions", {"messages": MESSAGES, "use_beam_search": True}, "use_beam_search", "use_beam_search"),
    ("/v1/completions", {"prompt": "hi", "length_penalty": 0.5}, "(only null or 1)", "length_penalty"),
    ("/v1/completions", {"prompt": "hi", "include_stop_str_in_output": True}, "include_stop_str_in_output",
     "include_stop_str_in_output"),
    ("/v1/chat/completions", {"messages": MESSAGES, "truncate_prompt_tokens": 4}, "truncate_prompt_tokens",
     "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "echo": True}, "echo is not supported", "echo"),
    ("/v1/chat/completions", {"messages": MESSAGES, "reasoning_effort": "low"}, "reasoning_effort", "reasoning_effort"),
    ("/v1/chat/completions", {"messages": MESSAGES, "modalities": ["text", "audio"]}, 'only null or ["text"]',
     "modalities"),
    ("/v1/chat/completions", {"messages": MESSAGES, "continue_final_message": True},
     "continue_final_message needs add_generation_prompt: false", "continue_final_message"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "needs add_generation_prompt: false",
     "continue_final_message"),
    # more of vLLM's (and OpenAI's) that moelm does not run
    ("/v1/completions", {"prompt": "hi", "spaces_between_special_tokens": False}, "(only null or true)",
     "spaces_between_special_tokens"),
    ("/v1/completions", {"prompt": "hi", "priority": 1}, "priority is not supported", "priority"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprob_token_ids": [1]}, "logprob_token_ids",
     "logprob_token_ids"),
    ("/v1/completions", {"prompt": "hi", "watermarking": True}, "watermarking", "watermarking"),
    ("/v1/completions", {"prompt": "hi", "kv_transfer_params": {"do_remote_decode": True}}, "kv_transfer_params",
     "kv_transfer_params"),
    ("/v1/chat/completions", {"messages": MESSAGES, "vllm_xargs": {"a": 1}}, "vllm_xargs", "vllm_xargs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "repetition_detection": {"max_pattern_size": 4}},
     "repetition_detection", "repetition_detection"),
    ("/v1/completions", {"prompt": "hi", "thinking_token_budget": 8}, "(only null or -1)", "thinking_token_budget"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_interval": 4}, "stream_interval", "stream_interval"),
    ("/v1/completions", {"prompt": "hi", "truncation_side": "middle"}, "truncation_side", "truncation_side"),
    ("/v1/completions", {"prompt": "hi", "logits_processors": ["x.y"]}, "logits_processors", "logits_processors"),
    ("/v1/completions", {"prompt": "hi", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern",
     "guided_whitespace_pattern"),
    ("/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds", "prompt_embeds"),
    ("/v1/chat/completions", {"messages": MESSAGES, "mm_processor_kwargs": {"num_crops": 4}}, "mm_processor_kwargs",
     "mm_processor_kwargs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "include_reasoning": False}, "include_reasoning",
     "include_reasoning"),
    ("/v1/chat/completions", {"messages": MESSAGES, "return_prompt_text": True}, "return_prompt_text",
     "return_prompt_text"),
    ("/v1/chat/completions", {"messages": MESSAGES, "store": True}, "store is not supported", "store"),
    ("/v1/chat/completions", {"messages": MESSAGES, "service_tier": "flex"}, 'only null or "auto" or "default"',
     "service_tier"),
    ("/v1/chat/completions", {"messages": MESSAGES, "verbosity": "low"}, "verbosity", "verbosity"),
    ("/v1/chat/completions", {"messages": MESSAGES, "web_search_options": {}}, "web_search_options",
     "web_search_options"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_cache_retention": "24h"}, "prompt_cache_retention",
     "prompt_cache_retention"),
    ("/tokenize", {"messages": MESSAGES, "mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs",
     "mm_processor_kwargs"),
    # a request's chat template needs --trust-request-chat-template, documents a template that uses them
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template": "{{ messages }}"},
     "--trust-request-chat-template", "chat_template"),
    ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ messages }}"}, "--trust-request-chat-template",
     "chat_template"),
    ("/v1/chat/completions", {"messages": MESSAGES, "documents": [{"title": "a", "text": "b"}]},
     "the chat template does not use documents", "documents"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": ""}, "cache_salt", "cache_salt"),
]


@pytest.mark.parametrize("path,body,message,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_400_with_openai_error_json(server, path, body, message, param):
    url = server[0]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]
    assert error["param"] == param
    assert httpx.get(url + "/health").status_code == 200


def test_idle_fields_that_change_nothing_are_accepted(server):
    url = server[0]
    same = dict(allowed_token_ids=None, bad_words=[], use_beam_search=False, length_penalty=1.0,
                include_stop_str_in_output=False, truncate_prompt_tokens=None, truncation_side="left",
                spaces_between_special_tokens=True, logprob_token_ids=None, watermarking=False, priority=0,
                routed_experts_prompt_start=0, return_token_offsets=False, return_mm_kwargs=True,
                kv_transfer_params={}, ec_transfer_params=None, vllm_xargs={}, repetition_detection=None,
                thinking_token_budget=-1, stream_interval=1, return_token_ids=False, session_id="s", user="u",
                return_tokens_as_token_ids=False, logits_processors=[], guided_whitespace_pattern=None)
    for path, body, extra in (
            ("/v1/chat/completions", {"messages": MESSAGES}, dict(
                echo=False, reasoning_effort=None, modalities=["text"], store=False, service_tier="auto",
                prompt_cache_retention="in_memory", verbosity=None, web_search_options=None, moderation=None,
                prompt_cache_options=None, include_reasoning=True, media_io_kwargs={}, mm_processor_kwargs={},
                return_prompt_text=False, metadata={"k": "v"}, safety_identifier="x", prompt_cache_key="k",
                add_special_tokens=False, chat_template=None, documents=None)),
            ("/v1/completions", {"prompt": "Hello there"}, dict(prompt_embeds=None, add_special_tokens=True))):
        body = dict(body, max_tokens=6, temperature=0)
        plain, given = (httpx.post(url + path, json=b) for b in (body, {**body, **same, **extra}))
        assert plain.status_code == given.status_code == 200, given.text
        assert plain.json()["choices"] == given.json()["choices"]


def test_continue_final_message_as_vllm(server, client):
    """The last message left open (the template's render with continue_final_message), continued, not answered."""
    url, engine, tokenizer = server
    partial = MESSAGES + [{"role": "assistant", "content": "Hello, I"}]
    text = tokenizer.apply_chat_template(partial, continue_final_message=True, tokenize=False,
                                         chat_template=ERNIE_TEMPLATE)
    assert text.endswith("Assistant: Hello, I")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _, want = greedy(engine, tokenizer, ids, 6)
    r = client.chat.completions.create(model="tiny", messages=partial, max_tokens=6, temperature=0,
                                       extra_body=dict(continue_final_message=True, add_generation_prompt=False))
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == want
    got = httpx.post(url + "/tokenize", json={"messages": partial, "continue_final_message": True,
                                              "add_generation_prompt": False}).json()
    assert got["tokens"] == ids


def test_bad_input_through_the_client_is_not_retried(server, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)


def test_api_key(tmp_path):
    path = new_checkpoint("ernie4_5-tiny", tmp_path / "m", seed=0)
    with running_server(path, api_key="secret", max_model_len=64) as (url, engine, tokenizer):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        bad_json = httpx.post(url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
        assert bad_json.status_code == 401  # the key is checked before the body is read
        assert httpx.get(url + "/health").status_code == 200  # public, as the load balancers need
        good = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
