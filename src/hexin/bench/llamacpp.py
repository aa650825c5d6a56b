"""llama.cpp's side of ``hexin bench``, through llama-cpp-python (an optional extra that
hexin never imports elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except Exception:  # missing, or a build that fails to load its library
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))
