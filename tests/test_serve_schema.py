"""The published /openapi.json describes `moelm serve` as it answers: a bounded schemathesis run over the live
server with every check (positive_data_acceptance as tests/schema_checks.py extends it), then issue 26's findings
one by one: statuses and content types per operation, 405's Allow, /health's body, strict types, the limits (empty
prompt, no messages, token ids outside the vocabulary), the refusals the schema cannot state, and the metrics of a
refused multi-prompt request."""
from __future__ import annotations

import json
import re

import pytest

import serve_fixtures
from serve_fixtures import running_server
from tokenizer_fixtures import ERNIE_TEMPLATE

httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

import schema_checks  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402
from moelm.serve import routes  # noqa: E402
from moelm.serve.app import PUBLIC, create_app  # noqa: E402
from moelm.serve.errors import REFUSALS  # noqa: E402

CONTEXT, QUEUE = 32, 8  # small: the generated requests stay fast


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, engine, tokenizer, app): the app with every route, those a flag of moelm serve adds too."""
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("schema"), seed=0)
    apps = []

    def every_route(*args, **kwargs):
        app = create_app(*args, **kwargs)
        app.add_api_route("/tokenizer_info", routes.tokenizer_info, methods=["GET"])  # as server.py does
        apps.append(app)
        return app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_fixtures, "create_app", every_route)
        with running_server(path, chat_template=ERNIE_TEMPLATE, max_num_seqs=4, max_model_len=CONTEXT,
                            max_num_batched_tokens=16, max_waiting=QUEUE) as (url, engine, tokenizer):
            yield url, engine, tokenizer, apps[0]


@pytest.fixture(scope="module")
def doc(server):
    return httpx.get(server[0] + "/openapi.json").json()


@pytest.fixture(scope="module")
def api(server):
    schema = schemathesis.openapi.from_url(server[0] + "/openapi.json")
    schema.config.generation.update(allow_x00=False)
    schema.config.seed = 26  # the same cases each run (a run by hand explores others: docs/serving.md)
    return schema


fuzz = schemathesis.pytest.from_fixture("api")


@fuzz.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_schemathesis_finds_nothing(case):
    """Every check: no 5xx, statuses, content types, headers and bodies as declared, schema-invalid requests
    refused, schema-valid ones accepted (or refused for a declared reason), 405 with Allow for other methods."""
    case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=60)


def test_the_declared_refusal_check_is_the_one_that_runs():
    from schemathesis.checks import CHECKS

    assert schema_checks.positive_data_acceptance_or_declared_refusal in CHECKS.get_all()


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def valid(doc, name: str, body) -> bool:
    """Whether `body` is valid against the published schema of component `name`."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


# ---------------------------------------------------------------- what each operation declares

