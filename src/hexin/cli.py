"""The ``hexin`` command line: story | chat | serve | cluster | bench | models | info | pull.

Errors the user can act on are printed as one line; a traceback is shown only with
HEXIN_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hexin.bench import add_bench_parser
from hexin.cluster import add_cluster_args
from hexin.errors import HexinError
from hexin.options import (
    DB_HELP,
    add_engine_args,
    add_model_args,
    add_server_args,
    engine_config,
    model_options,
)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; each defaults to None so that only the ones given override the
    session's or the built-in defaults (temperature 0.8, top-k 40, top-p 0.95, 256 tokens)."""
    p.add_argument("--max-tokens", "-n", type=int, help="tokens to generate")
    p.add_argument("--temperature", "-t", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="keep the k likeliest tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given on the command line, validated."""
    from hexin.sampling import SamplingParams

    names = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
    changes = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if "stop" in changes:
        changes["stop"] = tuple(changes["stop"])
    SamplingParams(**changes)  # refuse bad values before loading anything
    return changes


def cmd_story(args: argparse.Namespace) -> int:
    """Stream a continuation of ``--prompt`` to stdout."""
    from hexin.generate import TextStream
    from hexin.model import load_llama
    from hexin.sampling import SamplingParams

    params = SamplingParams(**_sampling_changes(args))
    loaded, model = load_llama(args.model, model_options(args))
    prompt_ids = loaded.tokenizer.encode(args.prompt)
    stream = TextStream(model, loaded.tokenizer, prompt_ids, params)
    for text in stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        c = stream.completion
        print(
            f"[{c.prompt_tokens} prompt tokens, {c.completion_tokens} generated, "
            f"stop: {c.stop_reason}, TTFT {c.ttft_s * 1000:.0f} ms, "
            f"decode {c.decode_tokens_per_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Terminal chat: a REPL, or one message with ``--once``."""
    from hexin.chat.repl import run_once, run_repl
    from hexin.chat.service import ChatService
    from hexin.chat.store import open_store
    from hexin.chat.tree import check_id
    from hexin.engine import Engine
    from hexin.model import load_llama
    from hexin.sampling import SamplingParams
    from hexin.threads import run_isolated

    changes = _sampling_changes(args)
    if args.session is not None:
        check_id(args.session)
    store = open_store(args.db)

    def build() -> tuple[Any, Engine]:
        loaded, model = load_llama(args.model, model_options(args))
        return loaded, Engine(model, loaded.tokenizer, engine_config(args))

    # built on a thread that ends, so the engine thread's OpenMP team is the only one
    loaded, engine = run_isolated(build)
    service = ChatService(
        engine, store, model_name=loaded.name, default_params=SamplingParams(**changes)
    )
    try:
        with engine:
            if args.once is not None:
                return run_once(service, args.once, args.session, changes, system=args.system)
            return run_repl(service, args.session, changes, system=args.system)
    finally:
        service.close()  # replies the engine ended as it shut down are saved too


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the chat WebSocket, the sessions and OpenAI APIs, and the web UI."""
    import logging

    import uvicorn

    from hexin.server import logs
    from hexin.server.app import ServerConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ServerConfig.from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"hexin: warning: serving on {args.host} without --api-key", file=sys.stderr)
    logs.install()  # no secret (an ?api_key= in a logged path) in the logs
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=logs.uvicorn_log_config(),
    )
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """``hexin serve``'s API from N engine replicas on Ray Serve (``hexin.cluster``)."""
    from hexin import cluster

    return cluster.run(args)


def cmd_models(args: argparse.Namespace) -> int:
    """List registered models, what is in the cache, and the models bundled with hexin."""
    from hexin.weights import registry

    cached = {name: (path, size) for name, path, size in registry.cached_models()}
    print(f"cache: {registry.cache_dir()}")
    for name in sorted(set(registry.REGISTRY) | set(cached)):
        model = registry.REGISTRY.get(name)
        where = f"{cached[name][1] / 1e6:.1f} MB  {cached[name][0]}" if name in cached else "-"
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        desc = model.description if model else "local file"
        print(f"{name}{default}\n  {desc}\n  cached: {where}")
    for name, desc in sorted(registry.BUNDLED.items()):
        print(f"{name}\n  {desc}\n  bundled: {registry.bundled_path(name)}")
    _print_hub_models()
    return 0


def _print_hub_models() -> None:
    """What ``hexin pull ORG/NAME[:QUANT]`` fetched: name, format, family, size, path."""
    from hexin import hub

    models = hub.cached_models()
    if not models:
        return
    print(f"hub cache: {hub.hub_dir()}")
    for m in models:
        state = "" if m.complete else "  (incomplete: pull it again)"
        print(
            f"{m.name}\n  {m.format}, {m.family}\n  cached: {m.size / 1e6:.1f} MB  {m.path}{state}"
        )


def cmd_info(args: argparse.Namespace) -> int:
    """The processor's features and the kernel each matrix role runs on it."""
    from hexin import cpu

    info = cpu.report()
    forced = " (forced by HEXIN_CPU_FEATURES)" if info["forced"] else ""
    print(f"cpu: {info['cpu']}")
    print(f"features: {', '.join(info['features']) or 'none of ' + ', '.join(cpu.KNOWN)}{forced}")
    for role, kernel in info["kernels"].items():
        print(f"  {role}: {kernel}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch a registered model, or a hub repository (ORG/NAME[:QUANT]), into the cache."""
    if "/" in args.name:
        from hexin import hub

        print(hub.pull(args.name))
        return 0
    from hexin.weights import registry

    print(registry.pull(args.name))
    return 0


def _resolve_hub_model(args: argparse.Namespace) -> None:
    """``--model ORG/NAME[:QUANT]``: the cached copy's path, fetched first when absent."""
    from hexin import hub

    spec = getattr(args, "model", None)
    if isinstance(spec, str) and hub.is_hub_spec(spec):
        args.model = str(hub.resolve(spec))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hexin", description="A from-scratch Llama inference engine and chat product."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    story = sub.add_parser("story", help="stream a story continuing a prompt")
    add_model_args(story)
    story.add_argument("--prompt", "-p", default="Once upon a time", help="text to continue")
    _add_sampling_args(story)
    story.add_argument("--stats", action="store_true", help="print speed figures to stderr")
    story.set_defaults(func=cmd_story)

    chat = sub.add_parser("chat", help="chat in the terminal (sessions kept in SQLite)")
    add_model_args(chat)
    chat.add_argument("--db", default=None, help=DB_HELP)
    chat.add_argument("--session", "-s", default=None, help="session id to continue or create")
    chat.add_argument("--once", default=None, metavar="TEXT", help="send one message and exit")
    chat.add_argument("--system", default=None, help="system prompt of a new session")
    add_engine_args(chat, serving=False)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="HTTP server: web UI, chat WebSocket, REST, OpenAI API")
    add_server_args(serve, host_help="interface to bind (default: local)")
    serve.set_defaults(func=cmd_serve)

    cluster = sub.add_parser(
        "cluster", help="the server's API from N engine replicas on Ray Serve, sharing --db"
    )
    add_cluster_args(cluster)
    cluster.set_defaults(func=cmd_cluster)

    add_bench_parser(sub)

    models = sub.add_parser("models", help="list registered and cached models")
    models.set_defaults(func=cmd_models)

    info = sub.add_parser("info", help="CPU features and the kernels chosen for them")
    info.set_defaults(func=cmd_info)

    pull = sub.add_parser(
        "pull", help="fetch a registered model, or ORG/NAME[:QUANT] from a hub, into the cache"
    )
    pull.add_argument(
        "name",
        nargs="?",
        default="smollm2-135m-instruct",
        help="a registered name, ORG/NAME (HF folder) or ORG/NAME:QUANT (one GGUF file)",
    )
    pull.set_defaults(func=cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _resolve_hub_model(args)
        return func(args)
    except KeyboardInterrupt:
        print("\nhexin: interrupted", file=sys.stderr)
        return 130
    except HexinError as e:
        print(f"hexin: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, but the user still gets one line, not a traceback
        if os.environ.get("HEXIN_DEBUG"):
            raise
        print(f"hexin: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("hexin: rerun with HEXIN_DEBUG=1 for the traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
