"""WebSocket chat at /c/{session_id}: JSON messages both ways, replies streamed as tokens.

Client -> server: {"type": "user", "content", "params"}, {"type": "stop"},
{"type": "regenerate", "params"}, {"type": "continue", "params"} (the last reply goes on,
in the same message), {"type": "rollback"}, {"type": "edit", "message_id",
"content", "params"}, {"type": "switch", "message_id"}, {"type": "tool_results",
"results": [{"tool_call_id", "content"}, ...], "params"} (answers the last reply's tool
calls), {"type": "session"} (resend state). ``params`` may hold ``tool_choice``
("required" or a function's name) when the session has tools (set through the sessions
API). Server -> client: {"type": "session", "session"} on connect and after tree changes;
{"type": "user_message", "message"} (for tool results: a ``session`` frame) and
{"type": "reply_start", "parent_id"} as a turn begins; {"type": "progress", "done",
"total", "cached"} while the prompt is computed (``done`` of its ``total`` tokens so far,
the ``cached`` prefix counted as done; looked at every ``PROGRESS_S``, sent when ``done``
moved, so a short prompt gets none; never after the first token); {"type": "token",
"text"} while it streams, and in a session with tools {"type": "tool_call", "delta"} for
a call in it (an OpenAI ``tool_calls`` delta: index, id and name first, then pieces of
the arguments; the call's text is no token; its id is the one stored); {"type": "done",
"message", "usage", "stop_reason", "dropped_turns", "timing"},
the message's ``meta.tool_calls`` holding the calls parsed out of its text (which then
holds only the rest); {"type": "error", "message", "code"} for
anything wrong, the connection staying open (codes: ``state.ERROR_KINDS``, "bad_request"
for a malformed message or a binary frame). Every reply ends with ``done`` or ``error``
(an engine error during a reply is reported, and the socket stays open). An unknown
session id is created on first use. A closed socket stops its reply (which is saved as
stopped). Close codes: 4401 missing or wrong API key, 4400 invalid session id, 1013 the
model is still loading (retry).

The API key: an ``Authorization: Bearer KEY`` header, or (browsers cannot set headers)
the subprotocols ``["hexin", "hexin.key." + base64url(KEY)]`` (UTF-8, no padding), the
server selecting "hexin"; ``?api_key=KEY`` still works (redacted in the logs, see
``hexin.server.logs``) but puts the key in URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from hexin import tools
from hexin.chat.service import ChatService, Reply
from hexin.chat.tree import ChatError, check_id
from hexin.server.sessions import session_view
from hexin.server.state import (
    BAD_REQUEST,
    MAX_MESSAGE_CHARS,
    SESSION_BUSY,
    State,
    api_error_from,
)

router = APIRouter()
SUBPROTOCOL = "hexin"
KEY_PREFIX = "hexin.key."
#: how often a reply still computing its prompt is looked at for a ``progress`` frame
PROGRESS_S = 0.2


class ClientGone(Exception):
    """A frame could not be sent: the client has gone away."""


def subprotocol_key(offered: list[str]) -> str | None:
    """The API key offered as a ``hexin.key.<base64url>`` subprotocol, if any."""
    for proto in offered:
        if proto.startswith(KEY_PREFIX):
            encoded = proto[len(KEY_PREFIX) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                return raw.decode()
            except (binascii.Error, ValueError):
                return ""  # offered, but unreadable: a wrong key
    return None


class Connection:
    def __init__(self, ws: WebSocket, state: State, service: ChatService, session_id: str):
        self.ws, self.state, self.service, self.sid = ws, state, service, session_id
        self.reply: Reply | None = None
        self.task: asyncio.Task | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        """Send one frame; ``ClientGone`` when the socket can no longer take it."""
        text = json.dumps(payload, ensure_ascii=False)
        try:
            await self.ws.send_text(text)
        except Exception as e:  # closed (WebSocketDisconnect, or RuntimeError once closed)
            raise ClientGone from e

    async def error(self, message: str, code: str = BAD_REQUEST.code) -> None:
        await self.send({"type": "error", "message": message, "code": code})

    async def failed(self, e: Exception) -> None:
        """Report an exception with the code the error table gives it."""
        error = api_error_from(e)
        await self.error(error.message, error.code or BAD_REQUEST.code)

    async def send_session(self) -> None:
        # loading and laying out a long tree is work for a thread, not the event loop
        view = await asyncio.to_thread(lambda: session_view(self.service.get(self.sid)))
        await self.send({"type": "session", "session": view})

    async def handle(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError as e:
            return await self.error(f"malformed JSON: {e.msg}")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return await self.error('expected an object with a "type" field')
        kind, svc = msg["type"], self.service
        if kind == "stop":
            if self.reply is not None:
                self.reply.stop()
            return None
        if kind == "session":
            return await self.send_session()
        if self.task is not None and not self.task.done():
            return await self.error("a reply is still streaming; stop it first", SESSION_BUSY.code)
        params = msg.get("params")
        if params is not None and not isinstance(params, dict):
            return await self.error('"params" must be an object')
        content = msg.get("content")
        if kind in ("user", "edit"):
            if not isinstance(content, str) or not content.strip():
                return await self.error('"content" must be a non-empty string')
            if len(content) > MAX_MESSAGE_CHARS:
                return await self.error(f'"content" is over {MAX_MESSAGE_CHARS} characters')
        if kind in ("edit", "switch") and not isinstance(msg.get("message_id"), str):
            return await self.error('"message_id" must be a string')
        if kind == "user":
            await self.start(svc.send, self.sid, content, params)
        elif kind == "regenerate":
            await self.start(svc.regenerate, self.sid, params)
        elif kind == "continue":
            await self.start(svc.continue_, self.sid, params)
        elif kind == "edit":
            await self.start(svc.edit, self.sid, msg["message_id"], content, params)
        elif kind == "tool_results":
            await self.start(svc.tool_results, self.sid, msg.get("results"), params)
        elif kind == "rollback":
            await asyncio.to_thread(svc.rollback, self.sid)
            await self.send_session()
        elif kind == "switch":
            await asyncio.to_thread(svc.switch, self.sid, msg["message_id"])
            await self.send_session()
        else:
            await self.error(f"unknown message type {kind!r}")
        return None

    async def start(self, fn, *args: Any) -> None:
        reply: Reply = await asyncio.to_thread(fn, *args)
        self.reply = reply
        if reply.user_message.role == "tool":  # several messages were added
            await self.send_session()
        else:
            await self.send({"type": "user_message", "message": reply.user_message.to_dict()})
        await self.send({"type": "reply_start", "parent_id": reply.user_message.id})
        self.task = asyncio.create_task(self.stream(reply))

    async def stream(self, reply: Reply) -> None:
        started = asyncio.Event()  # set at the first token: no progress frame after it
        progress = asyncio.create_task(self.progress(reply, started))

        async def quiet() -> None:
            """No progress frame from now on (one being sent goes out whole first)."""
            started.set()
            await asyncio.wait([progress])

        try:
            calls = tools.CallStream(ids_key=reply.message_id) if reply.calls_tools else None
            async for text in reply.stream():
                if not started.is_set():
                    await quiet()
                if calls is None:
                    await self.send({"type": "token", "text": text})
                    continue
                for delta in calls.feed(text):
                    await self.send_delta(delta)
            await quiet()  # a reply without a token
            for delta in calls.close() if calls is not None else ():
                await self.send_delta(delta)
            message = await asyncio.to_thread(reply.wait)
            self.state.metrics.completion(reply.handle.completion)
            meta = message.meta
            await self.send(
                {
                    "type": "done",
                    "message": message.to_dict(),
                    "usage": {
                        "prompt_tokens": meta["prompt_tokens"],
                        "cached_tokens": meta["cached_tokens"],
                        "completion_tokens": meta["completion_tokens"],
                    },
                    "stop_reason": meta["stop_reason"],
                    "dropped_turns": meta["dropped_turns"],
                    "timing": {"ttft_ms": meta["ttft_ms"], "tokens_per_s": meta["tokens_per_s"]},
                }
            )
        except ClientGone:  # nobody to tell: stop generating for them
            reply.stop()
        except Exception as e:  # the reply failed (engine or store): say so, stay open
            reply.stop()
            await quiet()
            with contextlib.suppress(ClientGone):
                await self.failed(e)
        finally:
            self.reply = None
            started.set()
            progress.cancel()  # (still running only if this task itself was cancelled)

    async def progress(self, reply: Reply, started: asyncio.Event) -> None:
        """Until ``started`` is set, every ``PROGRESS_S``: a ``progress`` frame if more of
        the prompt was computed since the last one (a UI shows "Processing N%" while a
        long prompt is prefilled). A client gone stops the reply, whose stream then ends."""
        handle, last = reply.handle, None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(started.wait(), PROGRESS_S)
                return
            done, total = handle.prefill_progress
            if done == last:
                continue
            last = done
            frame = {"done": done, "total": total, "cached": handle.completion.cached_tokens}
            try:
                await self.send({"type": "progress", **frame})
            except ClientGone:
                reply.stop()
                return

    async def send_delta(self, delta: dict[str, Any]) -> None:
        """A ``CallStream`` delta as a token or tool_call frame."""
        if "content" in delta:
            await self.send({"type": "token", "text": delta["content"]})
        for entry in delta.get("tool_calls", ()):
            await self.send({"type": "tool_call", "delta": entry})

    def close(self) -> None:
        if self.reply is not None:
            self.reply.stop()


@router.websocket("/c/{session_id}")
async def chat_socket(ws: WebSocket, session_id: str) -> None:
    state: State = ws.app.state.hexin
    offered = list(ws.scope.get("subprotocols") or ())
    # accept first, then close with a reason: a refused handshake looks like a dead
    # server to a browser, which could not tell "wrong key" from "down"; a browser that
    # offered subprotocols fails a handshake that selects none
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    header = ws.headers.get("authorization")
    key = subprotocol_key(offered)
    if key is None:
        key = ws.query_params.get("api_key")
    if not state.authorized(header, key):
        await ws.close(code=4401, reason="missing or wrong API key")
        return
    try:
        check_id(session_id)
    except Exception as e:
        await ws.close(code=4400, reason=str(e)[:120])
        return
    if state.service is None:
        frame = {"type": "error", "message": "model is loading", "code": "loading"}
        await ws.send_text(json.dumps(frame))
        await ws.close(code=1013)
        return
    service = state.service
    if not await asyncio.to_thread(service.store.exists, session_id):
        with contextlib.suppress(ChatError):  # another socket may create it first
            await asyncio.to_thread(service.create, session_id=session_id)
    state.metrics.request("/c/{session_id}", 101)
    conn = Connection(ws, state, service, session_id)
    try:
        await conn.send_session()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                await conn.error("binary frames are not supported: send JSON as text")
                continue
            try:
                await conn.handle(raw)
            except ClientGone:
                raise
            except Exception as e:
                await conn.failed(e)
    except (WebSocketDisconnect, ClientGone):
        pass
    finally:
        conn.close()
        if conn.task is not None:
            with contextlib.suppress(BaseException):
                await conn.task
