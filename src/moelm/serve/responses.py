"""Prompts submitted to the Engine and their outputs sent back: as Server-Sent Events or as one response."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .engine import EngineFull, Output, RequestError, TokenLogprob
from .errors import ENGINE_CODES, APIError, ClientGone
from .protocol import SamplingRequest

DISCONNECT_POLL = 0.2  # seconds between checks that the client is still there


class Generation:
    """Prompts submitted to the engine (`field` names them in errors): their requests, the queue their outputs
    arrive on, how many choices they make and, with `prompt_logprobs`, each choice's prompt logprobs (`prompts`,
    once its first output came)."""

    def __init__(self, state, prompts: list[list[int]], body: SamplingRequest, max_tokens, logprobs, field: str,
                 constraint: tuple | None = None, adapter: int = 0, prompt_logprobs: int | None = None):
        engine, loop = state.engine, asyncio.get_running_loop()
        self.engine = engine
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests, self.logprobs, self.choices = [], logprobs, len(prompts) * body.n
        self.prompts: list[list[TokenLogprob] | None] = [None] * self.choices
        ready = []
        try:
            for prompt in prompts:
                tokens = max_tokens if max_tokens is not None else engine.max_model_len - len(prompt)
                if max_tokens is None and tokens < 1:
                    raise APIError(400, f"the prompt is {len(prompt)} tokens: nothing is left of the model's "
                                        f"context of {engine.max_model_len} tokens", field, "context_length_exceeded")
                params = body.params(tokens, logprobs, state.defaults)
                if constraint is not None:  # the caller's own (tool_choice), in place of the body's
                    params.structured = constraint
                params.adapter = adapter
                params.prompt_logprobs = prompt_logprobs
                engine.check(prompt, params)  # each prompt before any is submitted: a refusal leaves none running
                ready.append((prompt, params))
            seqs = len(prompts) * body.n
            if seqs > engine.max_waiting:
                raise APIError(400, f"{len(prompts)} prompt(s) times n={body.n} are {seqs} sequences, more than the "
                                    f"queue holds ({engine.max_waiting})", "n", "too_many_choices")
            if engine.queued + seqs > engine.max_waiting:  # as submit would find it, before any is submitted
                raise EngineFull(f"{engine.queued} sequences are waiting (the queue holds {engine.max_waiting}); "
                                 "try again later")
            for i, (prompt, params) in enumerate(ready):
                def deliver(out: Output, i=i):
                    try:
                        loop.call_soon_threadsafe(self.events.put_nowait, (i, out))
                    except RuntimeError:  # the loop is closed: nobody is listening
                        pass

                self.requests.append(engine.submit(prompt, params, deliver))
        except BaseException as e:
            for r in self.requests:
                r.cancel()
            if isinstance(e, RequestError):
                raise APIError(400, str(e), e.param, ENGINE_CODES.get(e.param)) from None
            if isinstance(e, EngineFull):
                raise APIError(503, str(e), kind="server_overloaded") from None
            raise

    async def outputs(self, http: Request) -> AsyncIterator:
        """(choice index, Output) until every choice finished; cancels the requests if the client leaves."""
        left, checked = self.choices, time.monotonic()
        try:
            while left:
                try:
                    i, out = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    i = out = None
                    if not self.engine.alive():  # it died (a bug: its log says which) or stopped without a word
                        raise APIError(500, "the engine thread stopped: the request cannot finish",
                                       kind="internal_error")
                if time.monotonic() - checked >= DISCONNECT_POLL:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        raise ClientGone()
                if out is None:
                    continue
                if out.error:
                    raise APIError(500, f"generation failed: {out.error}", kind="internal_error")
                left -= out.finish_reason is not None
                c = i * self.requests[i].params.n + out.index
                if out.prompt_logprobs is not None:
                    self.prompts[c] = out.prompt_logprobs
                yield c, out
        finally:
            if left:
                for r in self.requests:
                    r.cancel()

    def usage(self) -> dict:
        prompt = sum(r.prompt_tokens for r in self.requests)
        completion = sum(r.completion_tokens for r in self.requests)
        cached = sum(r.cached_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def prompt_logprobs_json(token_text, entries: list[TokenLogprob]) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first token, then per position {token id: {"logprob", "rank",
    "decoded_token"}} of the prompt's token and the most likely ones."""
    out = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        ranked = [(e.token_id, e.logprob, e.rank)] + [(t, lp, r) for r, (t, lp) in enumerate(e.top, 1)]
        out.append({str(t): {"logprob": max(lp, -9999.0), "rank": r, "decoded_token": token_text(t)[0]}
                    for t, lp, r in ranked})
    return out


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def respond(http: Request, gen: Generation, body: SamplingRequest, model: str, prefix: str,
                  objects: tuple[str, str], choice: Callable, start: list[str], opening: list[dict] = (),
                  top: dict | None = None):
    """The response of a completions-like endpoint. `choice(index, text, logprob entries, finish reason, streamed)`
    is one choice's JSON; `start` is each choice's text before the generated one; `objects` the response's and a
    chunk's "object"; streamed, `opening` choice chunks come first; `top`: fields of the response (streamed: of its
    first chunk)."""
    head = {"id": f"{prefix}-{body.request_id or uuid.uuid4().hex}", "object": objects[1],
            "created": int(time.time()), "model": model}
    if body.stream:
        return StreamingResponse(stream(http, gen, head, body.include_usage(), choice, start, opening,
                                        bool(body.return_token_ids), top or {}),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, finish, entries = list(start), [None] * gen.choices, [[] for _ in range(gen.choices)]
    tokens = [[] for _ in range(gen.choices)]
    try:
        async for c, out in gen.outputs(http):
            text[c] += out.text
            entries[c] += out.logprobs
            tokens[c] += out.token_ids
            finish[c] = out.finish_reason or finish[c]
    except ClientGone:
        return Response(status_code=499)
    choices = [choice(c, text[c], entries[c], finish[c], False) for c in range(gen.choices)]
    if body.return_token_ids:
        for c, out in enumerate(choices):
            out["token_ids"] = tokens[c]
    return {**head, "object": objects[0], "choices": choices, "usage": gen.usage(), **(top or {})}


async def stream(http, gen: Generation, head: dict, with_usage: bool, choice, start: list[str], opening,
                 token_ids: bool = False, top: dict | None = None):
    """The SSE stream: the opening chunks, a chunk per output with something to send (token_ids: each output, its
    tokens in the choice's token_ids), the usage chunk if asked for, [DONE]; an error event ends it. `top`: fields
    of the first chunk."""
    extra, sent = {"usage": None} if with_usage else {}, [False] * gen.choices
    for i, chunk in enumerate(opening):
        yield sse({**head, "choices": [chunk], **extra, **(top if i == 0 else {})})
    try:
        async for c, out in gen.outputs(http):
            if not out.text and not out.finish_reason and not (out.logprobs and gen.logprobs is not None) \
                    and not (token_ids and out.token_ids):
                continue
            text = out.text if sent[c] else start[c] + out.text
            sent[c] = True
            data = choice(c, text, out.logprobs, out.finish_reason, True)
            if token_ids:
                data["token_ids"] = out.token_ids
            yield sse({**head, "choices": [data], **extra})
        if with_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except ClientGone:
        return
    except APIError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"
