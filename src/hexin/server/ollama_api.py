"""An Ollama-compatible API on the same engine: /api/chat, /api/generate (NDJSON streaming),
/api/tags, /api/show, /api/version.

Tools that speak only Ollama's protocol (Open WebUI's Ollama connection, editor plugins,
the ``ollama`` Python client) then work with hexin. Sampling ``options`` map onto the
engine's (``num_predict`` is ``max_tokens``, ``repeat_penalty`` ``repetition_penalty``);
``format`` ("json" or a JSON schema) holds the reply to it. ``tools`` on /api/chat work
as in the OpenAI API (``hexin.tools``); calls come back as the message's ``tool_calls``
(arguments as objects, as Ollama gives them) and ``role: "tool"`` messages go back in.
A field Ollama defines that hexin does not implement (``suffix``, ``template``,
``context``, ``think``) is refused with a 400 naming it. Errors are Ollama's shape,
``{"error": "..."}``, with the HTTP status hexin gives the same error elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hexin import tools
from hexin.config import expected_shapes
from hexin.engine import RequestHandle
from hexin.output import Completion
from hexin.sampling import SamplingParams
from hexin.server.state import MAX_MESSAGE_CHARS, State, api_error_from, get_state
from hexin.tools import Tool

router = APIRouter(prefix="/api", tags=["ollama"])
#: the Ollama API version these endpoints follow
VERSION = "0.6.3"
NDJSON = {200: {"content": {"application/x-ndjson": {"schema": {"type": "object"}}}}}
#: its paths, whose errors take Ollama's shape
PATHS = ("/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/version")


class OllamaError(Exception):
    """An error answered in Ollama's shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)


class Options(BaseModel):
    """Ollama's sampling options; others it defines (num_ctx, num_thread, mirostat...)
    tune its own runner and are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="allow")
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    num_predict: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float = Field(default=1.0, gt=0, le=10)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)

    def params(self, default_max: int, fmt: str | dict[str, Any] | None) -> SamplingParams:
        grammar = None
        if fmt == "json":
            grammar = ("json_object", "")
        elif isinstance(fmt, dict):
            grammar = ("json_schema", json.dumps(fmt))
        limited = self.num_predict is not None and self.num_predict > 0
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,
            min_p=self.min_p,
            max_tokens=self.num_predict if limited else default_max,  # type: ignore[arg-type]
            seed=self.seed,
            stop=tuple(self.stop or ()),
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            grammar=grammar,
        )


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    function: CalledFunction


class Message(BaseModel):
    # JSON types only, as the document says; a field it does not name is refused
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(default="", max_length=MAX_MESSAGE_CHARS)
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=tools.MAX_TOOLS)
    tool_name: str | None = None  # a tool message's function

    def chat_entry(self) -> dict[str, Any]:
        """The message as a chat template takes it (OpenAI's form)."""
        entry: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "function": c.function.model_dump(exclude={"index"})}
                for c in self.tool_calls
            ]
        return entry


