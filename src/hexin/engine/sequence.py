"""A request inside the engine (Sequence) and the caller's side of it (RequestHandle)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from hexin.grammar import Constraint
from hexin.output import Completion, OutputProcessor
from hexin.sampling import Sampler, SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"  # queued, holds no blocks
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    """Engine-side state of one request. ``token_ids`` is prompt + generated so far;
    the first ``num_computed`` of them have their keys and values in ``block_table``."""

    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    output: OutputProcessor
    sampler: Sampler
    #: the grammar the reply is held to, if any (``hexin.grammar``)
    constraint: Constraint | None = None
    cache_key: str | None = None
    #: run the final token (or EOS) into the cache before retiring, so the cache key's
    #: next request finds the whole conversation cached
    cache_tail: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    #: digest of the last full block registered, and how many full blocks that covers
    digest: bytes = b""
    num_digested: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    preemptions: int = 0
    #: other choices of the same request (``Engine.submit_choices``): they start from this
    #: sequence's prompt once it is computed, sharing its blocks
    forks: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are still to be computed."""
        return len(self.token_ids) - self.num_computed

    @property
    def finishing(self) -> bool:
        """Sampling is over; only the cache tail may still run."""
        return self.output.finished


class RequestHandle:
    """The caller's end of a request: iterate (or ``async for``) over text deltas; the
    ``completion`` holds counts and the stop reason once ``done`` is set. ``cancel()``
    from any thread frees the request's blocks within one engine step."""

    def __init__(
        self,
        prompt_tokens: int,
        on_cancel: Callable[[RequestHandle], None],
        on_close: Callable[[RequestHandle], None] | None = None,
    ) -> None:
        """``on_close(handle)`` runs (in the engine thread) when the request ends, before
        ``done`` is set, so whoever waits on the handle sees its effects. It is given here, before
        the request is queued, so it cannot miss an end that comes early."""
        self.completion = Completion(prompt_tokens=prompt_tokens)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False
        #: prompt tokens whose keys and values are computed, a cached prefix included
        self.prompt_done = 0
        self._events: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._listeners: list[Callable[[], None]] = []
        self._on_close = on_close

    # engine side
    def push(self, text: str) -> None:
        self._events.put(text)
        self._notify()

    def computed(self, tokens: int) -> None:
        """The sequence's first ``tokens`` tokens are computed: the prompt's progress moves
        up to them, never back (a preempted prompt is recomputed behind it) and never past
        the prompt's end."""
        self.prompt_done = max(self.prompt_done, min(tokens, self.completion.prompt_tokens))

    def close(self, error: BaseException | None = None) -> None:
        self.error = error
        if self._on_close is not None:
            try:
                self._on_close(self)
            except Exception as e:  # the engine must survive a failing consumer
                self.error = self.error or e
        self.done.set()
        self._events.put(None)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # caller side
    def cancel(self) -> None:
        if not self.done.is_set() and not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    @property
    def prefill_progress(self) -> tuple[int, int]:
        """(prompt tokens computed, prompt tokens), so that a caller can show how far a long
        prompt is before its first token. The engine thread moves it on after each prefill
        chunk; two ints, read from any thread without a lock."""
        return self.prompt_done, self.completion.prompt_tokens

    def __iter__(self) -> Iterator[str]:
        try:
            while (text := self._events.get()) is not None:
                yield text
        finally:
            self.cancel()  # a consumer that leaves early frees the sequence
        if self.error is not None:
            raise self.error

    def result(self) -> Completion:
        """Wait for the end and return the completion."""
        for _ in self:
            pass
        return self.completion

    async def stream(self) -> AsyncIterator[str]:
        """Async iteration for servers: deltas arrive without blocking the event loop."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._listeners.append(lambda: loop.call_soon_threadsafe(wake.set))
        try:
            while True:
                try:
                    text = self._events.get_nowait()
                except queue.Empty:
                    await wake.wait()
                    wake.clear()
                    continue
                if text is None:
                    break
                yield text
        finally:
            self.cancel()
        if self.error is not None:
            raise self.error
