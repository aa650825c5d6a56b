"""Helpers for the server tests: a real ``hexin serve`` subprocess on a free port, and
small bounded-wait clients for its HTTP and WebSocket APIs.

Every wait here has a deadline, so a server bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

LOAD_TIMEOUT_S = 120.0  # the default model loads in a few seconds; a slow CI gets slack
STOP_TIMEOUT_S = 30.0
WS_TIMEOUT_S = 60.0  # the longest a test waits for any single WebSocket message
FRANCE = "What is the capital of France?"
#: sampling params for short, reproducible replies
GREEDY = {"temperature": 0, "max_tokens": 16}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m hexin.cli serve`` in a subprocess, logging to a file in ``home``."""

    def __init__(
        self,
        model: Path,
        home: Path,
        *,
        db: Path | str | None = None,
        api_key: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.model, self.home = model, home
        self.db = db or home / "chat.db"
        self.api_key, self.extra = api_key, extra
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.health_seen: list[tuple[int, dict[str, Any]]] = []
        self.log_path = home / "server-0.log"

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> Server:
        """Launch the process; with ``wait``, return once /health says the model is ready."""
        assert self.proc is None, "already running"
        self.port = free_port()
        self.starts += 1
        self.log_path = self.home / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "hexin.cli", "serve", "--model", str(self.model)]
        cmd += ["--port", str(self.port), "--db", str(self.db), *self.extra]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        env = dict(os.environ, HEXIN_HOME=str(self.home), PYTHONUNBUFFERED="1")
        env.pop("HEXIN_API_KEY", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.home
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Poll /health until 200; every answer on the way must have the documented shape."""
        self.health_seen = []
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.1)
                continue
            body = r.json()
            self.health_seen.append((r.status_code, body))
            if r.status_code == 200:
                assert body["status"] == "ok" and isinstance(body["model"], str), body
                return
            assert r.status_code == 503, (r.status_code, body)
            assert body == {"status": "loading", "error": None}, body
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {LOAD_TIMEOUT_S}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Graceful stop (uvicorn handles SIGINT and SIGTERM); SIGKILL only as a last resort."""
        proc, self.proc = self.proc, None
        return 0 if proc is None else end_process(proc, sig, self.log, "server")

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    # -- clients ------------------------------------------------------------------------
    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key if key is not None else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def http(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 60)
        kw.setdefault("headers", self.headers())
        return httpx.Client(base_url=self.url, **kw)

    def openai(self, key: str | None = None, **kw: Any):
        import openai

        kw.setdefault("timeout", 60)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or self.api_key or "unused", **kw
        )

    def ws(self, session_id: str, *, key: str | None = None, query: str = "") -> ClientConnection:
        key = key if key is not None else self.api_key
        return connect(
            f"{self.ws_url}/c/{session_id}{query}",
            additional_headers=self.headers(key),
            open_timeout=15,
            close_timeout=5,
            max_size=None,
        )

    def ws_with(
        self,
        session_id: str,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        subprotocols: list[str] | None = None,
    ) -> ClientConnection:
        """A socket with exactly the given credentials (none by default): a query string,
        headers, subprotocols (``key_subprotocols``)."""
        return connect(
            f"{self.ws_url}/c/{session_id}{query}",
            additional_headers=headers or {},
            subprotocols=subprotocols,
            open_timeout=15,
            close_timeout=5,
            max_size=None,
        )


def end_process(
    proc: subprocess.Popen,
    sig: int,
    log: Callable[[], str],
    what: str,
    timeout: float = STOP_TIMEOUT_S,
) -> int:
    """Send ``sig`` and wait up to ``timeout`` for the exit code; a process that ignores it
    is killed and the test fails with its log."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{what} ignored signal {sig}:\n{log()}") from None
    return proc.returncode


def key_subprotocols(key: str) -> list[str]:
    """How a browser sends the API key: ["hexin", "hexin.key." + base64url(key)]."""
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    return ["hexin", f"hexin.key.{encoded}"]


# -- WebSocket protocol helpers -----------------------------------------------------------
def recv(ws: ClientConnection, timeout: float = WS_TIMEOUT_S) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def send(ws: ClientConnection, **msg: Any) -> None:
    ws.send(json.dumps(msg))


def recv_session(ws: ClientConnection) -> dict[str, Any]:
    msg = recv(ws)
    assert msg["type"] == "session", msg
    return msg["session"]


def request_session(ws: ClientConnection) -> dict[str, Any]:
    send(ws, type="session")
    return recv_session(ws)


def collect_reply(ws: ClientConnection, *, stop_after_first: bool = False) -> dict[str, Any]:
    """Read one turn after it was started: user_message, reply_start, tokens, done.

    Returns {"user_message", "tokens", "calls", "progress", "done"} (``user_message``: the
    message replied to; ``calls``: tool_call frames' deltas; ``progress``: the progress
    frames, which must all come before the first token). With ``stop_after_first`` a stop
    message is sent as soon as the first token arrives.
    """
    out: dict[str, Any] = {
        "user_message": None,
        "tokens": [],
        "calls": [],
        "progress": [],
        "done": None,
    }
    deadline = time.monotonic() + 3 * WS_TIMEOUT_S
    while time.monotonic() < deadline:
        msg = recv(ws)
        kind = msg["type"]
        if kind == "user_message":
            out["user_message"] = msg["message"]
        elif kind == "session":  # tool results: several messages were added
            out["user_message"] = msg["session"]["path"][-1]
        elif kind == "reply_start":
            assert out["user_message"] is not None, "reply_start before user_message"
            assert msg["parent_id"] == out["user_message"]["id"], msg
        elif kind == "token":
            assert isinstance(msg["text"], str), msg
            if stop_after_first and not out["tokens"]:
                send(ws, type="stop")
            out["tokens"].append(msg["text"])
        elif kind == "tool_call":
            out["calls"].append(msg["delta"])
        elif kind == "progress":
            assert not out["tokens"] and not out["calls"], f"progress after a token: {msg}"
            out["progress"].append(msg)
        elif kind == "done":
            out["done"] = msg
            return out
        else:
            raise AssertionError(f"unexpected message during a turn: {msg}")
    raise AssertionError("no done message in time")


def turn(
    ws: ClientConnection, content: str, params: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    send(ws, type="user", content=content, params=params if params is not None else GREEDY)
    return collect_reply(ws, **kw)


def check_done(reply: dict[str, Any]) -> dict[str, Any]:
    """The done message's documented shape; its text equals the streamed tokens."""
    done = reply["done"]
    assert set(done) >= {"message", "usage", "stop_reason", "dropped_turns", "timing"}, done
    message, usage = done["message"], done["usage"]
    assert message["role"] == "assistant"
    assert message["parent_id"] == reply["user_message"]["id"]
    assert message["content"] == "".join(reply["tokens"])
    assert set(usage) == {"prompt_tokens", "cached_tokens", "completion_tokens"}, usage
    assert usage["prompt_tokens"] > 0 and 0 <= usage["cached_tokens"] < usage["prompt_tokens"]
    assert usage["completion_tokens"] >= 1
    assert done["stop_reason"] in ("eos", "stop", "length", "cancelled")
    assert done["stop_reason"] == message["meta"]["stop_reason"]
    assert done["timing"]["ttft_ms"] > 0 and done["timing"]["tokens_per_s"] >= 0
    return done


# -- SSE (raw OpenAI streaming, to see the [DONE] sentinel the SDK hides) ----------------
def sse_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """POST a streaming request; every ``data:`` payload, JSON-decoded except "[DONE]"."""
    events: list[Any] = []
    with client.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when the series is absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
