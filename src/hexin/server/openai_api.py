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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hexin import tools
from hexin.engine import RequestHandle
from hexin.output import Completion
from hexin.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from hexin.server.state import MAX_MESSAGE_CHARS, ApiError, State, api_error_from, get_state
from hexin.tools import MAX_TOOLS, Tool

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
    gives it: 0 is no boolean, "1" no number. A field it does not name is refused (400
    naming it), never accepted and dropped."""

    model_config = ConfigDict(strict=True, extra="forbid")


def text_of_parts(value: Any) -> Any:
    """A message's content given as a list of parts: its text parts joined by newlines.
    Other parts (images, audio, files) are refused: no model hexin serves reads them."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file", "image", "audio"):
            raise PydanticCustomError(
                "content_part", f"{kind} parts are not supported: this model reads only text"
            )
        else:
            raise PydanticCustomError(
                "content_part", 'each content part must be {"type": "text", "text": "..."}'
            )
    return "\n".join(texts)


class CalledFunction(Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_MESSAGE_CHARS)  # a JSON object, as a string


class ToolCallIn(Strict):
    """A call the assistant made earlier, sent back with the conversation."""

    id: str = Field(max_length=64)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    name: str | None = None  # accepted, as OpenAI does; the chat templates here ignore it
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = None  # a tool message's answer to that call

    _parts = field_validator("content", mode="before")(text_of_parts)

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content: required (null only beside tool_calls)")
        return self


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the reply always follows the schema, strict or not


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def grammar(self) -> tuple[str, str] | None:
        if self.type == "json_object":
            return ("json_object", "")
        if self.type == "json_schema":
            if self.json_schema is None:
                message = "response_format.json_schema: give the schema"
                raise ApiError(400, message, param="response_format.json_schema")
            return ("json_schema", json.dumps(self.json_schema.schema_))
        return None


#: the most choices (``n``) one request may ask for
MAX_CHOICES = 16
#: what a completion's ``logprobs`` may ask for, and a chat's ``top_logprobs``
LOGPROBS_FIELD = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class SamplingFields(Strict):
    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted and ignored (OpenAI's end-user id)

    _stop_strings = field_validator("stop", mode="before")(strings)

    def sampling(self, default_max: int, vocab_size: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(len(s) > 200 for s in stop):
            raise ApiError(400, "stop: at most 4 strings of up to 200 characters", param="stop")
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or None,  # 0 means "off", as in the llama.cpp server
            min_p=self.min_p,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            seed=self.seed,
            stop=tuple(stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple(bias_of(self.logit_bias or {}, vocab_size).items()),
            logprobs=self.top_logprobs_asked(),
            grammar=self.grammar(),
        )

    def grammar(self) -> tuple[str, str] | None:
        """What the reply is held to (``hexin.grammar``), if anything."""
        return self.response_format.grammar() if self.response_format else None

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's log-probability lists; None: none asked."""
        return None


def bias_of(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as JSON keys, values from -100 to 100)."""
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(
                400, f"logit_bias: {key!r} is not a token id of this model", param="logit_bias"
            )
        if not -100 <= value <= 100:
            raise ApiError(400, "logit_bias: values must be from -100 to 100", param="logit_bias")
        out[int(key)] = value
    return out


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    logprobs: bool = False
    top_logprobs: int | None = LOGPROBS_FIELD
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; an enforced call is one call

    def tool_specs(self) -> list[dict[str, Any]]:
        """The tools the model is told about (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_call(self) -> tuple[bool, str | None]:
        """Whether the reply must be a call (tool_choice "required" or a named function),
        and the function named, if one is."""
        if not self.tool_specs():
            return False, None
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or []}:
                raise ApiError(400, f"tool_choice: no tool named {name!r}", param="tool_choice")
            return True, name
        return self.tool_choice == "required", None

    def grammar(self) -> tuple[str, str] | None:
        forced, name = self.forced_call()
        if not forced:
            return super().grammar()
        if self.response_format is not None and self.response_format.type != "text":
            message = "response_format: not with a required tool call"
            raise ApiError(400, message, param="response_format")
        return ("json_schema", json.dumps(tools.call_schema(self.tool_specs(), name)))

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


#: a prompt given as token ids
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    #: a string, token ids, or a list of either (one choice each)
    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1, max_length=64)]
    temperature: float = Field(default=1.0, ge=0, le=2)
    #: 0 only with ``echo``: score the prompt, generate nothing
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = LOGPROBS_FIELD
    echo: bool = False
    #: extensions: the text held to a GBNF or Lark grammar, or to a regular expression
    grammar_: str | None = Field(default=None, alias="grammar", max_length=MAX_MESSAGE_CHARS)
    regex: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)

    def grammar(self) -> tuple[str, str] | None:
        given = [
            (name, value)
            for name, value in (
                ("response_format", super().grammar()),
                ("grammar", ("grammar", self.grammar_) if self.grammar_ is not None else None),
                ("regex", ("regex", self.regex) if self.regex is not None else None),
            )
            if value is not None
        ]
        if len(given) > 1:
            names = " and ".join(name for name, _ in given)
            raise ApiError(400, f"{names}: give one of them", param=given[1][0])
        return given[0][1] if given else None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


