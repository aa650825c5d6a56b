"""Operations and security of a real ``hexin serve --api-key`` process: /health, Prometheus
/metrics, /tokenize and /detokenize, the API key on HTTP and the WebSocket, bad input of
every kind answered in the error shape, body size limits, the OpenAPI docs, and binding
to the loopback interface by default."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import openai
import pytest
import websockets
from server_util import FRANCE, Server, check_done, metric, recv, recv_session, send, turn

KEY = "test-key-123"
ERROR_KEYS = {"message", "type", "param", "code"}
ALLOWED_ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    home = tmp_path_factory.mktemp("ops")
    srv = Server(default_gguf, home, api_key=KEY, extra=("--cors", ALLOWED_ORIGIN)).start()
    yield srv
    srv.stop(signal.SIGTERM)  # the other modules stop theirs with SIGINT
    assert "Application shutdown complete" in srv.log(), srv.log()


@pytest.fixture
def anon(server):
    with server.http(headers={}) as client:
        yield client


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_health_is_open(anon, server):
    r = anon.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and "SmolLM2" in body["model"]
    # while the model loaded, /health said 503 {"status": "loading"} (checked as it polled)
    assert server.health_seen[-1][0] == 200
    assert {code for code, _ in server.health_seen} <= {200, 503}


def test_api_key_required(anon, http, server):
    for method, path, body in (
        ("GET", "/api/sessions", None),
        ("POST", "/api/sessions", {}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/tokenize", {"content": "hi"}),
        ("GET", "/metrics", None),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = anon.request(method, path, json=body, headers=headers)
            err = error_of(r, 401)
            assert err["type"] == "authentication_error", (path, headers)
    # the right key opens them (the mutating ones are checked elsewhere)
    assert http.get("/api/sessions").status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert http.get("/metrics").status_code == 200
    # a key in the query string is only for the WebSocket
    assert anon.get(f"/api/sessions?api_key={KEY}").status_code == 401


def test_cors_preflight_is_answered_before_the_key(anon):
    """Browsers send the preflight without credentials: it must get the CORS headers, or no
    page on an allowed origin could call the API; the request after it still needs the key."""
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for path in ("/v1/chat/completions", "/api/sessions", "/tokenize"):
        r = anon.options(path, headers=preflight)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
    r = anon.options("/v1/models", headers=preflight | {"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers  # not an allowed origin
    r = anon.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_openai_client_with_and_without_key(server):
    with server.openai(key="wrong") as bad, pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"
    with server.openai() as good:
        r = good.chat.completions.create(
            model="m", messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=8
        )
    assert "Paris" in r.choices[0].message.content


def refused(open_ws) -> Exception:
    """The exception a refused WebSocket ends with: a failed handshake or a close frame."""
    try:
        ws = open_ws()
    except websockets.InvalidStatus as e:
        return e
    with ws, pytest.raises(websockets.ConnectionClosed) as info:
        ws.recv(timeout=10)
    return info.value


def test_websocket_needs_the_key(server):
    for key, query in (("", ""), ("wrong", ""), ("", "?api_key=wrong")):
        e = refused(lambda key=key, query=query: server.ws("ws-auth", key=key, query=query))
        if isinstance(e, websockets.InvalidStatus):
            assert e.response.status_code in (401, 403)
        else:
            assert e.rcvd is not None and e.rcvd.code == 4401
    # Authorization: Bearer header
    with server.ws("ws-auth") as ws:
        assert recv_session(ws)["id"] == "ws-auth"
        check_done(turn(ws, "Hi!", {"temperature": 0, "max_tokens": 4}))
    # ?api_key= query parameter (browsers cannot set headers on a WebSocket)
    with server.ws("ws-auth", key="", query=f"?api_key={KEY}") as ws:
        session = recv_session(ws)
        assert session["id"] == "ws-auth" and session["message_count"] == 2


def test_websocket_bad_input_keeps_the_connection(server):
    with server.ws("ws-bad") as ws:
        recv_session(ws)
        for raw, fragment in (
            ("{not json", "JSON"),
            ("[1, 2]", "type"),
            (json.dumps({"type": "dance"}), "dance"),
            (json.dumps({"type": "user", "content": ""}), "content"),
            (json.dumps({"type": "user", "content": "   "}), "content"),
            (json.dumps({"type": "user", "content": 5}), "content"),
            (json.dumps({"type": "user", "content": "hi", "params": [1]}), "params"),
            (json.dumps({"type": "user", "content": "hi", "params": {"temperature": -2}}), "temp"),
            (json.dumps({"type": "user", "content": "x" * 100_001}), "100000"),
            (json.dumps({"type": "edit", "content": "hi"}), "message_id"),
            (json.dumps({"type": "switch", "message_id": "nope"}), "nope"),
            (json.dumps({"type": "rollback"}), "nothing"),
            (json.dumps({"type": "regenerate"}), "nothing"),
        ):
            ws.send(raw)
            msg = recv(ws, timeout=30)
            assert msg["type"] == "error", (raw[:40], msg)
            assert fragment in msg["message"], (raw[:40], msg)
            assert msg["code"] == "bad_request", (raw[:40], msg)
        # still usable, and nothing was saved by the refused messages
        reply = turn(ws, FRANCE, {"temperature": 0, "max_tokens": 8})
        assert "Paris" in check_done(reply)["message"]["content"]
        send(ws, type="session")
        assert recv_session(ws)["message_count"] == 2


def test_websocket_refuses_a_second_turn_while_streaming(server):
    with server.ws("ws-busy") as ws:
        recv_session(ws)
        send(ws, type="user", content="Tell me a long story.", params={"max_tokens": 200})
        assert recv(ws)["type"] == "user_message"
        send(ws, type="user", content="Another!")
        send(ws, type="stop")
        seen = []
        while (msg := recv(ws))["type"] != "done":
            seen.append(msg)
        errors = [m for m in seen if m["type"] == "error"]
        assert len(errors) == 1 and "streaming" in errors[0]["message"]
        assert errors[0]["code"] == "session_busy"
        assert msg["stop_reason"] in ("cancelled", "length", "eos")


def test_busy_session_is_a_conflict_over_rest(server):
    """While a reply streams, REST operations on its session answer 409 session_busy."""
    with server.ws("rest-busy") as ws, server.http() as http:
        recv_session(ws)
        send(ws, type="user", content="Tell me a long story.", params={"max_tokens": 200})
        assert recv(ws)["type"] == "user_message"
        r = http.post("/api/sessions/rest-busy/rollback")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "session_busy"
        assert r.json()["error"]["type"] == "conflict_error"
        send(ws, type="stop")
        while recv(ws)["type"] != "done":
            pass


def test_websocket_invalid_session_id(server):
    e = refused(lambda: server.ws("bad%20id%21"))
    if isinstance(e, websockets.InvalidStatus):
        assert e.response.status_code in (400, 403)
    else:
        assert e.rcvd is not None and e.rcvd.code == 4400


def test_metrics(http):
    before = http.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    text = before.text
    assert "# TYPE hexin_requests_total counter" in text
    assert "# TYPE hexin_time_to_first_token_seconds histogram" in text
    assert 'hexin_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    assert 'hexin_time_to_first_token_seconds_bucket{le="0.1"}' in text
    for gauge in ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "steps"):
        assert f"# TYPE hexin_engine_{gauge} gauge" in text
    assert metric(text, "hexin_engine_kv_blocks_total") > 0
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])

    route = 'route="/v1/chat/completions",status="200"'
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": FRANCE}], "temperature": 0, "max_tokens": 6},
    )
    assert r.status_code == 200
    tokens = r.json()["usage"]["completion_tokens"]
    after = http.get("/metrics").text
    assert (
        metric(after, "hexin_requests_total", route)
        == metric(text, "hexin_requests_total", route) + 1
    )
    assert metric(after, "hexin_completion_tokens_total") == (
        metric(text, "hexin_completion_tokens_total") + tokens
    )
    assert metric(after, "hexin_prompt_tokens_total") > metric(text, "hexin_prompt_tokens_total")
    count = "hexin_time_to_first_token_seconds_count"
    assert metric(after, count) == metric(text, count) + 1
    inf = 'le="+Inf"'
    assert metric(after, "hexin_time_to_first_token_seconds_bucket", inf) == metric(after, count)
    assert metric(after, "hexin_engine_steps") > metric(text, "hexin_engine_steps")
    assert metric(after, "hexin_engine_decode_tokens") >= tokens


def test_tokenize_round_trip(http):
    text = "Hello, world! Ünïcödé and emoji 🙂 — done."
    r = http.post("/tokenize", json={"content": text})
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    r = http.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200 and r.json()["content"] == text
    # special tokens are parsed and printed back
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = http.post("/tokenize", json={"content": chat}).json()["tokens"]
    assert len(ids) < len(chat) // 2
    assert http.post("/detokenize", json={"tokens": ids}).json()["content"] == chat

    err = error_of(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert err["param"] == "tokens"
    err = error_of(http.post("/detokenize", json={"tokens": [-1]}), 400)
    err = error_of(http.post("/tokenize", json={}), 400)
    assert err["param"] == "content"


def test_bad_http_input(http):
    err = error_of(
        http.post(
            "/api/sessions", content=b"{bad json", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert "JSON" in err["message"]
    err = error_of(
        http.post(
            "/v1/chat/completions",
            content=b'{"messages": [',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert "JSON" in err["message"]
    error_of(http.get("/api/sessions/no-such-session"), 404)
    err = error_of(http.get("/api/sessions/bad%20id%21"), 400)
    assert err["param"] == "session_id"
    err = error_of(http.post("/api/sessions", json={"title": "x" * 500}), 400)
    assert err["param"] == "title"
    error_of(http.get("/no/such/route"), 404)
    r = http.delete("/v1/models")  # a route, but not that method
    error_of(r, r.status_code if r.status_code in (404, 405) else 405)


def test_oversize_body_is_413(http):
    big = b"x" * ((4 << 20) + 1)
    try:
        r = http.post("/api/sessions", content=big, headers={"content-type": "application/json"})
    except httpx.TransportError as e:  # the server may close before reading it all
        pytest.fail(f"no 413 answer: {e!r}")
    err = error_of(r, 413)
    assert "body" in err["message"]
    # a body at the limit is read (and judged on its content)
    r = http.post(
        "/api/sessions",
        content=b'{"title": "ok"}'.ljust(4 << 20),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 201 and r.json()["title"] == "ok"


def test_oversize_chunked_body_is_413(http):
    """Without a Content-Length header (chunked transfer encoding), the 4 MiB limit must
    hold as well: the body is streamed, and the server has to count what it reads."""

    def chunks():  # 5 MiB of valid JSON: {"title": "chunked"  <whitespace> }
        yield b'{"title": "chunked"'
        for _ in range(5):
            yield b" " * (1 << 20)
        yield b"}"

    r = http.post("/api/sessions", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413, (r.status_code, r.text[:200])


def test_openapi_docs(anon):
    r = anon.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "swagger" in r.text.lower()
    r = anon.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for route in (
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/messages",
        "/api/sessions/{session_id}/regenerate",
        "/api/sessions/{session_id}/edit",
        "/api/sessions/{session_id}/rollback",
        "/api/sessions/{session_id}/switch",
        "/api/sessions/{session_id}/export",
        "/api/sessions/import",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
    ):
        assert route in paths, route
    assert {"get", "patch", "delete"} <= set(paths["/api/sessions/{session_id}"])


def test_client_config(http, anon):
    error_of(anon.get("/api/config"), 401)
    r = http.get("/api/config")
    assert r.status_code == 200
    config = r.json()
    assert "SmolLM2" in config["model"] and config["context_limit"] >= 2048
    assert config["has_chat_template"] is True
    assert {"temperature", "top_k", "top_p", "max_tokens"} <= set(config["defaults"])


def non_loopback_address() -> str | None:
    """This machine's address on its outward interface, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))  # no packet is sent for UDP connect
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_binds_loopback_by_default(server):
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log(tail=10**6)
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface to try")
    with pytest.raises(OSError):
        socket.create_connection((address, server.port), timeout=5).close()


