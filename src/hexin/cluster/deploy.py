"""Ray Serve's side of cluster mode: the replica (a whole ``hexin serve`` app), the request
router that keeps a session on one replica, and the registry the replicas report to.

A replica is ``create_app`` and nothing more, wrapped by ``ReplicaApp``, which

- names the replica on every answer (``x-hexin-replica``, ``x-hexin-pid`` headers on
  HTTP responses and on a WebSocket's handshake), so a client (and the tests) can see
  where a request landed;
- answers ``/cluster/health`` and ``/cluster/metrics`` from the registry: every replica's
  state and metrics, whichever replica is asked;
- drains: once Ray Serve is stopping the replica (a scale-down, a redeploy), each chat
  socket is closed with 1012 ("service restart") as soon as it has no reply streaming,
  and the client's reconnect reaches another replica. Ray Serve sends a stopping replica
  no new requests and waits for the open ones, but an idle socket is an open request
  too: without this, one idle browser tab would hold the replica until Serve's
  ``graceful_shutdown_timeout_s`` ran out and it was killed, losing the replies still
  streaming. The app's own shutdown then saves any reply still in flight as stopped.

Replicas share nothing but the store (``--db``): a replica that dies loses only its KV
caches; the next turn of its sessions is routed to another replica, which prefills the
stored conversation once (its ``cached_tokens`` show it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.responses import JSONResponse, PlainTextResponse

from hexin.cluster.affinity import has_key, rendezvous_rank
from hexin.cluster.ops import merge_metrics
from hexin.server.state import ServerConfig

log = logging.getLogger("hexin.cluster")

REPLICA_HEADER = "x-hexin-replica"
PID_HEADER = "x-hexin-pid"
#: how often a replica reports its state and metrics (and hears whether it is stopping)
REPORT_S = 1.0
#: a replica not heard from for this long is left out of the cluster's view (killed)
STALE_S = 5.0
#: the close code of a socket a draining replica ends: "service restart", try again
DRAIN_CLOSE = 1012
#: replies still running this long before Ray Serve kills a stopping replica are stopped
#: (and saved); the drain signal itself arrives up to two report periods late
DRAIN_MARGIN_S = 5.0
#: chat socket messages that start a reply (``hexin.server.websocket``)
TURNS = frozenset({"user", "regenerate", "continue", "edit", "tool_results"})
#: server frames that end one
ENDS = frozenset({"done", "error"})


class AffinityRouter(RequestRouter):
    """Ray Serve's request router for the replicas: a request with an affinity key (Ray's
    session id, set by ``affinity.AffinityMiddleware`` in the proxy) goes to the replica
    that rendezvous hashing ranks first for it, unless that replica is at its
    ``max_ongoing_requests``; then the least loaded of the others takes it. A request
    without a key goes to the least loaded replica. A replica that died is no longer a
    candidate, so its sessions move to the replicas ranked next for them."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = ""
        if pending_request is not None:
            key = pending_request.metadata.session_id
            # when every rank is full, wait a little before the next round (no spinning)
            pending_request.routing_context.should_backoff = True
        if not key or len(candidate_replicas) < 2:
            # least loaded; shuffled, so that ties do not all go to the first replica
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rendezvous_rank(key, by_id)]
        return [ranked[:1], ranked[1:]]


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},  # a report per replica per second
)
class Registry:
    """What every replica last reported (state, pid, metrics), and which replicas Ray
    Serve is stopping: the cluster's view for ``/cluster/*`` and the drain signal."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.stopping: set[str] = set()
        self.checked = 0.0

    async def report(self, replica: str, info: dict[str, Any]) -> dict[str, Any]:
        self.reports[replica] = dict(info, seen=time.time())
        await self._refresh()
        return {"draining": replica in self.stopping}

    def leave(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {
            replica: dict(info, age_s=round(now - info["seen"], 2))
            for replica, info in self.reports.items()
            if now - info["seen"] < STALE_S
        }

    async def _refresh(self) -> None:
        """The replicas Ray Serve is stopping, from its controller, at most once per
        report period (one call for all replicas)."""
        if time.monotonic() - self.checked < REPORT_S:
            return
        self.checked = time.monotonic()
        from ray.serve.context import _get_global_client

        try:
            details = await asyncio.to_thread(_get_global_client().get_serve_details)
        except Exception as e:  # the view goes stale; serving does not depend on it
            log.warning("cannot read Ray Serve's replica states: %s", e)
            return
        self.stopping = {
            replica["replica_id"]
            for app in details.get("applications", {}).values()
            for deployment in app.get("deployments", {}).values()
            for replica in deployment.get("replicas", [])
            if replica.get("state") == "STOPPING"
        }


def frame_type(text: str) -> str | None:
    """The ``type`` of a chat socket frame, if it is one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


