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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from hexin.options import EngineConfig, add_model_args, model_options
from hexin.threads import run_isolated

DEFAULT_OUT = "benchmarks/results"
TG_PROMPT = "Once upon a time, in a village by the sea,"


def _say(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the final table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Neighbours:
    """CPU time the rest of the machine used while a measurement ran, in cores: busy time
    from /proc/stat less this process's own. On a shared 2-core machine one busy
    neighbour can cut a figure tenfold (see ``_watched``), so every figure carries this."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        elapsed = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(others, 0.0) / elapsed, 2)


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


# -- token ids ----------------------------------------------------------------------------
def _random_prompts(
    vocab_size: int, special: frozenset[int], count: int, length: int, seed: int
) -> list[list[int]]:
    """``count`` distinct prompts of ordinary (non-special) token ids. Distinct from the
    first token on, so the prefix cache cannot share a single block between them and
    every prompt token is really computed. Plain Python, not torch: see ``run_isolated``."""
    rng = random.Random(seed)
    ordinary = [i for i in range(vocab_size) if i not in special]
    prompts: list[list[int]] = []
    firsts: set[int] = set()
    while len(prompts) < count:
        ids = rng.choices(ordinary, k=length)
        if ids[0] in firsts and len(firsts) < len(ordinary):
            continue
        firsts.add(ids[0])
        prompts.append(ids)
    return prompts


# -- hexin --------------------------------------------------------------------------------
def _without_eos(tokenizer: Any) -> Any:
    """A shallow copy of the tokenizer that knows no EOS, so greedy decoding runs its full
    budget; the model itself is untouched."""
    tok = copy.copy(tokenizer)
    tok.eos_token_ids = ()
    return tok


def _hexin_pp(model: Any, ids: list[int], repeats: int) -> dict[str, float]:
    """One forward of the whole prompt through a fresh cache; warm-up, then best of N."""
    tokens = torch.tensor([ids])
    times = []
    for i in range(repeats + 1):
        cache = model.new_cache(max_tokens=len(ids) + 1)
        t0 = time.perf_counter()
        model.forward(tokens, cache)
        elapsed = time.perf_counter() - t0
        if i:  # the first run pays for allocator and kernel warm-up
            times.append(elapsed)
    best = min(times)
    return {"tokens": len(ids), "best_s": best, "tok_s": len(ids) / best}


def _hexin_tg(
    model: Any, tokenizer: Any, prompt: list[int], new_tokens: int, repeats: int
) -> dict[str, float]:
    """Single-stream greedy decode through ``TextStream`` (the path ``hexin story`` uses):
    sampling, detokenization and stop checks included, as a user would see them."""
    from hexin.generate import TextStream
    from hexin.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    runs = []
    for i in range(repeats + 1):
        c = TextStream(model, tokenizer, prompt, params).run()
        if c.completion_tokens != new_tokens:
            raise RuntimeError(f"decode stopped after {c.completion_tokens} of {new_tokens}")
        if i:
            runs.append(c)
    best = max(runs, key=lambda c: c.decode_tokens_per_s)
    steps = best.completion_tokens - 1
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "tok_s": best.decode_tokens_per_s,
        "ttft_ms": min(c.ttft_s for c in runs) * 1000,
        "tpot_ms": best.decode_s / steps * 1000 if steps else 0.0,
    }


def _decode_time(stats: Any) -> float:
    """Seconds spent in decode steps so far, recovered from the engine's public counters."""
    rate = stats.decode_tokens_per_s
    return stats.decode_tokens / rate if rate else 0.0


def _hexin_streams(
    model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int, warm: list[int]
) -> dict[str, float | int]:
    """All requests submitted at once to an engine of their own, sized for them, which
    batches them (continuous batching). ``warm`` runs first, alone: the engine thread's
    first steps pay for thread-pool and kernel set-up."""
    from hexin.engine import Engine
    from hexin.engine.blocks import BlockPool

    block = 16
    per_seq = -(-(len(prompts[0]) + new_tokens + 1) // block)
    memory = (len(prompts) * per_seq + 2) * BlockPool.bytes_per_block(
        model.config, block, model.kv_dtype
    )
    # built on a thread that ends (the pool's allocation runs OpenMP), so that the engine
    # thread's team is the only one alive while it decodes: see ``run_isolated``
    engine = run_isolated(
        lambda: Engine(
            model,
            tokenizer,
            EngineConfig(kv_memory=memory, block_size=block, max_running=len(prompts)),
        )
    )
    with engine:
        return timed_streams(engine, prompts, new_tokens, warm)


def timed_streams(
    engine: Any, prompts: list[list[int]], new_tokens: int, warm: list[int]
) -> dict[str, float | int]:
    """Submit ``prompts`` at once, greedy, ``new_tokens`` each (after a 2-token warm-up
    request): decode tok/s from the engine's counters, end to end from the wall clock."""
    from hexin.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens)
    engine.generate(warm, params.with_(max_tokens=2))
    before = engine.stats()
    t0 = time.perf_counter()
    handles = [engine.submit(p, params) for p in prompts]
    completions = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    after = engine.stats()
    short = [c.completion_tokens for c in completions if c.completion_tokens != new_tokens]
    if short:
        raise RuntimeError(f"{len(short)} streams stopped early ({short[:4]} tokens)")
    generated = sum(c.completion_tokens for c in completions)
    decode_tokens = after.decode_tokens - before.decode_tokens
    decode_s = _decode_time(after) - _decode_time(before)
    return {
        "streams": len(prompts),
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
        "generated_tokens": generated,
        "wall_s": wall,
        "e2e_tok_s": generated / wall,
        "mean_ttft_ms": sum(c.ttft_s for c in completions) / len(completions) * 1000,
        "steps": after.steps - before.steps,
        "preemptions": after.preemptions - before.preemptions,
    }


# -- llama.cpp ----------------------------------------------------------------------------
class LlamaCpp:
    """The low-level llama.cpp API (through llama-cpp-python's ctypes bindings): one model,
    a fresh context per measurement sized for it, greedy argmax done here in NumPy, so
    the comparison is between the two engines' forward passes, not between samplers."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.lib, self.threads = llama_cpp, threads
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p())  # keep stderr for progress
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.lib.llama_model_free(self.model)

    @contextlib.contextmanager
    def context(self, n_ctx: int, n_seq: int, n_batch: int) -> Iterator[Any]:
        p = self.lib.llama_context_default_params()
        p.n_ctx = -(-n_ctx // 256) * 256
        p.n_batch = p.n_ubatch = max(n_batch, 512)
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = self.threads
        ctx = self.lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        try:
            yield ctx
        finally:
            self.lib.llama_free(ctx)

    def _decode(self, ctx: Any, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.lib.llama_batch_init(len(entries), 0, 1)
        try:
            batch.n_tokens = len(entries)
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i] = token, pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            if (rc := self.lib.llama_decode(ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
        finally:
            self.lib.llama_batch_free(batch)

    def _argmax(self, ctx: Any, i: int) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, i), (self.n_vocab,))
        return int(logits.argmax())

    def _prefill(self, ctx: Any, ids: list[int], seq: int) -> int:
        """Decode a prompt into sequence ``seq``; return its first greedy token."""
        last = len(ids) - 1
        self._decode(ctx, [(t, p, seq, p == last) for p, t in enumerate(ids)])
        return self._argmax(ctx, -1)

    def pp(self, ids: list[int], repeats: int) -> dict[str, float]:
        times = []
        for i in range(repeats + 1):
            with self.context(len(ids) + 1, 1, len(ids)) as ctx:
                t0 = time.perf_counter()
                self._prefill(ctx, ids, 0)
                elapsed = time.perf_counter() - t0
            if i:
                times.append(elapsed)
        best = min(times)
        return {"tokens": len(ids), "best_s": best, "tok_s": len(ids) / best}

    def tg(self, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
        runs = []
        for i in range(repeats + 1):
            with self.context(len(prompt) + new_tokens + 1, 1, len(prompt)) as ctx:
                t0 = time.perf_counter()
                token = self._prefill(ctx, prompt, 0)
                ttft = time.perf_counter() - t0
                t1 = time.perf_counter()
                for pos in range(len(prompt), len(prompt) + new_tokens - 1):
                    self._decode(ctx, [(token, pos, 0, True)])
                    token = self._argmax(ctx, 0)
                decode_s = time.perf_counter() - t1
            if i:
                runs.append((ttft, decode_s))
        steps = new_tokens - 1
        best = min(d for _, d in runs)
        return {
            "prompt_tokens": len(prompt),
            "new_tokens": new_tokens,
            "tok_s": steps / best if steps and best else 0.0,
            "ttft_ms": min(t for t, _ in runs) * 1000,
            "tpot_ms": best / steps * 1000 if steps else 0.0,
        }

    def streams(self, prompts: list[list[int]], new_tokens: int) -> dict[str, float | int]:
        """N sequences in one context: each prompt decoded on its own, then one batch of N
        tokens (one per sequence, at its own position) per generation step."""
        n, length = len(prompts), len(prompts[0])
        with self.context(n * (length + new_tokens + 1), n, max(n, length)) as ctx:
            t0 = time.perf_counter()
            tokens = [self._prefill(ctx, ids, s) for s, ids in enumerate(prompts)]
            t1 = time.perf_counter()
            for step in range(new_tokens - 1):
                pos = length + step
                self._decode(ctx, [(tokens[s], pos, s, True) for s in range(n)])
                tokens = [self._argmax(ctx, s) for s in range(n)]
            t2 = time.perf_counter()
        decode_tokens = n * (new_tokens - 1)
        decode_s = t2 - t1
        return {
            "streams": n,
            "decode_tokens": decode_tokens,
            "decode_s": decode_s,
            "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "generated_tokens": n * new_tokens,
            "wall_s": t2 - t0,
            "e2e_tok_s": n * new_tokens / (t2 - t0),
            "prefill_s": t1 - t0,
        }


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except Exception:  # missing, or a build that fails to load its library
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def _show_rate(r: dict[str, Any]) -> str:
    ttft = f", TTFT {r['ttft_ms']:.1f} ms" if "ttft_ms" in r else ""
    return f"{r['tok_s']:.1f} tok/s{ttft}"


def _show_streams(r: dict[str, Any]) -> str:
    return f"decode {r['decode_tok_s']:.1f} tok/s, end to end {r['e2e_tok_s']:.1f} tok/s"


Measure = Callable[[int], dict[str, Any]]  # attempt number -> figures


def _pair(
    label: str,
    ours: Measure,
    theirs: Measure | None,
    show: Callable[[dict[str, Any]], str],
    quiet_wait: float,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One figure from each engine, back to back, with progress on stderr."""
    _say(f"{label} ...")
    h = _watched(ours, quiet_wait)
    _say(f"  hexin     {show(h)}{_noise_note(h)}")
    c = _watched(theirs, quiet_wait) if theirs is not None else None
    if c is not None:
        _say(f"  llama.cpp {show(c)}{_noise_note(c)}")
    return h, c


NOISY = 0.3  # cores used by others that make a figure worth taking again


def _watched(measure: Measure, quiet_wait: float, retries: int = 2) -> dict[str, Any]:
    """Run a measurement, noting how busy the rest of the machine was. With a quiet-wait
    budget, wait for a calm moment first and take a noisy figure again (at most
    ``retries`` times): with as many threads as cores, one busy neighbour can slow
    OpenMP code tenfold, because a descheduled worker stalls every barrier."""
    for attempt in range(retries + 1):
        if quiet_wait > 0:
            wait_for_quiet(quiet_wait)
        watch = Neighbours()
        result = run_isolated(functools.partial(measure, attempt))
        result["neighbour_cores"] = busy = watch.cores()
        if quiet_wait <= 0 or busy is None or busy < NOISY or attempt == retries:
            return result
        _say(f"  noisy (other processes used {busy:.1f} cores): measuring again")
    raise AssertionError("unreachable")


def wait_for_quiet(limit: float, window: float = 2.0, calm: float = 0.15) -> None:
    """Return once other processes use less than ``calm`` cores over ``window`` seconds,
    or after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    told = False
    while time.monotonic() < deadline:
        watch = Neighbours()
        time.sleep(window)
        busy = watch.cores()
        if busy is None or busy < calm:
            return
        if not told:
            _say(f"  waiting up to {limit:.0f} s for a quiet machine (others use {busy:.1f})")
            told = True


def _noise_note(result: dict[str, Any]) -> str:
    busy = result.get("neighbour_cores")
    return f"  (noisy: other processes used {busy:.1f} cores)" if busy and busy > 0.1 else ""


def _measure(
    args: argparse.Namespace, loaded: Any, model: Any, lc: LlamaCpp | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both engines, section by section: each figure of hexin is taken within a minute of
    llama.cpp's, so a neighbour's burst of load skews one pair, not a whole side."""
    cfg, special = loaded.config, loaded.tokenizer.special_ids
    tok = _without_eos(loaded.tokenizer)
    pp_ids = _random_prompts(cfg.vocab_size, special, 1, args.pp, 1)[0]
    tg_prompt = loaded.tokenizer.encode(TG_PROMPT)
    hexin: dict[str, Any] = {"dtype": str(model.dtype), "streams": []}
    llama: dict[str, Any] | None = {"streams": []} if lc is not None else None

    def keep(key: str, h: dict[str, Any], c: dict[str, Any] | None) -> None:
        for side, result in ((hexin, h), (llama, c)):
            if side is not None and result is not None:
                if key == "streams":
                    side[key].append(result)
                else:
                    side[key] = result

    keep(
        "pp",
        *_pair(
            f"pp{args.pp}",
            lambda _: _hexin_pp(model, pp_ids, args.repeats),
            (lambda _: lc.pp(pp_ids, args.repeats)) if lc else None,
            _show_rate,
            args.quiet_wait,
        ),
    )
    keep(
        "tg",
        *_pair(
            f"tg{args.tg}",
            lambda _: _hexin_tg(model, tok, tg_prompt, args.tg, args.repeats),
            (lambda _: lc.tg(tg_prompt, args.tg, args.repeats)) if lc else None,
            _show_rate,
            args.quiet_wait,
        ),
    )

    warm = _random_prompts(cfg.vocab_size, special, 1, args.prompt_tokens, 7)[0]
    if lc is not None:
        run_isolated(lambda: lc.streams([warm, warm[::-1]], min(4, args.new_tokens)))

    def prompts(n: int, attempt: int) -> list[list[int]]:
        """The same prompts for both engines; new ones for a retry."""
        seed = 1000 * (attempt + 1) + n
        return _random_prompts(cfg.vocab_size, special, n, args.prompt_tokens, seed)

    new = args.new_tokens
    for n in args.streams:
        keep(
            "streams",
            *_pair(
                f"{n} streams",
                lambda a, n=n: _hexin_streams(model, tok, prompts(n, a), new, warm),
                (lambda a, n=n: lc.streams(prompts(n, a), new)) if lc else None,
                _show_streams,
                args.quiet_wait,
            ),
        )
    return hexin, llama


# -- the record ---------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    """Enough to tell two machines (or one machine in two moods) apart."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    # thread-pool settings change results a lot on a shared machine: record them
    env = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
    info["env"] = {name: os.environ[name] for name in env if name in os.environ}
    with contextlib.suppress(AttributeError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def _command(args: argparse.Namespace) -> str:
    """The run as a command line someone can paste to repeat it."""
    parts = ["hexin", "bench"]
    if args.model is not None:
        parts += ["--model", str(args.model)]
    parts += ["--streams", ",".join(map(str, args.streams))]
    for flag in ("prompt_tokens", "new_tokens", "pp", "tg", "threads", "repeats", "quiet_wait"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.no_llama_cpp:
        parts.append("--no-llama-cpp")
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def _ratios(hexin: dict[str, Any], llama: dict[str, Any] | None) -> dict[str, float]:
    if not llama:
        return {}
    out = {
        "pp": hexin["pp"]["tok_s"] / llama["pp"]["tok_s"],
        "tg": hexin["tg"]["tok_s"] / llama["tg"]["tok_s"],
    }
    for h, c in zip(hexin["streams"], llama["streams"], strict=True):
        out[f"decode_{h['streams']}"] = h["decode_tok_s"] / c["decode_tok_s"]
        out[f"e2e_{h['streams']}"] = h["e2e_tok_s"] / c["e2e_tok_s"]
    return out


def format_table(record: dict[str, Any]) -> str:
    """The run's figures side by side, one line per measurement, with the CPU the rest of
    the machine took meanwhile (the larger of the two engines' runs)."""
    cfg = record["config"]
    hexin, llama, ratios = record["hexin"], record.get("llama_cpp"), record["ratios"]
    # (label, section, index in streams, field, ratio key)
    specs: list[tuple[str, str, int | None, str, str | None]] = [
        (f"pp{cfg['pp']} tok/s", "pp", None, "tok_s", "pp"),
        (f"tg{cfg['tg']} tok/s", "tg", None, "tok_s", "tg"),
        ("  TTFT ms", "tg", None, "ttft_ms", None),
        ("  ms per output token", "tg", None, "tpot_ms", None),
    ]
    for i, h in enumerate(hexin["streams"]):
        n = h["streams"]
        specs.append((f"{n} streams decode tok/s", "streams", i, "decode_tok_s", f"decode_{n}"))
        specs.append((f"{n} streams end-to-end tok/s", "streams", i, "e2e_tok_s", f"e2e_{n}"))

    def pick(side: dict[str, Any] | None, section: str, i: int | None) -> dict[str, Any] | None:
        if not side:
            return None
        return side[section][i] if i is not None else side[section]

    lines = [
        f"hexin bench  {record['date']}  model {record['model']['name']}  "
        f"({record['model'].get('device', 'cpu')}, {record['model'].get('dtype', 'float32')}, "
        f"quant {record['model'].get('quant', 'none')})  threads {cfg['threads']}  "
        f"({cfg['prompt_tokens']} prompt + {cfg['new_tokens']} new tokens per stream)",
        f"{'':32}{'hexin':>10}{'llama.cpp':>11}{'ratio':>9}{'others busy':>13}",
    ]
    for label, section, i, field, key in specs:
        h, c = pick(hexin, section, i), pick(llama, section, i)
        assert h is not None
        theirs = f"{c[field]:11.1f}" if c else f"{'-':>11}"
        ratio = f"{ratios[key]:8.2f}x" if key and key in ratios else f"{'':>9}"
        busy = [r.get("neighbour_cores") for r in (h, c) if r]
        known = [b for b in busy if b is not None]
        # one note per measurement: TTFT and end-to-end rows share their run's
        shown = known and field in ("tok_s", "decode_tok_s")
        noise = f"{max(known):9.2f} cpu" if shown else ""
        lines.append(f"{label:32}{h[field]:10.1f}{theirs}{ratio}{noise}".rstrip())
    if not llama:
        lines.append(f"llama.cpp: {record.get('llama_cpp_skipped', 'not run')}")
    lines.append("ratio = hexin / llama.cpp; others busy = CPU cores used by other processes")
    return "\n".join(lines)


def _plot(record: dict[str, Any], path: Path) -> bool:
    """Aggregate decode tok/s against concurrency; False (with a notice) without
    matplotlib, which is an optional extra (``pip install hexin[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: no plot (pip install 'hexin[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("hexin", record["hexin"], "tab:blue")]
    if record.get("llama_cpp"):
        series.append(("llama.cpp", record["llama_cpp"], "tab:orange"))
    for label, data, colour in series:
        ns = [s["streams"] for s in data["streams"]]
        decode = [s["decode_tok_s"] for s in data["streams"]]
        e2e = [s["e2e_tok_s"] for s in data["streams"]]
        ax.plot(ns, decode, "o-", color=colour, label=f"{label} decode")
        ax.plot(ns, e2e, "s--", color=colour, alpha=0.6, label=f"{label} end to end")
    ax.set_xscale("log", base=2)
    ns = [s["streams"] for s in record["hexin"]["streams"]]
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    cfg = record["config"]
    ax.set_title(
        f"{record['model']['name']}: {cfg['prompt_tokens']} prompt + {cfg['new_tokens']} new "
        f"tokens per stream, {cfg['threads']} threads ({record['date'][:10]})",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _write(record: dict[str, Any], out: Path) -> dict[str, str]:
    """The dated record and plot, plus ``bench-latest`` copies for links that must not
    change."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(record["date"]).strftime("%Y%m%d-%H%M%S")
    json_path, png_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.png"
    files = {"json": str(json_path)}
    if _plot(record, png_path):
        shutil.copyfile(png_path, out / "bench-latest.png")
        files["png"] = str(png_path)
    record["files"] = files
    text = json.dumps(record, indent=2) + "\n"
    json_path.write_text(text)
    (out / "bench-latest.json").write_text(text)
    return files


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, print the table to stdout, write the JSON record (and plot) into
    ``args.out``; return the record."""

    torch.set_num_threads(args.threads)
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    watch = Neighbours()
    _say(f"loading {args.model or 'the default model'} ...")

    def load() -> tuple[Any, Any]:
        from hexin.model import load_llama

        return load_llama(args.model, model_options(args))

    loaded, model = run_isolated(load)
    cfg = loaded.config
    version = _llama_cpp_version()
    is_gguf = loaded.path.is_file()
    skipped = ""
    if args.no_llama_cpp:
        skipped = "skipped (--no-llama-cpp)"
    elif version is None:
        skipped = "skipped (llama-cpp-python is not installed)"
    elif not is_gguf:
        skipped = "skipped (the model is not a GGUF file)"
    if skipped:
        _say(f"llama.cpp {skipped}")
    lc = None if skipped else run_isolated(lambda: LlamaCpp(loaded.path, args.threads))
    try:
        hexin, llama = _measure(args, loaded, model, lc)
    finally:
        if lc is not None:
            lc.close()

    record: dict[str, Any] = {
        "benchmark": "hexin bench",
        "date": date,
        "command": _command(args),
        "argv": sys.argv,
        "config": {
            "streams": args.streams,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "pp": args.pp,
            "tg": args.tg,
            "threads": args.threads,
            "repeats": args.repeats,
            "quiet_wait": args.quiet_wait,
        },
        "model": {
            "name": loaded.name,
            "path": str(loaded.path),
            "file_bytes": loaded.path.stat().st_size if is_gguf else None,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "quant": model.quant,
            "decode_weight_bytes": model.weight_bytes,
        },
        "machine": {
            **_machine(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "neighbour_cores": watch.cores(),
        },
        "versions": {
            "hexin": _hexin_version(),
            "torch": torch.__version__,
            "llama_cpp": version,
        },
        "hexin": hexin,
        "llama_cpp": llama,
        "ratios": _ratios(hexin, llama),
    }
    if skipped:
        record["llama_cpp_skipped"] = skipped
    files = _write(record, Path(args.out))
    print(format_table(record))
    for kind, path in files.items():
        _say(f"wrote {kind}: {path}")
    return record


def _hexin_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexin")
    except PackageNotFoundError:
        return "unknown"


def _cmd_bench(args: argparse.Namespace) -> int:
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
        default=torch.get_num_threads(),
        help="threads for both engines (default: torch's count)",
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
