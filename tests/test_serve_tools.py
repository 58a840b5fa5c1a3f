"""Tool calling: the ernie45 block format parsed from whole and streamed outputs, the fallback rendering for templates
without tool syntax (ERNIE's and Phi-3.5's) and a template's own, and through the `openai` client: tool_choice
required / a named function (always a call whose arguments validate), auto, none, streamed tool-call deltas, tool
results sent back, and the errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

pytest.importorskip("llguidance")
pytest.importorskip("openai")

from openai import BadRequestError, OpenAI  # noqa: E402

from moelm import AutoTokenizer  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402
from moelm.serve import tools  # noqa: E402
from moelm.serve.protocol import ChatRequest  # noqa: E402
from moelm.serve.routes import render_chat  # noqa: E402
from serve_fixtures import running_server  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_blocks_are_parsed_from_whole_and_streamed_text():
    text = ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>'
            '<tool_call>{not json}</tool_call>')
    content, calls = tools.parse(text)
    assert content == "Let me look.\n\n<tool_call>{not json}</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "c"})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert tools.parse("no calls <tool_call> here") == ("no calls <tool_call> here", [])
    for size in (1, 3, 7, 50):  # any split into pieces: the same content and calls
        stream, sent, got = tools.Stream(), "", []
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            out, done = stream.feed(piece, final=i == len(pieces) - 1)
            assert "<tool_c" not in out or "{not json}" in out
            sent += out
            got += done
        assert [c["function"] for c in got] == [c["function"] for c in calls]
        assert sent.replace("\n", "") == content.replace("\n", "")


def test_fallback_and_native_rendering(tmp_path):
    """ERNIE's template (no tool syntax): the tools in the system message, calls as blocks, results as user turns;
    a template that uses `tools` gets them itself."""
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    functions, _ = tools.check(TOOLS, "auto")
    conversation = ChatRequest(messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}])
    state = SimpleNamespace(tokenizer=tokenizer, chat_template=None)
    text = tokenizer.decode(render_chat(state, conversation, TOOLS, functions))
    assert "You can call these tools:" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert "User: <tool_response>\n3\n</tool_response>" in text and text.endswith("Assistant: ")
    native = SimpleNamespace(tokenizer=tokenizer, chat_template=(
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% for c in m.tool_calls or [] %} CALL "
        "{{ c.function.name }}{% endfor %}\n{% endfor %}"))
    text = tokenizer.decode(render_chat(native, conversation, TOOLS, functions))
    assert text.startswith("TOOL get_weather;TOOL add;[user]") and "CALL add" in text and "[tool] 3" in text
    assert "You can call these tools" not in text


@pytest.fixture(scope="module", params=["ernie4_5_moe-tiny", "phimoe-tiny"])
def server(request, tmp_path_factory):
    path = new_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    with running_server(path, max_model_len=2048) as (url, engine, tokenizer):
        yield OpenAI(base_url=url + "/v1", api_key="unused")


def check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_choices_always_call(server):
    """A random model, greedy or sampled: tool_choice required (one call, parallel_tool_calls false) or a named
    function gives calls whose arguments validate, finish_reason tool_calls."""
    for seed in (None, 0, 1):
        extra = {} if seed is None else {"seed": seed, "temperature": 1.0}
        r = server.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=150, **{"temperature": 0, **extra})
        assert r.choices[0].finish_reason == "tool_calls", r
        check_calls(r.choices[0].message.tool_calls, SCHEMAS)
        r = server.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=150,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           **{"temperature": 0, **extra})
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
        check_calls(r.choices[0].message.tool_calls, ["add"])


def test_streamed_calls_equal_the_whole_answer(server):
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=150, temperature=0)
    whole = server.chat.completions.create(**kwargs).choices[0].message.tool_calls
    deltas, finish = [], None
    for chunk in server.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [d.index for d in deltas] == list(range(len(whole)))
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_auto_none_and_results_back(server):
    """auto on a random model: whatever it writes is content or valid calls; none: plain text, tools not
    rendered (a shorter prompt); a conversation with a call and its result renders and answers."""
    auto = server.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0)
    message = auto.choices[0].message
    assert message.content is not None or message.tool_calls
    none = server.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=5, temperature=0)
    plain = server.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    back = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}]
    r = server.chat.completions.create(model="tiny", messages=back, tools=TOOLS, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens > auto.usage.prompt_tokens


def test_tool_errors_are_400(server):
    for kwargs, param, message in [
        (dict(tools=[{"type": "function", "function": {}}]), "tools", "tools[0] must be"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
         "'nope', which is not in tools"),
        (dict(tool_choice="required"), "tool_choice", "needs tools"),
        (dict(tools=TOOLS, tool_choice="always"), "tool_choice", "tool_choice must be"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
         "cannot be combined"),
        (dict(functions=[{"name": "f"}]), "functions", "use tools"),
    ]:
        with pytest.raises(BadRequestError) as info:
            server.chat.completions.create(model="tiny", messages=ASK, max_tokens=5, **kwargs)
        error = info.value.body
        assert error["param"] == param and message in error["message"], (kwargs, error)
