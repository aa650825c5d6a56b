"""Streaming generation for one sequence: prefill, then decode token by token, yielding text.

This is the single-sequence path (story mode, tests, references). The serving engine runs
many sequences through the same model, sampler and stop logic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hexin.errors import HexinError
from hexin.kvcache import KVCache
from hexin.model import Llama
from hexin.sampling import Sampler, SamplingParams
from hexin.tokenizer import Tokenizer


class ContextOverflow(HexinError):
    """The prompt alone does not fit the context window."""


@dataclass
class Completion:
    """What a finished generation reports besides its text."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "eos" | "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # time to first token: prefill plus the first sample
    decode_s: float = 0.0  # time for the tokens after the first

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class StopMatcher:
    """Finds stop strings in streamed text and holds back any tail that could still
    become one, so a stop string is never half-printed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class OutputProcessor:
    """Per-sequence postprocessing of sampled tokens: EOS, detokenization, stop strings and
    the token budget. One object per sequence, shared by ``TextStream`` and the engine, so
    both stop for the same reasons and stream the same text."""

    def __init__(
        self, tokenizer: Tokenizer, params: SamplingParams, budget: int, completion: Completion
    ) -> None:
        self.completion, self.budget = completion, budget
        self._eos = set(tokenizer.eos_token_ids)
        self._decoder = tokenizer.stream_decoder()
        self._stops = StopMatcher(params.stop)

    @property
    def finished(self) -> bool:
        return bool(self.completion.stop_reason)

    def add(self, token: int) -> str:
        """Account for one sampled token; return the text it completes (maybe empty)."""
        c = self.completion
        if token in self._eos:
            c.stop_reason = "eos"
            return ""
        c.token_ids.append(token)
        c.completion_tokens += 1
        text, hit = self._stops.feed(self._decoder.push(token))
        c.text += text
        if hit:
            c.stop_reason = "stop"
        elif c.completion_tokens >= self.budget:
            c.stop_reason = "length"
        return text

    def finish(self, reason: str = "cancelled") -> str:
        """End the sequence (with ``reason`` unless it already stopped by itself) and
        return any text still held back."""
        c = self.completion
        c.stop_reason = c.stop_reason or reason
        if c.stop_reason == "stop":
            return ""
        tail = self._stops.feed(self._decoder.flush())[0] + self._stops.flush()
        c.text += tail
        return tail


class TextStream:
    """Iterate to receive text deltas as tokens decode; ``completion`` is filled in as it
    goes and final once iteration ends. Setting ``cancel`` stops it after the current step
    (the partial reply is kept, stop reason "cancelled").

    This is the plain single-sequence loop: the reference the serving engine is tested
    against, and the fastest path for one stream.
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cache: KVCache | None = None,
        cancel: threading.Event | None = None,
        *,
        cache_tail: bool = False,
    ) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        self.cache = cache if cache is not None else model.new_cache()
        self.cancel = cancel or threading.Event()
        #: after the reply, also run its final token (or the EOS) into the cache, so that
        #: a chat's next turn finds the whole previous context cached
        self.cache_tail = cache_tail
        check_fits(len(self.prompt_ids), self.cache.max_tokens)
        self.completion = Completion(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        c, cache = self.completion, self.cache
        # The cache may already hold a prefix of the prompt (a chat's earlier turns): only
        # the rest is prefilled. At least one prompt token is always run, because its
        # logits pick the first new token.
        reused = min(cache.common_prefix(self.prompt_ids), len(self.prompt_ids) - 1)
        cache.truncate(reused)
        c.cached_tokens = reused
        sampler = Sampler(self.params, self.model.device)
        budget = min(self.params.max_tokens, cache.max_tokens - len(self.prompt_ids))
        out = OutputProcessor(self.tokenizer, self.params, budget, c)
        start = time.perf_counter()
        pending = self.prompt_ids[reused:]
        prompt = True
        while True:
            ids = torch.tensor([pending], device=self.model.device)
            logits = self.model.forward(ids, cache, prompt=prompt)
            token = sampler(logits[0])
            if not c.ttft_s:
                c.ttft_s = time.perf_counter() - start
            if text := out.add(token):
                yield text
            if out.finished or self.cancel.is_set():
                break
            pending, prompt = [token], False
        if tail := out.finish():
            yield tail
        c.decode_s = time.perf_counter() - start - c.ttft_s
        # every exit leaves the last sampled token (or the EOS) out of the cache
        if self.cache_tail and len(cache) < cache.max_tokens:
            self.model.forward(torch.tensor([[token]], device=self.model.device), cache)

    def run(self) -> Completion:
        """Consume the whole stream and return the completion."""
        for _ in self:
            pass
        return self.completion


def check_fits(prompt_tokens: int, limit: int) -> None:
    """Refuse a prompt that leaves no room for even one new token."""
    if prompt_tokens >= limit:
        raise ContextOverflow(
            f"prompt of {prompt_tokens} tokens does not fit the context limit of {limit} tokens"
        )
