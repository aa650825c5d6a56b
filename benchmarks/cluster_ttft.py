"""What session affinity buys a cluster: second-turn time to first token on the replica
that holds the session's cache, against the same turn on the other replica.

    python benchmarks/cluster_ttft.py [--model M] [--history 1500] [--repeats 3]

Starts ``hexin cluster --replicas 2`` (a local Ray, one CPU per replica), and for each
repeat imports two sessions with a long history (distinct from their first token, so no
session finds another's blocks), runs one real turn on each (it lands on the session's
replica, which now caches the whole conversation), then times the next turn over the
chat socket: for one session as the router sends it (affinity: the same replica), for
the other forced to the replica that has not seen it (``x-session-id`` set by the client
to a key the router ranks there), which is what every turn would cost without affinity
and what the first turn after a replica dies costs. Writes
benchmarks/results/cluster_ttft.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from hexin.cluster.affinity import SESSION_HEADER, rendezvous_rank

RESULTS = Path(__file__).resolve().parent / "results" / "cluster_ttft.json"
TOPICS = ["the tides", "bread", "the blue sky", "honeybees", "lighthouses", "bicycles"]
WARM = "Thanks. Can you say that in one sentence?"
MEASURED = "Now tell me one surprising fact about it."
PARAMS = {"temperature": 0, "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def history(sid: str, target_tokens: int) -> dict[str, Any]:
    """A session export of about ``target_tokens`` (4 characters a token), its system
    prompt naming the session, so no two sessions share a prompt block."""
    messages: list[dict[str, Any]] = []
    chars, i = 0, 0
    while chars < 4 * target_tokens:
        topic = TOPICS[i % len(TOPICS)]
        question = f"Question {i + 1}: could you explain {topic} in a few sentences?"
        answer = (
            f"Sure. Here is a short explanation of {topic}, part {i + 1}. It starts with a "
            "simple observation most people have made, then follows the cause back step "
            "by step: small effects, repeated many times, add up to something large."
        )
        for role, content in (("user", question), ("assistant", answer)):
            messages.append(
                {
                    "id": uuid.uuid4().hex[:16],
                    "parent_id": messages[-1]["id"] if messages else None,
                    "role": role,
                    "content": content,
                    "created_at": time.time() - 3600 + len(messages),
                }
            )
            chars += len(content)
        i += 1
    return {
        "id": sid,
        "title": "benchmark",
        "system_prompt": f"[{sid}] You are a helpful assistant who answers briefly.",
        "messages": messages,
        "active_id": messages[-1]["id"],
    }


def timed_turn(url: str, sid: str, text: str, key: str | None = None) -> dict[str, Any]:
    """One turn on its own socket: the replica, client-side TTFT (message sent to first
    token frame) and the server's usage and TTFT."""
    headers = {SESSION_HEADER: key} if key else {}
    with connect(f"{url}/c/{sid}", additional_headers=headers, open_timeout=60) as ws:
        replica = ws.response.headers["x-hexin-replica"]
        json.loads(ws.recv(timeout=60))
        sent = time.perf_counter()
        ws.send(json.dumps({"type": "user", "content": text, "params": PARAMS}))
        first = None
        while True:
            frame = json.loads(ws.recv(timeout=300))
            if frame["type"] == "token" and first is None:
                first = time.perf_counter()
            if frame["type"] in ("done", "error"):
                break
    assert frame["type"] == "done", frame
    return {
        "replica": replica,
        "client_ttft_ms": round(((first or time.perf_counter()) - sent) * 1000, 1),
        "server_ttft_ms": frame["timing"]["ttft_ms"],
        "prompt_tokens": frame["usage"]["prompt_tokens"],
        "cached_tokens": frame["usage"]["cached_tokens"],
    }


def start_cluster(args: argparse.Namespace, home: Path, ray_dir: Path) -> tuple[Any, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "hexin.cli", "cluster", "--replicas", "2", "--port", str(port)]
    cmd += ["--db", str(home / "chat.db"), "--kv-memory", args.kv_memory]
    cmd += ["--num-cpus", "2", "--replica-cpus", "1"]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, RAY_TMPDIR=str(ray_dir), HEXIN_HOME=str(home))
    log = open(home / "cluster.log", "wb")  # noqa: SIM115 (open for the cluster's life)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hexin cluster exited: see {home / 'cluster.log'}")
        try:
            health = httpx.get(f"{url}/cluster/health", timeout=5).json()
            if health.get("ready") == 2:
                return proc, url
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    raise SystemExit("the cluster did not start in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: hexin's default model")
    parser.add_argument("--history", type=int, default=1500, help="tokens of history")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-memory", default="256M")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hexin-cluster-bench-"))
    ray_dir = Path(tempfile.mkdtemp(prefix="hx-ray-"))
    proc, url = start_cluster(args, home, ray_dir)
    runs: dict[str, list[dict[str, Any]]] = {"affinity": [], "other replica": []}
    try:
        replicas = [r["replica"] for r in httpx.get(f"{url}/cluster/health").json()["replicas"]]
        ws_url = url.replace("http://", "ws://")
        for repeat in range(args.repeats):
            for mode in runs:
                sid = f"bench-{repeat}-{uuid.uuid4().hex[:8]}"
                r = httpx.post(f"{url}/api/sessions/import", json=history(sid, args.history))
                r.raise_for_status()
                home_replica = timed_turn(ws_url, sid, WARM)["replica"]
                key = None
                if mode == "other replica":
                    key = next(
                        f"elsewhere-{n}"
                        for n in range(1000)
                        if rendezvous_rank(f"elsewhere-{n}", replicas)[0] != home_replica
                    )
                turn = timed_turn(ws_url, sid, MEASURED, key)
                assert (turn["replica"] == home_replica) == (mode == "affinity"), turn
                runs[mode].append(turn)
                print(f"{mode:>14}  {json.dumps(turn)}", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        shutil.rmtree(ray_dir, ignore_errors=True)

    summary = {
        mode: {
            "client_ttft_ms": statistics.median(t["client_ttft_ms"] for t in turns),
            "server_ttft_ms": statistics.median(t["server_ttft_ms"] for t in turns),
            "prompt_tokens": statistics.median(t["prompt_tokens"] for t in turns),
            "cached_tokens": statistics.median(t["cached_tokens"] for t in turns),
        }
        for mode, turns in runs.items()
    }
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "model": args.model or "default (smollm2-135m-instruct)",
        "replicas": 2,
        "replica_cpus": 1,
        "history_tokens": args.history,
        "repeats": args.repeats,
        "median": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['cpu']}, {record['cores']} cores, 2 replicas of 1 CPU")
    print(f"{'second turn':>14}  {'client TTFT':>12}  {'server TTFT':>12}  cached/prompt")
    for mode, s in summary.items():
        print(
            f"{mode:>14}  {s['client_ttft_ms']:>9.0f} ms  {s['server_ttft_ms']:>9.0f} ms"
            f"  {s['cached_tokens']:.0f}/{s['prompt_tokens']:.0f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
