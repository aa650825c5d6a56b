"""The conversation model: a session holds a tree of messages and one active path.

Regenerating adds a sibling reply, editing adds a sibling user message: nothing is ever
overwritten, so every version stays reachable. The active path runs from a root to
``active_id``; switching versions moves it.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from hexin import tools
from hexin.errors import HexinError
from hexin.sampling import SamplingParams

#: "tool": a tool's result, answering one call of the assistant message before it
Role = Literal["user", "assistant", "tool"]
ROLES = ("user", "assistant", "tool")
#: a reply is "complete", or "stopped" when it was interrupted mid-stream
STATUSES = ("complete", "stopped")

#: The most messages one session may bring in through an import. It also bounds the depth
#: of the tree (a chain cannot be longer than the count), so every walk of it is bounded.
#: 10,000 messages are 5,000 turns, far more than any context window holds; at ~400
#: characters each they fill the server's 4 MiB request body.
MAX_SESSION_MESSAGES = 10_000
#: The longest text field (content, title, system prompt) an import may hold. User
#: messages are capped at 100,000 characters by the server, but a reply is bounded only by
#: the model's context window (about 4 characters a token), so an export of a long reply
#: must still import; a million characters is room for any of them.
MAX_CONTENT_CHARS = 1_000_000


class ChatError(HexinError):
    """A chat operation that cannot be done as asked (unknown id, nothing to roll back...)."""


class SessionNotFound(ChatError):
    """No session has this id."""


class SessionExists(ChatError):
    """A new session was asked for under an id that is taken."""


class SessionBusy(ChatError):
    """The session has a reply in flight; the operation must wait until it ends."""


_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


#: session ids that are words of the sessions API's own paths (/api/sessions/import)
RESERVED_SESSION_IDS = frozenset({"import"})


def check_id(value: str, what: str = "session id") -> str:
    """Ids travel in URLs and file names: URL-safe characters only, at most 64."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ChatError(f"invalid {what} {value!r:.80}: use 1-64 letters, digits, '-' or '_'")
    if what == "session id" and value in RESERVED_SESSION_IDS:
        raise ChatError(f"invalid {what} {value!r}: reserved by the sessions API")
    return value


def new_id() -> str:
    """Random, URL-safe, 16 characters (96 bits)."""
    return secrets.token_urlsafe(12)


_last_time = 0.0


def now() -> float:
    """Wall-clock time, strictly increasing within the process, so that creation order
    (children after parents, newer versions after older) is also timestamp order."""
    global _last_time
    _last_time = max(time.time(), _last_time + 1e-6)
    return _last_time


@dataclass
class Message:
    id: str
    parent_id: str | None
    role: Role
    content: str
    created_at: float = field(default_factory=now)
    #: "complete", or "stopped" for a reply interrupted mid-stream
    status: str = "complete"
    #: usage and timing of a reply: prompt/cached/completion tokens, stop reason, ...;
    #: a reply's ``tool_calls`` (OpenAI's form), a tool result's ``tool_call_id``
    meta: dict[str, Any] = field(default_factory=dict)

    def chat_entry(self) -> dict[str, Any]:
        """The message as a chat template takes it (OpenAI's message form)."""
        entry: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.meta.get("tool_calls"):
            entry["tool_calls"] = self.meta["tool_calls"]
        if self.role == "tool":
            entry["tool_call_id"] = self.meta.get("tool_call_id", "")
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at,
            "status": self.status,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        """A message from its export, every field checked (ChatError if one is wrong)."""
        if not isinstance(d, dict):
            raise ChatError("not a valid session export: a message is not an object")
        mid = _id(d.get("id"), "message id")
        what = f"message {mid}"
        parent_id = d.get("parent_id")
        if parent_id is not None:
            _id(parent_id, f"parent id of {what}")
        role = d.get("role")
        if role not in ROLES:
            raise ChatError(f"not a valid session export: {what} has role {role!r:.40}")
        status = d.get("status", "complete")
        if status not in STATUSES:
            raise ChatError(f"not a valid session export: {what} has status {status!r:.40}")
        return cls(
            id=mid,
            parent_id=parent_id,
            role=role,
            content=_text(d.get("content"), f"content of {what}"),
            created_at=_time(d.get("created_at"), f"created_at of {what}"),
            status=status,
            meta=_meta(d.get("meta"), f"meta of {what}"),
        )


