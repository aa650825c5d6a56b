"""The chat WebSocket of a real ``hexin serve`` process: streamed turns with usage and the
per-session KV cache, stopping mid-reply, regenerate / rollback / edit over the socket, the
same tree through the REST API, the conversation surviving a server restart, and bad
input (a binary frame, a reply whose stream fails) answered with an error frame."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import websockets
from server_util import (
    FRANCE,
    GREEDY,
    Server,
    check_done,
    collect_reply,
    recv,
    recv_session,
    request_session,
    send,
    turn,
)
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected
from tool_specs import WEATHER_TOOL

from hexin.engine import EngineBusy
from hexin.server.websocket import Connection

LONG = {"temperature": 0, "max_tokens": 200}


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    # small prefill chunks: a long prompt's progress moves in many steps on any CPU
    extra = ("--prefill-chunk", "64")
    srv = Server(default_gguf, tmp_path_factory.mktemp("websocket"), extra=extra).start()
    yield srv
    srv.stop()


def tree(session: dict) -> dict[str, tuple]:
    """id -> (parent, role, content, status): what must survive every round trip."""
    return {
        m["id"]: (m["parent_id"], m["role"], m["content"], m["status"]) for m in session["messages"]
    }


def test_turns_report_usage_and_reuse_the_cache(server):
    with server.ws("ws-turns") as ws:
        first = recv_session(ws)
        assert first["id"] == "ws-turns" and first["messages"] == [] and first["path"] == []

        one = turn(ws, FRANCE, {"temperature": 0, "max_tokens": 24})
        assert one["user_message"]["content"] == FRANCE
        assert one["user_message"]["role"] == "user"
        assert one["user_message"]["parent_id"] is None
        done = check_done(one)
        assert "Paris" in done["message"]["content"]
        assert done["stop_reason"] == "eos"  # a short answer, ended by <|im_end|>
        assert done["message"]["status"] == "complete"
        assert done["dropped_turns"] == 0
        u1 = done["usage"]
        assert u1["cached_tokens"] % 16 == 0  # a new session: whole shared blocks at most

        two = turn(ws, "And of Germany?", {"temperature": 0, "max_tokens": 8})
        done2 = check_done(two)
        assert two["user_message"]["parent_id"] == done["message"]["id"]
        u2 = done2["usage"]
        # the session kept its KV cache: everything of the first turn is reused, the sampled
        # end-of-turn token included when the reply ended on it
        eos = 1 if done["stop_reason"] == "eos" else 0
        assert u2["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"] + eos
        assert u2["prompt_tokens"] > u2["cached_tokens"]

        session = request_session(ws)
        assert [m["role"] for m in session["path"]] == ["user", "assistant"] * 2
        assert session["active_id"] == done2["message"]["id"]
        meta = session["path"][-1]["meta"]
        assert meta["cached_tokens"] == u2["cached_tokens"]


def test_stop_mid_reply(server):
    with server.ws("ws-stop") as ws:
        recv_session(ws)
        reply = turn(ws, "Write a very long story about a dragon.", LONG, stop_after_first=True)
        done = check_done(reply)
        assert done["stop_reason"] == "cancelled"
        assert done["message"]["status"] == "stopped"
        assert done["usage"]["completion_tokens"] < 100
        # the connection stays usable and the stopped reply is in the tree
        session = request_session(ws)
        assert session["path"][-1]["id"] == done["message"]["id"]
        assert session["path"][-1]["status"] == "stopped"
        after = turn(ws, "Thanks.", {"temperature": 0, "max_tokens": 4})
        assert check_done(after)["usage"]["completion_tokens"] >= 1


def wait_for_reply(server: Server, sid: str, timeout: float = 60) -> dict:
    """Poll the REST API until the session's active message is a reply; the session."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while time.monotonic() < deadline:
            session = http.get(f"/api/sessions/{sid}").json()
            if session["path"] and session["path"][-1]["role"] == "assistant":
                return session
            time.sleep(0.1)
    raise AssertionError(f"no reply saved in {sid} after {timeout}s")


