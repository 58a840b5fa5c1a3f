"""The OpenAI request bodies as pydantic models: the fields moelm runs are validated, unknown fields are ignored,
and known fields that moelm does not run are refused by `unsupported()` (never dropped)."""
from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import SamplingParams
from .structured import KINDS as STRUCTURED

RESPONSE_FORMATS = [  # response_format as constraint() takes it
    {"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {"type": {"const": "json_schema"},
                                                                           "json_schema": {
        "type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}}}}}]
EPS = 1e-5  # a temperature below is greedy (vLLM's rule), a repetition_penalty below refused: both overflow fp32
FALSY = [None, False, 0, "", [], {}]  # what a field moelm does not run may be
TOOL = {"type": "object", "required": ["function"], "properties": {"type": {"const": "function"}, "function": {
    "type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                           "parameters": {"type": "object"}}}}}  # tools.check's
TOOL_CHOICE = [{"enum": [None, "none", "auto", "required"]},
               {"type": "object", "required": ["function"], "properties": {"function": {"type": "object"}}}]
IDLE = {  # vLLM's fields that moelm does not run -> the values that change nothing (any other is refused)
    "allowed_token_ids": [None], "bad_words": [None, []], "use_beam_search": [None, False],
    "length_penalty": [None, 1], "include_stop_str_in_output": [None, False], "truncate_prompt_tokens": [None],
    "truncation_side": [None, "left", "right"],  # without truncate_prompt_tokens, either changes nothing
    "spaces_between_special_tokens": [None, True], "logprob_token_ids": [None], "watermarking": [None, False],
    "priority": [None, 0], "routed_experts_prompt_start": [None, 0], "return_token_offsets": [None, False],
    "return_mm_kwargs": [None, True], "kv_transfer_params": [None, {}], "ec_transfer_params": [None, {}],
    "vllm_xargs": [None, {}], "repetition_detection": [None], "thinking_token_budget": [None, -1],
    "stream_interval": [None, 1], "guided_whitespace_pattern": [None], "logits_processors": [None, []]}  # older
CHAT_IDLE = {  # chat's: OpenAI's, then vLLM's
    "echo": [None, False], "reasoning_effort": [None], "modalities": [None, ["text"]], "store": [None, False],
    "service_tier": [None, "auto", "default"], "prompt_cache_retention": [None, "in_memory"], "verbosity": [None],
    "web_search_options": [None], "moderation": [None], "prompt_cache_options": [None],
    "include_reasoning": [None, True], "media_io_kwargs": [None, {}], "mm_processor_kwargs": [None, {}],
    "return_prompt_text": [None, False]}
COMPLETION_IDLE = {"prompt_embeds": [None]}
TOKENIZE_IDLE = {"media_io_kwargs": [None, {}], "mm_processor_kwargs": [None, {}]}


def idle(name: str):
    return Field(None, json_schema_extra={"enum": {**IDLE, **CHAT_IDLE, **COMPLETION_IDLE}[name]})


def refused(body, fields: dict) -> tuple | None:
    """(field, message) for the first of `fields` (name -> the values that change nothing) set otherwise."""
    for name, harmless in fields.items():
        value = getattr(body, name)
        if not any(type(value) is type(h) and value == h for h in harmless):
            return name, f"{name} is not supported by moelm serve (only {' or '.join(map(json.dumps, harmless))})"
    return None


def lone_surrogate(value) -> str | None:
    """The first lone surrogate (text that is not UTF-8, which JSON's \\ud800 escapes can give) in the strings of
    a JSON value, None for none."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return v[e.start]
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return None


def whole(value):
    """JSON Schema's integers include 2.0: such floats as ints (strict mode takes no float for an int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return [whole(v) for v in value] if isinstance(value, list) else value


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: false is no 0, "1" no number

    @model_validator(mode="before")
    @classmethod
    def _whole(cls, data):
        return {k: whole(v) for k, v in data.items()} if isinstance(data, dict) else data

    @field_validator("*", mode="before")
    @classmethod
    def _unicode(cls, value):
        bad = lone_surrogate(value)
        if bad is not None:
            raise ValueError(f"text must be valid Unicode (encodable as UTF-8): a lone surrogate U+{ord(bad):04X}")
        return value


class StreamOptions(Body):
    include_usage: bool = False


class TextPart(Body):
    model_config = ConfigDict(json_schema_extra={"properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                                                 "required": ["type", "text"]})  # what Message.text() takes
    type: str
    text: Optional[str] = None


class Message(Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant's calls
    tool_call_id: Optional[str] = None  # a tool message's answer to a call

    def text(self) -> str | None:
        """The content as one string (text parts joined); ValueError for a part that is not text."""
        if not isinstance(self.content, list):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
        return "".join(part.text for part in self.content)


class SamplingRequest(Body):
    """The fields chat and completions share. Only OpenAI's limits are checked here; the sampler checks its knobs
    (moelm.generation.Sampling) when the engine takes the request."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, le=2, json_schema_extra={"minimum": 0}, description=(
        "0 (or below 1e-5, as in vLLM) is greedy"))  # >= 0: Sampling's check
    top_p: Optional[float] = Field(None, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = Field(None, json_schema_extra={"minLength": 1, "items": {"minLength": 1}})
    seed: Optional[int] = None  # any integer: one outside torch's range is taken modulo 2**64
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = Field(None, json_schema_extra={"additionalProperties": {
        "type": "number", "minimum": -100, "maximum": 100}})
    user: Optional[str] = None
    # the usual extensions (vLLM's names)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, json_schema_extra={"minimum": 0, "maximum": 1})
    repetition_penalty: Optional[float] = Field(None, le=10, json_schema_extra={"minimum": EPS})
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: Optional[dict[str, Any]] = Field(None, json_schema_extra={"anyOf": RESPONSE_FORMATS})
    structured_outputs: Optional[dict[str, Any]] = Field(None, json_schema_extra={"anyOf": [{"type": "null"}, {
        "type": "object", "properties": {k: {} for k in (*STRUCTURED, "disable_any_whitespace")},
        "additionalProperties": {"enum": [None, False, 0]}}]})
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = Field(None, json_schema_extra={"enum": [None, "auto", "guidance",
                                                                                     "llguidance"]})
    # vLLM's per-request extras
    add_special_tokens: bool = True  # for a text prompt (chat: False, the template adds them)
    request_id: Optional[str] = Field(None, description="the response's id: its prefix and this (as vLLM)")
    session_id: Optional[str] = None  # accepted, not used (one engine: no routing)
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=1024, description=(
        "the prefix cache shares blocks only between requests of the same salt (none: unsalted ones)"))
    return_tokens_as_token_ids: Optional[bool] = None
    return_token_ids: Optional[bool] = None  # the choices' token_ids and the prompt's prompt_token_ids
    # vLLM's fields that moelm does not run (refused but at a value that changes nothing)
    idle_fields: ClassVar[dict] = IDLE
    allowed_token_ids: Any = idle("allowed_token_ids")
    bad_words: Any = idle("bad_words")
    use_beam_search: Any = idle("use_beam_search")
    length_penalty: Any = idle("length_penalty")
    include_stop_str_in_output: Any = idle("include_stop_str_in_output")
    truncate_prompt_tokens: Any = idle("truncate_prompt_tokens")
    truncation_side: Any = idle("truncation_side")
    spaces_between_special_tokens: Any = idle("spaces_between_special_tokens")
    logprob_token_ids: Any = idle("logprob_token_ids")
    watermarking: Any = idle("watermarking")
    priority: Any = idle("priority")
    routed_experts_prompt_start: Any = idle("routed_experts_prompt_start")
    return_token_offsets: Any = idle("return_token_offsets")
    return_mm_kwargs: Any = idle("return_mm_kwargs")
    kv_transfer_params: Any = idle("kv_transfer_params")
    ec_transfer_params: Any = idle("ec_transfer_params")
    vllm_xargs: Any = idle("vllm_xargs")
    repetition_detection: Any = idle("repetition_detection")
    thinking_token_budget: Any = idle("thinking_token_budget")
    stream_interval: Any = idle("stream_interval")
    guided_whitespace_pattern: Any = idle("guided_whitespace_pattern")
    logits_processors: Any = idle("logits_processors")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not re.search(r"^[0-9]+$", key):  # the schema's pattern (with the vocabulary's bound)
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _penalty(cls, value):
        if value is not None and 0 < value < EPS:  # <= 0: Sampling's check
            raise ValueError(f"repetition_penalty must be at least {EPS} (a smaller one overflows the scores)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def constraint(self) -> tuple[str, object, str] | None:
        """(kind, spec, field) of the structured-output constraint asked for (kinds: moelm.serve.structured.KINDS),
        None for none; ValueError(field, message) for an unsupported or a second one."""
        found = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(("json_object", None, "response_format"))
            elif kind == "json_schema":
                schema = rf.get("json_schema")
                if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
                    raise ValueError("response_format", "response_format json_schema needs json_schema.schema, an "
                                                        "object")
                found.append(("json", schema["schema"], "response_format"))
            elif kind != "text":
                raise ValueError("response_format", f"response_format type {kind!r} is not supported (text, "
                                                    "json_object, json_schema)")
        options = dict(self.structured_outputs or {})
        compact = bool(options.pop("disable_any_whitespace", False))
        for key, value in options.items():
            if key in STRUCTURED and value is not None and value is not False:
                found.append((key, None if key == "json_object" else value, "structured_outputs"))  # a flag
            elif key not in STRUCTURED and value not in (None, False):
                raise ValueError("structured_outputs", f"structured_outputs.{key} is not supported by moelm serve "
                                                       f"(only one of {', '.join(STRUCTURED)})")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                found.append((name[len("guided_"):], getattr(self, name), name))
        if self.guided_decoding_backend not in (None, "auto", "guidance", "llguidance"):
            raise ValueError("guided_decoding_backend", f"guided_decoding_backend {self.guided_decoding_backend!r} "
                                                        "is not available (moelm serve runs llguidance: 'guidance')")
        if len(found) > 1:
            raise ValueError(found[1][2], "give one structured-output constraint, not "
                                          f"{' and '.join(f'{field} ({kind})' for kind, _, field in found)}",
                             "conflicting_fields")
        if not found:
            return None
        kind, spec, field = found[0]
        if compact and kind in ("json", "json_object"):  # vLLM's disable_any_whitespace: llguidance's option
            if kind == "json" and not isinstance(spec, dict):
                try:
                    spec = json.loads(spec)
                except ValueError:
                    return kind, spec, field  # the engine names the fault
            if isinstance(spec, dict) or spec is None:
                spec = {**(spec or {}), "x-guidance": {**(spec or {}).get("x-guidance", {}),
                                                       "whitespace_flexible": False}}
        return kind, spec, field

    def params(self, max_tokens: int, logprobs: int | None, defaults: dict) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults where the request sets nothing."""
        def pick(name, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        top_k, temperature = pick("top_k", 0), pick("temperature", 1.0)
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if 0 < temperature < EPS else temperature, top_p=pick("top_p", 1.0),
            top_k=0 if top_k in (-1, None) else top_k, min_p=pick("min_p", 0.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), logprobs=logprobs,
            seed=self.seed if self.seed is None or -2**63 <= self.seed < 2**64 else self.seed % 2**64,
            skip_special_tokens=self.skip_special_tokens, n=self.n, structured=self.constraint(),
            cache_salt=self.cache_salt)

    def unsupported(self) -> tuple | None:
        """(field, message[, code]) for a set field that moelm does not run, else None; the code names a refusal the
        schema cannot state (moelm.serve.errors.REFUSALS)."""
        idle_field = refused(self, self.idle_fields)
        if idle_field:
            return idle_field
        if self.prompt_logprobs is not None and self.stream:
            return ("prompt_logprobs", "prompt_logprobs are not available when stream is true (as in vLLM)",
                    "conflicting_fields")
        try:
            self.constraint()
        except ValueError as e:
            return e.args
        return None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the last message is continued (with add_generation_prompt false)
    tools: Optional[list[Any]] = Field(None, json_schema_extra={"items": TOOL})
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": TOOL_CHOICE})
    parallel_tool_calls: bool = True
    # OpenAI fields moelm does not run (refused unless falsy)
    functions: Optional[list[Any]] = Field(None, json_schema_extra={"enum": [None, []]})
    function_call: Any = Field(None, json_schema_extra={"enum": FALSY})
    audio: Any = Field(None, json_schema_extra={"enum": FALSY})
    prediction: Any = Field(None, json_schema_extra={"enum": FALSY})
    add_special_tokens: bool = False  # on top of the template's (vLLM's default for chat)
    chat_template: Optional[str] = Field(None, description="a Jinja template for this request (with "
                                                           "--trust-request-chat-template)")
    documents: Optional[list[dict[str, str]]] = None  # for the template (one that uses documents)
    # OpenAI's that only label the request: accepted, not used
    metadata: Optional[dict[str, str]] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    idle_fields: ClassVar[dict] = {**IDLE, **CHAT_IDLE}
    echo: Any = idle("echo")
    reasoning_effort: Any = idle("reasoning_effort")
    modalities: Any = idle("modalities")
    store: Any = idle("store")
    service_tier: Any = idle("service_tier")
    prompt_cache_retention: Any = idle("prompt_cache_retention")
    verbosity: Any = idle("verbosity")
    web_search_options: Any = idle("web_search_options")
    moderation: Any = idle("moderation")
    prompt_cache_options: Any = idle("prompt_cache_options")
    include_reasoning: Any = idle("include_reasoning")
    media_io_kwargs: Any = idle("media_io_kwargs")
    mm_processor_kwargs: Any = idle("mm_processor_kwargs")
    return_prompt_text: Any = idle("return_prompt_text")

    def unsupported(self) -> tuple | None:
        """(field, message[, code]) for a set field that moelm does not run, else None."""
        for name in ("functions", "function_call", "audio", "prediction"):
            if getattr(self, name):
                return name, f"{name} is not supported by moelm serve" + (" (use tools)" if "func" in name else "")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true", "conflicting_fields"
        if self.continue_final_message and self.add_generation_prompt:
            return CONTINUE_CONFLICT
        return super().unsupported()


CONTINUE_CONFLICT = ("continue_final_message", "continue_final_message needs add_generation_prompt: false (the last "
                     "message is continued, no new one begun)", "conflicting_fields")


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(json_schema_extra={
        "minLength": 1, "minItems": 1, "items": {"minLength": 1, "minItems": 1}})  # prompts_of's "empty"
    max_tokens: Optional[int] = Field(16, ge=0)  # 0: with echo only, the prompt alone
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = Field(None, json_schema_extra={"maxLength": 0})
    idle_fields: ClassVar[dict] = {**IDLE, **COMPLETION_IDLE}
    prompt_embeds: Any = idle("prompt_embeds")

    def unsupported(self) -> tuple | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by moelm serve (use n)", "conflicting_fields"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by moelm serve"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens must be at least 1 (0 only with echo: the prompt alone)", \
                "conflicting_fields"
        return super().unsupported()


class TokenizeRequest(Body):
    model_config = ConfigDict(json_schema_extra={"oneOf": [  # one of prompt and messages (null is none)
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = Field(None, description="default: true for prompt, false for messages "
                                                                  "(as vLLM)")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = Field(None, json_schema_extra={"items": TOOL})
    return_token_strs: Optional[bool] = None
    media_io_kwargs: Any = idle("media_io_kwargs")
    mm_processor_kwargs: Any = idle("mm_processor_kwargs")

    def unsupported(self) -> tuple | None:
        if self.continue_final_message and self.add_generation_prompt:
            return CONTINUE_CONFLICT
        return refused(self, TOKENIZE_IDLE)


class DetokenizeRequest(Body):
    model: Optional[str] = None
    tokens: list[int]