def test_every_route_is_declared_with_its_statuses_and_content_types(server, doc):
    app = server[3]
    routed = {(r.path, m.lower()) for r in app.routes if getattr(r, "include_in_schema", False) and
              hasattr(r, "methods") for m in r.methods}
    declared = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routed == declared and {("/v1/completions", "post"), ("/tokenizer_info", "get")} <= declared
    for path, method in declared:
        op = doc["paths"][path][method]
        responses = op["responses"]
        assert "422" not in responses  # validation errors are 400s
        assert "500" in responses and "200" in responses
        for status, response in responses.items():
            if status >= "400":
                assert response["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        body = "requestBody" in op
        assert ("400" in responses) == body
        if body:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
            props = doc["components"]["schemas"][ref]["properties"]
            assert ("404" in responses) == ("model" in props)
            streams = "stream" in props
            assert ("text/event-stream" in responses["200"]["content"]) == streams
            assert ("503" in responses) == streams
            assert set(responses["400"].get("x-refusals", [])) <= set(REFUSALS)
        if "503" in responses:
            assert "Retry-After" in responses["503"]["headers"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "security" not in json.dumps(doc)  # no API key: no 401, no scheme


def test_an_api_key_is_declared_where_it_is_asked_for(server):
    url, engine, tokenizer, _ = server
    doc = create_app(engine, tokenizer, ["tiny"], api_key="k").openapi()
    assert doc["components"]["securitySchemes"] == {"key": {"type": "http", "scheme": "bearer"}}
    for path, item in doc["paths"].items():
        for op in item.values():
            asked = path not in PUBLIC
            assert ("401" in op["responses"]) == asked and ("security" in op) == asked, path


def test_a_405_names_the_allowed_methods(server):
    url = server[0]
    for method, path, allowed in (("PUT", "/health", "GET"), ("DELETE", "/v1/completions", "POST"),
                                  ("GET", "/tokenize", "POST")):
        r = httpx.request(method, url + path)
        assert r.status_code == 405 and r.headers["allow"] == allowed
        assert error_of(r)["type"] == "invalid_request_error"


def test_health_answers_as_declared(server, doc, monkeypatch):
    url, engine = server[:2]
    declared = doc["paths"]["/health"]["get"]["responses"]
    assert "content" not in declared["200"]  # an empty 200, as vLLM's
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.content == b"" and "content-type" not in r.headers
    monkeypatch.setattr(engine, "alive", lambda: False)
    r = httpx.get(url + "/health")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "503" in declared
    assert error_of(r)["type"] == "internal_error"


# ---------------------------------------------------------------- types and limits, in the schema and enforced

def test_booleans_and_strings_are_no_numbers(server, doc):
    url = server[0]
    for path, name, body, param in (
            ("/detokenize", "DetokenizeRequest", {"tokens": [False]}, "tokens"),
            ("/detokenize", "DetokenizeRequest", {"tokens": ["5"]}, "tokens"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "max_tokens": "2"}, "max_tokens"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "stream": 1}, "stream"),
            ("/v1/completions", "CompletionRequest", {"prompt": [True]}, "prompt")):
        assert not valid(doc, name, body)
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400, body
        assert error_of(r)["param"] == param and param in error_of(r)["message"]
    for body in ({"tokens": [5.0]}, {"tokens": [1e2]}):  # JSON Schema's integers
        assert valid(doc, "DetokenizeRequest", body)
        assert httpx.post(url + "/detokenize", json=body).status_code == 200


def test_empty_prompts_and_no_messages_are_refused_and_declared(server, doc):
    url = server[0]
    for path, name, body, param in (
            ("/v1/completions", "CompletionRequest", {"prompt": ""}, "prompt"),
            ("/v1/completions", "CompletionRequest", {"prompt": []}, "prompt"),
            ("/v1/completions", "CompletionRequest", {"prompt": ["hi", ""]}, "prompt"),
            ("/v1/completions", "CompletionRequest", {"prompt": [[5], []]}, "prompt"),
            ("/v1/chat/completions", "ChatRequest", {"messages": []}, "messages"),
            ("/tokenize", "TokenizeRequest", {}, "prompt"),
            ("/tokenize", "TokenizeRequest", {"messages": []}, "messages"),
            ("/tokenize", "TokenizeRequest", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
             "prompt")):
        assert not valid(doc, name, body), body
        r = httpx.post(url + path, json={**body, "max_tokens": 1})
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text
    assert valid(doc, "CompletionRequest", {"prompt": "h"}) and valid(doc, "TokenizeRequest", {"prompt": ""})


def test_token_ids_are_bounded_by_the_vocabulary(server, doc):
    url, engine = server[:2]
    vocab = engine.vocab_size
    schemas = doc["components"]["schemas"]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] == {"type": "integer", "minimum": 0,
                                                                             "maximum": vocab - 1}
    for path, name, body, param in (
            ("/detokenize", "DetokenizeRequest", {"tokens": [vocab]}, "tokens"),
            ("/detokenize", "DetokenizeRequest", {"tokens": [-1]}, "tokens"),
            ("/v1/completions", "CompletionRequest", {"prompt": [1, vocab]}, "prompt"),
            ("/v1/completions", "CompletionRequest", {"prompt": [[1], [vocab]]}, "prompt"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "stop_token_ids": [vocab]}, "stop_token_ids"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "logit_bias": {str(vocab): 1}}, "logit_bias"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "n": QUEUE + 1}, "n"),
            ("/v1/completions", "CompletionRequest", {"prompt": "hi", "model": "gpt-4"}, "model")):
        assert not valid(doc, name, body), body
        r = httpx.post(url + path, json={"max_tokens": 1, **body})
        assert r.status_code == (404 if param == "model" else 400) and error_of(r)["param"] == param, r.text
    for path, name, body in (
            ("/detokenize", "DetokenizeRequest", {"tokens": [0, vocab - 1]}),
            ("/v1/completions", "CompletionRequest", {"prompt": [1, vocab - 1], "max_tokens": 1,
                                                      "stop_token_ids": [vocab - 1], "n": QUEUE,
                                                      "logit_bias": {str(vocab - 1): 1, "007": -1}}),
            ("/v1/completions", "CompletionRequest", {"prompt": [5], "max_tokens": CONTEXT - 1, "temperature": 0})):
        assert valid(doc, name, body), body
        assert httpx.post(url + path, json=body).status_code == 200


