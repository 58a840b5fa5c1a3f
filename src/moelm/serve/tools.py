"""Tool calling for chat completions, in the format of vLLM's `ernie45` tool parser: each call is a block
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the model's output, the text outside the blocks is
the message's content.

A chat template that uses `tools` (as transformers' templates do) renders the tools, the assistant's tool calls and
the `tool` messages itself. The published ERNIE 4.5 and Phi-3.5 templates have no tool syntax: for them (the
fallback) the tools and the call format are described in the system message, an assistant's tool calls are
rendered as their blocks and each tool result as a user message `<tool_response>\\n...\\n</tool_response>`.
tool_choice "required" or a named function constrains the output (structured output, moelm.serve.structured) to
such blocks, so the call always parses."""
from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class ToolError(ValueError):
    """A bad `tools` or `tool_choice` (the server answers 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check(tools: list | None, tool_choice) -> tuple[list[dict], str | None]:
    """(the functions [{"name", "description", "parameters"}], the one name tool_choice forces or None); raises
    ToolError for a malformed tool or a choice naming no tool."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}", "tools")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools: two functions have the same name", "tools")
    forced = None
    if tool_choice in (None, "auto", "none", "required"):
        if tool_choice == "required" and not functions:
            raise ToolError("tool_choice 'required' needs tools", "tool_choice")
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        forced = tool_choice["function"].get("name")
        if forced not in names:
            raise ToolError(f"tool_choice names the function {forced!r}, which is not in tools", "tool_choice")
    else:
        raise ToolError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                        "{\"name\": ...}}", "tool_choice")
    return functions, forced


def uses_tools(template: str) -> bool:
    """Whether a chat template renders `tools` itself."""
    return re.search(r"\btools\b", template) is not None


def describe(functions: list[dict]) -> str:
    """The fallback's system text: the tools and how to call them."""
    lines = "\n".join(json.dumps({"name": f["name"], "description": f["description"],
                                  "parameters": f["parameters"]}, ensure_ascii=False) for f in functions)
    return ("You can call these tools:\n" + lines + "\n\nTo call a tool, reply with one block per call:\n"
            f"{OPEN}\n{{\"name\": <the tool's name>, \"arguments\": <its arguments as a JSON object>}}\n{CLOSE}")


def block(name: str, arguments) -> str:
    args = arguments if isinstance(arguments, (dict, list)) else json.loads(arguments or "{}")
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def fallback(conversation: list[dict], functions: list[dict]) -> list[dict]:
    """The conversation for a template without tool syntax (see the module docstring)."""
    out = []
    for m in conversation:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(block(c["function"]["name"], c["function"].get("arguments")) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(x for x in (m.get("content"), calls) if x)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if functions:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{describe(functions)}"}
        else:
            out.insert(0, {"role": "system", "content": describe(functions)})
    return out


def grammar(functions: list[dict], forced: str | None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's, with %json) of one or more call blocks (one, with `forced` (its function) or
    without `parallel`)."""
    options = [f for f in functions if forced is None or f["name"] == forced]
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                         "required": ["name", "arguments"], "additionalProperties": False} for f in options],
              "x-guidance": {"whitespace_flexible": False}}
    repeat = ' ("\\n" call)*' if parallel and not forced else ""
    return (f"start: call{repeat}\ncall: {json.dumps(OPEN + chr(10))} args {json.dumps(chr(10) + CLOSE)}\n"
            f"args: %json {json.dumps(schema)}")


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a finished output: the blocks whose JSON has a name become calls {"id", "type",
    "function": {"name", "arguments" (JSON text)}}; the rest of the text, stripped, is the content (None if empty)."""
    calls, kept, at = [], [], 0
    for match in BLOCK.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        calls.append(call(obj["name"], obj.get("arguments", {})))
    kept.append(text[at:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


def call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function", "function": {"name": name,
                                                                                        "arguments": args}}


class Stream:
    """A streamed output split as it comes: `feed(text)` returns (content to send now, calls completed now). Text
    that may be the start of a block is held back until it is known; a block is sent as one call when it closes;
    `final` lets out what is held (an unclosed block is content). Content is sent unstripped."""

    def __init__(self):
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.pending += text
        content, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial(self.pending, OPEN)
                cut = len(self.pending) - keep
                content, self.pending = content + self.pending[:cut], self.pending[cut:]
                break
            content, self.pending = content + self.pending[:start], self.pending[start:]
            end = self.pending.find(CLOSE)
            if end < 0:
                if final:  # an unclosed block is text
                    content, self.pending = content + self.pending, ""
                break
            _, parsed = parse(self.pending[:end + len(CLOSE)])
            if parsed:
                calls += parsed
            else:
                content += self.pending[:end + len(CLOSE)]
            self.pending = self.pending[end + len(CLOSE):]
        return content, calls


def _partial(text: str, tag: str) -> int:
    """Characters at the end of text that are a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