def test_closing_the_socket_stops_and_saves_the_reply(server):
    with server.ws("ws-close") as ws:
        recv_session(ws)
        send(ws, type="user", content="Write a very long story about a dragon.", params=LONG)
        while recv(ws)["type"] != "token":
            pass
    session = wait_for_reply(server, "ws-close")
    reply = session["path"][-1]
    assert reply["status"] == "stopped" and reply["meta"]["stop_reason"] == "cancelled"
    assert 1 <= reply["meta"]["completion_tokens"] < 100
    # the session is free again
    with server.ws("ws-close") as ws:
        recv_session(ws)
        check_done(turn(ws, "Hi!", {"temperature": 0, "max_tokens": 4}))


def test_stop_when_idle_is_harmless(server):
    with server.ws("ws-idle-stop") as ws:
        recv_session(ws)
        send(ws, type="stop")
        check_done(turn(ws, "Hi!", {"temperature": 0, "max_tokens": 4}))


def test_regenerate_rollback_edit_and_rest_view(server):
    sid = "ws-tree"
    with server.ws(sid) as ws:
        recv_session(ws)
        first = check_done(turn(ws, FRANCE, GREEDY))
        user1 = first["message"]["parent_id"]

        # regenerate: a second version of the reply
        send(ws, type="regenerate", params={"temperature": 0.9, "seed": 7, "max_tokens": 8})
        regen = collect_reply(ws)
        assert regen["user_message"]["id"] == user1
        second = check_done(regen)
        assert second["message"]["id"] != first["message"]["id"]
        session = request_session(ws)
        last = session["path"][-1]
        assert last["id"] == second["message"]["id"]
        assert (last["version"], last["versions"]) == (2, 2)
        assert session["message_count"] == len(session["messages"]) == 3

        # switch back to version 1 and forward again
        send(ws, type="switch", message_id=first["message"]["id"])
        session = recv_session(ws)
        assert session["active_id"] == first["message"]["id"]
        assert (session["path"][-1]["version"], session["path"][-1]["versions"]) == (1, 2)
        send(ws, type="switch", message_id=second["message"]["id"])
        assert recv_session(ws)["active_id"] == second["message"]["id"]

        # rollback removes the active reply; the other version takes its place
        send(ws, type="rollback")
        session = recv_session(ws)
        assert session["message_count"] == 2
        assert session["active_id"] == first["message"]["id"]
        assert second["message"]["id"] not in tree(session)

        # edit the user message: a new branch beside the old one
        send(ws, type="edit", message_id=user1, content="What is the capital of Italy?")
        edited = collect_reply(ws)
        check_done(edited)
        user2 = edited["user_message"]
        assert user2["id"] != user1 and user2["parent_id"] is None
        session = request_session(ws)
        roots = [m for m in session["messages"] if m["parent_id"] is None]
        assert sorted(m["content"] for m in roots) == sorted([FRANCE, user2["content"]])
        assert session["path"][0]["id"] == user2["id"]
        assert (session["path"][0]["version"], session["path"][0]["versions"]) == (2, 2)
        # the old branch is still reachable
        send(ws, type="switch", message_id=user1)
        old = recv_session(ws)
        assert [m["id"] for m in old["path"]] == [user1, first["message"]["id"]]
        send(ws, type="switch", message_id=user2["id"])
        final = recv_session(ws)

    # the REST API shows the same tree
    with server.http() as http:
        r = http.get(f"/api/sessions/{sid}")
        assert r.status_code == 200
        rest = r.json()
    assert tree(rest) == tree(final)
    assert rest["active_id"] == final["active_id"]
    assert [m["id"] for m in rest["path"]] == [m["id"] for m in final["path"]]
    assert rest["message_count"] == 4  # 2 user versions, a reply to each


