"""Chat templates: rendered in a sandboxed Jinja environment as transformers' `render_jinja_template` does, and the
templates in the published style of each family, for checkpoints that `moelm new` writes."""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(jinja2.exceptions.TemplateError, ValueError):
    """Raised by a chat template's `raise_exception(message)`, and for a template that does not compile or fails."""


class UndefinedError(jinja2.exceptions.UndefinedError, TemplateError):
    """A chat template used something undefined (jinja's error, also a ValueError)."""


class SecurityError(jinja2.exceptions.SecurityError, TemplateError):
    """A chat template reached outside the sandbox (jinja's error, also a ValueError)."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore-prefixed attributes."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


_tracked = threading.local()  # the blocks rendered so far and the generation spans, while _render_spans runs


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body and, while tracked, records its characters' span
    (transformers' assistant masks)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        text = caller()
        blocks = getattr(_tracked, "blocks", None)
        if blocks is not None:
            start = len("".join(blocks))
            _tracked.spans.append((start, start + len(text)))
        return text


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env.from_string(template)


def compile_chat_template(template: str, name: str = "the chat template") -> jinja2.Template:
    """The compiled template; a TemplateError naming it (`name`) and the line where it does not compile."""
    try:
        return _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"{name} does not compile: {(e.message or '').rstrip('.')} (line {e.lineno})") \
            from None


def _render_spans(compiled: jinja2.Template, **variables) -> tuple[str, list[tuple[int, int]]]:
    """The text and the character spans of its {% generation %} blocks, as transformers tracks them."""
    blocks, spans = [], []
    _tracked.blocks, _tracked.spans = blocks, spans
    try:
        for block in compiled.generate(**variables):
            blocks.append(block)
    finally:
        _tracked.blocks = _tracked.spans = None
    return "".join(blocks), spans


def _failed(e: Exception, name: str) -> TemplateError:
    """A failure while rendering as a TemplateError naming the template (jinja's undefined and sandbox errors keep
    their class); the template's own raise_exception as it is."""
    if isinstance(e, TemplateError):
        return e
    kind = TemplateError
    if isinstance(e, jinja2.exceptions.UndefinedError):
        kind = UndefinedError
    elif isinstance(e, jinja2.exceptions.SecurityError):
        kind = SecurityError
    return kind(f"{name} failed: {type(e).__name__}: {e}")


def _plain(value):
    """Plain JSON-like data for the sandbox; other objects become "<TypeName>" placeholders."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(template: str, conversations: list, tools=None, documents=None,
                         add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                         variables: dict | None = None, name: str = "the chat template",
                         spans: list | None = None) -> list[str]:
    """Render each conversation as transformers' `render_jinja_template` does; `variables` are the template's
    others, `name` names the template in errors; a list as `spans` gets each text's {% generation %} spans."""
    compiled = compile_chat_template(template, name)
    kwargs = variables or {}
    if tools is not None:
        if not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be JSON schema dicts")
        tools = _plain(tools)
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    documents, kwargs = _plain(documents), _plain(kwargs)
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    rendered = []
    for chat in conversations:
        chat = _plain(getattr(chat, "messages", chat))
        for i, m in enumerate(chat):
            if not isinstance(m, dict):
                raise TypeError(f"Chat messages should be dicts, but got {m!r}.")
            reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
            if reasoning is not None:
                chat[i] = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = chat[-1].get(field) if chat else None
            if final is None:
                raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
            fields = [f for f in _REASONING if chat[-1].get(f) == final] if field in _REASONING else [field]
            if not any(f in template for f in fields):
                raise ValueError(f'continue_final_message is set to "{field}" but the chat template does not use it')
            if isinstance(final, (list, tuple)):
                block = next((b for b in reversed(final) if "text" in b), None)
                if block is None:
                    raise ValueError("continue_final_message is set but the final message has no text to continue!")
                final, block["text"] = block["text"], block["text"] + tag
            else:
                for f in fields:
                    chat[-1][f] = chat[-1][f] + tag
        context = dict(messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                       **kwargs)
        try:
            if spans is None:
                text = compiled.render(**context)
            else:
                text, found = _render_spans(compiled, **context)
                spans.append(found)
        except Exception as e:
            raise _failed(e, name) from None
        if continue_final_message:
            if final.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the "
                                 "rendered chat")
            loc = text.rindex(tag.strip())
            text = text[:loc] if text[loc:loc + len(tag)] == tag else text[:loc].rstrip()
        rendered.append(text)
    return rendered


ERNIE_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}{%- endif -%}\n"
    "{%- if not cls_token is defined -%}{%- set cls_token = '<|begin_of_sentence|>' -%}{%- endif -%}\n"
    "{%- if not sep_token is defined -%}{%- set sep_token = '<|end_of_sentence|>' -%}{%- endif -%}\n"
    "{{- cls_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + sep_token -}}\n"
    "{%- elif message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

PHI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