class ChatSocket:
    """One chat socket through ``ReplicaApp``: it knows whether a reply is streaming (a
    turn sent, its ``done`` or ``error`` not yet), and ends the socket at the first
    moment none is once the replica drains."""

    def __init__(self, owner: ReplicaApp) -> None:
        self.owner = owner
        self.busy = False
        self.closing = asyncio.Event()
        self.pending: asyncio.Future | None = None

    def idle(self) -> bool:
        return not self.busy

    async def run(self, scope: dict, receive: Any, send: Any) -> None:
        identity = self.owner.identity

        async def sending(message: dict) -> None:
            if message["type"] == "websocket.accept":
                message = dict(message, headers=[*message.get("headers", ()), *identity])
            await send(message)
            sent = message["type"] == "websocket.send" and message.get("text")
            if self.busy and sent and frame_type(message["text"]) in ENDS:
                self.busy = False
                if self.owner.draining:
                    self.closing.set()

        async def receiving() -> dict:
            if self.pending is None:
                self.pending = asyncio.ensure_future(receive())
            closing = asyncio.ensure_future(self.closing.wait())
            await asyncio.wait({self.pending, closing}, return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            if self.pending.done():
                message, self.pending = self.pending.result(), None
                if message["type"] == "websocket.receive":
                    self.busy = self.busy or frame_type(message.get("text") or "") in TURNS
                return message
            # draining and idle: tell the client to reconnect (elsewhere), and the app
            # that the client has gone
            self.pending.cancel()
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": DRAIN_CLOSE, "reason": "draining"})
            return {"type": "websocket.disconnect", "code": DRAIN_CLOSE}

        if self.owner.draining:
            self.closing.set()
        await self.owner.app(scope, receiving, sending)


class ReplicaApp:
    """The hexin app as a replica serves it (see the module's docstring)."""

    def __init__(self, app: Any, replica: Replica) -> None:
        self.app, self.replica = app, replica
        self.identity = [
            (REPLICA_HEADER.encode(), replica.id.encode()),
            (PID_HEADER.encode(), str(replica.pid).encode()),
        ]
        self.sockets: set[ChatSocket] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.warned = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self.app(scope, self._lifespan(receive), send)
        self.loop = asyncio.get_running_loop()
        self._check_affinity(scope)
        if kind == "websocket":
            socket = ChatSocket(self)
            self.sockets.add(socket)
            try:
                return await socket.run(scope, receive, send)
            finally:
                self.sockets.discard(socket)
        if kind == "http" and scope.get("path", "").startswith("/cluster/"):
            return await self._cluster(scope, receive, send)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), *self.identity])
            await send(message)

        return await self.app(scope, receive, tagged)

    def _lifespan(self, receive: Any) -> Any:
        async def watched() -> dict:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                self.replica.leave()
            return message

        return watched

    def _check_affinity(self, scope: dict) -> None:
        """Say once if the proxy gives chat sockets no affinity key: each turn then lands
        on any replica and prefills the conversation again."""
        if self.warned or not scope.get("path", "").startswith("/c/"):
            return
        if not has_key(scope):
            self.warned = True
            log.warning(
                "no session affinity: Ray Serve's proxy does not run "
                "hexin.cluster.affinity.proxy_middlewares (set "
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH before `ray start`)"
            )

    def drain(self) -> None:
        """From any thread: close each idle chat socket now and each busy one after its
        reply (the replica gets no new requests: Ray Serve sends none). Replies still
        running ``DRAIN_MARGIN_S`` before Ray Serve's deadline are stopped, so that they
        are saved (as stopped) before the process is killed."""
        self.draining = True
        grace = max(0.0, self.replica.drain_timeout_s - DRAIN_MARGIN_S)
        deadline = threading.Timer(grace, self.replica.stop_replies)
        deadline.daemon = True
        deadline.start()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._close_idle)

    def _close_idle(self) -> None:
        for socket in list(self.sockets):
            if socket.idle():
                socket.closing.set()

    async def _cluster(self, scope: dict, receive: Any, send: Any) -> None:
        """``/cluster/health`` (200 while a replica is ready) and ``/cluster/metrics``,
        guarded by the API key like ``/metrics``."""
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", ())}
        response: Any
        if not self.replica.state.authorized(headers.get("authorization")):
            error = {"message": "missing or wrong API key", "type": "authentication_error"}
            response = JSONResponse({"error": error | {"param": None, "code": None}}, 401)
        elif scope["path"] not in ("/cluster/health", "/cluster/metrics"):
            error = {"message": "Not Found", "type": "http_error", "param": None, "code": None}
            response = JSONResponse({"error": error}, 404)
        else:
            snapshot = await self.replica.registry.snapshot.remote()
            if scope["path"] == "/cluster/metrics":
                texts = {r: info.pop("metrics", "") for r, info in snapshot.items()}
                response = PlainTextResponse(
                    merge_metrics(texts), media_type="text/plain; version=0.0.4"
                )
            else:
                replicas = [
                    {k: v for k, v in info.items() if k != "metrics"} | {"replica": r}
                    for r, info in sorted(snapshot.items())
                ]
                ready = sum(1 for r in replicas if r["status"] == "ok" and not r["draining"])
                body = {"status": "ok" if ready else "unavailable", "ready": ready}
                response = JSONResponse(body | {"replicas": replicas}, 200 if ready else 503)
        response.raw_headers.extend(self.identity)
        await response(scope, receive, send)


