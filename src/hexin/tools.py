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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from hexin.tokenizer import Tokenizer

#: hexin's default system prompt for tools, before the functions' JSON
TOOLS_PREAMBLE = (
    "You can call functions. To call one, reply with only a <tool_call> block:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": {<its arguments>}}\n</tool_call>\n'
    "The functions:"
)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
#: the start of a call's JSON up to its arguments: what a stream can announce a call by
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


#: the most tools one request or session may declare
MAX_TOOLS = 128


class FunctionSpec(BaseModel):
    """A function the model may call, as OpenAI declares one."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls always follow the parameters' schema when enforced


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


_TOOLS = TypeAdapter(list[Tool])


def check_tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI tool declarations, checked (ValueError naming the first fault), as plain
    JSON with unset fields left out."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise ValueError(f"tools: expected a list of at most {MAX_TOOLS} tools")
    try:
        checked = _TOOLS.validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"tools.{where}: {first['msg']}") from None
    names = [t.function.name for t in checked]
    if len(set(names)) != len(names):
        raise ValueError("tools: two tools have the same name")
    return [t.model_dump(exclude_none=True) for t in checked]


def prompt(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] = (),
) -> str:
    """The conversation through the model's chat template: with the template's own tool
    format where it has one, hexin's default (``render``) otherwise."""
    if tokenizer.template_takes_tools:
        return tokenizer.apply_chat_template(messages, tools=list(tools) or None)
    return tokenizer.apply_chat_template(render(messages, tools))


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


class CallIds:
    """Ids for a reply's calls: random, or ``call_<key>_<i>`` for the i-th call, so that
    a stream and a parse of one reply's text give its calls the same ids."""

    def __init__(self, key: str | None = None) -> None:
        self.key, self.count = key, 0

    def __call__(self) -> str:
        self.count += 1
        return new_id() if self.key is None else f"call_{self.key}_{self.count - 1}"


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


def call_grammar(tools: Sequence[dict[str, Any]], name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for a reply that is one call of ``tools``
    in hexin's default format, its JSON held to ``call_schema``: what enforces a call in
    the chat layer, whose replies are parsed as text."""
    schema = json.dumps(call_schema(tools, name))
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {schema}\n'


def parse(
    text: str, *, whole: bool = False, ids_key: str | None = None
) -> tuple[str, list[ToolCall]]:
    """The reply's text outside tool calls, and its calls. ``whole``: the reply is one
    call's JSON (a reply held to ``call_schema``). Text that is no valid call stays text.
    ``ids_key``: see ``CallIds``."""
    ids = CallIds(ids_key)
    if whole:
        call = _call(text, ids)
        return ("", [call]) if call is not None else (text, [])
    calls: list[ToolCall] = []

    def take(match: re.Match[str]) -> str:
        call = _call(match.group(1), ids)
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = CALL.sub(take, text)
    return (rest.strip(), calls) if calls else (text, [])


def _call(text: str, ids: CallIds) -> ToolCall | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    # the arguments as written, as a stream sends them; else as JSON writes them
    raw = _raw_arguments(text[head.end() :]) if (head := HEAD.match(text)) else None
    if raw is None or json.loads(raw) != arguments:
        raw = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(data["name"], raw, ids())


def _raw_arguments(rest: str) -> str | None:
    """The arguments' text from what follows ``HEAD``: all but the call's closing brace."""
    rest = rest.rstrip()
    if not rest.endswith("}"):
        return None
    rest = rest[:-1].rstrip()
    try:
        json.loads(rest)
    except ValueError:
        return None
    return rest


class CallStream:
    """A reply's text deltas, split as they arrive into OpenAI chat deltas: text outside
    calls as ``{"content": ...}``, and each call as ``{"tool_calls": [...]}`` deltas,
    first its id and name (once the name is whole), then its arguments as they are written.

    Text that may be the start of ``<tool_call>`` is held back until it is known not to
    be; within a call, the text from its last ``}`` on is held back, since it may be the
    end of the call rather than of its arguments. A call whose JSON does not open with its
    name is sent whole when it ends, and one that is no valid call at all goes out as
    text, as ``parse`` leaves it. ``whole`` and ``ids_key``: as ``parse`` takes them."""

    def __init__(self, *, whole: bool = False, ids_key: str | None = None) -> None:
        self.whole = whole
        self._ids = CallIds(ids_key)
        self.calls = 0  #: calls begun so far
        self._buffer = ""
        self._in_call = whole
        self._announced = False  # the current call's id and name have gone out
        self._written = False  # and some of its arguments

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        out: list[dict[str, Any]] = []
        while self._step(out, final=False):
            pass
        return out

    def close(self) -> list[dict[str, Any]]:
        """What is still held back, at the end of the reply."""
        out: list[dict[str, Any]] = []
        while self._step(out, final=True):
            pass
        return out

    def _step(self, out: list[dict[str, Any]], *, final: bool) -> bool:
        """Move what can go out of the buffer; True when there may be more to do."""
        buffer = self._buffer
        if not self._in_call:
            at = buffer.find(OPEN)
            if at < 0:
                cut = len(buffer) if final else len(buffer) - _partial(buffer, OPEN)
                self._text(out, buffer[:cut])
                self._buffer = buffer[cut:]
                return False
            self._text(out, buffer[:at])
            self._buffer, self._in_call, self._announced = buffer[at + len(OPEN) :], True, False
            return True
        end = buffer.find(CLOSE) if not self.whole else -1
        ended = end >= 0 or final
        body = buffer[:end] if end >= 0 else buffer
        if not self._announced:
            if head := HEAD.match(body):
                entry = {"id": self._ids(), "type": "function"}
                entry["function"] = {"name": json.loads(f'"{head.group(1)}"'), "arguments": ""}
                self._call(out, entry)
                self._announced, self._written = True, False
                self._buffer = buffer[head.end() :]
                return True
            if not ended:
                return False
            call = _call(body, self._ids)
            if call is not None:
                self._call(out, call.to_openai())
            else:  # no call after all: the text as it was
                tags = ("", "") if self.whole else (OPEN, CLOSE if end >= 0 else "")
                self._text(out, tags[0] + body + tags[1])
        elif not ended:  # hold back from the last brace (it may close the call) and
            cut = body.rfind("}")  # the blanks before it (they may follow the arguments)
            cut = len(body[: cut if cut >= 0 else len(body)].rstrip())
            self._arguments(out, body[:cut])
            self._buffer = buffer[cut:]
            return False
        else:
            rest = body.rstrip()
            self._arguments(out, rest[:-1].rstrip() if rest.endswith("}") else rest)
        self._buffer = buffer[end + len(CLOSE) :] if end >= 0 else ""
        self._in_call = False
        return end >= 0

    def _text(self, out: list[dict[str, Any]], text: str) -> None:
        if text:
            out.append({"content": text})

    def _call(self, out: list[dict[str, Any]], entry: dict[str, Any]) -> None:
        out.append({"tool_calls": [{"index": self.calls} | entry]})
        self.calls += 1

    def _arguments(self, out: list[dict[str, Any]], text: str) -> None:
        if not self._written:  # as ``_call`` reads them: from their first character
            text = text.lstrip()
            self._written = bool(text)
        if text:
            out.append({"tool_calls": [{"index": self.calls - 1, "function": {"arguments": text}}]})


def _partial(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
