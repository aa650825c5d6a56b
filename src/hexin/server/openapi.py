"""The OpenAPI document made to say what the server answers: FastAPI generates it from the
routes; ``document_errors`` adds the errors each operation can give, in one shape."""

from __future__ import annotations

from typing import Any

from hexin.server import ollama_api
from hexin.server.state import MAX_BODY_BYTES, PROTECTED, ServerConfig

#: the ``Error`` component: every error the HTTP API answers
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "loading", "error"]},
        "model": {"type": "string"},
        "error": {"type": ["string", "null"]},
    },
}
ERROR_WHY = {
    400: "Bad request: invalid JSON, a field out of range, a prompt over the context",
    401: "Missing or wrong API key",
    404: "No such session (or message), or no such model",
    409: "The session is busy with a reply, or a new session's id is taken",
    413: f"Request body over {MAX_BODY_BYTES} bytes",
    503: "The model is loading (or failed to load), the engine's queue is full, or the "
    "chat database could not be written for now",
    507: "The disk holding the chat database is full (deleting sessions still works)",
}
OLLAMA_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
#: Ollama's routes, and those that name a model (404 for another)
OLLAMA_PATHS = tuple(ollama_api.PATHS)
OLLAMA_MODEL_PATHS = ("/api/chat", "/api/generate")
#: paths that answer without the engine (every other one says 503 until it is ready)
ENGINE_FREE = ("/health", "/metrics")


def document_errors(doc: dict[str, Any], config: ServerConfig) -> dict[str, Any]:
    """Make FastAPI's generated document say what the server answers: its validation
    errors are 400 in the ``Error`` shape (the 422 and its schemas go), and each
    operation lists the errors its path can give. With an API key, the guarded paths
    also name the bearer scheme."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["Health"] = HEALTH_SCHEMA
    if config.api_key:
        schemes = doc["components"].setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    schemas["OllamaError"] = OLLAMA_ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    ollama = {"application/json": {"schema": {"$ref": "#/components/schemas/OllamaError"}}}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = set()
            if "requestBody" in op:
                codes |= {400, 413}
            if op.get("parameters"):
                codes.add(400)
            if path.startswith(PROTECTED):
                codes.add(401)
                if config.api_key:
                    op["security"] = [{"bearer": []}]
            if "{model_id}" in path or path in OLLAMA_MODEL_PATHS:
                codes.add(404)
            if "{session_id}" in path:
                codes |= {404} if method == "get" else {404, 409}
            if path == "/api/sessions" and method == "post":
                codes.add(409)
            if path.startswith("/api/sessions") and method != "get":
                codes.add(507)
            if path not in ENGINE_FREE:
                codes.add(503)
            for code in sorted(codes):
                # Ollama's routes answer their own errors in Ollama's shape
                shape = ollama if path in OLLAMA_PATHS and code in (400, 404) else error
                responses[str(code)] = {"description": ERROR_WHY[code], "content": shape}
    health = doc.get("paths", {}).get("/health", {}).get("get")
    if health is not None:
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
        health["responses"] = {
            "200": {"description": "The model is ready", "content": body},
            "503": {"description": "The model is loading, or failed to load", "content": body},
        }
    return doc