def finish_reason(c: Completion) -> str:
    return "length" if c.stop_reason == "length" else "stop"


def usage(cs: list[Completion]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in cs)
    completion = sum(c.completion_tokens for c in cs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in cs)},
    }


def submit(
    state: State, ids: list[int], req: SamplingFields, *, score_prompt: bool = False
) -> list[RequestHandle]:
    """Queue the request's ``n`` replies to one prompt (computed once; with a seed, reply
    i samples with seed + i); ``score_prompt``: with the prompt tokens' log-probabilities."""
    engine, _ = state.require()  # any "model" is accepted: one model is served
    try:
        # the engine also stops a reply at the context limit
        params = req.sampling(state.config.max_tokens_default, engine.model.config.vocab_size)
        if score_prompt:
            params = params.with_(prompt_logprobs=params.logprobs or 0)
        if req.n == 1:
            return [engine.submit(ids, params)]
        seeds = [None if params.seed is None else params.seed + i for i in range(req.n)]
        return engine.submit_choices(ids, [params.with_(seed=seed) for seed in seeds])
    except ApiError:
        raise
    except Exception as e:
        raise api_error_from(e) from None


class Logprobs:
    """Token log-probabilities in OpenAI's two shapes, with each token's text."""

    def __init__(self, state: State) -> None:
        self.tokenizer = state.require()[0].tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special=False)

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """A chat choice's ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs}]}."""

        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries
        ]
        return {"content": content, "refusal": None}

    def completion(
        self, entries: list[TokenLogprob | None], first: int | None = None
    ) -> dict[str, Any]:
        """A completion choice's ``logprobs``: parallel lists of tokens, their
        log-probabilities, their alternatives and their offsets in the choice's text.
        An echoed prompt's first token (``first``), which nothing predicts, is the None
        entry, with null ones."""
        out: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        offset = 0
        for e in entries:
            token = e.token if e is not None else first
            assert token is not None, "a None entry stands for the prompt's first token"
            text = self.text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob if e is not None else None)
            top = {self.text(t): lp for t, lp in e.top} if e is not None else None
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, str | None]]:
    """The text deltas of several requests as they come, as (index, text), and (index,
    None) when one ends; a request's error is raised once all have ended."""
    queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    errors: list[BaseException] = []

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for text in handle.stream():
                await queue.put((i, text))
        except Exception as e:
            errors.append(e)
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in handles:
            while (item := await queue.get())[1] is not None:
                yield item
            yield item
        if errors:
            raise errors[0]
    finally:
        for task in tasks:
            task.cancel()


