"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
import secrets
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


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature`` 0 is greedy, and any positive one is sampled stably (a tiny one picks
    the top token, as greedy would). ``top_k`` None disables top-k; as in the seed, any
    top_k < 2 or top_p <= 0 also means greedy (argmax), since a candidate set of one token
    leaves nothing to sample. ``seed`` None draws a fresh seed per request.
    """

    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

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

    @property
    def greedy(self) -> bool:
        return (
            self.temperature == 0 or (self.top_k is not None and self.top_k < 2) or self.top_p <= 0
        )

    def with_(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Sampler:
    """Draws tokens for one sequence from its own seeded generator, so a sequence's
    tokens depend only on its seed and logits, never on what else runs beside it."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def __call__(self, logits: Tensor) -> int:
        """Pick the next token from fp32 ``logits`` (V,)."""
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
        if p.top_p < 1.0:
            # keep the smallest head whose mass reaches top_p (always at least one token)
            before = torch.cumsum(probs, dim=-1) - probs
            keep = before < p.top_p * probs.sum()
            probs, ids = probs[keep], ids[keep]
        choice = torch.multinomial(probs / probs.sum(), 1, generator=self.generator)
        return int(ids[choice])
