"""The OpenAI-compatible HTTP API over an Engine: FastAPI routes, Server-Sent Events, OpenAI's error JSON."""
from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import re
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, EngineFull, Output, RequestError
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, Sampling, TokenizeRequest

PAGE = Path(__file__).parent / "static" / "index.html"
PAGE_POLICY = "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
DISCONNECT_POLL = 0.2  # seconds between checks that the client is still there
PUBLIC = ("/health", "/metrics", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    pass


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the field at fault, from pydantic's errors."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        field = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts[:3]) or "invalid request", param


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


def create_app(engine: Engine, tokenizer, served_model_names: list[str], api_key: str | None = None,
               chat_template: str | None = None, defaults: dict | None = None) -> FastAPI:
    """The FastAPI app. The engine must be started by the caller; `defaults` are sampling defaults (the model's
    generation_config) for fields a request leaves unset."""
    app = FastAPI(title="moelm", version="1", docs_url="/docs")
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    names = list(served_model_names)
    metrics = Metrics(engine, names[0])
    if engine.metrics is None:
        engine.metrics = metrics
    defaults = defaults or {}
    app.state.engine, app.state.metrics = engine, metrics
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(APIError(400, message, param))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="internal_error"))

    def model_name(requested: str | None) -> str:
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise APIError(404, f"the model {requested!r} is not served here (served: {', '.join(names)})", "model",
                           "model_not_found", "not_found_error")
        return requested

    # ---------------------------------------------------------------- info

    @app.get("/health")
    async def health():
        if engine.alive():
            return Response(status_code=200)
        return error_response(APIError(503, "the engine thread is not running", kind="internal_error"))

    @app.get("/metrics")
    async def _metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "moelm", "root": names[0],
             "max_model_len": engine.max_model_len} for name in names]}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_POLICY})

    # ---------------------------------------------------------------- tokens

    def render_chat(messages, add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
        kwargs = dict(kwargs or {})
        clash = sorted(set(kwargs) & TEMPLATE_ARGS)
        if clash:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
        try:
            conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                            for m in messages]
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, chat_template=chat_template, **kwargs)
        except Exception as e:  # the template's own raise_exception, a missing template, a part that is not text
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = render_chat(body.messages, body.add_generation_prompt, None)
        else:
            ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        model_name(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (size {engine.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @functools.lru_cache(maxsize=65536)
    def token_text(token: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (a byte-fallback piece <0xHH> is that byte)."""
        piece = tokenizer.convert_ids_to_tokens([token])[0] or ""
        hexbyte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if hexbyte:
            return tokenizer.decode([token]), [int(hexbyte.group(1), 16)]
        text = tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    # ---------------------------------------------------------------- generation

    def submit(prompts: list[list[int]], body: Sampling, max_tokens, logprobs, field: str):
        """Submit each prompt (`field` names it in errors); returns (engine requests, their event queue, choices)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        submitted = []
        try:
            for i, prompt in enumerate(prompts):
                tokens = max_tokens if max_tokens is not None else engine.max_model_len - len(prompt)
                if tokens < 1:
                    raise APIError(400, f"the prompt is {len(prompt)} tokens: nothing is left of the model's "
                                        f"context of {engine.max_model_len} tokens", field)
                params = body.params(tokens, logprobs, defaults)

                def deliver(out: Output, i=i):
                    try:
                        loop.call_soon_threadsafe(events.put_nowait, (i, out))
                    except RuntimeError:  # the loop is closed: nobody is listening
                        pass

                submitted.append(engine.submit(prompt, params, deliver))
        except BaseException as e:
            for r in submitted:
                r.cancel()
            if isinstance(e, RequestError):
                raise APIError(400, str(e), e.param) from None
            if isinstance(e, EngineFull):
                raise APIError(503, str(e), kind="server_overloaded") from None
            raise
        return submitted, events, len(prompts) * body.n

    async def outputs(http: Request, submitted, events: asyncio.Queue, choices: int) -> AsyncIterator:
        """(choice index, Output) until every choice finished; cancels the requests if the client leaves."""
        left, checked = choices, time.monotonic()
        try:
            while left:
                try:
                    i, out = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    i = out = None
                if time.monotonic() - checked >= DISCONNECT_POLL:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        raise ClientGone()
                if out is None:
                    continue
                left -= out.finish_reason is not None
                yield i * submitted[i].params.n + out.index, out
        finally:
            if left:
                for r in submitted:
                    r.cancel()

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def usage(submitted) -> dict:
        prompt = sum(r.prompt_tokens for r in submitted)
        completion = sum(r.completion_tokens for r in submitted)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def error_event(out: Output) -> dict:
        return APIError(500, f"generation failed: {out.error}", kind="internal_error").body()

    def event_stream(http, submitted, events, choices: int, head: dict, with_usage: bool, opening: list[dict],
                     choice) -> StreamingResponse:
        """The SSE response: `opening` choice chunks, then choice(index, Output) for each event (None: nothing to
        send), the usage chunk if asked for, [DONE]; an error event ends it."""
        async def stream():
            extra = {"usage": None} if with_usage else {}
            for body in opening:
                yield sse({**head, "choices": [body], **extra})
            try:
                async for c, out in outputs(http, submitted, events, choices):
                    if out.error:
                        yield sse(error_event(out))
                        break
                    body = choice(c, out)
                    if body is not None:
                        yield sse({**head, "choices": [body], **extra})
                else:
                    if with_usage:
                        yield sse({**head, "choices": [], "usage": usage(submitted)})
                yield "data: [DONE]\n\n"
            except ClientGone:
                return
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(http, submitted, events, choices: int, start: list[str]):
        """(texts, finish reasons, logprob entries) per choice once all finished; None if the client left."""
        text, finish, entries = list(start), [None] * choices, [[] for _ in range(choices)]
        try:
            async for c, out in outputs(http, submitted, events, choices):
                if out.error:
                    raise APIError(500, f"generation failed: {out.error}", kind="internal_error")
                text[c] += out.text
                entries[c] += out.logprobs
                finish[c] = out.finish_reason or finish[c]
        except ClientGone:
            return None
        return text, finish, entries

    # ---------------------------------------------------------------- chat

    def chat_logprobs(entries) -> dict:
        content = []
        for e in entries:
            text, raw = token_text(e.token_id)
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": [
                {"token": token_text(t)[0], "logprob": lp, "bytes": token_text(t)[1]} for t, lp in e.top]})
        return {"content": content}

    async def chat(body: ChatRequest, http: Request):
        name = model_name(body.model)
        refused = body.unsupported()
        if refused:
            raise APIError(400, refused[1], refused[0])
        prompt = render_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        submitted, events, choices = submit([prompt], body, max_tokens, logprobs, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}

        if body.stream:
            def choice(c: int, out: Output):
                if not out.text and not out.finish_reason and not (out.logprobs and logprobs is not None):
                    return None
                return {"index": c, "delta": {"content": out.text} if out.text else {},
                        "logprobs": chat_logprobs(out.logprobs) if logprobs is not None else None,
                        "finish_reason": out.finish_reason}

            opening = [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for c in range(choices)]
            return event_stream(http, submitted, events, choices, head, body.include_usage(), opening, choice)

        done = await collect(http, submitted, events, choices, [""] * choices)
        if done is None:
            return Response(status_code=499)
        text, finish, entries = done
        return {"id": rid, "object": "chat.completion", "created": now, "model": name, "choices": [
            {"index": c, "message": {"role": "assistant", "content": text[c]},
             "logprobs": chat_logprobs(entries[c]) if logprobs is not None else None,
             "finish_reason": finish[c]} for c in range(choices)], "usage": usage(submitted)}

    app.post("/v1/chat/completions")(chat)
    app.post("/chat/completions", include_in_schema=False)(chat)

    # ---------------------------------------------------------------- completions

    def prompts_of(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        out = []
        for p in prompt:
            ids = p if isinstance(p, list) else tokenizer(p)["input_ids"]
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            out.append(list(ids))
        return out

    class Offsets:
        """The completions logprobs shape, built token by token (text_offset counts from the text's start)."""

        def __init__(self, start: int):
            self.offset = start

        def add(self, entries) -> dict:
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for e in entries:
                piece = token_text(e.token_id)[0]
                out["tokens"].append(piece)
                out["token_logprobs"].append(e.logprob)
                out["top_logprobs"].append({token_text(t)[0]: lp for t, lp in e.top})
                out["text_offset"].append(self.offset)
                self.offset += len(piece)
            return out

    async def completions(body: CompletionRequest, http: Request):
        name = model_name(body.model)
        refused = body.unsupported()
        if refused:
            raise APIError(400, refused[1], refused[0])
        prompts = prompts_of(body.prompt)
        submitted, events, choices = submit(prompts, body, body.max_tokens, body.logprobs, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": name}
        echo = [tokenizer.decode(prompts[c // body.n]) if body.echo else "" for c in range(choices)]
        offsets = [Offsets(len(e)) for e in echo]

        if body.stream:
            sent = [False] * choices

            def choice(c: int, out: Output):
                if not out.text and not out.finish_reason and not (out.logprobs and body.logprobs is not None):
                    return None
                text = out.text if sent[c] else echo[c] + out.text
                sent[c] = True
                return {"index": c, "text": text,
                        "logprobs": offsets[c].add(out.logprobs) if body.logprobs is not None else None,
                        "finish_reason": out.finish_reason}

            return event_stream(http, submitted, events, choices, head, body.include_usage(), [], choice)

        done = await collect(http, submitted, events, choices, echo)
        if done is None:
            return Response(status_code=499)
        text, finish, entries = done
        return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": [
            {"index": c, "text": text[c],
             "logprobs": offsets[c].add(entries[c]) if body.logprobs is not None else None,
             "finish_reason": finish[c]} for c in range(choices)], "usage": usage(submitted)}

    app.post("/v1/completions")(completions)
    app.post("/completions", include_in_schema=False)(completions)
    return app


def _template_args() -> set[str]:
    """apply_chat_template's own parameters, which chat_template_kwargs may not set."""
    from ..text.tokenizer import Tokenizer

    sig = inspect.signature(Tokenizer.apply_chat_template)
    return {name for name, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD and name != "self"}


TEMPLATE_ARGS = _template_args()
