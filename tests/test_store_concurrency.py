"""Two servers, one PostgreSQL store: concurrent writers on different processes never lose
or duplicate a message, and the loser of a race gets the same "busy" answer as on one
server.

Two real ``hexin serve`` processes share a fresh database. Client threads, half on each
server, hammer the same few sessions for a bounded time with sends, regenerations, edits
and deletes (a deleted session is created again under its id). Each user message carries
a unique text, and every answered request records what it stored. Afterwards:

* every message a request committed after the session's last delete is stored, exactly
  once (its text appears once); what an acknowledged delete removed is gone;
* every tree is valid (its export reads back: no cycle, no missing parent, the active
  message present);
* the races happened: some requests got 409 ``session_busy``, with a message that says so,
  and nothing else went wrong (no 5xx);
* no session is left locked: each takes a new turn on either server.

Also: a process that dies holding a session's lock frees it (PostgreSQL ends its advisory
locks with its connection).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from postgres_server import fresh_database
from server_util import Server

from hexin.chat import Session, open_store

SESSIONS = [f"shared-{i}" for i in range(4)]
CLIENTS_PER_SERVER = 3
#: the clients hammer for at least HAMMER_S, and on until MIN_COMMITS requests committed
#: (a loaded machine needs longer), but never past HAMMER_MAX_S
HAMMER_S, MIN_COMMITS, HAMMER_MAX_S = 20.0, 10, 150.0
REPLY = {"temperature": 0.8, "max_tokens": 6}


@pytest.fixture(scope="module")
def database(postgres_url):
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="module")
def servers(default_gguf, database, tmp_path_factory):
    extra = ("--kv-memory", "64M", "--max-running", "8")
    started = [
        Server(default_gguf, tmp_path_factory.mktemp(f"replica{i}"), db=database, extra=extra)
        for i in range(2)
    ]
    for server in started:
        server.start(wait=False)
    for server in started:
        server.wait_ready()
    yield started
    for server in started:
        server.stop()


@dataclass
class Ledger:
    """What the clients saw, shared between their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: session -> [(request start, response end, stored texts, stored message ids)]
    committed: dict[str, list[tuple[float, float, list[str], list[str]]]] = field(
        default_factory=dict
    )
    #: session -> [(request start, response end)] of acknowledged deletes
    deleted: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    busy_messages: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)

    def count(self, what: str) -> None:
        with self.lock:
            self.statuses[what] = self.statuses.get(what, 0) + 1

    def hammering(self, began: float) -> bool:
        elapsed = time.monotonic() - began
        with self.lock:
            commits = sum(len(c) for c in self.committed.values())
        return elapsed < HAMMER_S or (commits < MIN_COMMITS and elapsed < HAMMER_MAX_S)


def _client(server: Server, name: str, ledger: Ledger, began: float, seed: int) -> None:
    """One client's requests; anything that breaks it is recorded, never lost with its
    thread."""
    try:
        _requests(server, name, ledger, began, seed)
    except Exception as e:
        ledger.unexpected.append(f"client {name}: {e!r}")