def test_the_vocabulary_pattern_is_exact():
    from moelm.serve.openapi import below

    for n in (1, 2, 10, 11, 100, 101, 512, 1000, 1001, 100352, 151936):
        pattern = re.compile(below(n))
        assert all(pattern.search(str(i)) for i in range(min(n, 2000)))
        assert all(pattern.search(str(i)) for i in range(n - 50, n) if i >= 0)
        assert not any(pattern.search(str(i)) for i in range(n, n + 1000))
        assert pattern.search("0" + str(n - 1)) and not pattern.search("-1") and not pattern.search("")


# ---------------------------------------------------------------- refusals the schema cannot state

def test_schema_valid_refusals_carry_a_declared_code(server, doc):
    url = server[0]
    cases = [
        ("/v1/completions", "CompletionRequest", {"prompt": [5] * 20, "max_tokens": CONTEXT - 1},
         "context_length_exceeded"),
        ("/v1/completions", "CompletionRequest", {"prompt": [[5], [6]], "n": QUEUE // 2 + 1, "max_tokens": 1},
         "too_many_choices"),
        ("/v1/completions", "CompletionRequest", {"prompt": "hi", "best_of": 2}, "conflicting_fields"),
        ("/v1/completions", "CompletionRequest", {"prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]},
         "conflicting_fields"),
        ("/v1/completions", "CompletionRequest", {"prompt": "hi", "guided_regex": "("}, "invalid_structured_output"),
        ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "wizard", "content": "hi"}]},
         "chat_template_error"),
        ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "user", "content": "hi"}],
                                                 "top_logprobs": 2}, "conflicting_fields"),
        ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {
            "type": "function", "function": {"name": "f"}}}, "conflicting_fields"),
        ("/tokenize", "TokenizeRequest", {"messages": [{"role": "user"}]}, "chat_template_error"),
    ]
    for path, name, body, code in cases:
        assert valid(doc, name, body), body
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400 and error_of(r)["code"] == code, r.text
        op = doc["paths"][path]["post"]
        assert code in op["responses"]["400"]["x-refusals"] and code in op["description"]


def test_fuzzing_finds_fixed(server):
    """500s the schemathesis runs found: vLLM's json_object flag, scores that overflow, a GBNF comment alone."""
    url = server[0]
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                  "structured_outputs": {"json_object": True}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].lstrip().startswith("{")
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "repetition_penalty": 5e-324})
    assert r.status_code == 400 and error_of(r)["param"] == "repetition_penalty"
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "guided_grammar": "#'"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_structured_output"
    tiny = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 5e-324})
    greedy = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def success(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^moelm:request_success_total\{[^}]*finished_reason="(\w+)"[^}]*\} (\S+)$', text, re.M)}


def test_a_refused_multi_prompt_request_runs_nothing(server):
    """Every prompt is checked before any is submitted: the first prompt of a request refused for its second is
    never run, so it is not counted as an abort (a refused request counts nowhere, as a refused single prompt)."""
    url = server[0]
    before = success(url)
    for body in ({"prompt": [[5, 6], [5] * CONTEXT], "max_tokens": 1},  # the second fills the context
                 {"prompt": [[5], [6]], "n": QUEUE, "max_tokens": 1},  # 16 sequences: more than the queue holds
                 {"prompt": [[5], [6]], "max_tokens": 1, "stop_token_ids": [0, 10**6]}):
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 400, r.text
    r = httpx.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    after = success(url)  # the engine finished the request above after any cancel sent before it
    assert after.get("abort", 0) == before.get("abort", 0)
    assert sum(after.values()) - sum(before.values()) == 1 and after["length"] - before.get("length", 0) == 1