async def sse(
    state: State,
    handles: list[RequestHandle],
    chunk: Callable[..., dict[str, Any] | None],
    include_usage: bool,
    split: Callable[[], tools.CallStream] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events: for each choice (its ``index``), one chunk per text delta (with
    the log-probabilities of the tokens since its last one, if asked for) and a final chunk
    with its finish reason; then the usage chunk if asked for, and [DONE]. With ``split``
    (a reply that may call tools) each choice's text goes through its own ``CallStream``,
    and its chunks carry content and ``tool_calls`` deltas. A client that disconnects
    cancels the requests (the generator is closed)."""
    seen = [0] * len(handles)
    calls = [split() for _ in handles] if split is not None else None

    def new_logprobs(i: int) -> list[TokenLogprob]:
        entries = handles[i].completion.logprobs
        start, seen[i] = seen[i], len(entries)
        return entries[start:]

    def events(i: int, text: str | None) -> Iterator[dict[str, Any] | None]:
        entries = new_logprobs(i)
        if calls is None:
            if text is not None:
                yield chunk(text=text, entries=entries, index=i)
            return
        deltas = calls[i].feed(text) if text is not None else calls[i].close()
        for delta in deltas:
            yield chunk(delta=delta, entries=entries, index=i)
            entries = []

    try:
        for i in range(len(handles)):
            first = chunk(role=True, index=i)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
        async for i, text in merged(handles):
            for event in events(i, text):
                yield f"data: {json.dumps(event)}\n\n"
            if text is None:
                c = handles[i].completion
                state.metrics.completion(c)
                finish = "tool_calls" if calls and calls[i].calls else finish_reason(c)
                final = chunk(finish=finish, entries=new_logprobs(i), index=i)
                yield f"data: {json.dumps(final)}\n\n"
        if include_usage:
            cs = [h.completion for h in handles]
            yield f"data: {json.dumps(chunk(usage=usage(cs)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for handle in handles:
            handle.cancel()


async def wait_unless_disconnected(
    request: Request | None, handles: list[RequestHandle]
) -> list[Completion]:
    """The finished completions; a client that goes away first cancels the requests, so
    the engine does not generate for nobody (nor hold up a graceful shutdown)."""

    async def watch() -> None:
        # the body is read: what the server sends next is the client's disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for handle in handles:
            handle.cancel()

    watcher = asyncio.ensure_future(watch()) if request is not None else None
    try:
        return [await asyncio.to_thread(handle.result) for handle in handles]
    finally:
        if watcher is not None:
            watcher.cancel()
        for handle in handles:
            handle.cancel()  # a no-op once finished


async def respond(
    state: State,
    handles: list[RequestHandle],
    req: SamplingFields,
    chunk: Callable[..., dict[str, Any] | None],
    rid: str,
    kind: str,
    choice: Callable[[int, Completion], dict[str, Any]],
    request: Request | None = None,
    split: Callable[[], tools.CallStream] | None = None,
):
    """The answer to a generation request: an event stream (one request), or the
    finished object with one choice per request."""
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            sse(state, handles, chunk, include, split), media_type="text/event-stream"
        )
    cs = await wait_unless_disconnected(request, handles)
    for c in cs:
        state.metrics.completion(c)
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": state.model_name,
        # choices first: a choice may correct its counts (echo alone generates nothing)
        "choices": [choice(i, c) for i, c in enumerate(cs)],
        "usage": usage(cs),
    }


def model_card(state: State) -> dict[str, Any]:
    created, name = state.started, state.model_name
    return {"id": name, "object": "model", "created": created, "owned_by": "hexin"}


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state: State = get_state(request)
    state.require()
    return {"object": "list", "data": [model_card(state)]}


@router.get("/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    state: State = get_state(request)
    state.require()
    if model_id != state.model_name:
        message = f"model {model_id!r} does not exist: this server serves {state.model_name!r}"
        raise ApiError(404, message, type_="not_found_error", param="model", code="model_not_found")
    return model_card(state)


def chat_prompt(state: State, req: ChatRequest) -> str:
    """The conversation (and its tools) through the model's chat template."""
    tok = state.require()[0].tokenizer
    messages = [
        m.model_dump(exclude_none=True) | {"role": "system" if m.role == "developer" else m.role}
        for m in req.messages
    ]
    try:
        return tools.prompt(tok, messages, req.tool_specs())
    except Exception as e:
        raise api_error_from(e) from None


@router.post("/chat/completions", responses=GENERATED)
async def chat_completions(request: Request, req: ChatRequest):
    state: State = get_state(request)
    engine, _ = state.require()
    handles = submit(state, engine.tokenizer.encode_chat(chat_prompt(state, req)), req)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    logprobs = Logprobs(state) if req.logprobs else None
    calling = bool(req.tool_specs())
    forced, _ = req.forced_call()

    def message_of(c: Completion) -> tuple[dict[str, Any], str]:
        """The assistant message and finish reason, tool calls parsed out of the text."""
        content, calls = tools.parse(c.text, whole=forced) if calling else (c.text, [])
        if not calls:
            return {"role": "assistant", "content": c.text}, finish_reason(c)
        message = {"role": "assistant", "content": content or None}
        return message | {"tool_calls": [call.to_openai() for call in calls]}, "tool_calls"

    def chunk(
        *, role=False, text=None, delta=None, finish=None, usage=None, entries=None, index=0
    ) -> dict[str, Any]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created}
        base["model"] = state.model_name
        if usage is not None:
            return base | {"choices": [], "usage": usage}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        one = {"index": index, "delta": delta or {}, "finish_reason": finish}
        if logprobs is not None and not role:
            one["logprobs"] = logprobs.chat(entries or [])
        return base | {"choices": [one]}

    def choice(i: int, c: Completion) -> dict[str, Any]:
        message, finish = message_of(c)
        out = {"index": i, "message": message, "finish_reason": finish}
        return out | {"logprobs": logprobs.chat(c.logprobs) if logprobs is not None else None}

    split = (lambda: tools.CallStream(whole=forced)) if calling else None
    return await respond(state, handles, req, chunk, rid, "chat.completion", choice, request, split)


