"""REST API for sessions under /api/sessions. Operations that generate return the finished
reply; the WebSocket at /c/{session_id} is the streaming path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from hexin.chat.service import ChatService, Reply
from hexin.chat.tree import Session, check_id
from hexin.server.state import MAX_MESSAGE_CHARS, ApiError, State, api_error_from, get_state
from hexin.tools import MAX_TOOLS, Tool

router = APIRouter(prefix="/api/sessions", tags=["sessions"])


class SessionCreate(BaseModel):
    id: str | None = Field(default=None, max_length=64)
    title: str = Field(default="", max_length=200)
    system_prompt: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    params: dict[str, Any] | None = None
    #: the functions the model may call (OpenAI's ``tools``)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)


class SessionUpdate(BaseModel):
    title: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    params: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)

    def tool_specs(self) -> list[dict[str, Any]] | None:
        return None if self.tools is None else specs(self.tools)


class MessageIn(BaseModel):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    params: dict[str, Any] | None = None


class EditIn(MessageIn):
    message_id: str = Field(max_length=64)


class RegenerateIn(BaseModel):
    params: dict[str, Any] | None = None


class SwitchIn(BaseModel):
    message_id: str = Field(max_length=64)


class ToolResult(BaseModel):
    tool_call_id: str = Field(max_length=64)
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class ToolResultsIn(BaseModel):
    """The results of the last reply's tool calls, one per call."""

    results: list[ToolResult] = Field(max_length=MAX_TOOLS)
    params: dict[str, Any] | None = None


def specs(tools: list[Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


def service(request: Request) -> ChatService:
    state: State = get_state(request)
    return state.require()[1]


async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a service call off the event loop (it may wait for the store or a stopping
    reply) and turn hexin errors into HTTP errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except ApiError:
        raise
    except Exception as e:
        raise api_error_from(e) from None


def session_view(session: Session) -> dict[str, Any]:
    """The whole tree plus the active path, with each message's version (i of n).
    Linear in the size of the tree (one children index for all the versions)."""
    data = session.to_dict()
    path = session.path()
    data["path"] = [
        m.to_dict() | {"version": i, "versions": n}
        for m, (i, n) in zip(path, session.versions(path), strict=True)
    ]
    return data


async def view(fn: Callable[..., Session], *args: Any, status: int = 200, **kw: Any) -> Response:
    """A service call that returns a session, answered with its view. The call, the view
    and its JSON are all made off the event loop: for a large tree they take a while, and
    the loop must keep answering everyone else meanwhile."""
    return await call(lambda: JSONResponse(session_view(fn(*args, **kw)), status_code=status))


async def finished(request: Request, reply: Reply) -> dict[str, Any]:
    message = await asyncio.to_thread(reply.wait)
    get_state(request).metrics.completion(reply.handle.completion)
    return {"message": message.to_dict(), "user_message": reply.user_message.to_dict()}


Svc = Annotated[ChatService, Depends(service)]


def valid_id(session_id: str) -> str:
    try:
        return check_id(session_id)
    except Exception as e:
        raise ApiError(400, str(e), param="session_id") from None


@router.get("")
async def list_sessions(
    svc: Svc, q: Annotated[str | None, Query(max_length=200)] = None
) -> dict[str, Any]:
    return {"sessions": await call(svc.list, q)}


@router.post("", status_code=201)
async def create_session(body: SessionCreate, svc: Svc):
    return await view(
        svc.create,
        title=body.title,
        system_prompt=body.system_prompt,
        params=body.params,
        session_id=body.id,
        tools=specs(body.tools or []),
        status=201,
    )


@router.post("/import", status_code=201)
async def import_session(body: dict[str, Any], svc: Svc):
    """A session from its export, checked in full before anything is stored (any fault
    is a 400 and changes nothing); see ``ChatService.import_``."""
    return await view(svc.import_, body, status=201)


@router.get("/{session_id}")
async def read_session(session_id: str, svc: Svc):
    return await view(svc.get, valid_id(session_id))


@router.patch("/{session_id}")
async def update_session(session_id: str, body: SessionUpdate, svc: Svc):
    return await view(
        svc.update,
        valid_id(session_id),
        title=body.title,
        system_prompt=body.system_prompt,
        params=body.params,
        tools=body.tool_specs(),
    )


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, svc: Svc) -> None:
    await call(svc.delete, valid_id(session_id))


@router.get("/{session_id}/export")
async def export_session(session_id: str, svc: Svc):
    sid = valid_id(session_id)
    return await call(lambda: JSONResponse(svc.export(sid)))


@router.post("/{session_id}/messages")
async def send_message(request: Request, session_id: str, body: MessageIn, svc: Svc):
    reply = await call(svc.send, valid_id(session_id), body.content, body.params)
    return await finished(request, reply)


@router.post("/{session_id}/regenerate")
async def regenerate(request: Request, session_id: str, svc: Svc, body: RegenerateIn | None = None):
    reply = await call(svc.regenerate, valid_id(session_id), body.params if body else None)
    return await finished(request, reply)


@router.post("/{session_id}/continue")
async def continue_reply(
    request: Request, session_id: str, svc: Svc, body: RegenerateIn | None = None
):
    """The last reply goes on from where it stopped (its token limit, or a stop); the
    text is added to the same message."""
    reply = await call(svc.continue_, valid_id(session_id), body.params if body else None)
    return await finished(request, reply)


@router.post("/{session_id}/edit")
async def edit(request: Request, session_id: str, body: EditIn, svc: Svc):
    reply = await call(svc.edit, valid_id(session_id), body.message_id, body.content, body.params)
    return await finished(request, reply)


@router.post("/{session_id}/tool_results")
async def tool_results(request: Request, session_id: str, body: ToolResultsIn, svc: Svc):
    """Answer the last reply's tool calls; the reply to them, as ``/messages`` gives it
    (``user_message``: the last tool result)."""
    results = [r.model_dump() for r in body.results]
    reply = await call(svc.tool_results, valid_id(session_id), results, body.params)
    return await finished(request, reply)


@router.post("/{session_id}/rollback")
async def rollback(session_id: str, svc: Svc):
    return await view(svc.rollback, valid_id(session_id))


@router.post("/{session_id}/switch")
async def switch(session_id: str, body: SwitchIn, svc: Svc):
    return await view(svc.switch, valid_id(session_id), body.message_id)
