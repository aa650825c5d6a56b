"""The chat WebSocket of a real ``hexin serve`` process: streamed turns with usage and the
per-session KV cache, stopping mid-reply, regenerate / rollback / edit over the socket, the
same tree through the REST API, and the conversation surviving a server restart."""

from __future__ import annotations

import time

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

LONG = {"temperature": 0, "max_tokens": 200}


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("websocket")).start()
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

        # rollback removes the active reply
        send(ws, type="rollback")
        session = recv_session(ws)
        assert session["message_count"] == 2
        assert session["active_id"] == user1
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