@dataclass
class Session:
    id: str
    title: str = ""
    model: str = ""
    system_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    messages: dict[str, Message] = field(default_factory=dict)
    active_id: str | None = None
    #: the functions the model may call in this session (OpenAI's ``tools``)
    tools: list[dict[str, Any]] = field(default_factory=list)

    # -- tree navigation ----------------------------------------------------------------
    def message(self, message_id: str) -> Message:
        try:
            return self.messages[message_id]
        except KeyError:
            raise ChatError(f"no message {message_id!r} in session {self.id!r}") from None

    def path(self, leaf_id: str | None = None) -> list[Message]:
        """Messages from the root down to ``leaf_id`` (default: the active one)."""
        out: list[Message] = []
        node = leaf_id if leaf_id is not None else self.active_id
        while node is not None:
            msg = self.messages[node]
            out.append(msg)
            node = msg.parent_id
        return out[::-1]

    def children(self, parent_id: str | None) -> list[Message]:
        """Children of a message (or the roots for None), oldest first."""
        kids = [m for m in self.messages.values() if m.parent_id == parent_id]
        return sorted(kids, key=_order)

    def children_index(self) -> dict[str | None, list[Message]]:
        """Every message's children (the roots under None), oldest first, in one pass:
        build it once where many messages are visited, instead of calling ``children``
        (a scan of the whole tree) for each of them."""
        index: dict[str | None, list[Message]] = {}
        for m in sorted(self.messages.values(), key=_order):
            index.setdefault(m.parent_id, []).append(m)
        return index

    def siblings(self, message_id: str) -> list[Message]:
        """All versions of a message: the children of its parent, itself included."""
        return self.children(self.message(message_id).parent_id)

    def version(self, message_id: str) -> tuple[int, int]:
        """(i, n): this message is version i (1-based) of n, as the ``< i/n >`` pager shows."""
        ids = [m.id for m in self.siblings(message_id)]
        return ids.index(message_id) + 1, len(ids)

    def versions(self, messages: Iterable[Message] | None = None) -> list[tuple[int, int]]:
        """``version`` of each of ``messages`` (default: the active path), in one pass."""
        index = self.children_index()
        position = {m.id: i for kids in index.values() for i, m in enumerate(kids, 1)}
        return [
            (position[m.id], len(index[m.parent_id]))
            for m in (self.path() if messages is None else messages)
        ]

    def latest_leaf(self, message_id: str) -> str:
        """Follow the newest child down from a message: where switching to it lands."""
        index = self.children_index()
        node = message_id
        while kids := index.get(node):
            node = kids[-1].id
        return node

    def subtree(self, message_id: str) -> list[str]:
        """Ids of a message and all its descendants."""
        index = self.children_index()
        out, todo = [], [message_id]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(m.id for m in index.get(node, ()))
        return out

    def tree_order(self) -> list[Message]:
        """Every message, parents before their children (breadth-first from the roots);
        messages that no root leads to (a cycle, a missing parent) are left out."""
        index = self.children_index()
        out = list(index.get(None, ()))
        for m in out:  # grows as it goes: each message is visited once
            out.extend(index.get(m.id, ()))
        return out

    def renumber(self) -> None:
        """Give every message a fresh id, parent links and the active id following."""
        ids = {mid: new_id() for mid in self.messages}
        for m in self.messages.values():
            m.id, m.parent_id = ids[m.id], ids.get(m.parent_id or "")
        self.messages = {m.id: m for m in self.messages.values()}
        self.active_id = ids.get(self.active_id or "")

    # -- serialisation ------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "message_count": len(self.messages),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything about the session: the JSON export format."""
        return {
            **self.summary(),
            "system_prompt": self.system_prompt,
            "params": self.params.to_dict(),
            "tools": self.tools,
            "active_id": self.active_id,
            "messages": [m.to_dict() for m in sorted(self.messages.values(), key=_order)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        """A session from its export (``to_dict``), checked in full before anything is
        kept: ids, roles, statuses, text fields, finite timestamps, meta, sampling params,
        a parent link from every message to a root, and the caps above. Anything wrong is
        a ChatError. Linear in the number of messages."""
        if not isinstance(d, dict):
            raise ChatError("not a valid session export: expected a JSON object")
        sid = _id(d.get("id"), "session id")
        raw = d.get("messages", [])
        if not isinstance(raw, list):
            raise ChatError("not a valid session export: messages must be a list")
        if len(raw) > MAX_SESSION_MESSAGES:
            raise ChatError(
                f"not a valid session export: {len(raw)} messages, "
                f"at most {MAX_SESSION_MESSAGES} can be imported"
            )
        messages: dict[str, Message] = {}
        for item in raw:
            m = Message.from_dict(item)
            if m.id in messages:
                raise ChatError(f"not a valid session export: message id {m.id} appears twice")
            messages[m.id] = m
        system_prompt = d.get("system_prompt")
        session = cls(
            id=sid,
            title=_text(d.get("title", ""), "title"),
            model=_text(d.get("model", ""), "model"),
            system_prompt=None if system_prompt is None else _text(system_prompt, "system_prompt"),
            params=_params(d.get("params")),
            created_at=_time(d.get("created_at"), "created_at"),
            updated_at=_time(d.get("updated_at"), "updated_at"),
            messages=messages,
            active_id=d.get("active_id"),
            tools=check_tools(d.get("tools", []), "not a valid session export: "),
        )
        for m in messages.values():
            if m.parent_id is not None and m.parent_id not in messages:
                raise ChatError(f"not a valid session export: {m.id} has no parent")
        # every parent exists, so a message no root leads to is on (or below) a cycle
        if len(session.tree_order()) != len(messages):
            raise ChatError("not a valid session export: parent links form a cycle")
        if session.active_id is not None and (
            not isinstance(session.active_id, str) or session.active_id not in messages
        ):
            raise ChatError("not a valid session export: active message missing")
        return session


def check_tools(value: Any, context: str = "") -> list[dict[str, Any]]:
    """``tools.check_tools``, its fault a ChatError."""
    try:
        return tools.check_tools(value)
    except ValueError as e:
        raise ChatError(f"{context}{e}") from None


def _id(value: Any, what: str) -> str:
    try:
        return check_id(value, what)
    except ChatError as e:
        raise ChatError(f"not a valid session export: {e}") from None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ChatError(f"not a valid session export: {what} must be a string")
    if len(value) > MAX_CONTENT_CHARS:
        raise ChatError(
            f"not a valid session export: {what} is over {MAX_CONTENT_CHARS} characters"
        )
    return value


def _time(value: Any, what: str) -> float:
    """A timestamp: a finite number (missing: now)."""
    if value is None:
        return now()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ChatError(f"not a valid session export: {what} must be a finite number")
    return float(value)


def _meta(value: Any, what: str) -> dict[str, Any]:
    """An object that is stored as JSON and read back as JSON: no NaN or infinities."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ChatError(f"not a valid session export: {what} must be an object")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ChatError(f"not a valid session export: {what}: {e}") from None
    return dict(value)


def _params(value: Any) -> SamplingParams:
    if value is None:
        return SamplingParams()
    if not isinstance(value, dict):
        raise ChatError("not a valid session export: params must be an object")
    params = dict(value)
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)
    ):
        raise ChatError("not a valid session export: params.stop must be a list of strings")
    params["stop"] = tuple(stop or ())
    try:
        return SamplingParams(**params)
    except TypeError as e:  # an unknown name
        raise ChatError(f"not a valid session export: params: {e}") from None
    except HexinError as e:
        raise ChatError(f"not a valid session export: params: {e}") from None


def _order(m: Message) -> tuple[float, str]:
    return (m.created_at, m.id)
