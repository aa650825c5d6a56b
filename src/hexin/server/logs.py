"""Logging for ``hexin serve`` without secrets: query-string values are redacted.

uvicorn logs every request's full path with its query string (HTTP requests on
"uvicorn.access", WebSocket handshakes on "uvicorn.error"), and a client may put its API
key there (``/c/{id}?api_key=...``). ``RedactQuery`` replaces each query value with
``<redacted>`` (names stay, for debugging) in a record's message and arguments, before any
handler formats it. ``uvicorn_log_config`` is uvicorn's own logging configuration with the
filter on its handlers; ``install`` puts it on the root logger's handlers too (hexin's own
loggers).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

REDACTED = "<redacted>"
# a query string: from "?" to the end of the path (whitespace or a quote ends it)
_QUERY = re.compile(r"\?([^\s\"']*)")
_VALUE = re.compile(r"=[^&;]*")


def _redact_query(match: re.Match) -> str:
    return "?" + _VALUE.sub("=" + REDACTED, match.group(1))


def redact(text: str) -> str:
    """``text`` with the value of every query parameter replaced by ``<redacted>``."""
    return _QUERY.sub(_redact_query, text) if "?" in text else text


class RedactQuery(logging.Filter):
    """Redacts query-string values in a record's message and string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration, its handlers filtered by ``RedactQuery``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query"] = {"()": RedactQuery}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_query")
    return config


def install() -> None:
    """Filter what the root logger's handlers write (hexin's own loggers propagate there)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactQuery) for f in handler.filters):
            handler.addFilter(RedactQuery())
