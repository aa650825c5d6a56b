"""The FastAPI application: state, security, errors, ops endpoints, and the routers.

The model loads in a background thread at start-up, so the server answers at once:
``/health`` says 503 until the engine is ready, and other endpoints refuse politely.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hexin.chat.service import ChatService
from hexin.chat.store import Store
from hexin.chat.tree import ChatError
from hexin.engine import Engine, EngineBusy
from hexin.errors import HexinError
from hexin.options import EngineConfig, ModelOptions
from hexin.sampling import InvalidParams
from hexin.server.metrics import Metrics

log = logging.getLogger("hexin.server")
MAX_BODY_BYTES = 4 << 20
MAX_MESSAGE_CHARS = 100_000
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PROTECTED = ("/api/", "/v1/", "/tokenize", "/detokenize", "/metrics")


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


class WebFiles(StaticFiles):
    """The web UI's files; anything but GET/HEAD of a path that is no route is "not
    found" (StaticFiles would say 405, e.g. to POST /v1/embeddings)."""

    async def get_response(self, path, scope):
        if scope["method"] not in ("GET", "HEAD"):
            raise StarletteHTTPException(404, "Not Found")
        return await super().get_response(path, scope)


@dataclass
class ServerConfig:
    model: str | None = None
    model_options: ModelOptions = field(default_factory=ModelOptions)
    engine: EngineConfig = field(default_factory=EngineConfig)
    db: str | None = None
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)


class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": None}
        return JSONResponse({"error": body}, status_code=self.status)


def api_error_from(e: Exception) -> ApiError:
    """Map hexin's errors onto HTTP statuses."""
    if isinstance(e, ApiError):
        return e
    message = str(e)
    if isinstance(e, ChatError) and message.startswith("unknown session"):
        return ApiError(404, message, type_="not_found_error")
    if isinstance(e, ChatError) and "busy" in message:
        return ApiError(409, message, type_="conflict_error")
    if isinstance(e, EngineBusy):
        return ApiError(503, message, type_="server_busy")
    if isinstance(e, InvalidParams):
        return ApiError(400, message, param=message.split()[0])
    if isinstance(e, HexinError | ValueError):
        return ApiError(400, message)
    return ApiError(500, f"internal error: {type(e).__name__}", type_="server_error")


class State:
    """Everything the routes share; filled in by the loader thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.engine: Engine | None = None
        self.service: ChatService | None = None
        self.model_name = ""
        self.started = int(time.time())

    def load(self) -> None:
        from hexin.model import load_llama

        try:
            loaded, model = load_llama(self.config.model, self.config.model_options)
            engine = Engine(model, loaded.tokenizer, self.config.engine).start()
            self.service = ChatService(engine, Store(self.config.db), model_name=loaded.name)
            self.engine, self.model_name = engine, loaded.name
            self.ready.set()
            log.info("model %s ready", loaded.name)
        except Exception as e:  # reported by /health and every endpoint
            self.load_error = str(e)
            log.error("model failed to load: %s", e)

    def require(self) -> tuple[Engine, ChatService]:
        if self.engine is None or self.service is None:
            detail = f"model failed to load: {self.load_error}" if self.load_error else None
            raise ApiError(503, detail or "model is loading; retry shortly", type_="unavailable")
        return self.engine, self.service

    def authorized(self, header: str | None, query_key: str | None = None) -> bool:
        key = self.config.api_key
        if not key:
            return True
        offered = query_key or ""
        if header and header.lower().startswith("bearer "):
            offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), key.encode())


class TokenizeRequest(BaseModel):
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    add_special: bool = True


class DetokenizeRequest(BaseModel):
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
            state.engine.shutdown()  # in-flight replies end as stopped, and are saved

    app = FastAPI(title="hexin", version="0.1.0", lifespan=lifespan)
    app.state.hexin = state
    if config.cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors,
            allow_methods=["*"],
            allow_headers=["*"],
        )

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

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HexinError)
    async def on_hexin_error(request: Request, e: HexinError) -> JSONResponse:
        return api_error_from(e).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {first.get('msg', '')}").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field_name = ".".join(loc) or "body"
        message = f"{field_name}: {first.get('msg', 'invalid')}"
        return ApiError(400, message, param=field_name).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), type_="http_error").response()

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
        return {"tokens": tok.encode(body.content, add_bos=None if body.add_special else False)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine, _ = state.require()
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} outside the vocabulary", param="tokens")
        return {"content": engine.tokenizer.decode(body.tokens, skip_special=False)}

    from hexin.server import openai_api, sessions, websocket

    app.include_router(sessions.router)
    app.include_router(openai_api.router)
    app.include_router(websocket.router)
    if (WEB_DIR / "index.html").is_file():
        app.mount("/", WebFiles(directory=WEB_DIR, html=True), name="web")
    return app


def get_state(request: Request) -> State:
    return request.app.state.hexin
