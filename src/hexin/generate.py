"""Streaming generation for one sequence: prefill, then decode token by token, yielding text.

This is the single-sequence path (story mode, tests, references). The serving engine runs
many sequences through the same model, sampler and stop logic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import torch

from hexin.model import Llama
from hexin.output import Completion, OutputProcessor, check_fits
from hexin.sampling import Sampler, SamplingParams
from hexin.tokenizer import Tokenizer


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
        cancel: threading.Event | None = None,
        *,
        context_limit: int | None = None,
    ) -> None:
        """``context_limit``: tokens the sequence may reach, prompt included (default: the
        model's context)."""
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        self.cache = model.new_cache(context_limit)
        self.cancel = cancel or threading.Event()
        check_fits(len(self.prompt_ids), self.cache.max_tokens)
        self.completion = Completion(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        c, cache = self.completion, self.cache
        sampler = Sampler(self.params, self.model.device, self.prompt_ids)
        budget = min(self.params.max_tokens, cache.max_tokens - len(self.prompt_ids))
        out = OutputProcessor(self.tokenizer, self.params, budget, c)
        start = time.perf_counter()
        pending = self.prompt_ids
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

    def run(self) -> Completion:
        """Consume the whole stream and return the completion."""
        for _ in self:
            pass
        return self.completion
