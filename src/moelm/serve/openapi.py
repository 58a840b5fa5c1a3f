"""The published schema (/openapi.json) made to describe the server: FastAPI's own, then for every operation the
statuses it answers, each error with OpenAI's error body (no 422: a body that fails validation is a 400), the
content types (Server-Sent Events with stream: true), the API key where one is asked for, and on the request bodies
the limits known only when the app is built: the served names, the vocabulary, max_model_len, the queue's size.
A schema-valid request is refused only for a rule JSON Schema cannot state: a 400 whose error code its operation
lists in `x-refusals` (moelm.serve.errors.REFUSALS)."""
from __future__ import annotations

from fastapi.openapi.utils import get_openapi

from .errors import REFUSALS, SCHEMA

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
STATUS = {
    "400": "A bad request: not JSON, outside the schema, or refused by a rule the schema cannot state (see "
           "x-refusals: the error's code).",
    "401": "No API key, or a wrong one: send 'Authorization: Bearer <key>'.",
    "404": "The model is not served here.",
    "500": "An internal error: a bug, or a failed generation step.",
    "503": "The queue of waiting sequences is full: try again later (Retry-After).",
}
RETRY = {"Retry-After": {"description": "seconds to wait", "required": True, "schema": {"type": "string"}}}
SSE = {"text/event-stream": {"schema": {  # one event (OpenAPI 3.1)
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
    "description": "With stream: true, Server-Sent Events: 'data: <a chunk's JSON>' each, then 'data: [DONE]'; an "
                   "error after the first event is an event 'data: <the error JSON>'."}}}


def below(n: int) -> str:
    """A regex matching the decimal numbers 0 .. n-1 (leading zeros allowed)."""
    top = str(n - 1)
    k = len(top)
    alts = [f"[0-9]{{1,{k - 1}}}"] if k > 1 else []
    alts += [f"{top[:i]}[0-{int(d) - 1}][0-9]{{{k - i - 1}}}" for i, d in enumerate(top) if d != "0"]
    return f"^0*({'|'.join(alts + [top])})$"


def limits(state, template_args) -> dict:
    """Property name -> (JSON type, how to patch each node of that type in the property's schema)."""
    engine = state.engine
    names = list(state.names) + list(engine.adapters.names if engine.adapters is not None else ())
    token = dict(minimum=0, maximum=engine.vocab_size - 1)
    most = engine.max_model_len - 1  # a prompt is at least one token
    return {
        "model": ("string", lambda node: node.update(enum=["", *names])),
        "max_tokens": ("integer", lambda node: node.update(maximum=most)),
        "max_completion_tokens": ("integer", lambda node: node.update(maximum=most)),
        "n": ("integer", lambda node: node.update(maximum=min(node.get("maximum", engine.max_waiting),
                                                              engine.max_waiting))),
        "prompt": ("integer", lambda node: node.update(token)),
        "tokens": ("integer", lambda node: node.update(token)),
        "stop_token_ids": ("integer", lambda node: node.update(token)),
        "logit_bias": ("object", lambda node: node.update(propertyNames={"pattern": below(engine.vocab_size)})),
        "chat_template_kwargs": ("object", lambda node: node.update(
            propertyNames={"not": {"enum": sorted(template_args)}})),
        "chat_template": ("string", lambda node: None if state.trust_request_chat_template else untrusted(node)),
    }


def untrusted(node: dict):
    """A request's chat_template without --trust-request-chat-template: null only."""
    node.clear()
    node["type"] = "null"


def patch(node, kind: str, fix):
    """fix(n) for each subschema n of `node` of JSON type `kind`."""
    if isinstance(node, dict):
        if node.get("type") == kind:
            fix(node)
        for value in node.values():
            patch(value, kind, fix)
    elif isinstance(node, list):
        for value in node:
            patch(value, kind, fix)


def refusals(props: dict) -> list[str]:
    """The codes of REFUSALS an operation with a body of these properties can answer."""
    out = []
    if "stream" in props:
        out += ["context_length_exceeded", "invalid_structured_output", "conflicting_fields", "too_many_choices"]
    if "messages" in props:
        out.append("chat_template_error")
    if "continue_final_message" in props and "conflicting_fields" not in out:
        out.append("conflicting_fields")
    return sorted(out)


def build(app, public, template_args) -> dict:
    """The schema of `app` (create_app's): `public` are the paths without the API key."""
    state = app.state
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=(
        "An OpenAI-compatible API (moelm serve). Errors are OpenAI's JSON, {\"error\": {\"message\", \"type\", "
        "\"param\", \"code\"}}; every body outside its schema is a 400. A request the schema allows is refused only "
        "by a rule the schema cannot state, a 400 whose code is one its operation lists in x-refusals:\n\n" +
        "\n".join(f"- {code}: {text}" for code, text in REFUSALS.items())))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    rules = limits(state, template_args)
    for body in components.values():
        for name, prop in body.get("properties", {}).items():
            if name in rules:
                patch(prop, *rules[name])
    components["Error"] = SCHEMA
    if state.api_key:
        schema["components"]["securitySchemes"] = {"key": {"type": "http", "scheme": "bearer"}}
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            responses = op["responses"]
            responses.pop("422", None)
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            props = components.get(ref.get("$ref", "").split("/")[-1], {}).get("properties", {})
            statuses = ["500"] + ["400"] * ("requestBody" in op) + ["404"] * ("model" in props)
            if "stream" in props:
                statuses.append("503")
                responses["200"].setdefault("content", {}).update(SSE)
            if state.api_key and path not in public:
                statuses.append("401")
                op["security"] = [{"key": []}]
            for status in statuses:
                responses.setdefault(status, {"description": STATUS[status]})
            for status, response in responses.items():
                if status >= "400":
                    response["content"] = ERROR
                if status == "503":
                    response["headers"] = RETRY
            if "400" in responses and refusals(props):
                responses["400"]["x-refusals"] = refusals(props)
                op["description"] = (op.get("description", "") + "\n\nA schema-valid request is refused (400) for: " +
                                     "; ".join(f"{c}: {REFUSALS[c]}" for c in refusals(props)) + ".").strip()
    return schema
