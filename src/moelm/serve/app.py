"""The OpenAI-compatible HTTP API over an Engine: the FastAPI app, its routes (routes.py), its key check and error
handlers."""
from __future__ import annotations

import functools
import hmac
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException

from . import openapi, routes
from .engine import Engine
from .errors import APIError, error_response, validation_message
from .metrics import Metrics

PUBLIC = ("/health", "/metrics", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
ROUTES = [  # path, endpoint, methods, in the OpenAPI schema
    ("/health", routes.health, ["GET"], True),
    ("/metrics", routes.metrics, ["GET"], True),
    ("/models", routes.models, ["GET"], True),
    ("/v1/models", routes.models, ["GET"], True),
    ("/", routes.page, ["GET", "HEAD"], False),
    ("/tokenize", routes.tokenize, ["POST"], True),
    ("/detokenize", routes.detokenize, ["POST"], True),
    ("/v1/chat/completions", routes.chat, ["POST"], True),
    ("/chat/completions", routes.chat, ["POST"], False),
    ("/v1/completions", routes.completions, ["POST"], True),
    ("/completions", routes.completions, ["POST"], False),
]
DOCUMENTED = {  # what the schema says of an endpoint's 200 when it is not JSON, its other statuses
    routes.health: dict(response_class=Response, responses={200: {"description": "The engine runs (an empty body)."},
                                                            503: {"description": "The engine thread is not running."}}),
    routes.metrics: dict(response_class=PlainTextResponse, responses={200: {"description": "Prometheus' format."}}),
}


class RequireKey:
    """Plain ASGI middleware: API paths need `Authorization: Bearer KEY`, checked on the headers before the body is
    read (Starlette's BaseHTTPMiddleware would hide a streaming client's disconnect)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC:
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(header, self.expected):
                what = "a wrong API key" if header else "no API key"
                response = error_response(APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                                   code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def api_error(request, exc: APIError):
    return error_response(exc)


async def invalid(request, exc: RequestValidationError):
    message, param = validation_message(exc)
    return error_response(APIError(400, message, param))


async def http_error(request, exc: HTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(exc.status_code, str(exc.detail), kind=kind), exc.headers)  # a 405's Allow


async def bug(request, exc: Exception):
    return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="internal_error"))


def create_app(engine: Engine, tokenizer, served_model_names: list[str], api_key: str | None = None,
               chat_template: str | None = None, defaults: dict | None = None, tokenizer_info: bool = False,
               trust_request_chat_template: bool = False) -> FastAPI:
    """The FastAPI app. The engine must be started by the caller; `defaults` are sampling defaults (the model's
    generation_config) for fields a request leaves unset; tokenizer_info: serve GET /tokenizer_info (off by default,
    as vLLM's --enable-tokenizer-info-endpoint: it shows the chat template); trust_request_chat_template: take a
    request's chat_template (off by default, as vLLM's --trust-request-chat-template)."""
    app = FastAPI(title="moelm", version="1", docs_url="/docs")
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    names = list(served_model_names)
    metrics = Metrics(engine, names[0])
    if engine.metrics is None:
        engine.metrics = metrics
    state = app.state
    state.engine, state.tokenizer, state.names, state.metrics = engine, tokenizer, names, metrics
    state.api_key, state.chat_template, state.defaults = api_key, chat_template, defaults or {}
    state.trust_request_chat_template = trust_request_chat_template
    state.created = int(time.time())
    state.token_text = functools.lru_cache(maxsize=65536)(functools.partial(routes.token_text, tokenizer))
    for exc, handler in ((APIError, api_error), (RequestValidationError, invalid), (HTTPException, http_error),
                         (Exception, bug)):
        app.add_exception_handler(exc, handler)
    for path, endpoint, methods, public in ROUTES:
        app.add_api_route(path, endpoint, methods=methods, include_in_schema=public, **DOCUMENTED.get(endpoint, {}))
    if tokenizer_info:
        app.add_api_route("/tokenizer_info", routes.tokenizer_info, methods=["GET"])
    app.openapi = functools.lru_cache(maxsize=1)(functools.partial(openapi.build, app, PUBLIC, routes.TEMPLATE_ARGS))
    return app