@router.post("/completions", responses=GENERATED)
async def completions(request: Request, req: CompletionRequest):
    state: State = get_state(request)
    engine, _ = state.require()
    tok = engine.tokenizer
    prompts = [tok.encode(p) if isinstance(p, str) else p for p in req.prompts()]
    for ids in prompts:
        if bad := [t for t in ids if t >= engine.model.config.vocab_size]:
            raise ApiError(400, f"prompt: token id {bad[0]} outside the vocabulary", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens: must be at least 1 (0 only with echo)", param="max_tokens")
    scoring = req.echo and req.logprobs is not None
    if scoring and req.stream:
        raise ApiError(400, "echo: prompt log-probabilities are not streamed", param="echo")
    echo_only = req.max_tokens == 0  # score the prompt: generate one token, leave it out
    if echo_only:
        req = req.model_copy(update={"max_tokens": 1})
    handles = [h for ids in prompts for h in submit(state, ids, req, score_prompt=scoring)]
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    logprobs = Logprobs(state) if req.logprobs is not None else None
    echoed = [tok.decode(ids, skip_special=False) if req.echo else "" for ids in prompts]

    def chunk(*, role=False, text=None, finish=None, usage=None, entries=None, index=0):
        base = {"id": rid, "object": "text_completion", "created": created}
        base["model"] = state.model_name
        if usage is not None:
            return base | {"choices": [], "usage": usage}
        if role and not req.echo:
            return None
        lp = logprobs.completion(entries or []) if logprobs is not None else None
        text = echoed[index // req.n] if role else text or ""  # the echoed prompt opens it
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return base | {"choices": [choice]}

    def choice(i: int, c: Completion) -> dict[str, Any]:
        text, entries = c.text, list(c.logprobs)
        if echo_only:
            text, entries, c.completion_tokens = "", [], 0
        lp = None
        if logprobs is not None:
            scored: list[TokenLogprob | None] = list(c.prompt_logprobs) if req.echo else []
            lp = logprobs.completion(scored + entries, first=prompts[i // req.n][0])
        return {
            "index": i,
            "text": echoed[i // req.n] + text,
            "logprobs": lp,
            "finish_reason": "length" if echo_only else finish_reason(c),
        }

    return await respond(state, handles, req, chunk, rid, "text_completion", choice, request)
