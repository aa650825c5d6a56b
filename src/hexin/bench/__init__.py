"""``hexin bench``: hexin's speed beside llama.cpp's, on the same GGUF file, in one process.

These machines are shared and noisy, so absolute figures drift from run to run; what a run
can be trusted for is the ratio of two engines measured minutes apart on the same cores.
That is why llama.cpp (through llama-cpp-python, an optional extra that hexin never
imports elsewhere) runs inside the same command, with the same thread count, the same
token ids and the same shapes of work:

- ``pp``: prompt processing, one forward of ``--pp`` tokens through an empty cache;
- ``tg``: single-stream greedy decode of ``--tg`` tokens after a short prompt, with TTFT
  and the time per output token;
- ``streams``: N concurrent requests of ``--prompt-tokens`` distinct prompt tokens and
  ``--new-tokens`` new tokens each, reported as decode throughput (decode tokens over the
  time spent in decode steps) and end to end (all tokens generated over wall time).

EOS is switched off for every measurement (a copy of the tokenizer without EOS ids for
hexin, plain argmax for llama.cpp), so each engine does exactly the work asked of it.

The package is split by concern: ``measure`` (hexin's side and the measuring machinery),
``llamacpp`` (llama.cpp's side), ``report`` (the record, table and plot) and ``run``
(``run_bench``, tying them together). This module only defines the command's flags and
imports neither torch nor the rest of the package until the bench runs, so that
``hexin --help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from hexin.options import add_model_args

DEFAULT_OUT = "benchmarks/results"


def _parse_streams(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"stream counts must be positive, got {text!r}")
    return sorted(dict.fromkeys(values))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_bench(args: argparse.Namespace) -> int:
    from hexin.bench.run import run_bench

    run_bench(args)
    return 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``hexin bench`` on the CLI's subparsers (its ``func`` runs the bench)."""
    p = subparsers.add_parser(
        "bench",
        help="measure prompt, decode and batched throughput (beside llama.cpp if installed)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_model_args(p)
    p.add_argument(
        "--streams",
        type=_parse_streams,
        default=[1, 8, 32],
        help="concurrencies to measure, comma-separated (default: 1,8,32)",
    )
    p.add_argument("--prompt-tokens", type=_positive, default=128, help="per stream")
    p.add_argument("--new-tokens", type=_positive, default=128, help="per stream")
    p.add_argument("--pp", type=_positive, default=512, help="prompt-processing tokens")
    p.add_argument("--tg", type=_positive, default=128, help="single-stream decode tokens")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="threads for both engines (default: torch's count, read when the bench runs)",
    )
    p.add_argument("--repeats", type=_positive, default=3, help="best of N after a warm-up")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="on a shared machine: before each measurement wait up to S seconds for other "
        "processes to go quiet, and retake figures they disturbed (default: 0, off)",
    )
    p.add_argument("--no-llama-cpp", action="store_true", help="measure hexin only")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON record and plot")
    p.set_defaults(func=_cmd_bench)
    return p
