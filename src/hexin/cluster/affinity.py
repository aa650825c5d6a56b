"""Which replica a request should prefer: an affinity key made in Ray Serve's proxy, and
rendezvous hashing of that key onto the live replicas.

A replica's KV pool holds what it computed: the sessions it served (kept per session id)
and the prompt blocks it saw (found again by content). A turn sent to any other replica
prefills the whole conversation once more. So each request is given a key naming the
cache it would reuse, and requests with one key prefer one replica.

Ray Serve's request router sees Ray's request metadata, not the request: of an HTTP or
WebSocket request it has the matched route *pattern* (``/c/{session_id}``, never the id)
and the session id Ray reads from one header (``x-session-id``, renamed by
``RAY_SERVE_SESSION_ID_HEADER_KEY``); the body is still on its way. The key is therefore
made where the whole request is seen, in the proxy, by ``AffinityMiddleware`` (installed
through Ray Serve's proxy callback, ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``), and
handed to the router in that header. A client that sends the header itself chooses its
own key (an OpenAI client's ``extra_headers``), and the middleware leaves it alone.

Nothing here imports Ray: the proxy imports this module, and the tests call it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from starlette.middleware import Middleware

#: the header whose value Ray Serve's proxy puts in the request metadata as its session id
SESSION_HEADER = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id").lower()
#: Ray Serve calls the function this names in each proxy, for the middlewares to add
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "hexin.cluster.affinity:proxy_middlewares"
#: how much of a conversation's opening message the key is made of: enough to tell
#: conversations apart, and unchanged by every later turn
PREFIX_CHARS = 2000
#: bodies read for a key are bounded like the app bounds them (hexin.server.state)
MAX_BODY_BYTES = 4 << 20

SESSION_PATH = re.compile(r"^/(?:c|api/sessions)/([^/]+)(?:/.*)?$")
#: generations whose key comes from the body: OpenAI's and Ollama's
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")


def path_key(path: str) -> str | None:
    """The session id in a chat socket's or the sessions API's path, if any."""
    m = SESSION_PATH.match(path)
    return m.group(1) if m else None


def has_key(scope: dict) -> bool:
    """Whether an ASGI request already carries an affinity key (``SESSION_HEADER``)."""
    name = SESSION_HEADER.encode()
    return any(k.lower() == name for k, _ in scope.get("headers", ()))


def header_safe(key: str) -> str:
    """``key`` as a header value: itself when short printable ASCII, else a digest."""
    if len(key) <= 128 and key.isascii() and key.isprintable():
        return key
    return "key-" + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def body_key(body: bytes) -> str | None:
    """A digest of a generation's opening: for a chat, each message up to and including
    the first user message (a system prompt shared by every conversation alone would send
    them all to one replica); for a completion, the start of the prompt. Every later turn
    of one conversation repeats that opening, so all its turns get the same key."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    parts: list[str] = []
    messages = data.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            role = str(m.get("role", ""))
            parts.append(role + "\x00" + _text(m.get("content"))[:PREFIX_CHARS])
            if role == "user":
                break
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list):  # a batch, or token ids: the first one decides
            prompt = prompt[0] if prompt else None
        if prompt is None:
            return None
        system = data.get("system")
        if isinstance(system, str):
            parts.append("system\x00" + system[:PREFIX_CHARS])
        parts.append(str(prompt)[:PREFIX_CHARS])
    if not parts:
        return None
    digest = hashlib.blake2b("\x01".join(parts).encode(), digest_size=12).hexdigest()
    return "prefix-" + digest


def rendezvous_rank(key: str, replica_ids: Iterable[str]) -> list[str]:
    """``replica_ids`` ordered by preference for ``key`` (highest random weight first).

    Each (key, replica) pair gets a pseudo-random weight; the key's replica is the one of
    highest weight. A replica leaving moves only the keys it was first for, and a replica
    joining takes only those it now wins, so the other sessions keep their caches."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class AffinityMiddleware:
    """An ASGI middleware for Ray Serve's proxy: it puts the request's affinity key in
    ``SESSION_HEADER`` before the proxy reads the headers, so Ray carries it to the
    request router as the request's session id.

    Keys: the session id of ``/c/{id}`` and ``/api/sessions/{id}/...``; for a generation
    (OpenAI, Ollama) the body's ``body_key``, the body read here and handed on
    unchanged; nothing for anything else (the least loaded replica answers it).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or has_key(scope):
            return await self.app(scope, receive, send)
        key = path_key(scope.get("path", ""))
        generation = scope.get("path", "").rstrip("/") in GENERATION_PATHS
        if key is None and generation and scope["type"] == "http" and scope["method"] == "POST":
            receive, key = await self._read_body(receive)
        if key is not None:
            scope = dict(scope)
            header = (SESSION_HEADER.encode(), header_safe(key).encode())
            scope["headers"] = [*scope.get("headers", ()), header]
        return await self.app(scope, receive, send)

    @staticmethod
    async def _read_body(receive: Any) -> tuple[Any, str | None]:
        """Read the request body (up to ``MAX_BODY_BYTES``: a larger one is passed on
        without a key, for the app to refuse); a ``receive`` that replays it, and the key."""
        messages: list[dict] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if not message.get("more_body") or size > MAX_BODY_BYTES:
                break
        complete = messages[-1]["type"] == "http.request" and not messages[-1].get("more_body")
        key = None
        if complete and size <= MAX_BODY_BYTES:
            key = body_key(b"".join(m.get("body", b"") for m in messages))

        async def replay() -> dict:
            if messages:
                return messages.pop(0)
            return await receive()

        return replay, key


def proxy_middlewares() -> list[Middleware]:
    """What Ray Serve's proxy callback (``PROXY_CALLBACK_ENV``) returns: the key maker."""
    return [Middleware(AffinityMiddleware)]
