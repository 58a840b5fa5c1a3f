"""vLLM's per-request fields beyond OpenAI's, through real clients on loopback: add_special_tokens (a tokenizer that
adds BOS), a request's chat_template (--trust-request-chat-template) and documents, request_id,
return_tokens_as_token_ids, cache_salt, and /tokenize's chat_template, chat_template_kwargs, tools and
return_token_strs."""
from __future__ import annotations

import pytest
import torch

from serve_fixtures import running_server
from tokenizer_fixtures import ERNIE_TEMPLATE

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
tokenizers = pytest.importorskip("tokenizers")

from moelm.models.scaffold import new_checkpoint  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
QA = ("{%- for m in messages -%}{{- m['role'] + '> ' + m['content'] + '\\n' -}}{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{- 'assistant> ' -}}{%- endif -%}")
RAG = ("{%- for d in documents -%}{{- '[' + d['title'] + '] ' + d['text'] + '\\n' -}}{%- endfor -%}" + QA)
TOOL = {"type": "function", "function": {"name": "clock", "description": "the time",
                                         "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose tokenizer adds BOS (as Phi-3.5's does) and that takes a request's chat_template."""
    path = new_checkpoint("ernie4_5-tiny", tmp_path_factory.mktemp("fields"), seed=0)
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = backend.token_to_id("<s>")
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                      special_tokens=[("<s>", bos)])
    backend.save(str(path / "tokenizer.json"))
    with running_server(path, chat_template=ERNIE_TEMPLATE, max_num_seqs=4, max_model_len=256,
                        max_num_batched_tokens=32, trust_request_chat_template=True) as (url, engine, tokenizer):
        assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
        yield url, engine, tokenizer


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(engine, tokenizer, ids: list[int], n: int) -> str:
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    eos = set(engine.eos)
    return tokenizer.decode([t for t in out if t not in eos][:next((i for i, t in enumerate(out) if t in eos),
                                                                   len(out))], skip_special_tokens=True)


def rendered_ids(tokenizer, template, messages=MESSAGES, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template,
                                         **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def post(url, path, body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_add_special_tokens_as_vllm(server, client):
    """Completions add the tokenizer's BOS by default and not with add_special_tokens false; chat adds none on top
    of the template's by default, BOS with add_special_tokens true; /tokenize the same."""
    url, engine, tokenizer = server
    bos, plain = tokenizer.bos_token_id, tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    for flag, want in ((None, [bos] + plain), (True, [bos] + plain), (False, plain)):
        extra = {} if flag is None else {"add_special_tokens": flag}
        r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=1, temperature=0, echo=True,
                                      logprobs=0, extra_body=extra)
        assert r.usage.prompt_tokens == len(want)
        assert r.choices[0].logprobs.tokens[:len(want)] == [tokenizer.decode([t]) for t in want]
        assert r.choices[0].text.startswith("Hello there") and "<s>" not in r.choices[0].text  # as given (vLLM)
        ids = client.completions.create(model="tiny", prompt=want, max_tokens=1, temperature=0, echo=True)
        assert ids.choices[0].text.startswith(tokenizer.decode(want))  # token ids: decoded
        assert post(url, "/tokenize", {"prompt": "Hello there", **extra}).json()["tokens"] == want
    ids = rendered_ids(tokenizer, ERNIE_TEMPLATE)
    for flag, want in ((None, ids), (False, ids), (True, [bos] + ids)):
        extra = {} if flag is None else {"add_special_tokens": flag}
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                           extra_body=extra)
        assert r.usage.prompt_tokens == len(want)
        assert r.choices[0].message.content == greedy_text(engine, tokenizer, want, 4)
        assert post(url, "/tokenize", {"messages": MESSAGES, **extra}).json()["tokens"] == want


def test_a_requests_chat_template(server, client):
    """The request's template renders the prompt (as apply_chat_template with it), in chat and /tokenize; one that
    does not compile is a 400 naming chat_template."""
    url, engine, tokenizer = server
    ids = rendered_ids(tokenizer, QA)
    assert ids != rendered_ids(tokenizer, ERNIE_TEMPLATE)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                       extra_body={"chat_template": QA})
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == greedy_text(engine, tokenizer, ids, 5)
    assert post(url, "/tokenize", {"messages": MESSAGES, "chat_template": QA}).json()["tokens"] == ids
    for path in ("/v1/chat/completions", "/tokenize"):
        r = post(url, path, {"messages": MESSAGES, "chat_template": "{% for m in messages %}"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "chat_template" and error["code"] == "chat_template_error"
        assert "the request's chat_template does not compile" in error["message"]


def test_documents_reach_the_template(server, client):
    url, engine, tokenizer = server
    documents = [{"title": "moelm", "text": "serves mixtures of experts"}, {"title": "b", "text": "two"}]
    ids = rendered_ids(tokenizer, RAG, documents=documents)
    assert len(ids) > len(rendered_ids(tokenizer, RAG, documents=[]))
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                       extra_body={"chat_template": RAG, "documents": documents})
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == greedy_text(engine, tokenizer, ids, 5)
    r = post(url, "/v1/chat/completions", {"messages": MESSAGES, "documents": documents})  # the server's template
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents", r.text
    assert "does not use documents" in r.json()["error"]["message"]


def test_request_id_names_the_response(server, client):
    url = server[0]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                          extra_body={"request_id": "abc-1"})
    assert chat.id == "chatcmpl-abc-1"
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True,
                                            extra_body={"request_id": "xyz"}))
    assert chunks and {c.id for c in chunks} == {"cmpl-xyz"}
    assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).json()["id"].startswith("cmpl-")


