"""OpenAI's error JSON: APIError and the responses made of it."""
from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}  # the body above, as JSON Schema (/openapi.json)


# The `code` of a 400 refusing a request that its operation's schema allows: the rules JSON Schema cannot state.
REFUSALS = {
    "context_length_exceeded": "the prompt's tokens plus max_tokens (max_completion_tokens) are more than the "
                               "model's context (max_model_len), or the prompt alone fills it",
    "chat_template_error": "the model's chat template refuses the conversation (a role it does not know, the order "
                           "of the messages, content it cannot render), or does not use the documents given; a "
                           "request's chat_template that does not compile",
    "invalid_structured_output": "a structured-output constraint (response_format, structured_outputs, guided_*, "
                                 "the tools of tool_choice 'required' or a named function) that llguidance cannot "
                                 "compile, or that allows no first token",
    "conflicting_fields": "fields that do not go together: top_logprobs without logprobs, best_of other than n, "
                          "max_tokens 0 without echo, prompt_logprobs with stream, continue_final_message with "
                          "add_generation_prompt, two structured-output constraints, tool_choice naming no function "
                          "of tools or 'required' without tools or with another constraint, two tools of one name, "
                          "/tokenize's chat_template, chat_template_kwargs or tools with a prompt",
    "too_many_choices": "the prompts times n are more sequences than the server's queue holds (--max-waiting)",
}
ENGINE_CODES = {"max_tokens": "context_length_exceeded", **dict.fromkeys(  # an engine RequestError's, by its param
    ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
     "tool_choice"), "invalid_structured_output")}


class ClientGone(Exception):
    pass


def error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    if e.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
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