def _requests(server: Server, name: str, ledger: Ledger, began: float, seed: int) -> None:
    rng, texts = random.Random(seed), itertools.count()
    with server.http(timeout=60) as http:
        while ledger.hammering(began):
            sid = rng.choice(SESSIONS)
            op = rng.choices(["send", "regenerate", "edit", "delete"], [5, 2, 2, 1])[0]
            text = f"{name} says {next(texts)}: tell me a short story."
            start = time.monotonic()
            if op == "send":
                r = http.post(
                    f"/api/sessions/{sid}/messages", json={"content": text, "params": REPLY}
                )
            elif op == "regenerate":
                r = http.post(f"/api/sessions/{sid}/regenerate", json={"params": REPLY})
            elif op == "edit":
                got = http.get(f"/api/sessions/{sid}")
                users = [m for m in got.json().get("messages", []) if m["role"] == "user"]
                if got.status_code != 200 or not users:
                    continue
                body = {"message_id": rng.choice(users)["id"], "content": text, "params": REPLY}
                r = http.post(f"/api/sessions/{sid}/edit", json=body)
            else:
                r = http.delete(f"/api/sessions/{sid}")
            end = time.monotonic()
            ledger.count(f"{op} {r.status_code}")
            if r.status_code == 200:
                stored = [r.json()["message"]]
                if op != "regenerate":
                    stored.append(r.json()["user_message"])
                with ledger.lock:
                    ledger.committed.setdefault(sid, []).append(
                        (start, end, [m["content"] for m in stored if m["role"] == "user"],
                         [m["id"] for m in stored])
                    )  # fmt: skip
            elif r.status_code == 204:
                with ledger.lock:
                    ledger.deleted.setdefault(sid, []).append((start, end))
                _create(http, sid)
            elif r.status_code == 409:
                error = r.json()["error"]
                assert error["code"] == "session_busy", error
                ledger.busy_messages.add(error["message"])
                time.sleep(rng.uniform(0.05, 0.3))  # as a client would, before trying again
            elif r.status_code == 404:  # deleted by another client, not yet created again
                _create(http, sid)
            elif not (r.status_code == 400 and op in ("regenerate", "edit")):
                ledger.unexpected.append(f"{op} {sid}: {r.status_code} {r.text[:300]}")


def _create(http: httpx.Client, sid: str) -> None:
    r = http.post("/api/sessions", json={"id": sid})
    if r.status_code != 201:  # another client created it first
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists", r.text


def test_two_servers_on_one_database_lose_and_duplicate_nothing(servers, database):
    with servers[0].http() as http:
        for sid in SESSIONS:
            _create(http, sid)
    ledger = Ledger()
    began = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(server, f"c{i}{j}", ledger, began, 10 * i + j))
        for i, server in enumerate(servers)
        for j in range(CLIENTS_PER_SERVER)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HAMMER_MAX_S + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not ledger.unexpected, ledger.unexpected
    assert not [s for s in ledger.statuses if s.split()[1].startswith("5")], ledger.statuses
    # the races happened, and each loser was told the session is busy
    assert sum(n for s, n in ledger.statuses.items() if s.endswith(" 409")) > 0, ledger.statuses
    assert all("busy" in m for m in ledger.busy_messages), ledger.busy_messages
    assert sum(n for s, n in ledger.statuses.items() if s.endswith(" 200")) >= MIN_COMMITS, (
        ledger.statuses
    )

    store = open_store(database)
    try:
        for sid in SESSIONS:
            session = store.load(sid)
            exported = session.to_dict()
            Session.from_dict(exported)  # a valid tree: no cycle, parents present
            assert session.active_id is None or session.active_id in session.messages
            texts = [m.content for m in session.messages.values() if m.role == "user"]
            assert len(texts) == len(set(texts)), "a user message was stored twice"
            stored_ids = set(session.messages)
            deletes = ledger.deleted.get(sid, [])
            last_delete_end = max((end for _, end in deletes), default=0.0)
            for start, end, user_texts, ids in ledger.committed.get(sid, []):
                if start > last_delete_end:  # after every delete: must be there
                    assert set(ids) <= stored_ids, (sid, ids)
                    assert all(texts.count(t) == 1 for t in user_texts), user_texts
                elif any(end < d_start for d_start, _ in deletes):  # removed by a delete
                    assert not set(ids) & stored_ids, (sid, ids)
    finally:
        store.close()

    # no session is left locked: each takes a turn on either server
    for i, sid in enumerate(SESSIONS):
        with servers[i % 2].http() as http:
            r = http.post(f"/api/sessions/{sid}/messages", json={"content": "hi", "params": REPLY})
            assert r.status_code == 200, r.text


HOLDER = textwrap.dedent(
    """
    import sys, time
    from hexin.chat import open_store
    store = open_store(sys.argv[1])
    assert store.try_lock("held")
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_lock_held_by_a_process_that_dies_is_freed(database):
    store = open_store(database)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert not store.try_lock("held")  # another process holds it
        assert store.try_lock("other")  # locks are per session
        store.unlock("other")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        while not store.try_lock("held"):  # the server notices the lost connection
            assert time.monotonic() < deadline, "the dead process's lock was never freed"
            time.sleep(0.05)
        store.unlock("held")
    finally:
        holder.kill()
        store.close()