class Generation(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str = ""
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: str | float | None = None  # one model stays loaded: accepted, ignored


class ChatBody(Generation):
    messages: list[Message] = Field(default_factory=list, max_length=1000)
    tools: list[Tool] | None = Field(default=None, max_length=tools.MAX_TOOLS)

    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


class GenerateBody(Generation):
    prompt: str = Field(default="", max_length=MAX_MESSAGE_CHARS)
    system: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    raw: bool = False
    images: list[str] | None = None


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def stats(c: Completion, started: float) -> dict[str, Any]:
    """The final object's counts and durations (nanoseconds, as Ollama gives them)."""
    total = time.perf_counter() - started
    return {
        "done_reason": "length" if c.stop_reason == "length" else "stop",
        "total_duration": int(total * 1e9),
        "load_duration": 0,
        "prompt_eval_count": c.prompt_tokens,
        "prompt_eval_duration": int(c.ttft_s * 1e9),
        "eval_count": c.completion_tokens,
        "eval_duration": int(c.decode_s * 1e9),
    }


def submit(state: State, prompt: str, body: Generation, *, templated: bool) -> RequestHandle:
    """Queue ``prompt``: a rendered chat template (``templated``) is encoded as transformers
    encodes one, with no BOS but the one the template writes; raw text as plain text."""
    engine, _ = state.require()
    if body.model and body.model.removesuffix(":latest") != state.model_name:
        message = f"model '{body.model}' not found: this server runs '{state.model_name}'"
        raise OllamaError(404, message)
    try:
        params = body.options.params(state.config.max_tokens_default, body.format)
        tok = engine.tokenizer
        ids = tok.encode_chat(prompt) if templated else tok.encode(prompt)
        return engine.submit(ids, params)
    except Exception as e:
        error = api_error_from(e)
        raise OllamaError(error.status, error.message) from None


async def answer(
    state: State,
    handle: RequestHandle,
    body: Generation,
    delta: Callable[[str], dict[str, Any] | None],
    final: Callable[[Completion, bool], dict[str, Any]],
) -> Any:
    """NDJSON lines of ``delta(text)`` (None: nothing to send yet) and a last line
    ``final(completion, True) | done``; or one object, ``final(completion, False) | done``."""
    started = time.perf_counter()
    base = {"model": state.model_name}
    if body.stream:

        async def lines() -> AsyncIterator[str]:
            try:
                async for text in handle.stream():
                    if (piece := delta(text)) is not None:
                        line = base | {"created_at": now()} | piece | {"done": False}
                        yield json.dumps(line) + "\n"
                c = handle.completion
                state.metrics.completion(c)
                last = base | {"created_at": now()} | final(c, True) | {"done": True}
                yield json.dumps(last | stats(c, started)) + "\n"
            finally:
                handle.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    try:
        c = await asyncio.to_thread(handle.result)
    finally:
        handle.cancel()
    state.metrics.completion(c)
    return base | {"created_at": now()} | final(c, False) | {"done": True} | stats(c, started)


class ChatReply:
    """/api/chat's message pieces. With tools, text streams outside calls (a
    ``tools.CallStream``), and the calls, parsed from the whole reply, come in the last
    message, their arguments as objects."""

    def __init__(self, calling: bool) -> None:
        self.calls = tools.CallStream() if calling else None

    def delta(self, text: str) -> dict[str, Any] | None:
        if self.calls is not None:
            text = "".join(d.get("content", "") for d in self.calls.feed(text))
            if not text:
                return None
        return {"message": {"role": "assistant", "content": text}}

    def final(self, c: Completion, streamed: bool) -> dict[str, Any]:
        if self.calls is None:
            return {"message": {"role": "assistant", "content": "" if streamed else c.text}}
        held = "".join(d.get("content", "") for d in self.calls.close())
        content, calls = tools.parse(c.text)
        message = {"role": "assistant", "content": held if streamed else content}
        if calls:
            message["tool_calls"] = [
                {
                    "function": {
                        "index": i,
                        "name": call.name,
                        "arguments": json.loads(call.arguments),
                    }
                }
                for i, call in enumerate(calls)
            ]
        return {"message": message}


def loaded(state: State) -> dict[str, Any]:
    """The answer to a request that only loads the model (always loaded here)."""
    return {"model": state.model_name, "created_at": now(), "done": True, "done_reason": "load"}


def refuse_images(images: list[str] | None) -> None:
    if images:
        raise OllamaError(400, "images are not supported: this model reads only text")


@router.post("/chat", responses=NDJSON)
async def chat(request: Request, body: ChatBody):
    state: State = get_state(request)
    engine, _ = state.require()
    for m in body.messages:
        refuse_images(m.images)
    if not body.messages:  # Ollama's way to load a model: nothing to say
        return loaded(state) | {"message": {"role": "assistant", "content": ""}}
    messages = [m.chat_entry() for m in body.messages]
    try:
        prompt = tools.prompt(engine.tokenizer, messages, body.tool_specs())
    except Exception as e:
        raise OllamaError(400, str(e)) from None
    handle = submit(state, prompt, body, templated=True)
    reply = ChatReply(calling=bool(body.tools))
    return await answer(state, handle, body, reply.delta, reply.final)


@router.post("/generate", responses=NDJSON)
async def generate(request: Request, body: GenerateBody):
    state: State = get_state(request)
    engine, _ = state.require()
    refuse_images(body.images)
    if not body.prompt:  # Ollama's way to load a model
        return loaded(state) | {"response": ""}
    prompt = body.prompt
    templated = not body.raw and bool(engine.tokenizer.chat_template)
    if templated:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        prompt = engine.tokenizer.apply_chat_template(messages)
    handle = submit(state, prompt, body, templated=templated)
    return await answer(
        state,
        handle,
        body,
        lambda text: {"response": text},
        lambda c, streamed: {"response": "" if streamed else c.text},
    )


def details(state: State) -> dict[str, Any]:
    engine, _ = state.require()
    cfg = engine.model.config
    params = sum(math.prod(shape) for shape in expected_shapes(cfg, lm_head=False).values())
    return {
        "parent_model": "",
        "format": state.model_format,
        "family": cfg.architecture,
        "families": [cfg.architecture],
        "parameter_size": f"{params / 1e6:.0f}M" if params < 1e9 else f"{params / 1e9:.1f}B",
        "quantization_level": engine.model.quant,
    }


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    state: State = get_state(request)
    state.require()
    started = datetime.fromtimestamp(state.started, UTC).isoformat().replace("+00:00", "Z")
    model = {
        "name": state.model_name,
        "model": state.model_name,
        "modified_at": started,
        "size": 0,
        "digest": "",
        "details": details(state),
    }
    return {"models": [model]}


class ShowBody(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str = ""
    name: str = ""  # the older field name


@router.post("/show")
async def show(request: Request, body: ShowBody) -> dict[str, Any]:
    state: State = get_state(request)
    engine, _ = state.require()
    arch = engine.model.config.architecture
    return {
        "modelfile": "",
        "parameters": "",
        "template": engine.tokenizer.chat_template or "",
        "details": details(state),
        "model_info": {
            "general.architecture": arch,
            f"{arch}.context_length": engine.context_limit,
        },
        "capabilities": ["completion", "tools"],
    }


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": VERSION}
