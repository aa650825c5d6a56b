"""What holding replies to a JSON schema costs per token, at 1 and 32 streams.

Side by side in one process, on the default model: the engine decodes N requests with
``response_format``-style JSON schema constraints, then the same N requests free, and the
time each token's mask took (llguidance's bitmask, its expansion and the -inf fill) is
timed inside the engine. Writes ``results/structured_output.json``.

    python benchmarks/structured_output.py [--streams 1,32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hexin import cpu, grammar
from hexin.engine import Engine
from hexin.model import load_llama
from hexin.sampling import SamplingParams
from hexin.threads import run_isolated

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
            "required": ["name", "country"],
        },
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
}


def timed_masks() -> list[float]:
    """Wrap ``Constraint.mask`` to record each call's seconds."""
    seconds: list[float] = []
    original = grammar.Constraint.mask

    def mask(self, logits, **kw):
        t0 = time.perf_counter()
        out = original(self, logits, **kw)
        seconds.append(time.perf_counter() - t0)
        return out

    grammar.Constraint.mask = mask  # type: ignore[method-assign]
    return seconds


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    before = engine.stats()
    t0 = time.perf_counter()
    done = [h.result() for h in [engine.submit(ids, params) for ids in prompts]]
    wall = time.perf_counter() - t0
    after = engine.stats()
    tokens = sum(c.completion_tokens for c in done)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "steps": after.steps - before.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "structured_output.json")
    )
    args = ap.parse_args()
    loaded, model = run_isolated(lambda: load_llama(None, None))
    tok = loaded.tokenizer
    seconds = timed_masks()
    free = SamplingParams(temperature=0, max_tokens=args.new_tokens)
    held = free.with_(grammar=("json_schema", json.dumps(SCHEMA)))
    results = []

    def measure() -> None:
        with Engine(model, tok) as engine:
            engine.generate(tok.encode("warm up"), held.with_(max_tokens=4))
            for n in (int(s) for s in args.streams.split(",")):
                prompts = [
                    tok.encode(
                        tok.apply_chat_template([{"role": "user", "content": f"Person {i}:"}])
                    )
                    for i in range(n)
                ]
                seconds.clear()
                constrained = run(engine, prompts, held)
                masks = list(seconds)
                plain = run(engine, prompts, free)
                row = {
                    "streams": n,
                    "constrained": constrained,
                    "free": plain,
                    "mask_ms_mean": 1e3 * sum(masks) / len(masks),
                    "mask_ms_max": 1e3 * max(masks),
                    "masks": len(masks),
                }
                results.append(row)
                print(
                    f"{n:3d} streams: constrained {constrained['tok_s']:.1f} tok/s, free "
                    f"{plain['tok_s']:.1f} tok/s; mask {row['mask_ms_mean']:.3f} ms a token "
                    f"(max {row['mask_ms_max']:.2f} ms)"
                )

    run_isolated(measure)
    record = {
        "benchmark": "structured_output",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu.model_name(),
        "features": sorted(f for f in cpu.KNOWN if f in cpu.features()),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "model": loaded.name,
        "new_tokens": args.new_tokens,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
