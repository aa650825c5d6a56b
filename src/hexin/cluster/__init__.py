"""Cluster mode: ``hexin cluster --replicas N``, N hexin engines as Ray Serve replicas
behind Ray Serve's HTTP proxy, sharing one chat store (``--db``; PostgreSQL when the
replicas run on several machines).

Every replica is a whole ``hexin serve`` app with its own engine and KV pool, so the
cluster answers the same API: OpenAI's under /v1, the sessions API, the web UI and the
chat sockets at /c/{id}. What a cluster adds is where each request goes
(``affinity``): the turns of one session, and OpenAI requests opening the same way, go
to the replica that holds their cache, and to another one when it is gone or full
(``deploy.AffinityRouter``). Replicas report their state and metrics to a registry,
served at ``/cluster/health`` and ``/cluster/metrics`` (``ops``), and drain their chat
sockets when Ray Serve stops them (``deploy.ReplicaApp``).

The same application runs under Ray Serve's own command line:
``serve run hexin.cluster:build replicas=2 model=story db=postgresql://...`` (keys are
``hexin cluster``'s options), with ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` set as
``hexin cluster`` sets it for the Ray it starts.

This module imports neither Ray nor torch: the command line builds its parser from it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from hexin.cluster.affinity import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from hexin.options import add_server_args, positive_int

#: the Ray Serve application's name
APP_NAME = "hexin"
#: the Ray object store of a local Ray: hexin passes little through it
OBJECT_STORE_BYTES = 256 << 20


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """``hexin cluster``'s options: ``hexin serve``'s and the cluster's own."""
    add_server_args(p, host_help="interface of Ray Serve's proxy")
    p.add_argument("--replicas", type=positive_int, default=2, help="engine replicas")
    p.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster to deploy on ('auto': the one `ray start` made on "
        "this machine); default: start a Ray of this machine's own",
    )
    p.add_argument(
        "--num-cpus",
        type=positive_int,
        default=None,
        help="CPUs of the Ray started here (default: all)",
    )
    p.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each replica; its torch threads (at least 1)",
    )
    p.add_argument(
        "--max-ongoing",
        type=positive_int,
        default=256,
        help="open requests (chat sockets included) per replica before its sessions "
        "spill to others (default: 256)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a stopping replica gets to finish its replies (default: 30)",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="with --address: deploy (or change the replica count) and return",
    )


def application(args: argparse.Namespace) -> Any:
    """The Ray Serve application for ``args``."""
    from hexin.cluster.deploy import application as build_application
    from hexin.server.state import ServerConfig

    return build_application(
        ServerConfig.from_args(args),
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        max_ongoing=args.max_ongoing,
        drain_timeout_s=args.drain_timeout,
    )


def build(args: dict[str, str]) -> Any:
    """Ray Serve's application builder (``serve run hexin.cluster:build key=value ...``):
    the keys are ``hexin cluster``'s options without their dashes."""
    parser = argparse.ArgumentParser(prog="hexin.cluster:build")
    add_cluster_args(parser)
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in args.items()]
    return application(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``hexin cluster``: start (or join) Ray, deploy, serve until SIGINT or SIGTERM,
    then take down what was started here."""
    import ray
    from ray import serve

    if args.detach and not args.address:
        print("hexin: error: --detach needs --address (a Ray cluster that stays)", file=sys.stderr)
        return 1
    # the proxy makes the affinity keys; a Ray started here hands this to its processes,
    # and the controller (which starts the proxies) is given it too for a running cluster
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    env = {PROXY_CALLBACK_ENV: os.environ[PROXY_CALLBACK_ENV]}
    if args.address:
        ray.init(address=args.address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=args.num_cpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": args.host, "port": args.port},
            proxy_location="HeadOnly",
            controller_options={"runtime_env": {"env_vars": env}},
        )
        serve.run(application(args), name=APP_NAME, route_prefix="/")
        print(
            f"hexin: {args.replicas} replicas serving on http://{args.host}:{args.port}",
            flush=True,
        )
        if args.detach:
            return 0
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        if not args.detach:
            if args.address:  # a cluster someone else runs: take only this app away
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        ray.shutdown()