def test_conversation_survives_restart(server):
    sid = "ws-restart"
    with server.ws(sid) as ws:
        recv_session(ws)
        check_done(turn(ws, FRANCE, GREEDY))
        check_done(turn(ws, "And of Germany?", {"temperature": 0, "max_tokens": 8}))
    with server.http() as http:
        before = {
            s["id"]: http.get(f"/api/sessions/{s['id']}").json()
            for s in http.get("/api/sessions").json()["sessions"]
        }
    assert sid in before

    # stop the server while another session's reply is streaming to an open socket
    with server.ws("ws-live") as live:
        recv_session(live)
        send(live, type="user", content="Write a very long story about a dragon.", params=LONG)
        while recv(live)["type"] != "token":
            pass
        server.stop()  # SIGINT: uvicorn shuts down gracefully
        assert "Application shutdown complete" in server.log(), server.log()
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                recv(live, timeout=10)
        assert info.value.rcvd is None or info.value.rcvd.code in (1001, 1012)
    server.start()  # a new process on the same database

    with server.http() as http:
        after = {
            s["id"]: http.get(f"/api/sessions/{s['id']}").json()
            for s in http.get("/api/sessions").json()["sessions"]
        }
    # the interrupted reply was saved as stopped on the way down
    stopped = after.pop("ws-live")["path"]
    assert [m["role"] for m in stopped] == ["user", "assistant"]
    assert stopped[-1]["status"] == "stopped" and stopped[-1]["content"]
    assert after.keys() == before.keys()
    for key, session in before.items():
        assert tree(after[key]) == tree(session), key
        assert after[key]["active_id"] == session["active_id"]

    with server.ws(sid) as ws:
        resumed = recv_session(ws)
        assert tree(resumed) == tree(before[sid])
        reply = turn(ws, "And of Spain?", {"temperature": 0, "max_tokens": 8})
        done = check_done(reply)
        assert reply["user_message"]["parent_id"] == before[sid]["active_id"]
        # a fresh engine has no cache, and the whole history is in the prompt again
        assert done["usage"]["cached_tokens"] == 0
        assert done["usage"]["prompt_tokens"] > before[sid]["path"][-1]["meta"]["prompt_tokens"]
        assert len(request_session(ws)["path"]) == 6


def test_binary_frame_gets_an_error_and_the_socket_stays_open(server):
    with server.ws("ws-binary") as ws:
        recv_session(ws)
        ws.send(json.dumps({"type": "session"}).encode())  # valid JSON, but binary
        msg = recv(ws, timeout=10)
        assert msg["type"] == "error" and msg["code"] == "bad_request", msg
        assert "binary" in msg["message"]
        assert request_session(ws)["id"] == "ws-binary"
        check_done(turn(ws, "Hi!", {"temperature": 0, "max_tokens": 4}))
    assert "Exception in ASGI application" not in server.log(), server.log()


def test_subprotocol_hexin_is_selected(server):
    """A browser fails a handshake that selects none of the subprotocols it offered."""
    with server.ws_with("ws-proto", subprotocols=["hexin"]) as ws:
        assert ws.subprotocol == "hexin"
        assert recv_session(ws)["id"] == "ws-proto"
    with server.ws_with("ws-proto") as ws:  # none offered, none selected
        assert ws.subprotocol is None
        recv_session(ws)


# -- Connection.stream, model-free: what a socket hears when a reply fails ----------------
class FakeSocket:
    """Collects the frames sent; with ``gone_after``, sending fails as a closed socket
    does (``gone`` the exception) once that many frames went out."""

    def __init__(self, gone_after: int | None = None, gone: Exception | None = None) -> None:
        self.frames: list[dict] = []
        self.gone_after, self.gone, self.attempts = gone_after, gone, 0

    async def send_text(self, text: str) -> None:
        self.attempts += 1
        if self.gone_after is not None and len(self.frames) >= self.gone_after:
            raise self.gone
        self.frames.append(json.loads(text))


META = {
    "prompt_tokens": 5,
    "cached_tokens": 0,
    "completion_tokens": 2,
    "stop_reason": "eos",
    "dropped_turns": 0,
    "ttft_ms": 1.0,
    "tokens_per_s": 10.0,
}


class FakeReply:
    """A reply that streams ``tokens`` and then raises ``error`` (if any)."""

    def __init__(self, tokens: list[str], error: Exception | None = None) -> None:
        self.tokens, self.error, self.stopped = tokens, error, False
        self.user_message = SimpleNamespace(id="u1", role="user", to_dict=lambda: {"id": "u1"})
        self.handle = SimpleNamespace(
            completion=SimpleNamespace(cached_tokens=0), prefill_progress=(0, 5)
        )
        self.message_id, self.calls_tools = "a1", False

    def stop(self) -> None:
        self.stopped = True

    async def stream(self):
        for text in self.tokens:
            await asyncio.sleep(0)
            yield text
        if self.error is not None:
            raise self.error

    def wait(self):
        assert self.error is None, "wait() after a failed stream"
        content = "".join(self.tokens)
        return SimpleNamespace(meta=META, to_dict=lambda: {"id": "a1", "content": content})


