"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions.

Requests are stateless, but they still share cached prefixes through the engine's block
digests: a repeated system prompt or a conversation resent with one more message is
prefilled only past what is cached, and ``usage.prompt_tokens_details.cached_tokens``
says how much was reused.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from hexin.engine import RequestHandle
from hexin.output import Completion
from hexin.sampling import SamplingParams
from hexin.server.state import MAX_MESSAGE_CHARS, ApiError, State, api_error_from, get_state

router = APIRouter(prefix="/v1", tags=["openai"])
#: a generation's 200 answer: the finished object, or with "stream" server-sent events,
#: each a JSON chunk in ``data`` and then "[DONE]" (the schema of one event, as Open API
#: 3.1 reads an event stream's schema)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
GENERATED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def strings(value: Any, info: ValidationInfo) -> Any:
    """A string or a list of strings, as JSON gave it: anything else (an object, a number,
    a list holding one) is refused, never coerced. Only ``stop`` may be null."""
    if isinstance(value, str) or (value is None and info.field_name == "stop"):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise PydanticCustomError("string_or_strings", "must be a string or an array of strings")


class Strict(BaseModel):
    """A request body whose fields take only their JSON type, as the OpenAPI document
    gives it: 0 is no boolean, "1" no number."""

    model_config = ConfigDict(strict=True)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    _stop_strings = field_validator("stop", mode="before")(strings)

    def sampling(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(len(s) > 200 for s in stop):
            raise ApiError(400, "stop: at most 4 strings of up to 200 characters", param="stop")
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,  # 0 means "off", as in the llama.cpp server
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            seed=self.seed,
            stop=tuple(stop),
        )


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(max_length=MAX_MESSAGE_CHARS)
    temperature: float = Field(default=1.0, ge=0, le=2)
    max_tokens: int | None = Field(default=16, ge=1)

    _prompt_strings = field_validator("prompt", mode="before")(strings)


def finish_reason(c: Completion) -> str:
    return "length" if c.stop_reason == "length" else "stop"


def usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


def submit(state: State, prompt: str, req: SamplingFields) -> RequestHandle:
    engine, _ = state.require()  # any "model" is accepted: one model is served
    ids = engine.tokenizer.encode(prompt)
    try:
        # the engine also stops a reply at the context limit
        params = req.sampling(default_max=state.config.max_tokens_default)
        return engine.submit(ids, params)
    except ApiError:
        raise
    except Exception as e:
        raise api_error_from(e) from None


async def sse(
    state: State, handle: RequestHandle, chunk: Any, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta, a final chunk with the finish
    reason, the usage chunk if asked for, then [DONE]. A client that disconnects
    cancels the request (the generator is closed)."""
    try:
        first = chunk(role=True)
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n"
        async for text in handle.stream():
            yield f"data: {json.dumps(chunk(text=text))}\n\n"
        c = handle.completion
        state.metrics.completion(c)
        yield f"data: {json.dumps(chunk(finish=finish_reason(c)))}\n\n"
        if include_usage:
            yield f"data: {json.dumps(chunk(usage=usage(c)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


async def wait_unless_disconnected(request: Request | None, handle: RequestHandle) -> Completion:
    """The finished completion; a client that goes away first cancels the request, so
    the engine does not generate for nobody (nor hold up a graceful shutdown)."""

    async def watch() -> None:
        # the body is read: what the server sends next is the client's disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.ensure_future(watch()) if request is not None else None
    try:
        return await asyncio.to_thread(handle.result)
    finally:
        if watcher is not None:
            watcher.cancel()
        handle.cancel()  # a no-op once finished


async def respond(
    state: State,
    handle: RequestHandle,
    req: SamplingFields,
    chunk: Callable[..., dict[str, Any] | None],
    rid: str,
    kind: str,
    choice: Callable[[Completion], dict[str, Any]],
    request: Request | None = None,
):
    """The answer to a generation request: an event stream, or the finished object."""
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(sse(state, handle, chunk, include), media_type="text/event-stream")
    c = await wait_unless_disconnected(request, handle)
    state.metrics.completion(c)
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": state.model_name,
        "choices": [choice(c)],
        "usage": usage(c),
    }


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state: State = get_state(request)
    state.require()
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": state.started,
                "owned_by": "hexin",
            }
        ],
    }


@router.post("/chat/completions", responses=GENERATED)
async def chat_completions(request: Request, req: ChatRequest):
    state: State = get_state(request)
    engine, _ = state.require()
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in req.messages
    ]
    try:
        prompt = engine.tokenizer.apply_chat_template(messages)
    except Exception as e:
        raise api_error_from(e) from None
    handle = submit(state, prompt, req)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

    def chunk(*, role=False, text=None, finish=None, usage=None) -> dict[str, Any]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created}
        base["model"] = state.model_name
        if usage is not None:
            return base | {"choices": [], "usage": usage}
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def choice(c: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": c.text}
        return {"index": 0, "message": message, "finish_reason": finish_reason(c)}

    return await respond(state, handle, req, chunk, rid, "chat.completion", choice, request)


@router.post("/completions", responses=GENERATED)
async def completions(request: Request, req: CompletionRequest):
    state: State = get_state(request)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: exactly one prompt per request", param="prompt")
    handle = submit(state, prompts[0], req)
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

    def chunk(*, role=False, text=None, finish=None, usage=None) -> dict[str, Any] | None:
        if role:
            return None
        base = {"id": rid, "object": "text_completion", "created": created}
        base["model"] = state.model_name
        if usage is not None:
            return base | {"choices": [], "usage": usage}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return base | {"choices": [choice]}

    def choice(c: Completion) -> dict[str, Any]:
        return {"index": 0, "text": c.text, "logprobs": None, "finish_reason": finish_reason(c)}

    return await respond(state, handle, req, chunk, rid, "text_completion", choice, request)