@serve.ingress()
class Replica:
    """One engine replica: ``create_app(config)``, its model loaded before Ray Serve
    routes to it, reporting to the registry every ``REPORT_S``."""

    def __init__(
        self,
        config: ServerConfig,
        registry: DeploymentHandle,
        threads: int = 1,
        drain_timeout_s: float = 30.0,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this replica
        self.config, self.registry = config, registry
        self.drain_timeout_s = drain_timeout_s
        self.id = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.node = ray.get_runtime_context().get_node_id()
        self.left = threading.Event()
        self.wrapped: ReplicaApp | None = None

    def __serve_build_asgi_app__(self) -> ReplicaApp:
        from hexin.server.app import create_app

        # loaded during start-up: Ray Serve routes to the replica once it is ready
        inner = create_app(self.config, load_in_background=False)
        self.state = inner.state.hexin
        self.wrapped = ReplicaApp(inner, self)
        threading.Thread(target=self._report, name="hexin-cluster-report", daemon=True).start()
        return self.wrapped

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose model failed to load is replaced."""
        if self.state.load_error:
            raise RuntimeError(f"model failed to load: {self.state.load_error}")

    def info(self) -> dict[str, Any]:
        state = self.state
        status = "ok" if state.ready.is_set() else "error" if state.load_error else "loading"
        stats = state.engine.stats() if state.engine is not None else None
        return {
            "status": status,
            "pid": self.pid,
            "node": self.node,
            "model": state.model_name,
            "draining": bool(self.wrapped and self.wrapped.draining),
            "engine": asdict(stats) if stats is not None else None,
            "metrics": state.metrics.render(stats),
        }

    def _report(self) -> None:
        while not self.left.is_set():
            try:
                answer = self.registry.report.remote(self.id, self.info()).result(timeout_s=10)
                app = self.wrapped
                if answer.get("draining") and app is not None and not app.draining:
                    log.info("replica %s is stopping: draining its chat sockets", self.id)
                    app.drain()
            except Exception as e:  # the registry restarting: try again next period
                log.warning("report to the cluster registry failed: %s", e)
            self.left.wait(REPORT_S)

    def stop_replies(self) -> None:
        """End every reply in flight: they end as stopped and are saved, each socket
        gets its ``done`` and is closed, each OpenAI stream its end."""
        if self.state.engine is not None:
            log.info("replica %s: drain deadline, stopping the replies still running", self.id)
            self.state.engine.shutdown()

    def leave(self) -> None:
        """The app is shutting down: stop reporting, and leave the cluster's view."""
        self.left.set()
        with contextlib.suppress(Exception):
            self.registry.leave.remote(self.id)


def code_version(config: ServerConfig, replica_cpus: float) -> str:
    """What Ray Serve compares to tell a new deployment from a rescaled one: hexin's
    version and everything a replica is built from."""
    from hexin import __version__

    described = json.dumps([__version__, repr(config), replica_cpus], sort_keys=True)
    return hashlib.blake2b(described.encode(), digest_size=8).hexdigest()


def application(
    config: ServerConfig,
    *,
    replicas: int,
    replica_cpus: float = 1.0,
    max_ongoing: int = 256,
    drain_timeout_s: float = 30.0,
) -> Any:
    """The Ray Serve application: ``replicas`` engines behind ``AffinityRouter``, and
    the registry. ``max_ongoing`` bounds each replica's open requests, chat sockets
    included (one per open conversation), before its sessions spill to others."""
    threads = max(1, int(replica_cpus))
    deployment = serve.deployment(Replica).options(
        name="hexin",
        # the same for the same configuration: a redeploy that changes only the replica
        # count scales in place (Ray Serve would otherwise replace every replica)
        version=code_version(config, replica_cpus),
        _internal=True,
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing,
        graceful_shutdown_timeout_s=drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0,
        ray_actor_options={
            "num_cpus": replica_cpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
        request_router_config=RequestRouterConfig(
            request_router_class="hexin.cluster.deploy:AffinityRouter",
            initial_backoff_s=0.02,
            max_backoff_s=0.5,
        ),
    )
    registry = Registry.options(version="1", _internal=True)  # kept across redeploys
    return deployment.bind(config, registry.bind(), threads, drain_timeout_s)
