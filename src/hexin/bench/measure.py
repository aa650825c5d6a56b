"""hexin's side of ``hexin bench`` and the measuring machinery: neighbours' CPU load,
waiting for a quiet machine, paired and retaken measurements, random prompts."""

from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hexin.bench.progress import say
from hexin.options import EngineConfig
from hexin.threads import run_isolated

if TYPE_CHECKING:
    from hexin.bench.llamacpp import LlamaCpp

TG_PROMPT = "Once upon a time, in a village by the sea,"


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
    say(f"{label} ...")
    h = _watched(ours, quiet_wait)
    say(f"  hexin     {show(h)}{_noise_note(h)}")
    c = _watched(theirs, quiet_wait) if theirs is not None else None
    if c is not None:
        say(f"  llama.cpp {show(c)}{_noise_note(c)}")
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
        say(f"  noisy (other processes used {busy:.1f} cores): measuring again")
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
            say(f"  waiting up to {limit:.0f} s for a quiet machine (others use {busy:.1f})")
            told = True


def _noise_note(result: dict[str, Any]) -> str:
    busy = result.get("neighbour_cores")
    return f"  (noisy: other processes used {busy:.1f} cores)" if busy and busy > 0.1 else ""


def measure_all(
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