def connection(ws: FakeSocket, replies: list[FakeReply]) -> Connection:
    service = SimpleNamespace(send=lambda sid, content, params: replies.pop(0))
    state = SimpleNamespace(metrics=SimpleNamespace(completion=lambda c: None))
    return Connection(ws, state, service, "s1")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("CUDA error: device-side assert"), "internal_error"),
        (EngineBusy("full"), "engine_busy"),
    ],
)
def test_a_failing_reply_stream_ends_with_an_error_frame_and_the_socket_stays_usable(error, code):
    ws = FakeSocket()
    failing, good = FakeReply(["Hel", "lo"], error), FakeReply(["Fine", "."])
    conn = connection(ws, [failing, good])

    async def scenario() -> None:
        await conn.handle(json.dumps({"type": "user", "content": "Hi"}))
        await asyncio.wait_for(conn.task, 5)  # promptly, not a hang
        # the socket is free for the next turn, which ends with done
        await conn.handle(json.dumps({"type": "user", "content": "Again"}))
        await asyncio.wait_for(conn.task, 5)

    asyncio.run(scenario())
    kinds = [f["type"] for f in ws.frames]
    turn_frames = ["user_message", "reply_start", "token", "token"]
    assert kinds == [*turn_frames, "error", *turn_frames, "done"], ws.frames
    err = ws.frames[4]
    assert err["code"] == code, err
    if code == "internal_error":  # the details stay in the server
        assert "CUDA" not in err["message"]
    assert failing.stopped and conn.reply is None
    assert ws.frames[-1]["message"]["content"] == "Fine."


@pytest.mark.parametrize(
    "gone", [WebSocketDisconnect(1006), WebSocketDisconnected("closed"), OSError("reset")]
)
def test_a_client_gone_mid_reply_stops_it_without_more_sends(gone):
    ws = FakeSocket(gone_after=3, gone=gone)  # user_message, reply_start, one token
    reply = FakeReply(["a", "b", "c", "d"])
    conn = connection(ws, [reply])

    async def scenario() -> None:
        await conn.handle(json.dumps({"type": "user", "content": "Hi"}))
        await asyncio.wait_for(conn.task, 5)

    asyncio.run(scenario())
    assert [f["type"] for f in ws.frames] == ["user_message", "reply_start", "token"]
    assert ws.attempts == 4  # the failed token; no error frame tried on a dead socket
    assert reply.stopped and conn.reply is None


class PrefillingReply(FakeReply):
    """A reply whose prompt takes a while: its prefill progress moves every 0.1 s (three
    times) before the tokens come."""

    def __init__(self, tokens: list[str], error: Exception | None = None) -> None:
        super().__init__(tokens, error)
        self.handle.prefill_progress = (0, 48)

    async def stream(self):
        for done in (16, 32, 48):
            await asyncio.sleep(0.1)
            self.handle.prefill_progress = (done, 48)
        async for text in super().stream():
            yield text


@pytest.mark.parametrize("error", [None, RuntimeError("engine failed")])
def test_progress_frames_come_only_before_the_first_token(monkeypatch, error):
    monkeypatch.setattr("hexin.server.websocket.PROGRESS_S", 0.02)
    ws = FakeSocket()
    conn = connection(ws, [PrefillingReply(["a", "b"], error)])

    async def scenario() -> None:
        await conn.handle(json.dumps({"type": "user", "content": "Hi"}))
        await asyncio.wait_for(conn.task, 5)
        await asyncio.sleep(0.1)  # time for a stray frame to show

    asyncio.run(scenario())
    kinds = [f["type"] for f in ws.frames]
    n = kinds.count("progress")
    end = "error" if error else "done"
    assert kinds == ["user_message", "reply_start", *["progress"] * n, "token", "token", end]
    progress = [f for f in ws.frames if f["type"] == "progress"]
    assert n >= 2 and progress[0] == {"type": "progress", "done": 0, "total": 48, "cached": 0}
    dones = [f["done"] for f in progress]
    assert dones == sorted(set(dones)) and set(dones) <= {0, 16, 32, 48}


def test_a_client_gone_during_the_prefill_stops_the_reply(monkeypatch):
    monkeypatch.setattr("hexin.server.websocket.PROGRESS_S", 0.02)
    ws = FakeSocket(gone_after=2, gone=WebSocketDisconnect(1006))  # the first progress frame
    reply = PrefillingReply(["a", "b"])
    conn = connection(ws, [reply])

    async def scenario() -> None:
        await conn.handle(json.dumps({"type": "user", "content": "Hi"}))
        await asyncio.wait_for(conn.task, 5)

    asyncio.run(scenario())
    assert [f["type"] for f in ws.frames] == ["user_message", "reply_start"]
    assert reply.stopped and conn.reply is None
    assert ws.attempts == 4  # the progress frame, then the first token: nothing more


