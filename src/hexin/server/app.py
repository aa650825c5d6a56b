"""The FastAPI application: middleware (body limit, API key, CORS), error handlers, the
ops endpoints, and the routers.

The model loads in a background thread at start-up, so the server answers at once:
``/health`` says 503 until the engine is ready, and other endpoints refuse politely.

The OpenAPI document (/openapi.json) says what the server answers: every error in one
shape (the ``Error`` schema), 400 for a bad request (never FastAPI's 422), 401 on the
paths an API key guards, 413 for an oversize body, 503 while the model loads. A known
path asked with a method it does not serve is 405 with an ``Allow`` header.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from hexin.errors import HexinError
from hexin.server import ollama_api, openai_api, sessions, websocket
from hexin.server.openapi import document_errors
from hexin.server.state import (
    MAX_BODY_BYTES,
    MAX_MESSAGE_CHARS,
    PROTECTED,
    ApiError,
    ServerConfig,
    State,
    api_error_from,
)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


class BodyLimit:
    """Counts the bytes of every request body as it is read, so the limit also holds for
    a chunked body that declares no Content-Length."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise StarletteHTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
            return message

        return await self.app(scope, counted, send)


#: the methods a 405's ``Allow`` header can name
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(scope) -> list[str]:
    """The methods the app's routes (not the web UI's mount) serve at this path."""
    routes = [r for r in scope["app"].router.routes if not isinstance(r, Mount)]
    return [
        method
        for method in METHODS
        if any(r.matches(dict(scope, method=method))[0] == Match.FULL for r in routes)
    ]


class WebFiles(StaticFiles):
    """The web UI's files, mounted at "/" so it sees every request no route took: a path
    some route serves with other methods is 405 (with ``Allow``); anything else but
    GET/HEAD is "not found", as OpenAI answers (e.g. POST /v1/embeddings), not 405."""

    async def get_response(self, path, scope):
        allowed = allowed_methods(scope)
        if allowed:
            headers = {"Allow": ", ".join(allowed)}
            raise StarletteHTTPException(405, "Method Not Allowed", headers=headers)
        if scope["method"] not in ("GET", "HEAD"):
            raise StarletteHTTPException(404, "Not Found")
        return await super().get_response(path, scope)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part


class TokenizeRequest(BaseModel):
    """llama.cpp's shape ({"content"}), or vLLM's ({"prompt"}, "add_special_tokens")."""

    model_config = ConfigDict(strict=True)  # JSON types only, as the document says
    content: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    prompt: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    add_special: bool = True
    add_special_tokens: bool | None = None
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    tokens: list[int] = Field(max_length=MAX_MESSAGE_CHARS)


def create_app(config: ServerConfig, *, load_in_background: bool = True) -> FastAPI:
    state = State(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=state.load, name="hexin-loader", daemon=True)
        thread.start()
        if not load_in_background:
            thread.join()
        yield
        if state.engine is not None:
            state.engine.shutdown()  # in-flight replies end as stopped...
        if state.service is not None:
            state.service.close()  # ...and are saved before the process exits

    app = FastAPI(title="hexin", version="0.1.0", lifespan=lifespan)
    app.state.hexin = state

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(FastAPI.openapi(app), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = MAX_BODY_BYTES + 1
        if length > MAX_BODY_BYTES:
            response = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes").response()
        elif path.startswith(PROTECTED) and not state.authorized(
            request.headers.get("authorization")
        ):
            response = ApiError(401, "missing or wrong API key", type_="authentication_error")
            response = response.response()
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    # CORS is added last, so outermost: it answers a browser's preflight (which carries no
    # credentials) before the API key is asked for, and every answer, a 401 too, carries
    # its headers
    if config.cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(ollama_api.OllamaError)
    async def on_ollama_error(request: Request, e: ollama_api.OllamaError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HexinError)
    async def on_hexin_error(request: Request, e: HexinError) -> JSONResponse:
        return api_error_from(e).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        # a union's member appears in the location as its type ("str", "list[int]"): the
        # client named a field, not a type
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(str(p))]
        field_name = ".".join(loc) or "body"
        message = f"{field_name}: {first.get('msg', 'invalid')}"
        param: str | None = field_name
        if first.get("type") == "json_invalid":
            param, message = None, f"malformed JSON body: {first.get('msg', '')}"
        elif first.get("type") == "extra_forbidden":  # refused, never silently dropped
            message = f"{field_name}: not supported by hexin (README: the supported parameters)"
        if request.url.path.startswith(ollama_api.PATHS):  # Ollama's clients read its shape
            return ollama_api.OllamaError(400, message).response()
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith(ollama_api.PATHS) and e.status_code in (400, 404):
            return ollama_api.OllamaError(e.status_code, str(e.detail)).response()
        response = ApiError(e.status_code, str(e.detail), type_="http_error").response()
        response.headers.update(e.headers or {})  # e.g. a 405's Allow
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.ready.is_set():
            return JSONResponse({"status": "ok", "model": state.model_name})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        stats = state.engine.stats() if state.engine else None
        return PlainTextResponse(
            state.metrics.render(stats), media_type="text/plain; version=0.0.4"
        )

    @app.get("/api/config")
    async def server_config() -> dict[str, Any]:
        """What a client needs to set itself up: the model, its context, the defaults."""
        engine, service = state.require()
        return {
            "model": state.model_name,
            "context_limit": engine.context_limit,
            "defaults": service.default_params.to_dict(),
            "has_chat_template": bool(engine.tokenizer.chat_template),
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        engine, _ = state.require()
        tok = engine.tokenizer
        text = body.content if body.content is not None else body.prompt
        if text is None:
            raise ApiError(400, "content: give the text to tokenize", param="content")
        special = body.add_special if body.add_special_tokens is None else body.add_special_tokens
        tokens = tok.encode(text, add_bos=None if special else False)
        # vLLM's fields too, for clients that read those
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_limit}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """The tokenizer's description, as vLLM serves it, so that evaluation clients
        find the served model's tokenizer instead of fetching one."""
        engine, _ = state.require()
        tok = engine.tokenizer
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": engine.context_limit,
            "vocab_size": tok.vocab_size,
            "bos_token": tok.bos_token or None,  # null, not "", where there is none
            "eos_token": tok.eos_token or None,
            "chat_template": tok.chat_template,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine, _ = state.require()
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} outside the vocabulary", param="tokens")
        text = engine.tokenizer.decode(body.tokens, skip_special=False)
        return {"content": text, "prompt": text}  # llama.cpp's key, and vLLM's

    app.include_router(sessions.router)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(websocket.router)
    if (WEB_DIR / "index.html").is_file():
        app.mount("/", WebFiles(directory=WEB_DIR, html=True), name="web")
    return app
