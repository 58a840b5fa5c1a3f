"""The API's endpoints, one function each; what they share (engine, tokenizer, served names, ...) is on app.state."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from ..text.chat_template import TemplateError, compile_chat_template
from . import tools
from .errors import APIError, error_response
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import Generation, prompt_logprobs_json, respond

PAGE = Path(__file__).parent / "static" / "index.html"
PAGE_POLICY = "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def model_name(state, requested: str | None) -> str:
    """The served name a request asks for (the first one by default): a name of the model or of a LoRA adapter."""
    if requested is None or requested == "":
        return state.names[0]
    adapters = state.engine.adapters
    if requested not in state.names and (adapters is None or requested not in adapters.names):
        served = state.names + (list(adapters.names) if adapters is not None else [])
        raise APIError(404, f"the model {requested!r} is not served here (served: {', '.join(served)})",
                       "model", "model_not_found", "not_found_error")
    return requested


def adapter_of(state, name: str) -> int:
    adapters = state.engine.adapters
    return 0 if adapters is None else adapters.id(name)


def checked(state, body) -> str:
    """The model name of a generation request that asks for nothing unsupported."""
    name = model_name(state, body.model)
    refuse(body)
    return name


def refuse(body):
    """A 400 for a field the body sets that moelm does not run (or fields that do not go together)."""
    refused = body.unsupported()
    if refused:
        raise APIError(400, refused[1], refused[0], *refused[2:])


# ---------------------------------------------------------------- info

async def health(request: Request):
    if request.app.state.engine.alive():
        return Response(status_code=200)
    return error_response(APIError(503, "the engine thread is not running", kind="internal_error"))


async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request):
    state = request.app.state
    adapters = state.engine.adapters
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": state.created, "owned_by": "moelm", "root": state.names[0],
         "parent": None, "max_model_len": state.engine.max_model_len} for name in state.names] + [
        {"id": name, "object": "model", "created": state.created, "owned_by": "moelm", "root": adapters.paths[name],
         "parent": state.names[0], "max_model_len": state.engine.max_model_len}
        for name in (adapters.names if adapters is not None else ())]}


async def page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_POLICY})


# ---------------------------------------------------------------- tokens

def render_chat(state, body, tool_list=None, functions=()) -> list[int]:
    """The prompt's token ids of a chat or /tokenize body (its messages, add_generation_prompt,
    continue_final_message, chat_template_kwargs, chat_template, documents, add_special_tokens); with tools (the
    request's `tool_list`, checked as `functions`), rendered by the template when it knows tools, else by
    moelm.serve.tools' fallback (also for tool calls and tool messages in the conversation, which such a template
    would drop)."""
    kwargs = dict(body.chat_template_kwargs or {})
    clash = sorted(set(kwargs) & TEMPLATE_ARGS)
    if clash:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    template = request_template(state, body.chat_template)
    documents = getattr(body, "documents", None)
    if documents is not None and not re.search(r"\bdocuments\b", template):
        raise APIError(400, "documents: the chat template does not use documents", "documents",
                       "chat_template_error")
    try:
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {}),
                         **({"tool_calls": m.tool_calls} if m.tool_calls else {}),
                         **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})} for m in body.messages]
        native = tools.uses_tools(template)
        if not native and (functions or any(m.get("tool_calls") or m["role"] == "tool" for m in conversation)):
            conversation = tools.fallback(conversation, list(functions))
        elif native and functions:
            kwargs["tools"] = tool_list
        text = state.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=body.add_generation_prompt, documents=documents,
            continue_final_message=body.continue_final_message, tokenize=False,
            chat_template=body.chat_template or state.chat_template, **kwargs)
    except Exception as e:  # the template's own raise_exception, a missing template, a part that is not text
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages", "chat_template_error") \
            from None
    return state.tokenizer(text, add_special_tokens=bool(body.add_special_tokens))["input_ids"]


def request_template(state, template: str | None) -> str:
    """The template a chat renders with: the request's (checked: allowed by --trust-request-chat-template, and
    compiling), else (also for an empty one, as vLLM) the server's."""
    if template is not None and not state.trust_request_chat_template:
        raise APIError(400, "chat_template: this server takes no chat template from a request (start it with "
                            "--trust-request-chat-template)", "chat_template", "chat_template_error")
    if not template:
        return state.chat_template or getattr(state.tokenizer, "chat_template", None) or ""
    try:
        compile_chat_template(template, "the request's chat_template")
    except TemplateError as e:
        raise APIError(400, str(e), "chat_template", "chat_template_error") from None
    return template


