"""Function calling: tools in the prompt, tool calls out of the reply.

A model whose chat template takes ``tools`` gets them there, in its own format. Others (the
default SmolLM2's template has none) get hexin's default, documented in the README: a
system message listing the functions as JSON, and calls written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

the format many open models were trained on. Tool calls in the history are written back
the same way, and a tool's result goes back as a ``<tool_response>`` user turn.

``call_schema`` is the JSON schema of one call, for constrained decoding: with
``tool_choice`` "required" or a named function the reply is held to it, so that even a
small model emits a valid call.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: hexin's default system prompt for tools, before the functions' JSON
TOOLS_PREAMBLE = (
    "You can call functions. To call one, reply with only a <tool_call> block:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<its arguments>}}\n</tool_call>\n'
    "The functions:"
)
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI gives it
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


def new_id() -> str:
    return "call_" + secrets.token_hex(12)


def render(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``messages`` for a template without tools: the tools as a system message (merged
    into the first system message), assistant tool calls as text, tool results as user
    turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(format_call(c) for c in m["tool_calls"])
            content = f"{m.get('content') or ''}\n{calls}".strip()
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            out.append({"role": "user", "content": result})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        preamble = f"{TOOLS_PREAMBLE}\n{listing}"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def format_call(call: dict[str, Any]) -> str:
    """An OpenAI ``tool_calls`` entry as hexin's default call text."""
    function = call.get("function", {})
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON: kept as the string it is
            arguments = json.loads(arguments)
    body = json.dumps({"name": function.get("name", ""), "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>"


def call_schema(tools: Sequence[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call of ``tools`` (of ``name`` only, when given)."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = dict(function.get("parameters") or {"type": "object"})
        if parameters.get("type") == "object":  # as OpenAI's strict mode: no other keys
            parameters.setdefault("additionalProperties", False)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse(text: str, *, whole: bool = False) -> tuple[str, list[ToolCall]]:
    """The reply's text outside tool calls, and its calls. ``whole``: the reply is one
    call's JSON (a reply held to ``call_schema``). Text that is no valid call stays text."""
    if whole:
        call = _call(text)
        return ("", [call]) if call is not None else (text, [])
    calls = [c for c in (_call(m.group(1)) for m in CALL.finditer(text)) if c is not None]
    if not calls:
        return text, []
    return CALL.sub("", text).strip(), calls


def _call(text: str) -> ToolCall | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False), new_id())
