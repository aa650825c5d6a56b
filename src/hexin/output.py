"""Request output: what a finished generation reports, and the per-sequence postprocessing
of sampled tokens (EOS, detokenization, stop strings, token budget) that turns them into
streamed text.

Both generation paths (the single-sequence ``generate.TextStream`` and the serving
engine) use it, so they stop for the same reasons and stream the same text; the chat
layer and the server read its ``Completion``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hexin.errors import HexinError
from hexin.sampling import SamplingParams, TokenLogprob
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
    #: with ``SamplingParams.logprobs``: one entry per token of ``token_ids``
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: with ``SamplingParams.prompt_logprobs``: one per prompt token (None for the first,
    #: which nothing predicts)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

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

    def add(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Account for one sampled token (and its log-probability, if asked for); return
        the text it completes (maybe empty)."""
        c = self.completion
        if token in self._eos:
            c.stop_reason = "eos"
            return ""
        if logprob is not None:
            c.logprobs.append(logprob)  # before the text, which a reader may see at once
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


def check_fits(prompt_tokens: int, limit: int) -> None:
    """Refuse a prompt that leaves no room for even one new token."""
    if prompt_tokens >= limit:
        raise ContextOverflow(
            f"prompt of {prompt_tokens} tokens does not fit the context limit of {limit} tokens"
        )