def test_return_tokens_as_token_ids(server, client):
    body = dict(model="tiny", max_tokens=4, temperature=0)
    plain = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **body)
    ids = client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **body,
                                         extra_body={"return_tokens_as_token_ids": True})
    tokenizer = server[2]
    for a, b in zip(plain.choices[0].logprobs.content, ids.choices[0].logprobs.content, strict=True):
        token = int(b.token.removeprefix("token_id:"))
        assert b.token == f"token_id:{token}" and b.bytes == list(b.token.encode())
        assert a.token == tokenizer.decode([token]) and a.logprob == b.logprob
        assert [t.token for t in b.top_logprobs] == [f"token_id:{int(t.token[9:])}" for t in b.top_logprobs]
    done = client.completions.create(prompt="Hello", echo=True, logprobs=1, **body,
                                     extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert all(t.startswith("token_id:") for t in done.tokens)
    assert done.text_offset == [sum(len(t) for t in done.tokens[:i]) for i in range(len(done.tokens))]


def test_return_token_ids(server, client):
    """The prompt's ids (chat: the response's, first chunk streamed; completions: each choice's) and each choice's
    generated ids (streamed: each chunk's), EOS included as usage counts it."""
    url, engine, tokenizer = server
    body = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    r = client.chat.completions.create(messages=MESSAGES, **body)
    ids = r.choices[0].token_ids
    assert r.prompt_token_ids == rendered_ids(tokenizer, ERNIE_TEMPLATE) and len(ids) == r.usage.completion_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **body))
    assert chunks[0].prompt_token_ids == r.prompt_token_ids
    assert not any(getattr(c, "prompt_token_ids", None) for c in chunks[1:])
    assert sum((c.choices[0].token_ids for c in chunks[1:]), []) == ids
    prompts = ["Hello there", "Bye"]
    done = client.completions.create(prompt=prompts, n=2, **body)
    assert [c.prompt_token_ids for c in done.choices] == [tokenizer(p)["input_ids"] for p in prompts for _ in "ab"]
    assert sum(len(c.token_ids) for c in done.choices) == done.usage.completion_tokens
    chunks = list(client.completions.create(prompt=prompts[0], stream=True, **body))
    assert chunks[0].choices[0].prompt_token_ids == done.choices[0].prompt_token_ids
    assert sum((c.choices[0].token_ids for c in chunks), []) == done.choices[0].token_ids


def test_cache_salt_keeps_prefixes_apart(server, client):
    """Blocks of a salted prompt are reused by the same salt only (not by another, nor by unsalted requests)."""
    history = [{"role": "user", "content": "A long question about salts and caches, " * 6}]

    def cached(salt):
        extra = {} if salt is None else {"cache_salt": salt}
        r = client.chat.completions.create(model="tiny", messages=history, max_tokens=1, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("one") == 0
    assert cached("one") > 0
    assert cached("two") == 0 and cached(None) == 0
    assert cached(None) > 0 and cached("two") > 0


def test_tokenize_takes_vllms_chat_fields(server, client):
    """/tokenize's chat_template_kwargs and tools render as chat does; return_token_strs gives the pieces; fields of
    messages with a prompt are refused."""
    url, engine, tokenizer = server
    kwargs_template = "{{- greeting -}}" + QA
    got = post(url, "/tokenize", {"messages": MESSAGES, "chat_template": kwargs_template,
                                  "chat_template_kwargs": {"greeting": "Howdy. "}}).json()
    assert got["tokens"] == rendered_ids(tokenizer, kwargs_template, greeting="Howdy. ")
    tools = post(url, "/tokenize", {"messages": MESSAGES, "tools": [TOOL]}).json()
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, tools=[TOOL])
    assert tools["count"] == chat.usage.prompt_tokens > post(url, "/tokenize", {"messages": MESSAGES}).json()["count"]
    strs = post(url, "/tokenize", {"prompt": "Hello there", "return_token_strs": True}).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])
    r = post(url, "/tokenize", {"prompt": "Hello", "chat_template": QA})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