def wait_idle(http: httpx.Client, timeout: float = 120) -> str:
    """Poll /metrics until the engine runs nothing; the last metrics text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if metric(text, "hexin_engine_running") == metric(text, "hexin_engine_waiting") == 0:
            return text
        time.sleep(0.1)
    raise AssertionError(f"the engine was still busy after {timeout}s")


COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 256}


def test_abandoned_stream_is_cancelled(http):
    before = wait_idle(http)
    with http.stream("POST", "/v1/completions", json=COUNTING | {"stream": True}) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    # the client hung up after its first chunk: the engine stops that request
    after = wait_idle(http, timeout=60)
    decoded = metric(after, "hexin_engine_decode_tokens") - metric(
        before, "hexin_engine_decode_tokens"
    )
    assert decoded < 200, f"{decoded} tokens decoded for a client that left"


def test_abandoned_non_streaming_request_is_cancelled(http):
    """A client that gives up on a non-streaming completion (a timeout, a closed tab)
    should not keep the engine generating up to max_tokens for nobody; it also makes a
    graceful shutdown wait for that generation."""
    # a budget decode cannot cover in the second the client waits plus the time the server
    # takes to notice it left (~200 tokens at today's CPU decode speed); the model counts
    # on past it without an end-of-sequence token
    budget = 1024
    before = wait_idle(http)
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=COUNTING | {"max_tokens": budget}, timeout=1.0)
    after = wait_idle(http, timeout=120)
    decoded = metric(after, "hexin_engine_decode_tokens") - metric(
        before, "hexin_engine_decode_tokens"
    )
    assert decoded < budget / 2, f"{decoded} tokens decoded for a client that left"


def test_model_that_fails_to_load(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + bytes(1000))
    srv = Server(bad, tmp_path).start(wait=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{srv.url}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            assert r.status_code == 503
            if r.json()["status"] == "error":
                break
            assert r.json() == {"status": "loading", "error": None}
            time.sleep(0.1)
        else:
            raise AssertionError(f"no error reported:\n{srv.log()}")
        assert "GGUF" in r.json()["error"]
        # the server stays up and every endpoint says why it cannot serve
        err = error_of(httpx.get(f"{srv.url}/v1/models", timeout=5), 503)
        assert "failed to load" in err["message"]
        err = error_of(httpx.get(f"{srv.url}/api/sessions", timeout=5), 503)
        assert "failed to load" in err["message"]
        with srv.ws("anything") as ws:
            assert recv(ws)["type"] == "error"
            with pytest.raises(websockets.ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    finally:
        srv.stop()
