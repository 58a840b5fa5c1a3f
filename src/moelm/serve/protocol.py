"""The OpenAI request bodies as pydantic models: the fields moelm runs are validated, unknown fields are ignored,
and known fields that moelm does not run are refused by `unsupported()` (never dropped)."""
from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import SamplingParams
from .structured import KINDS as STRUCTURED


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class TextPart(Body):
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
    temperature: Optional[float] = Field(None, le=2)
    top_p: Optional[float] = None
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # the usual extensions (vLLM's names)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = Field(None, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys are token ids, got {key!r}") from None
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
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
                found.append((key, value, "structured_outputs"))
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
                                          f"{' and '.join(f'{field} ({kind})' for kind, _, field in found)}")
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

        top_k = pick("top_k", 0)
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=0 if top_k in (-1, None) else top_k, min_p=pick("min_p", 0.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), seed=self.seed, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, n=self.n, structured=self.constraint())

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a set field that moelm does not run, else None."""
        try:
            self.constraint()
        except ValueError as e:
            return e.args[0], e.args[1]
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
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    # OpenAI fields moelm does not run
    functions: Optional[list[Any]] = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a set field that moelm does not run, else None."""
        for name in ("functions", "function_call", "audio", "prediction"):
            if getattr(self, name):
                return name, f"{name} is not supported by moelm serve" + (" (use tools)" if "func" in name else "")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by moelm serve (use n)"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by moelm serve"
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs (prompt logprobs) is not supported by moelm serve"
        return super().unsupported()


class TokenizeRequest(Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    model: Optional[str] = None
    tokens: list[int]


