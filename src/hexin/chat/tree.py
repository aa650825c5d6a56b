"""The conversation model: a session holds a tree of messages and one active path.

Regenerating adds a sibling reply, editing adds a sibling user message: nothing is ever
overwritten, so every version stays reachable. The active path runs from a root to
``active_id``; switching versions moves it.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from hexin.errors import HexinError
from hexin.sampling import SamplingParams

Role = Literal["user", "assistant"]


class ChatError(HexinError):
    """A chat operation that cannot be done as asked (unknown id, nothing to roll back...)."""


class SessionNotFound(ChatError):
    """No session has this id."""


class SessionBusy(ChatError):
    """The session has a reply in flight; the operation must wait until it ends."""


_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_id(value: str, what: str = "session id") -> str:
    """Ids travel in URLs and file names: URL-safe characters only, at most 64."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ChatError(f"invalid {what} {value!r}: use 1-64 letters, digits, '-' or '_'")
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
    #: usage and timing of a reply: prompt/cached/completion tokens, stop reason, ...
    meta: dict[str, Any] = field(default_factory=dict)

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
        return cls(
            id=d["id"],
            parent_id=d.get("parent_id"),
            role=d["role"],
            content=d["content"],
            created_at=float(d.get("created_at", now())),
            status=d.get("status", "complete"),
            meta=dict(d.get("meta") or {}),
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
        return sorted(kids, key=lambda m: (m.created_at, m.id))

    def siblings(self, message_id: str) -> list[Message]:
        """All versions of a message: the children of its parent, itself included."""
        return self.children(self.message(message_id).parent_id)

    def version(self, message_id: str) -> tuple[int, int]:
        """(i, n): this message is version i (1-based) of n, as the ``< i/n >`` pager shows."""
        ids = [m.id for m in self.siblings(message_id)]
        return ids.index(message_id) + 1, len(ids)

    def latest_leaf(self, message_id: str) -> str:
        """Follow the newest child down from a message: where switching to it lands."""
        node = message_id
        while kids := self.children(node):
            node = kids[-1].id
        return node

    def subtree(self, message_id: str) -> list[str]:
        """Ids of a message and all its descendants."""
        out, todo = [], [message_id]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(m.id for m in self.messages.values() if m.parent_id == node)
        return out

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
            "active_id": self.active_id,
            "messages": [m.to_dict() for m in sorted(self.messages.values(), key=_order)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Session:
        if not isinstance(d, dict):
            raise ChatError("not a valid session export: expected a JSON object")
        try:
            params = dict(d.get("params") or {})
            params["stop"] = tuple(params.get("stop") or ())
            messages = {m["id"]: Message.from_dict(m) for m in d.get("messages", [])}
            session = cls(
                id=d["id"],
                title=d.get("title", ""),
                model=d.get("model", ""),
                system_prompt=d.get("system_prompt"),
                params=SamplingParams(**params),
                created_at=float(d.get("created_at", now())),
                updated_at=float(d.get("updated_at", now())),
                messages=messages,
                active_id=d.get("active_id"),
            )
        except (KeyError, TypeError, ValueError, AttributeError, HexinError) as e:
            raise ChatError(f"not a valid session export: {e}") from None
        check_id(session.id)
        for m in messages.values():
            if m.role not in ("user", "assistant"):
                raise ChatError(f"not a valid session export: message role {m.role!r}")
            if m.parent_id is not None and m.parent_id not in messages:
                raise ChatError(f"not a valid session export: {m.id} has no parent")
        for m in messages.values():  # parent links must lead to a root
            seen: set[str] = set()
            node: str | None = m.id
            while node is not None:
                if node in seen:
                    raise ChatError("not a valid session export: parent links form a cycle")
                seen.add(node)
                node = messages[node].parent_id
        if session.active_id is not None and session.active_id not in messages:
            raise ChatError("not a valid session export: active message missing")
        return session


def _order(m: Message) -> tuple[float, str]:
    return (m.created_at, m.id)
