"""What the server's routes share: its configuration and limits, the loaded engine and chat
service, and the one table that turns hexin's errors into HTTP and WebSocket answers."""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from hexin.chat.service import ChatService
from hexin.chat.store import DB_ENV, StorageError, StorageFull, open_store
from hexin.chat.tree import SessionBusy, SessionExists, SessionNotFound
from hexin.engine import Engine, EngineBusy
from hexin.errors import HexinError
from hexin.options import (
    MAX_TOKENS_DEFAULT,
    EngineConfig,
    ModelOptions,
    engine_config,
    model_options,
)
from hexin.output import ContextOverflow
from hexin.sampling import InvalidParams
from hexin.server.metrics import Metrics

log = logging.getLogger("hexin.server")
MAX_BODY_BYTES = 4 << 20
#: path prefixes that need the API key, when one is set
PROTECTED = ("/api/", "/v1/", "/tokenize", "/detokenize", "/metrics")  # /tokenize*: info too
MAX_MESSAGE_CHARS = 100_000


@dataclass
class ServerConfig:
    model: str | None = None
    model_options: ModelOptions = field(default_factory=ModelOptions)
    engine: EngineConfig = field(default_factory=EngineConfig)
    db: str | None = None
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    #: the cap on an OpenAI chat completion that names no max_tokens
    max_tokens_default: int = MAX_TOKENS_DEFAULT

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """From ``options.add_server_args``' options (``hexin serve``, ``hexin cluster``);
        the store and the API key fall back to $HEXIN_DB and $HEXIN_API_KEY here, so a
        cluster's replicas on other machines get what the command line saw."""
        return cls(
            model=args.model,
            model_options=model_options(args),
            engine=engine_config(args),
            db=args.db or os.environ.get(DB_ENV),
            api_key=args.api_key or os.environ.get("HEXIN_API_KEY"),
            cors=args.cors,
            max_tokens_default=args.max_tokens_default,
        )


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of error is answered: its HTTP status and OpenAI error ``type``, and
    the ``code`` of a WebSocket error frame."""

    status: int
    type: str
    code: str


BAD_REQUEST = ErrorKind(400, "invalid_request_error", "bad_request")
CONTEXT_EXCEEDED = ErrorKind(400, "invalid_request_error", "context_length_exceeded")
SESSION_NOT_FOUND = ErrorKind(404, "not_found_error", "session_not_found")
SESSION_BUSY = ErrorKind(409, "conflict_error", "session_busy")
SESSION_EXISTS = ErrorKind(409, "conflict_error", "session_exists")
ENGINE_BUSY = ErrorKind(503, "server_busy", "engine_busy")
STORAGE_FULL = ErrorKind(507, "storage_full", "storage_full")
STORAGE_ERROR = ErrorKind(503, "storage_error", "storage_error")
INTERNAL = ErrorKind(500, "server_error", "internal_error")
#: first match wins, so subclasses come before their bases
ERROR_KINDS: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (SessionNotFound, SESSION_NOT_FOUND),
    (SessionBusy, SESSION_BUSY),
    (SessionExists, SESSION_EXISTS),
    (EngineBusy, ENGINE_BUSY),
    (StorageFull, STORAGE_FULL),
    (StorageError, STORAGE_ERROR),
    (ContextOverflow, CONTEXT_EXCEEDED),
    (HexinError, BAD_REQUEST),
    (ValueError, BAD_REQUEST),
)


def error_kind(e: BaseException) -> ErrorKind:
    """The table's answer for ``e``; anything unforeseen is an internal error."""
    return next((kind for cls, kind in ERROR_KINDS if isinstance(e, cls)), INTERNAL)


class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = BAD_REQUEST.type,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param}
        body["code"] = self.code
        return JSONResponse({"error": body}, status_code=self.status)


def api_error_from(e: Exception) -> ApiError:
    """Map hexin's errors onto HTTP statuses (``ERROR_KINDS``). An internal error names
    only its type: its message may hold details that are not the client's business."""
    if isinstance(e, ApiError):
        return e
    kind = error_kind(e)
    if kind is INTERNAL:
        message = f"internal error: {type(e).__name__}"
        return ApiError(kind.status, message, type_=kind.type, code=kind.code)
    # a bad sampling value's message starts with the parameter's name; a bad grammar's
    # error names it
    param = str(e).split()[0] if isinstance(e, InvalidParams) else getattr(e, "param", None)
    return ApiError(kind.status, str(e), type_=kind.type, param=param, code=kind.code)


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
        self.model_format = ""  # "gguf" or "safetensors"
        self.started = int(time.time())

    def load(self) -> None:
        from hexin.model import load_llama

        try:
            loaded, model = load_llama(self.config.model, self.config.model_options)
            engine = Engine(model, loaded.tokenizer, self.config.engine).start()
            self.service = ChatService(engine, open_store(self.config.db), model_name=loaded.name)
            self.engine, self.model_name = engine, loaded.name
            self.model_format = "gguf" if loaded.path.is_file() else "safetensors"
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


def get_state(request: Request) -> State:
    return request.app.state.hexin
