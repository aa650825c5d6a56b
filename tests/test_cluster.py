"""Cluster mode (``hexin cluster``): the affinity key, the hash and the metrics merge on
their own, then a real Ray Serve with 2 replicas of the story model (local Ray, no GPU,
small KV pools) sharing a PostgreSQL store, through real clients: the official ``openai``
package for /v1 streams and ``websockets`` for the chat sockets.

Shown on the running cluster, in this order: 16 concurrent sessions (8 chat sockets, 8
OpenAI conversations) complete, each turn of a session on one replica (a fresh
connection per turn, so the router decides every time), the turns after the first
reusing the whole history (``cached_tokens``); the cluster's health and merged metrics; a
full replica's new sessions served by the other; one replica's process killed mid-reply:
every session goes on on the other replica (one prefill of the stored text, then cached
again), nothing stored is lost, and the killed reply, which its process could not save,
is retried by the client (``regenerate``) on the survivor; and a scale-down to one
replica, whose chat sockets are closed between replies (1012) within seconds.

The cluster starts once for the module (20-30 s on 2 cores; the module takes under a
minute) and is stopped with SIGINT, after which no process of its Ray may be left. Tests
using the ``cluster`` fixture are marked ``cluster`` and ``slow`` (tests/conftest.py), so
the quick run skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from server_util import (
    check_done,
    collect_reply,
    end_process,
    free_port,
    recv,
    recv_session,
    send,
    turn,
)
from websockets.sync.client import ClientConnection, connect

from hexin.cluster.affinity import (
    SESSION_HEADER,
    AffinityMiddleware,
    body_key,
    path_key,
    rendezvous_rank,
)
from hexin.cluster.ops import merge_metrics

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPLICAS = 2
#: open requests per replica (chat sockets count) before its sessions go elsewhere: more
#: than the 16 sessions of the concurrency test could ever put on one replica
MAX_ONGOING = 20
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0
#: how long the drain test gives the stopped replica to close its sockets
DRAIN_WAIT_S = 45.0
#: short greedy replies: the story model ends none by itself, so each is 12 tokens
SHORT = {"temperature": 0, "max_tokens": 12}
BLOCK = 16  # the engine's KV block size (EngineConfig.block_size)


# -- without Ray --------------------------------------------------------------------------
def test_path_key_is_the_session_id_of_sockets_and_the_sessions_api():
    assert path_key("/c/abc") == "abc"
    assert path_key("/api/sessions/abc") == "abc"
    assert path_key("/api/sessions/abc/messages") == "abc"
    for other in ("/api/sessions", "/api/sessions/", "/v1/models", "/health", "/c/"):
        assert path_key(other) is None, other


def test_body_key_is_the_conversations_opening():
    def key(messages: list[dict[str, Any]]) -> str | None:
        return body_key(json.dumps({"model": "m", "messages": messages}).encode())

    system = {"role": "system", "content": "You are terse."}
    first = {"role": "user", "content": "Tell me about cats."}
    later = [
        first,
        {"role": "assistant", "content": "Cats purr."},
        {"role": "user", "content": "Why?"},
    ]
    # every turn of one conversation opens the same way
    assert key([system, first]) == key([system, *later]) is not None
    # one system prompt shared by all conversations does not make them one key
    assert key([system, first]) != key([system, {"role": "user", "content": "Dogs?"}])
    # OpenAI's content parts count as their text
    parts = {"role": "user", "content": [{"type": "text", "text": "Tell me about cats."}]}
    assert key([system, parts]) == key([system, first])
    # a completion: the prompt's start
    one = body_key(json.dumps({"prompt": "Once upon a time", "max_tokens": 3}).encode())
    assert one is not None and one != key([first])
    assert body_key(b"not json") is None and body_key(b"[1, 2]") is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_left():
    keys = [f"session-{i}" for i in range(3000)]
    three = {k: rendezvous_rank(k, ["a", "b", "c"])[0] for k in keys}
    counts = {r: list(three.values()).count(r) for r in "abc"}
    assert all(800 < n < 1200 for n in counts.values()), counts
    two = {k: rendezvous_rank(k, ["a", "c"])[0] for k in keys}
    assert all(two[k] == three[k] for k in keys if three[k] != "b")
    # the order of the candidates does not matter
    assert all(rendezvous_rank(k, ["c", "b", "a"])[0] == three[k] for k in keys[:200])


def test_middleware_names_the_key_in_the_session_header_and_passes_the_body_on():
    seen: list[tuple[dict[str, str], bytes]] = []

    async def app(scope, receive, send):
        body = b""
        if scope["type"] == "http":
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        seen.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))

    middleware = AffinityMiddleware(app)

    async def call(scope: dict, chunks: list[bytes]) -> None:
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            pass

        await middleware({"headers": [], **scope}, receive, send)

    chat = json.dumps({"messages": [{"role": "user", "content": "Hi there"}]}).encode()
    asyncio.run(call({"type": "websocket", "path": "/c/s-1"}, []))
    asyncio.run(call({"type": "http", "method": "GET", "path": "/api/sessions/s-2"}, [b""]))
    asyncio.run(
        call(
            {"type": "http", "method": "POST", "path": "/v1/chat/completions"}, [chat[:7], chat[7:]]
        )
    )
    asyncio.run(call({"type": "http", "method": "GET", "path": "/v1/models"}, [b""]))
    client_chosen = {"headers": [(SESSION_HEADER.encode(), b"mine")]}
    post = {"type": "http", "method": "POST", "path": "/v1/completions", **client_chosen}
    asyncio.run(call(post, [b'{"prompt": "x"}']))

    assert seen[0][0][SESSION_HEADER] == "s-1"
    assert seen[1][0][SESSION_HEADER] == "s-2"
    assert seen[2] == ({SESSION_HEADER: body_key(chat)}, chat)  # the body arrives whole
    assert SESSION_HEADER not in seen[3][0]
    assert seen[4] == ({SESSION_HEADER: "mine"}, b'{"prompt": "x"}')  # the client's own key


def test_merged_metrics_label_each_replica_and_total_them():
    def text(tokens: int, rate: float) -> str:
        return (
            "# HELP hexin_completion_tokens_total Tokens generated.\n"
            "# TYPE hexin_completion_tokens_total counter\n"
            f"hexin_completion_tokens_total {tokens}\n"
            "# TYPE hexin_requests_total counter\n"
            f'hexin_requests_total{{route="/health",status="200"}} {tokens // 10}\n'
            "# TYPE hexin_engine_prefix_cache_hit_rate gauge\n"
            f"hexin_engine_prefix_cache_hit_rate {rate}\n"
        )

    merged = merge_metrics({"r1": text(30, 0.5), "r2": text(50, 0.25)})
    lines = merged.splitlines()
    assert 'hexin_completion_tokens_total{replica="r1"} 30' in lines
    assert 'hexin_completion_tokens_total{replica="r2"} 50' in lines
    assert "hexin_cluster_completion_tokens_total 80" in lines
    assert 'hexin_requests_total{replica="r2",route="/health",status="200"} 5' in lines
    assert 'hexin_cluster_requests_total{route="/health",status="200"} 8' in lines
    assert "hexin_cluster_engine_prefix_cache_hit_rate 0.375" in lines  # a mean, not a sum
    assert "# TYPE hexin_cluster_completion_tokens_total counter" in lines
    assert "hexin_cluster_replicas 2" in lines
    # each family's samples follow its own header
    assert lines.index("# TYPE hexin_requests_total counter") < lines.index(
        'hexin_requests_total{replica="r1",route="/health",status="200"} 3'
    )


# -- a real cluster -----------------------------------------------------------------------
class Cluster:
    """``python -m hexin.cli cluster`` in a subprocess, its Ray in a folder of its own
    (``RAY_TMPDIR``), so that every process it started can be found afterwards."""

    def __init__(self, model: Path, db: str, home: Path) -> None:
        self.model, self.db, self.home = model, db, home
        self.port = free_port()
        # short: Ray's socket paths under it must fit in 107 characters
        self.ray_dir = Path(tempfile.mkdtemp(prefix="hx-ray-"))
        self.log_path = home / "cluster.log"
        self.proc: subprocess.Popen | None = None
        #: replicas killed by a test (Ray Serve replaces them under new ids)
        self.killed: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, replicas: int) -> list[str]:
        cmd = [sys.executable, "-m", "hexin.cli", "cluster", "--model", str(self.model)]
        cmd += ["--replicas", str(replicas), "--db", self.db, "--port", str(self.port)]
        cmd += ["--kv-memory", "8M", "--num-cpus", "2", "--replica-cpus", "0.5"]
        # a drain timeout far beyond what the drain test waits, so that what it sees is
        # hexin closing idle sockets, never the timeout, however slow a busy machine is
        cmd += ["--drain-timeout", str(DRAIN_TIMEOUT_S)]
        return [*cmd, "--max-ongoing", str(MAX_ONGOING)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, HEXIN_HOME=str(self.home), RAY_TMPDIR=str(self.ray_dir))
        env.update(PYTHONUNBUFFERED="1", HEXIN_DEBUG="1")
        env.pop("HEXIN_API_KEY", None)
        return env

    def start(self) -> Cluster:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(REPLICAS),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.home,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"hexin cluster exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                health = httpx.get(f"{self.url}/cluster/health", timeout=5)
                if health.status_code == 200 and health.json()["ready"] == REPLICAS:
                    return self
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"cluster not ready in {START_TIMEOUT_S}s:\n{self.log()}")

    def scale(self, replicas: int) -> None:
        """``hexin cluster --address auto --detach`` with a new replica count, as an
        operator changes it on a running cluster."""
        done = subprocess.run(
            [*self.command(replicas), "--address", "auto", "--detach"],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.home,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    def stop(self) -> None:
        """SIGINT, as Ctrl-C in its terminal would (to it alone), then: every process of
        its Ray must be gone."""
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc, signal.SIGINT, self.log, "hexin cluster", STOP_TIMEOUT_S)
        left = ray_processes(self.ray_dir)
        for pid in left:  # ours, by id: not to disturb the rest of the run
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        assert not left, f"processes of the cluster's Ray left running: {left}"

    def log(self, tail: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    # -- clients ------------------------------------------------------------------------
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def ws(self, session_id: str) -> ClientConnection:
        return connect(
            f"ws://127.0.0.1:{self.port}/c/{session_id}", open_timeout=30, close_timeout=5
        )

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/cluster/health", timeout=30).json()

    def replicas(self) -> dict[str, int]:
        """The ready replicas: id -> pid."""
        ready = [r for r in self.health()["replicas"] if r["status"] == "ok"]
        return {r["replica"]: r["pid"] for r in ready if not r["draining"]}


def ray_processes(folder: Path) -> list[int]:
    """Processes started with ``RAY_TMPDIR=folder``: the cluster's command, its Ray and
    every worker (whose command lines Ray renames, but whose environment it inherits)."""
    mark = f"RAY_TMPDIR={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, story_dir, postgres_url):
    """2 replicas of the story model (given a chat template, so its sessions can chat)
    sharing a fresh PostgreSQL database."""
    from postgres_server import fresh_database

    home = tmp_path_factory.mktemp("cluster")
    model = home / "story-chat"
    shutil.copytree(story_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    with fresh_database(postgres_url) as db:
        running = Cluster(model, db, home).start()
        try:
            yield running
        finally:
            running.stop()


# -- client sides of a session ------------------------------------------------------------
def history_of(done: dict[str, Any]) -> int:
    """The tokens a finished turn leaves in its session's cache: its prompt and reply,
    and the end-of-turn token it sampled, if it ended on one."""
    u = done["usage"]
    return u["prompt_tokens"] + u["completion_tokens"] + (done["stop_reason"] == "eos")


def socket_turn(cluster: Cluster, sid: str, content: str) -> tuple[str, dict[str, Any]]:
    """One turn on a socket of its own: the replica it reached, and its done frame."""
    with cluster.ws(sid) as ws:
        replica = ws.response.headers["x-hexin-replica"]
        recv_session(ws)
        done = check_done(turn(ws, content, SHORT))
    assert done["message"]["status"] == "complete", done
    return replica, done


def socket_session(cluster: Cluster, sid: str, turns: int) -> list[tuple[str, dict]]:
    return [socket_turn(cluster, sid, f"{sid}, part {i}: and then what?") for i in range(turns)]


def openai_turn(cluster: Cluster, messages: list[dict[str, Any]]) -> tuple[str, Any, str]:
    """One streamed chat completion: the replica, its usage, its text."""
    text, usage, finish = "", None, None
    with cluster.openai() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="story",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **SHORT,
        )
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    assert finish == "length" and usage is not None and usage.completion_tokens == 12
    return raw.headers["x-hexin-replica"], usage, text


def openai_conversation(cluster: Cluster, name: str, turns: int) -> list[tuple[str, Any]]:
    messages = [{"role": "user", "content": f"{name}: tell me about a little red boat."}]
    out = []
    for i in range(turns):
        replica, usage, text = openai_turn(cluster, messages)
        out.append((replica, usage))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"{i}?"}]
    return out


def openai_key(name: str) -> str:
    opening = [{"role": "user", "content": f"{name}: tell me about a little red boat."}]
    key = body_key(json.dumps({"messages": opening}).encode())
    assert key is not None
    return key


# -- on the cluster -----------------------------------------------------------------------
def test_sixteen_concurrent_sessions_each_stay_on_one_replica(cluster):
    replicas = list(cluster.replicas())
    assert len(replicas) == REPLICAS
    sockets = [f"ws-{i}" for i in range(8)]
    chats = [f"oai-{i}" for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        socket_runs = {sid: pool.submit(socket_session, cluster, sid, 3) for sid in sockets}
        chat_runs = {name: pool.submit(openai_conversation, cluster, name, 3) for name in chats}
        socket_turns = {sid: f.result(timeout=240) for sid, f in socket_runs.items()}
        chat_turns = {name: f.result(timeout=240) for name, f in chat_runs.items()}

    for sid, turns in socket_turns.items():
        # one replica for all of a session's turns: the one its id hashes to
        assert {r for r, _ in turns} == {rendezvous_rank(sid, replicas)[0]}, (sid, turns)
        for (_, before), (_, done) in itertools.pairwise(turns):
            # the whole history is reused: only the new message is prefilled
            assert done["usage"]["cached_tokens"] == history_of(before), (sid, turns)
    for name, turns in chat_turns.items():
        assert {r for r, _ in turns} == {rendezvous_rank(openai_key(name), replicas)[0]}
        for (_, before), (_, usage) in itertools.pairwise(turns):
            # OpenAI requests share whole blocks by content: at least those of the last
            # turn's prompt are found again
            cached = usage.prompt_tokens_details.cached_tokens
            assert cached >= before.prompt_tokens // BLOCK * BLOCK > 0, (name, turns)
    landed = {r for turns in socket_turns.values() for r, _ in turns}
    landed |= {r for turns in chat_turns.values() for r, _ in turns}
    assert landed == set(replicas)  # 16 keys: both replicas take some

    with cluster.http() as http:
        for sid in sockets:
            path = http.get(f"/api/sessions/{sid}").json()["path"]
            assert [m["role"] for m in path] == ["user", "assistant"] * 3
            assert all(m["status"] == "complete" for m in path)


def sample(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
    assert m, f"no {name} in:\n{metrics}"
    return float(m.group(1))


def test_cluster_health_and_merged_metrics(cluster):
    pids = cluster.replicas()
    health = cluster.health()
    assert health["status"] == "ok" and health["ready"] == REPLICAS
    assert all(r["model"] == "story-chat" and r["engine"] for r in health["replicas"])
    # the pid a replica reports is the process that answers as it
    with cluster.http() as http:
        r = http.get("/health")
        assert r.status_code == 200
        assert pids[r.headers["x-hexin-replica"]] == int(r.headers["x-hexin-pid"])

    turns = [socket_turn(cluster, f"metrics-{i}", "Hello.")[1] for i in range(2)]
    generated = sum(done["usage"]["completion_tokens"] for done in turns)
    deadline = time.monotonic() + 10
    while True:
        with cluster.http() as http:
            metrics = http.get("/cluster/metrics").text
        per_replica = {
            rid: sample(metrics, f'hexin_completion_tokens_total{{replica="{rid}"}}')
            for rid in pids
        }
        total = sample(metrics, "hexin_cluster_completion_tokens_total")
        if total >= generated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total == sum(per_replica.values()) >= generated
    assert sample(metrics, "hexin_cluster_replicas") == REPLICAS


def test_a_full_replica_sends_its_new_sessions_to_the_other(cluster):
    """A replica holding ``MAX_ONGOING`` open sockets is full: a session that hashes to it
    is served by the other replica instead, and comes back once there is room."""
    replicas = sorted(cluster.replicas())
    full = replicas[0]
    ids = (f"spill-{n}" for n in range(1000))
    mine = [s for s in ids if rendezvous_rank(s, replicas)[0] == full][: MAX_ONGOING + 1]
    with contextlib.ExitStack() as stack:
        for sid in mine[:MAX_ONGOING]:
            ws = stack.enter_context(cluster.ws(sid))
            assert ws.response.headers["x-hexin-replica"] == full
            recv_session(ws)
        replica, done = socket_turn(cluster, mine[-1], "Is there room?")
        assert replica != full and done["usage"]["completion_tokens"] == 12
    deadline = time.monotonic() + 10  # the proxy sees the sockets close
    while socket_turn(cluster, mine[-1], "And now?")[0] != full:
        assert time.monotonic() < deadline, "the replica stayed full"
        time.sleep(0.2)


def test_a_killed_replica_loses_only_its_caches(cluster):
    """SIGKILL one replica mid-reply. Its process can save nothing, so the reply in
    flight is lost with it: the user message stays stored without an answer, and the
    client, its socket dropped, reconnects and retries it (``regenerate``) on the other
    replica. That is what this cluster does with a killed reply ("retried"); a replica
    stopped gracefully saves its replies instead (as "stopped")."""
    pids = cluster.replicas()
    victim, survivor = sorted(pids)
    ids = [f"kill-{n}" for n in range(40)]
    on_victim = [s for s in ids if rendezvous_rank(s, [victim, survivor])[0] == victim][:3]
    on_survivor = [s for s in ids if rendezvous_rank(s, [victim, survivor])[0] == survivor][:2]
    chat = next(
        f"kill-oai-{n}"
        for n in range(40)
        if rendezvous_rank(openai_key(f"kill-oai-{n}"), [victim, survivor])[0] == victim
    )
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    for sid in on_victim + on_survivor:
        first[sid] = socket_turn(cluster, sid, f"{sid}: once there was a fox.")
        assert first[sid][0] == (victim if sid in on_victim else survivor)
    chat_messages = [{"role": "user", "content": f"{chat}: tell me about a little red boat."}]
    replica, chat_usage, text = openai_turn(cluster, chat_messages)
    assert replica == victim

    # a long reply streaming on the victim when its process is killed
    talking = on_victim[0]
    with cluster.ws(talking) as ws:
        assert ws.response.headers["x-hexin-replica"] == victim
        recv_session(ws)
        send(ws, type="user", content="Tell me the whole story.", params={"max_tokens": 400})
        while recv(ws)["type"] != "token":
            pass
        os.kill(pids[victim], signal.SIGKILL)
        cluster.killed.add(victim)
        with pytest.raises(websockets.ConnectionClosed):
            while True:  # tokens already on their way, then the socket drops: no done
                assert recv(ws, timeout=30)["type"] == "token"

    # the client reconnects: the survivor answers, from the stored text
    with cluster.ws(talking) as ws:
        assert ws.response.headers["x-hexin-replica"] == survivor
        session = recv_session(ws)
        asked = session["path"][-1]
        assert asked["role"] == "user" and asked["content"] == "Tell me the whole story."
        assert not [m for m in session["messages"] if m["parent_id"] == asked["id"]]
        send(ws, type="regenerate", params=SHORT)
        retried = check_done(collect_reply(ws))
    assert retried["message"]["parent_id"] == asked["id"]
    assert retried["message"]["status"] == "complete"
    lost = retried["usage"]["cached_tokens"]
    # one prefill of the stored conversation: its cache died with the victim
    assert lost < history_of(first[talking][1]) and lost % BLOCK == 0

    # every session goes on, on the survivor; the moved ones prefill once, then are cached
    for sid in on_victim[1:] + on_survivor:
        replica, done = socket_turn(cluster, sid, "And then?")
        assert replica == survivor
        history = history_of(first[sid][1])
        if sid in on_survivor:
            assert done["usage"]["cached_tokens"] == history
        else:
            assert done["usage"]["cached_tokens"] < history
        again_replica, again = socket_turn(cluster, sid, "And after that?")
        assert again_replica == survivor
        assert again["usage"]["cached_tokens"] == history_of(done)
    chat_messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
    replica, usage, _ = openai_turn(cluster, chat_messages)
    assert replica == survivor
    assert usage.prompt_tokens_details.cached_tokens < chat_usage.prompt_tokens // BLOCK * BLOCK

    # nothing stored is lost: every turn of every session, the earlier tests' too
    with cluster.http() as http:
        for sid in on_victim[1:] + on_survivor:
            path = http.get(f"/api/sessions/{sid}").json()["path"]
            assert [m["role"] for m in path] == ["user", "assistant"] * 3
        path = http.get(f"/api/sessions/{talking}").json()["path"]
        assert [m["role"] for m in path] == ["user", "assistant"] * 2
        assert path[-1]["id"] == retried["message"]["id"]
        for sid in (f"ws-{i}" for i in range(8)):
            assert len(http.get(f"/api/sessions/{sid}").json()["messages"]) == 6


def ready_replicas(cluster: Cluster, n: int, timeout: float = 90) -> list[str]:
    """Wait until ``n`` replicas are ready (a killed one is restarted by Ray Serve with a
    new id; its stale report is left out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [r for r, info in cluster.replicas().items() if r not in cluster.killed]
        if len(fresh) == n:
            return sorted(fresh)
        time.sleep(0.5)
    raise AssertionError(f"not {n} replicas in {timeout}s: {cluster.health()}\n{cluster.log()}")


class Watched:
    """A chat socket on a thread of its own until ``stop``: idle, or (``chatty``) sending
    a turn after every reply. Records its replica, how it closed, and whether the close
    came in the middle of a reply."""

    def __init__(self, cluster: Cluster, sid: str, chatty: bool) -> None:
        self.cluster, self.sid, self.chatty = cluster, sid, chatty
        self.replica = ""
        self.code: int | None = None
        self.closed_at: float | None = None
        self.mid_reply = False
        self.replies = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.cluster.ws(self.sid) as ws:
            self.replica = ws.response.headers["x-hexin-replica"]
            recv_session(ws)
            try:
                while not self.stop.is_set():
                    if not self.chatty:
                        with contextlib.suppress(TimeoutError):
                            recv(ws, timeout=0.2)
                        continue
                    send(ws, type="user", content="And then?", params=SHORT)
                    while True:  # in a reply from its first frame to its done
                        kind = recv(ws)["type"]
                        self.mid_reply = kind != "done"
                        if kind == "done":
                            break
                    self.replies += 1
            except websockets.ConnectionClosed as e:
                self.closed_at = time.monotonic()
                self.code = e.rcvd.code if e.rcvd is not None else None


def test_a_replica_scaled_away_drains_its_sockets_between_replies(cluster):
    """2 replicas -> 1 while each holds an idle chat socket and a busy one (a turn after
    every reply). The replica Ray Serve stops closes its sockets with 1012 ("service
    restart") at a moment no reply streams, within seconds (``DRAIN_WAIT_S`` on a busy
    machine), where its drain timeout would otherwise run out on the idle socket and kill
    it; the other replica's sockets stay open, with their caches; the drained sessions go
    on on the survivor."""
    replicas = ready_replicas(cluster, REPLICAS)
    sockets = []
    for replica in replicas:
        for chatty in (False, True):
            tag = "drain-busy" if chatty else "drain-idle"
            sid = next(
                f"{tag}-{n}"
                for n in range(100)
                if rendezvous_rank(f"{tag}-{n}", replicas)[0] == replica
            )
            sockets.append(Watched(cluster, sid, chatty))
    for s in sockets:
        s.thread.start()
    time.sleep(1.0)
    assert all(s.replica for s in sockets)
    scaled = time.monotonic()
    cluster.scale(1)
    deadline = time.monotonic() + DRAIN_WAIT_S
    while time.monotonic() < deadline and sum(s.code is not None for s in sockets) < 2:
        time.sleep(0.2)
    for s in sockets:
        s.stop.set()
    for s in sockets:
        s.thread.join(30)

    stopped = {s.replica for s in sockets if s.code is not None}
    assert len(stopped) == 1, [(s.sid, s.replica, s.code) for s in sockets]
    for s in sockets:
        if s.replica in stopped:
            assert s.code == 1012 and not s.mid_reply, (s.sid, s.code, s.mid_reply)
            assert s.closed_at is not None and s.closed_at - scaled < DRAIN_WAIT_S
        else:
            assert s.code is None  # still open when told to stop
    busy = [s for s in sockets if s.chatty]
    assert all(s.replies >= 1 for s in busy)

    (survivor,) = ready_replicas(cluster, 1)
    with cluster.http() as http:
        for s in sockets:
            path = http.get(f"/api/sessions/{s.sid}").json()["path"]
            # every reply stored whole: a drained reply is never cut
            assert [m["role"] for m in path] == ["user", "assistant"] * (len(path) // 2)
            assert all(m["status"] == "complete" for m in path)
    for s in sockets:
        replica, _ = socket_turn(cluster, s.sid, "Still there?")
        assert replica == survivor