def test_a_long_prompt_streams_progress_before_its_first_token(server):
    """A long message's prompt is computed in several chunks: progress frames with a
    growing ``done`` come before the first token, and count the prompt the usage shows."""
    words = ("river", "lantern", "copper", "violin", "meadow")
    words += ("harbor", "glacier", "velvet", "comet", "saddle")
    lines = [
        f"Item {i}: the {words[i % 10]} and the {words[i * 7 % 10]} {i * 37 % 101}."
        for i in range(200)
    ]
    content = "Read this list, then say OK.\n" + "\n".join(lines)
    with server.ws("ws-progress") as ws:
        recv_session(ws)
        reply = turn(ws, content, {"temperature": 0, "max_tokens": 4})
        usage = check_done(reply)["usage"]
    progress = reply["progress"]
    assert usage["prompt_tokens"] > 1500, usage  # several prefill chunks of 512
    assert len(progress) >= 2, progress
    dones = [f["done"] for f in progress]
    assert dones == sorted(set(dones)), dones  # growing, each frame a new count
    assert all(f["total"] == usage["prompt_tokens"] for f in progress), (progress, usage)
    assert dones[-1] <= usage["prompt_tokens"]
    assert all(0 <= f["cached"] <= f["done"] for f in progress), progress
    assert progress[-1]["cached"] == usage["cached_tokens"]


def test_tool_calls_and_their_results_over_the_socket_and_rest(server):
    """A session with tools (set through the sessions API): a required call comes back
    in the done frame's message, the results go back over the socket and are answered,
    and the tree holds the tool messages, over REST too."""
    with server.http() as http:
        r = http.post("/api/sessions", json={"id": "ws-tools", "tools": [WEATHER_TOOL]})
        assert r.status_code == 201 and r.json()["tools"] == [WEATHER_TOOL]
        bad = http.patch("/api/sessions/ws-tools", json={"tools": [{"type": "nope"}]})
        assert bad.status_code == 400 and "tools" in bad.text
    params = {"temperature": 0, "max_tokens": 60, "tool_choice": "get_weather"}
    with server.ws("ws-tools") as ws:
        recv_session(ws)
        asked = turn(ws, "Weather in Oslo?", params)
        message = check_done(asked)["message"]
        (call,) = message["meta"]["tool_calls"]
        assert message["content"] == "" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"])["city"]
        # streamed as tool_call frames: the stored id and name, then the arguments
        first, *rest = asked["calls"]
        assert first["id"] == call["id"] and first["function"]["name"] == "get_weather"
        assert len(rest) > 1 and all(d["index"] == 0 for d in asked["calls"])
        assert (
            "".join(d["function"]["arguments"] for d in asked["calls"])
            == (call["function"]["arguments"])
        )

        result = {"tool_call_id": call["id"], "content": "rain, 4 C"}
        send(ws, type="tool_results", results=[result], params=GREEDY)
        answer = collect_reply(ws)
        assert answer["user_message"]["role"] == "tool"
        assert answer["user_message"]["meta"]["tool_call_id"] == call["id"]
        assert answer["done"]["message"]["parent_id"] == answer["user_message"]["id"]
        assert answer["done"]["usage"]["cached_tokens"] > 0

        send(ws, type="tool_results", results=[result])  # nothing left to answer
        error = recv(ws)
        assert error["type"] == "error" and "no tool calls to answer" in error["message"]
    with server.http() as http:
        path = http.get("/api/sessions/ws-tools").json()["path"]
        assert [m["role"] for m in path] == ["user", "assistant", "tool", "assistant"]
        # and the same over REST: regenerate, then answer a new call
        again = http.post(
            "/api/sessions/ws-tools/messages", json={"content": "And Rome?", "params": params}
        )
        (call,) = again.json()["message"]["meta"]["tool_calls"]
        body = {"results": [{"tool_call_id": call["id"], "content": "sun"}], "params": GREEDY}
        r = http.post("/api/sessions/ws-tools/tool_results", json=body)
        assert r.status_code == 200 and r.json()["user_message"]["role"] == "tool"
        assert r.json()["message"]["role"] == "assistant"
