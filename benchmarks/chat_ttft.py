"""Second-turn time to first token of the chat layer, short history against long.

    python benchmarks/chat_ttft.py [--model M] [--sizes 100,1500] [--repeats 3]

A chat turn's prompt is the whole conversation so far. The engine keeps each session's KV
blocks between turns (the session id is the cache key), so a follow-up turn should only
prefill the new message and its TTFT should hardly grow with the history. This script
checks that claim on the default model: for each history size it imports a session with
prepared messages (fast, nothing generated), runs one real turn to warm the cache, then
times the next turn. The same turn on a fresh engine (cold cache) shows what the cache
saves. Writes benchmarks/results/chat_ttft.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hexin.bench.measure import Neighbours, wait_for_quiet
from hexin.chat.service import ChatService
from hexin.chat.store import Store
from hexin.chat.tree import new_id
from hexin.engine import Engine
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.sampling import SamplingParams
from hexin.threads import run_isolated
from hexin.weights import load_model

KV_MEMORY = 256 << 20  # room for a few sessions of ~2k tokens at fp32
SYSTEM = "You are a helpful assistant who answers briefly."
TOPICS = [
    "the tides and the moon",
    "how bread rises",
    "why the sky is blue",
    "the life of honeybees",
    "how a lighthouse lens works",
    "the history of the bicycle",
    "how glaciers carve valleys",
    "why cats purr",
]
#: differs between repeats right after the shared history, so no repeat finds an earlier
#: one's later turns in the engine's prefix cache: each measures a true second turn
WARM_MESSAGE = "Thanks (take {take}). Can you summarise that in one sentence?"
MEASURED_MESSAGE = "Now tell me one surprising fact about it."


def _turn(i: int, *, short: bool = False) -> tuple[str, str]:
    """A plausible user question and a longer answer, different for every turn, so the
    history tokenizes like a real conversation rather than a repeated string."""
    topic = TOPICS[i % len(TOPICS)]
    if short:
        return f"What is {topic} about?", f"In short: {topic} is about cause and effect."
    question = f"Question {i + 1}: could you explain {topic} in a few sentences?"
    answer = (
        f"Sure. Here is a short explanation of {topic}, part {i + 1}. It starts with a "
        f"simple observation that most people have made at some point, then follows the "
        f"cause back step by step. The details matter less than the overall idea: small "
        f"effects, repeated many times, add up to something large and regular. If you "
        f"want, we can go deeper into any one of these steps next."
    )
    return question, answer


def history_session(tokenizer: Any, target: int, params: SamplingParams) -> dict[str, Any]:
    """A session export whose templated history is about ``target`` tokens long, minus
    the ~50 tokens the warm-up turn will add."""
    goal = max(target - 50, 1)
    messages: list[dict[str, Any]] = []
    turns = 0
    while True:
        question, answer = _turn(turns, short=target < 200)
        chat = [{"role": "system", "content": SYSTEM}]
        chat += [{"role": m["role"], "content": m["content"]} for m in messages]
        if turns and len(tokenizer.encode(tokenizer.apply_chat_template(chat))) >= goal:
            break
        if turns and target < 200:  # a short history is a single exchange
            break
        for role, content in (("user", question), ("assistant", answer)):
            parent = messages[-1]["id"] if messages else None
            messages.append(
                {
                    "id": new_id(),
                    "parent_id": parent,
                    "role": role,
                    "content": content,
                    "created_at": time.time() - 3600 + len(messages),
                }
            )
        turns += 1
    return {
        "id": new_id(),
        "title": f"history ~{target} tokens",
        "system_prompt": SYSTEM,
        "params": params.to_dict(),
        "messages": messages,
        "active_id": messages[-1]["id"],
    }


def _measured(service: ChatService, session_id: str, quiet_wait: float) -> dict[str, Any]:
    if quiet_wait > 0:
        wait_for_quiet(quiet_wait)
    watch = Neighbours()
    reply = service.send(session_id, MEASURED_MESSAGE)
    reply.wait()
    u = reply.usage
    keys = ("ttft_ms", "prompt_tokens", "cached_tokens", "completion_tokens")
    return {**{k: u[k] for k in keys}, "neighbour_cores": watch.cores()}


def new_engine(model: Llama, tokenizer: Any) -> Engine:
    """An engine built on a thread that ends, so that its own thread is the only one with
    an OpenMP team while it runs (see ``hexin.threads.run_isolated``)."""
    return run_isolated(lambda: Engine(model, tokenizer, EngineConfig(kv_memory=KV_MEMORY)))


def run_size(
    model: Llama,
    loaded: Any,
    target: int,
    params: SamplingParams,
    repeats: int,
    db: Path,
    quiet_wait: float = 0.0,
) -> dict[str, Any]:
    """Warm and cold measurements of the second turn for one history size."""
    base = history_session(loaded.tokenizer, target, params)
    warm_runs, cold_runs = [], []
    with new_engine(model, loaded.tokenizer) as engine:
        service = ChatService(engine, Store(db), default_params=params)
        for take in range(repeats):
            session = service.import_(base, keep_id=False)  # a fresh copy each time
            service.send(session.id, WARM_MESSAGE.format(take=take + 1)).wait()  # first real turn
            before = service.export(session.id)  # history as the measured turn sees it
            warm_runs.append(_measured(service, session.id, quiet_wait))
            # the same turn, on an engine that has never seen this conversation
            with new_engine(model, loaded.tokenizer) as fresh:
                cold = ChatService(fresh, Store(db), default_params=params)
                copy = cold.import_(before, keep_id=False)
                cold_runs.append(_measured(cold, copy.id, quiet_wait))
    noise = [r["neighbour_cores"] for r in warm_runs + cold_runs if r["neighbour_cores"]]
    warm_ttft = [r["ttft_ms"] for r in warm_runs]
    cold_ttft = [r["ttft_ms"] for r in cold_runs]
    last = warm_runs[-1]
    return {
        "history_target": target,
        "prompt_tokens": last["prompt_tokens"],
        "history_tokens": history_tokens(loaded.tokenizer, before),
        "max_neighbour_cores": max(noise, default=0.0),
        "warm": {
            "ttft_ms_median": statistics.median(warm_ttft),
            "ttft_ms_runs": warm_ttft,
            "cached_tokens": last["cached_tokens"],
            "prefilled_tokens": last["prompt_tokens"] - last["cached_tokens"],
        },
        "cold": {
            "ttft_ms_median": statistics.median(cold_ttft),
            "ttft_ms_runs": cold_ttft,
            "cached_tokens": cold_runs[-1]["cached_tokens"],
            "prefilled_tokens": cold_runs[-1]["prompt_tokens"] - cold_runs[-1]["cached_tokens"],
        },
    }


def history_tokens(tokenizer: Any, export: dict[str, Any]) -> int:
    """Tokens of the conversation (system prompt included) before the measured message."""
    chat = [{"role": "system", "content": export["system_prompt"]}]
    chat += [{"role": m["role"], "content": m["content"]} for m in export["messages"]]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
    return len(tokenizer.encode(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    ap.add_argument("--quant", default="auto", help="as hexin's --quant (default: auto)")
    ap.add_argument("--sizes", default="100,1500", help="history sizes in tokens")
    ap.add_argument("--repeats", type=int, default=3, help="measured turns per size (median)")
    ap.add_argument("--reply-tokens", type=int, default=32, help="max tokens of each reply")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="wait up to this many seconds for other processes to go quiet before each "
        "measured turn (shared machines)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chat_ttft.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    loaded = run_isolated(lambda: load_model(args.model))
    model = run_isolated(lambda: Llama.from_loaded(loaded, quant=args.quant))
    params = SamplingParams(temperature=0, max_tokens=args.reply_tokens)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "chat.db"
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"[chat_ttft] history ~{size} tokens ...", file=sys.stderr, flush=True)
            results.append(run_size(model, loaded, size, params, args.repeats, db, args.quiet_wait))

    record = {
        "benchmark": "chat second-turn TTFT, warm (session cache) vs cold (fresh engine)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "benchmarks/chat_ttft.py", *sys.argv[1:]]),
        "model": str(loaded.path),
        "quant": model.quant,
        "reply_tokens": args.reply_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "quiet_wait": args.quiet_wait,
        "torch_version": torch.__version__,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(
        f"{'history':>8} {'prompt':>7} {'cached':>7} {'warm TTFT':>10} {'cold TTFT':>10}"
        f" {'others busy':>12}"
    )
    for r in results:
        print(
            f"{r['history_tokens']:>8} {r['prompt_tokens']:>7} {r['warm']['cached_tokens']:>7} "
            f"{r['warm']['ttft_ms_median']:>8.1f}ms {r['cold']['ttft_ms_median']:>8.1f}ms"
            f" {r['max_neighbour_cores']:>8.2f} cpu"
        )
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
