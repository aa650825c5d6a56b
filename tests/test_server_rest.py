"""The sessions REST API of a real ``hexin serve`` process: list and search, create, read,
update, delete, and the operations that generate (send, regenerate, edit) answered with the
finished reply as JSON, plus rollback, switch, export and import."""

from __future__ import annotations

import pytest
from server_util import FRANCE, GREEDY, Server


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("rest")).start()
    yield srv
    srv.stop()


def check_reply(body: dict, content: str | None = None) -> dict:
    """A generating call's answer: the finished reply and the user message it answers."""
    assert set(body) == {"message", "user_message"}
    message, user = body["message"], body["user_message"]
    assert message["role"] == "assistant" and message["parent_id"] == user["id"]
    assert message["status"] == "complete"
    assert message["content"]
    meta = message["meta"]
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] >= 1
    assert meta["stop_reason"] in ("eos", "length", "stop")
    if content is not None:
        assert user["content"] == content
    return message


def test_create_read_update_delete(http):
    r = http.post(
        "/api/sessions",
        json={
            "id": "crud-1",
            "title": "  Geography  ",
            "system_prompt": "You are terse.",
            "params": {"temperature": 0, "max_tokens": 12},
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"] == "crud-1" and created["title"] == "Geography"
    assert created["system_prompt"] == "You are terse."
    assert created["params"]["temperature"] == 0 and created["params"]["max_tokens"] == 12
    assert created["messages"] == [] and created["path"] == [] and created["active_id"] is None
    assert "SmolLM2" in created["model"]

    # creating it again is refused as a conflict; a generated id otherwise
    again = http.post("/api/sessions", json={"id": "crud-1"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "session_exists"
    assert "already exists" in again.json()["error"]["message"]
    anon = http.post("/api/sessions", json={})
    assert anon.status_code == 201 and len(anon.json()["id"]) >= 8

    r = http.get("/api/sessions/crud-1")
    assert r.status_code == 200 and r.json() == created

    r = http.patch(
        "/api/sessions/crud-1",
        json={"title": "Capitals", "system_prompt": "Be brief.", "params": {"top_k": 5}},
    )
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["title"] == "Capitals" and updated["system_prompt"] == "Be brief."
    assert updated["params"]["top_k"] == 5
    assert updated["params"]["temperature"] == 0  # untouched params kept
    assert http.get("/api/sessions/crud-1").json()["title"] == "Capitals"
    # an empty system prompt clears it; bad params are refused and change nothing
    assert (
        http.patch("/api/sessions/crud-1", json={"system_prompt": ""}).json()["system_prompt"]
        is None
    )
    bad = http.patch("/api/sessions/crud-1", json={"params": {"temperature": -1}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    bad = http.patch("/api/sessions/crud-1", json={"params": {"nope": 1}})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    assert http.get("/api/sessions/crud-1").json()["params"]["temperature"] == 0

    r = http.delete("/api/sessions/crud-1")
    assert r.status_code == 204 and r.content == b""
    r = http.get("/api/sessions/crud-1")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
    assert http.delete("/api/sessions/crud-1").status_code == 404


def test_list_and_search(http):
    for sid, title in (("list-a", "Trip to Lisbon"), ("list-b", "Cooking pasta")):
        assert http.post("/api/sessions", json={"id": sid, "title": title}).status_code == 201
    listed = http.get("/api/sessions").json()["sessions"]
    ids = [s["id"] for s in listed]
    assert {"list-a", "list-b"} <= set(ids)
    entry = next(s for s in listed if s["id"] == "list-a")
    assert {"id", "title", "model", "created_at", "updated_at", "message_count"} <= set(entry)

    found = [s["id"] for s in http.get("/api/sessions", params={"q": "lisbon"}).json()["sessions"]]
    assert "list-a" in found and "list-b" not in found
    none = http.get("/api/sessions", params={"q": "no-such-words-xyz"}).json()["sessions"]
    assert none == []


def test_conversation_operations(http):
    sid = "rest-conv"
    assert http.post("/api/sessions", json={"id": sid, "params": GREEDY}).status_code == 201

    r = http.post(f"/api/sessions/{sid}/messages", json={"content": FRANCE})
    assert r.status_code == 200, r.text
    first = check_reply(r.json(), FRANCE)
    assert "Paris" in first["content"]
    user1 = r.json()["user_message"]
    assert user1["parent_id"] is None
    session = http.get(f"/api/sessions/{sid}").json()
    assert session["title"] == FRANCE  # titled after the first message
    assert session["active_id"] == first["id"]

    # a second turn reuses the session's cache
    r = http.post(
        f"/api/sessions/{sid}/messages",
        json={"content": "And of Germany?", "params": {"max_tokens": 6}},
    )
    second = check_reply(r.json())
    assert second["meta"]["cached_tokens"] > first["meta"]["prompt_tokens"]
    assert second["meta"]["completion_tokens"] <= 6

    # regenerate: a new version of the last reply, with other params
    r = http.post(
        f"/api/sessions/{sid}/regenerate", json={"params": {"temperature": 1.0, "seed": 3}}
    )
    assert r.status_code == 200, r.text
    regen = check_reply(r.json())
    assert regen["parent_id"] == second["parent_id"] and regen["id"] != second["id"]
    view = http.get(f"/api/sessions/{sid}").json()
    assert (view["path"][-1]["version"], view["path"][-1]["versions"]) == (2, 2)
    # regenerate without a body works too
    assert http.post(f"/api/sessions/{sid}/regenerate").status_code == 200
    assert http.get(f"/api/sessions/{sid}").json()["path"][-1]["versions"] == 3

    # switch to the first version of that reply
    r = http.post(f"/api/sessions/{sid}/switch", json={"message_id": second["id"]})
    assert r.status_code == 200
    assert r.json()["active_id"] == second["id"]
    assert (r.json()["path"][-1]["version"], r.json()["path"][-1]["versions"]) == (1, 3)

    # rollback: the active version goes and the newest other one takes its place; with
    # none left the path ends at the user message, which goes next
    count = r.json()["message_count"]
    r = http.post(f"/api/sessions/{sid}/rollback")
    assert r.status_code == 200 and r.json()["message_count"] == count - 1
    last = r.json()["path"][-1]
    assert last["role"] == "assistant" and (last["version"], last["versions"]) == (2, 2)
    http.post(f"/api/sessions/{sid}/rollback")
    r = http.post(f"/api/sessions/{sid}/rollback")
    assert r.json()["active_id"] == second["parent_id"]
    r = http.post(f"/api/sessions/{sid}/rollback")
    assert r.json()["active_id"] == first["id"]
    assert r.json()["message_count"] == 2

    # edit the first user message: a sibling branch, the old one kept
    r = http.post(
        f"/api/sessions/{sid}/edit",
        json={"message_id": user1["id"], "content": "What is the capital of Italy?"},
    )
    assert r.status_code == 200, r.text
    edited = check_reply(r.json(), "What is the capital of Italy?")
    view = http.get(f"/api/sessions/{sid}").json()
    roots = [m for m in view["messages"] if m["parent_id"] is None]
    assert len(roots) == 2
    assert (view["path"][0]["version"], view["path"][0]["versions"]) == (2, 2)
    assert view["active_id"] == edited["id"]
    back = http.post(f"/api/sessions/{sid}/switch", json={"message_id": user1["id"]}).json()
    assert [m["id"] for m in back["path"]] == [user1["id"], first["id"]]

    # errors on the operations
    r = http.post(f"/api/sessions/{sid}/switch", json={"message_id": "nope"})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    # the status comes from the error's type, never from words in its message
    r = http.post(f"/api/sessions/{sid}/switch", json={"message_id": "busy"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = http.post(f"/api/sessions/{sid}/edit", json={"message_id": first["id"], "content": "x"})
    assert r.status_code == 400  # only user messages can be edited
    r = http.post(f"/api/sessions/{sid}/messages", json={"content": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "content"
    r = http.post(f"/api/sessions/{sid}/messages", json={"content": "hi", "params": {"top_p": 9}})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    assert http.get(f"/api/sessions/{sid}").json()["message_count"] == 4  # nothing added
    r = http.post("/api/sessions/no-such-session/messages", json={"content": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_export_import(http):
    sid = "rest-export"
    http.post("/api/sessions", json={"id": sid, "title": "Export me", "params": GREEDY})
    check_reply(http.post(f"/api/sessions/{sid}/messages", json={"content": "Hi!"}).json())

    r = http.get(f"/api/sessions/{sid}/export")
    assert r.status_code == 200
    exported = r.json()
    assert exported["id"] == sid and len(exported["messages"]) == 2
    assert exported["title"] == "Export me"

    # importing beside the original gives a copy with fresh ids
    r = http.post("/api/sessions/import", json=exported)
    assert r.status_code == 201, r.text
    copy = r.json()
    assert copy["id"] != sid
    assert [m["content"] for m in copy["messages"]] == [m["content"] for m in exported["messages"]]
    assert not {m["id"] for m in copy["messages"]} & {m["id"] for m in exported["messages"]}

    # after deleting the original, the import keeps its id and messages
    assert http.delete(f"/api/sessions/{sid}").status_code == 204
    r = http.post("/api/sessions/import", json=exported)
    assert r.status_code == 201
    restored = r.json()
    assert restored["id"] == sid
    assert [(m["id"], m["content"]) for m in restored["messages"]] == [
        (m["id"], m["content"]) for m in exported["messages"]
    ]
    assert http.get(f"/api/sessions/{sid}/export").json() == exported

    # and it is a live session again
    r = http.post(f"/api/sessions/{sid}/messages", json={"content": "Bye!"})
    assert r.json()["user_message"]["parent_id"] == exported["active_id"]

    bad = http.post("/api/sessions/import", json={"messages": "nope"})
    assert bad.status_code == 400 and "export" in bad.json()["error"]["message"]


def test_path_errors(http):
    assert http.get("/api/sessions/unknown-session").status_code == 404
    r = http.get("/api/sessions/bad%20id%21")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "session_id"
    r = http.patch("/api/sessions/bad%20id%21", json={"title": "x"})
    assert r.status_code == 400
    r = http.post("/api/sessions", json={"id": "bad id!"})
    assert r.status_code == 400 and "session id" in r.json()["error"]["message"]
    r = http.post("/api/sessions", json={"id": "x" * 65})
    assert r.status_code == 400
    r = http.post("/api/sessions", json={"id": "import"})  # the import endpoint's path
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]