async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state
    model_name(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    refuse(body)
    if body.messages is not None:
        try:
            functions, _ = tools.check(body.tools, None)
        except tools.ToolError as e:
            raise APIError(400, str(e), e.param, "conflicting_fields") from None
        ids = render_chat(state, body, body.tools if functions else None, functions)
    else:
        chat_only = next((f for f in ("chat_template", "chat_template_kwargs", "tools") if getattr(body, f)), None)
        if chat_only:
            raise APIError(400, f"{chat_only} applies to messages, not to a prompt", chat_only, "conflicting_fields")
        ids = state.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
    out = {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return out


async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state
    model_name(state, body.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (size {vocab})", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}


async def tokenizer_info(request: Request):
    """vLLM's GET /tokenizer_info (behind --enable-tokenizer-info-endpoint): the tokenizer's configuration as its
    tokenizer_config.json gives it (special tokens, limits), its class and the chat template served."""
    state = request.app.state
    tok = state.tokenizer
    info = dict(getattr(tok, "special_tokens_map", {}))
    for name in TOKENIZER_INFO:
        value = getattr(tok, name, None)
        if value is not None and value != []:
            info[name] = value
    info["tokenizer_class"] = type(tok).__name__
    template = state.chat_template or getattr(tok, "chat_template", None)
    if template:
        info["chat_template"] = template
    return info


TOKENIZER_INFO = ("extra_special_tokens", "add_bos_token", "add_eos_token", "model_max_length",
                  "clean_up_tokenization_spaces", "padding_side", "truncation_side", "name_or_path")


def texts_of(state, body):
    """token_text for the logprobs of a request: with return_tokens_as_token_ids, "token_id:<id>" (vLLM's form)."""
    if not body.return_tokens_as_token_ids:
        return state.token_text
    return token_id_text


def token_id_text(token: int) -> tuple[str, list[int]]:
    text = f"token_id:{token}"
    return text, list(text.encode())


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its bytes (a byte-fallback piece <0xHH> is that byte); create_app caches it per app."""
    piece = tokenizer.convert_ids_to_tokens([token])[0] or ""
    hexbyte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if hexbyte:
        return tokenizer.decode([token]), [int(hexbyte.group(1), 16)]
    text = tokenizer.decode([token])
    return text, list(text.encode("utf-8"))


# ---------------------------------------------------------------- generation

async def chat(body: ChatRequest, http: Request):
    state = http.app.state
    name = checked(state, body)
    try:
        functions, forced = tools.check(body.tools, body.tool_choice)
    except tools.ToolError as e:
        raise APIError(400, str(e), e.param, "conflicting_fields") from None  # the schema has the tools' shape
    active = bool(functions) and body.tool_choice != "none"
    constraint = None
    if active and (body.tool_choice == "required" or forced):
        if body.constraint() is not None:
            raise APIError(400, "tool_choice 'required' or a named function cannot be combined with another "
                                "structured-output constraint", "tool_choice", "conflicting_fields")
        constraint = ("grammar", tools.grammar(functions, forced, body.parallel_tool_calls), "tool_choice")
    prompt = render_chat(state, body, body.tools if active else None, functions if active else ())
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    token_text = texts_of(state, body)
    gen = Generation(state, [prompt], body, body.max_completion_tokens or body.max_tokens, logprobs, "messages",
                     constraint, adapter_of(state, name), body.prompt_logprobs)
    streams = [tools.Stream() for _ in range(gen.choices)]
    called = [0] * gen.choices

    def choice(c: int, text: str, entries, finish, streamed: bool) -> dict:
        if not active:
            content = ({"delta": {"content": text} if text else {}} if streamed
                       else {"message": {"role": "assistant", "content": text}})
        elif streamed:
            text, calls = streams[c].feed(text, final=finish is not None)
            delta = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = [{"index": called[c] + i, **call} for i, call in enumerate(calls)]
                called[c] += len(calls)
            content = {"delta": delta}
        else:
            text, calls = tools.parse(text)
            called[c] = len(calls)
            content = {"message": {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}}
        if finish == "stop" and called[c]:
            finish = "tool_calls"
        return {"index": c, **content,
                "logprobs": chat_logprobs(token_text, entries) if logprobs is not None else None,
                "finish_reason": finish}

    opening = [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for c in range(gen.choices)]
    response = await respond(http, gen, body, name, "chatcmpl", ("chat.completion", "chat.completion.chunk"),
                             choice, [""] * gen.choices, opening,
                             {"prompt_token_ids": prompt} if body.return_token_ids else None)
    if body.prompt_logprobs is not None and isinstance(response, dict):  # vLLM's place: the response's
        response["prompt_logprobs"] = prompt_logprobs_json(state.token_text, gen.prompts[0])
    return response


def chat_logprobs(token_text, entries) -> dict:
    content = []
    for e in entries:
        text, raw = token_text(e.token_id)
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": [
            {"token": token_text(t)[0], "logprob": lp, "bytes": token_text(t)[1]} for t, lp in e.top]})
    return {"content": content}


async def completions(body: CompletionRequest, http: Request):
    state = http.app.state
    name = checked(state, body)
    prompts = prompts_of(state.tokenizer, body.prompt, body.add_special_tokens)
    scored = body.prompt_logprobs if body.prompt_logprobs is not None else body.logprobs if body.echo else None
    gen = Generation(state, prompts, body, body.max_tokens, body.logprobs, "prompt", adapter=adapter_of(state, name),
                     prompt_logprobs=scored)
    texts = [body.prompt] if isinstance(body.prompt, str) else [p if isinstance(p, str) else None for p in body.prompt]
    echo = [(texts[c // body.n] if texts[c // body.n] is not None else state.tokenizer.decode(prompts[c // body.n]))
            if body.echo else "" for c in range(gen.choices)]  # a text prompt as given (vLLM's), token ids decoded
    offsets = [Offsets(texts_of(state, body), body.logprobs) for _ in echo]
    told = set()  # the choices given their prompt_token_ids (return_token_ids: on a choice's first chunk)

    def choice(c: int, text: str, entries, finish, streamed: bool) -> dict:
        prompt = gen.prompts[c]
        logprobs = None if body.logprobs is None else offsets[c].add(entries, prompt if body.echo else None)
        out = {"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if prompt is not None and not streamed:  # vLLM's field
            out["prompt_logprobs"] = prompt_logprobs_json(state.token_text, prompt)
        if body.return_token_ids and c not in told:
            out["prompt_token_ids"] = prompts[c // body.n]
            told.add(c)
        return out

    return await respond(http, gen, body, name, "cmpl", ("text_completion", "text_completion"), choice, echo)


def prompts_of(tokenizer, prompt, add_special_tokens: bool = True) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = []
    for p in prompt:
        ids = p if isinstance(p, list) else tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        out.append(list(ids))
    return out


class Offsets:
    """The completions logprobs shape, built chunk by chunk (text_offset: the sum of the tokens' texts before, from
    the first token sent): each token, its logprob and top_logprobs, the token and the `count` most likely (up to
    count + 1, as OpenAI and vLLM give them); with echo, the prompt's entries first (the first token's null)."""

    def __init__(self, token_text, count: int | None):
        self.token_text, self.count, self.offset, self.echoed = token_text, count, 0, False

    def add(self, entries, prompt=None) -> dict:
        if prompt is not None and not self.echoed:
            entries, self.echoed = [*prompt, *entries], True
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = self.token_text(e.token_id)[0]
            top = None
            if e.logprob is not None:
                ranked = list({e.token_id: e.logprob, **dict(e.top)}.items())[:self.count + 1]
                top = {self.token_text(t)[0]: max(lp, -9999.0) for t, lp in ranked}
            out["tokens"].append(piece)
            out["token_logprobs"].append(None if e.logprob is None else max(e.logprob, -9999.0))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(piece)
        return out


def _template_args() -> set[str]:
    """apply_chat_template's own parameters, which chat_template_kwargs may not set."""
    from ..text.tokenizer import Tokenizer

    sig = inspect.signature(Tokenizer.apply_chat_template)
    return {name for name, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD and name != "self"}


TEMPLATE_ARGS = _template_args()
