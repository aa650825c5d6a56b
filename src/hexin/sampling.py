"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, min-p, seeded; logit
bias and repetition penalties; log-probabilities of the chosen tokens."""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hexin.errors import HexinError


class InvalidParams(HexinError):
    """A sampling parameter is out of range."""


#: temperatures below this sample as it does: already greedy (fp32 logits that differ at
#: all differ by far more than 1e-30 times any score that exp() keeps above 0)
MIN_TEMPERATURE = 1e-30
#: what a torch generator can be seeded with (64 bits, signed or not)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: the most alternatives a token's log-probability lists (OpenAI's limit)
MAX_TOP_LOGPROBS = 20
#: what a constrained reply may be held to (``hexin.grammar``)
GRAMMAR_KINDS = ("json_schema", "json_object", "grammar", "regex")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature`` 0 is greedy, and any positive one is sampled stably (a tiny one picks
    the top token, as greedy would). ``top_k`` None disables top-k; as in the seed, any
    top_k < 2 or top_p <= 0 also means greedy (argmax), since a candidate set of one token
    leaves nothing to sample. ``min_p`` drops tokens less likely than that fraction of the
    likeliest. ``seed`` None draws a fresh seed per request.

    Before picking, the logits are changed (``Sampler.process``), greedy or not:
    ``logit_bias`` adds to given token ids' logits (-100 excludes one); ``presence_penalty``
    and ``frequency_penalty`` subtract, per token already generated, a constant and its
    count times a constant (OpenAI's penalties); ``repetition_penalty`` divides the
    positive logits of every token seen in the prompt or the reply, and multiplies the
    negative ones (the CTRL paper's, as transformers and llama.cpp apply it).
    ``logprobs``: how many alternatives to report with each token's log-probability (None:
    no log-probabilities); ``prompt_logprobs`` the same for the prompt's tokens. Both are
    of the model's own distribution, before any of the changes above.
    """

    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    #: (kind, text): the reply held to a JSON schema, any JSON object, a GBNF or Lark
    #: grammar, or a regex (``GRAMMAR_KINDS``, ``hexin.grammar``)
    grammar: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise InvalidParams(f"temperature must be a number, got {self.temperature!r}")
        if self.temperature < 0:
            raise InvalidParams(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and not _is_int(self.top_k):
            raise InvalidParams(f"top_k must be an integer, got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 <= self.top_p <= 1:
            raise InvalidParams(f"top_p must be between 0 and 1, got {self.top_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidParams(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and not (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX):
            raise InvalidParams(
                f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {self.seed!r}"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        _check_range("min_p", self.min_p, 0, 1)
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        _check_range("repetition_penalty", self.repetition_penalty, 0, 10)
        if self.repetition_penalty == 0:
            raise InvalidParams("repetition_penalty must be > 0 (1 is none)")
        bias = dict(self.logit_bias)  # from pairs or a mapping; one value per token
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise InvalidParams(f"logit_bias keys must be token ids, got {token!r}")
            _check_range("logit_bias values", value, -100, 100)
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        if self.grammar is not None:
            kind, text = self.grammar  # a list from JSON becomes a tuple
            if kind not in GRAMMAR_KINDS or not isinstance(text, str):
                raise InvalidParams(f"grammar must be (kind, text), kind one of {GRAMMAR_KINDS}")
            object.__setattr__(self, "grammar", (kind, text))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS):
                raise InvalidParams(
                    f"{name} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        return (
            self.temperature == 0 or (self.top_k is not None and self.top_k < 2) or self.top_p <= 0
        )

    @property
    def changes_logits(self) -> bool:
        """Whether logits are changed before the pick (bias or penalties)."""
        return bool(self.logit_bias) or (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    @property
    def plain_greedy(self) -> bool:
        """The pick is the model's own argmax and needs nothing else from the logits: a
        batch of such rows is picked with one batched argmax."""
        return (
            self.greedy
            and not self.changes_logits
            and self.logprobs is None
            and self.grammar is None
        )

    def with_(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        d["grammar"] = list(self.grammar) if self.grammar else None
        return d


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, value: object, low: float, high: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and low <= value <= high):  # type: ignore[arg-type]
        raise InvalidParams(f"{name} must be a number from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``top`` likeliest alternatives
    as (token id, log-probability), likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability in fp32 ``logits`` (V,), with ``top`` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logp.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), best)


class Sampler:
    """Draws tokens for one sequence from its own seeded generator, so a sequence's
    tokens depend only on its seed and logits, never on what else runs beside it."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device | str = "cpu",
        prompt_ids: Sequence[int] = (),
    ) -> None:
        """``prompt_ids``: what ``repetition_penalty`` counts as seen before the reply."""
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.counts: Counter[int] = Counter()  # the reply's tokens so far
        self.seen = set(prompt_ids) if params.repetition_penalty != 1 else set()

    def process(self, logits: Tensor) -> Tensor:
        """``logits`` with the bias and penalties applied (a copy; the same if none)."""
        p = self.params
        if not p.changes_logits:
            return logits
        logits = logits.float().clone()
        if p.logit_bias:
            ids, values = zip(*p.logit_bias, strict=True)
            index = torch.tensor(ids, device=logits.device)
            ok = index < logits.shape[-1]  # ids past the vocabulary were refused earlier
            logits[index[ok]] += torch.tensor(values, device=logits.device)[ok]
        if p.repetition_penalty != 1 and self.seen:
            index = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[index]
            penalty = p.repetition_penalty
            logits[index] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids, counts = zip(*self.counts.items(), strict=True)
            index = torch.tensor(ids, device=logits.device)
            n = torch.tensor(counts, dtype=logits.dtype, device=logits.device)
            logits[index] -= n * p.frequency_penalty + p.presence_penalty
        return logits

    def __call__(self, logits: Tensor) -> int:
        """Pick the next token from fp32 ``logits`` (V,)."""
        token = self._pick(self.process(logits))
        self.counts[token] += 1
        if self.params.repetition_penalty != 1:
            self.seen.add(token)
        return token

    def _pick(self, logits: Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        # relative to the top logit, and by at least MIN_TEMPERATURE (which fp32 holds,
        # where 1e-50 would round to 0 and divide 0 by 0), so that any temperature > 0
        # gives finite or -inf scores: a tiny one behaves as greedy
        logits = logits.float()
        scaled = (logits - logits.max()) / max(p.temperature, MIN_TEMPERATURE)
        probs = torch.softmax(scaled, dim=-1)
        probs, ids = torch.sort(probs, descending=True)
        if p.top_k is not None and p.top_k < probs.shape[-1]:
            probs, ids = probs[: p.top_k], ids[: p.top_k]
        if p.min_p > 0:  # sorted: a prefix, never empty (the first is the maximum)
            keep = probs >= p.min_p * probs[0]
            probs, ids = probs[keep], ids[keep]
        if p.top_p < 1.0:
            # keep the smallest head whose mass reaches top_p (always at least one token)
            before = torch.cumsum(probs, dim=-1) - probs
            keep = before < p.top_p * probs.sum()
            probs, ids = probs[keep], ids[keep]
        choice = torch.multinomial(probs / probs.sum(), 1, generator=self.generator)
        return int(ids[choice])
