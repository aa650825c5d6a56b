"""The engine loop: one thread owns the model and the KV pool and serves every request.

Each step is schedule -> run -> postprocess: prefill chunks (one forward each), then one
batched forward for every decoding sequence's next token, then per-sequence sampling with
its own seed, stop checks and streaming. Requests join and leave between steps
(continuous batching); a cancelled request is retired at the start of the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from hexin.engine.blocks import BlockPool, PagedBatch
from hexin.engine.graphs import GraphedDecode
from hexin.engine.scheduler import Scheduler
from hexin.engine.sequence import RequestHandle, Sequence, Status
from hexin.grammar import Grammars
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.output import Completion, OutputProcessor, check_fits
from hexin.sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from hexin.tokenizer import Tokenizer

log = logging.getLogger("hexin.engine")


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    preemptions: int
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    steps: int


class Engine:
    def __init__(
        self, model: Llama, tokenizer: Tokenizer, config: EngineConfig | None = None
    ) -> None:
        config = config or EngineConfig()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        limit = model.context
        self.context_limit = min(config.context_limit or limit, limit)
        bs = config.block_size
        per_block = BlockPool.bytes_per_block(model.config, bs, model.kv_dtype)
        self.pool = BlockPool(
            model.config,
            max(2, config.kv_memory // per_block),
            block_size=bs,
            dtype=model.kv_dtype,
            device=model.device,
        )
        self.grammars = Grammars(tokenizer)
        self._graphs: GraphedDecode | None = None
        if config.cuda_graphs and model.device.type == "cuda":
            self._graphs = GraphedDecode(model, self.pool)
        self.scheduler = Scheduler(self.pool, config)
        self._lock = threading.Condition()
        self._incoming: list[Sequence] = []
        self._cancelled: set[RequestHandle] = set()
        self._by_handle: dict[RequestHandle, Sequence] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._prefill_tokens = self._decode_tokens = 0
        self._prefill_s = self._decode_s = 0.0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hexin-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end as cancelled."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:  # never started: end what was queued
            self._cancel_all()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- requests -----------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        cache_key: str | None = None,
        cache_tail: bool = False,
        on_close: Callable[[RequestHandle], None] | None = None,
    ) -> RequestHandle:
        """Queue a request; its handle streams text as tokens are decoded (once the loop
        runs: ``start()`` or ``with engine:``). ``on_close`` runs on the engine thread as
        the request ends (see ``RequestHandle``): it must only hand work over, never wait."""
        seq = self._sequence(list(prompt_ids), params, cache_key, cache_tail, on_close)
        with self._lock:
            self._admissible(len(seq.prompt_ids))
            self._incoming.append(seq)
            self._by_handle[seq.handle] = seq
            self._lock.notify()
        return seq.handle

    def submit_choices(
        self, prompt_ids: Seq[int], params: Seq[SamplingParams]
    ) -> list[RequestHandle]:
        """Queue several replies to one prompt (OpenAI's ``n``), one per ``params``: the
        prompt is computed once, then each reply starts from a copy of its cache (its full
        blocks shared) and samples its own tokens."""
        seqs = [self._sequence(list(prompt_ids), p, None, False, None) for p in params]
        leader, *forks = seqs
        leader.forks = forks
        with self._lock:
            self._admissible(len(leader.prompt_ids))
            self._incoming.append(leader)
            for seq in seqs:
                self._by_handle[seq.handle] = seq
            self._lock.notify()
        return [seq.handle for seq in seqs]

    def _start_forks(self, leader: Sequence, logits: torch.Tensor | None) -> None:
        """``leader``'s prompt is computed (``logits``: its last position's) or it ended
        before that (None): start its other choices, forked where they can be."""
        forks, leader.forks = leader.forks, []
        for seq in forks:
            if seq.status is not Status.WAITING:  # cancelled meanwhile
                continue
            if logits is not None and self.scheduler.fork(leader, seq):
                seq.handle.completion.prompt_logprobs = list(
                    leader.handle.completion.prompt_logprobs
                )
                self._isolated(seq, lambda seq=seq: self._sample(seq, logits))
            else:
                self.scheduler.add(seq)

    def check(self, prompt_ids: Seq[int]) -> None:
        """Raise now what ``submit`` would raise for this prompt (empty, too long, queue
        full), without queueing it, so a caller can refuse a request before storing
        anything. (Sampling values are checked by ``SamplingParams`` itself.)"""
        self._fits(len(prompt_ids))
        with self._lock:
            self._admissible(len(prompt_ids))

    def _fits(self, prompt_tokens: int) -> None:
        if not prompt_tokens:
            raise ValueError("empty prompt: give at least one token")
        check_fits(prompt_tokens, self.context_limit)

    def _sequence(
        self,
        prompt: list[int],
        params: SamplingParams,
        cache_key: str | None,
        cache_tail: bool,
        on_close: Callable[[RequestHandle], None] | None,
    ) -> Sequence:
        self._fits(len(prompt))
        handle = RequestHandle(len(prompt), self._request_cancel, on_close)
        # a sequence can grow only as far as the context and the whole pool allow
        capacity = (self.pool.num_blocks - 1) * self.pool.block_size
        budget = min(
            params.max_tokens, self.context_limit - len(prompt), capacity - len(prompt) - 1
        )
        return Sequence(
            prompt_ids=prompt,
            params=params,
            handle=handle,
            output=OutputProcessor(self.tokenizer, params, budget, handle.completion),
            sampler=Sampler(params, self.model.device, prompt),
            constraint=self.grammars.constraint(*params.grammar) if params.grammar else None,
            cache_key=cache_key,
            cache_tail=cache_tail,
        )

    def _admissible(self, prompt_tokens: int) -> None:
        """Under the lock: refuse a request the engine cannot take now."""
        if self._stop:
            raise RuntimeError("engine is shut down")
        self.scheduler.check(prompt_tokens, queued=len(self._incoming))  # busy, too long

    def generate(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        cache_key: str | None = None,
        cache_tail: bool = False,
    ) -> Completion:
        """Submit and wait: the finished Completion."""
        return self.submit(prompt_ids, params, cache_key=cache_key, cache_tail=cache_tail).result()

    def _request_cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._cancelled.add(handle)
            self._lock.notify()

    # -- loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        """Steps run outside the lock, so submitting or cancelling never waits for one."""
        while True:
            with self._lock:
                while not (
                    self._stop or self.scheduler.has_work or self._incoming or self._cancelled
                ):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self._step()
            except Exception as e:  # a bug: fail the requests, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._retire(seq, error=e)
        self._cancel_all()

    def _cancel_all(self) -> None:
        self._take_incoming()
        while self.scheduler.has_work:  # a retired leader hands its other choices over
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._retire(seq, reason="cancelled")

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancelled, self._cancelled = self._cancelled, set()
        for seq in incoming:
            self.scheduler.add(seq)
        for handle in cancelled:
            if (seq := self._by_handle.get(handle)) is not None:
                self._retire(seq, reason="cancelled")

    def _step(self) -> None:
        self._take_incoming()
        step = self.scheduler.schedule()
        if not step:
            return
        self._steps += 1
        for seq, n in step.prefill:
            t0 = time.perf_counter()
            start = seq.num_computed
            tokens = torch.tensor([seq.token_ids[start : start + n]], device=self.model.device)
            view = PagedBatch.of(self.pool, [seq.block_table], [start], [n])
            scored = seq.params.prompt_logprobs is not None
            logits = self.model.forward(tokens, view, prompt=True, all_logits=scored)
            self.scheduler.computed(seq, n)
            self._prefill_tokens += n
            self._prefill_s += time.perf_counter() - t0
            if scored:
                self._isolated(seq, lambda s=seq, a=start, r=logits[0]: self._score(s, a, r))
                logits = logits[:, -1]
            if seq.num_pending == 0 and seq.status is Status.RUNNING:
                if seq.forks:
                    self._start_forks(seq, logits[0])
                self._isolated(seq, lambda seq=seq, row=logits[0]: self._sample(seq, row))
        if step.decode:
            t0 = time.perf_counter()
            batch = step.decode
            last = [s.token_ids[-1] for s in batch]
            tables = [s.block_table for s in batch]
            offsets = [s.num_computed for s in batch]
            if self._graphs is not None:
                logits = self._graphs(last, tables, offsets)
            else:
                view = PagedBatch.of(self.pool, tables, offsets, [1] * len(batch))
                tokens = torch.tensor(last, device=self.model.device).unsqueeze(1)
                logits = self.model.forward(tokens, view)
            picks = self._greedy_picks(batch, logits)
            for i, seq in enumerate(batch):
                self.scheduler.computed(seq, 1)
                if seq.finishing:  # that was the cache tail
                    self._retire(seq)
                    continue
                self._decode_tokens += 1
                if i in picks:
                    self._isolated(seq, lambda seq=seq, t=picks[i]: self._accept(seq, t))
                else:
                    self._isolated(seq, lambda seq=seq, row=logits[i]: self._sample(seq, row))
            self._decode_s += time.perf_counter() - t0

    @staticmethod
    def _greedy_picks(batch: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
        """The next token of each greedy row, by row: one batched argmax and one
        device-to-host copy (on a GPU, a sync per row would cost more than the step).
        Sampled rows draw from their own seeded generator (``_sample``)."""
        greedy = [i for i, seq in enumerate(batch) if seq.params.plain_greedy]
        if not greedy:
            return {}
        rows = logits if len(greedy) == len(batch) else logits[greedy]
        return dict(zip(greedy, rows.argmax(-1).tolist(), strict=True))

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        allowed = logits
        if seq.constraint is not None:
            left = seq.output.budget - seq.handle.completion.completion_tokens
            allowed = seq.constraint.mask(logits, tokens_left=left)
        token, top = seq.sampler(allowed), seq.params.logprobs
        if seq.constraint is not None:
            seq.constraint.accept(token)
        # log-probabilities are the model's own, before any mask, bias or penalty
        self._accept(seq, token, None if top is None else token_logprob(logits, token, top))

    def _score(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that ``logits`` (n, V), the prompt's
        positions from ``start`` on, predict."""
        c, top = seq.handle.completion, seq.params.prompt_logprobs
        assert top is not None
        if start == 0:  # (again, after a preemption: recomputed from the start)
            c.prompt_logprobs = [None]  # the first token: nothing predicts it
        prompt = seq.prompt_ids
        for i in range(logits.shape[0]):
            if (at := start + i + 1) < len(prompt):
                c.prompt_logprobs.append(token_logprob(logits[i], prompt[at], top))

    def _isolated(self, seq: Sequence, work: Callable[[], None]) -> None:
        """Run one sequence's own postprocessing (sampling, detokenization, stop checks):
        if it fails, that sequence alone ends, with the error; the batch goes on."""
        try:
            work()
        except Exception as e:
            log.exception("request %s failed", seq.id)
            self._retire(seq, error=e)

    def _accept(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        c = seq.handle.completion
        if not c.ttft_s:
            c.ttft_s = time.perf_counter() - seq.arrived
        if text := seq.output.add(token, logprob):
            seq.handle.push(text)
        seq.token_ids.append(token)
        if seq.output.finished and not (seq.cache_tail and seq.cache_key):
            self._retire(seq)

    def _retire(
        self, seq: Sequence, *, reason: str = "cancelled", error: BaseException | None = None
    ) -> None:
        """Finish a sequence: flush its text, release or retain its blocks, close its
        handle. ``reason`` applies only if it did not already stop by itself."""
        if seq.forks:  # ended before its prompt was computed: the other choices go alone
            self._start_forks(seq, None)
        if seq in self.scheduler.waiting:
            self.scheduler.remove_waiting(seq)
        else:
            self.scheduler.finish(seq)
        try:
            if tail := seq.output.finish(reason):
                seq.handle.push(tail)
        except Exception as e:  # a failing detokenizer ends its own request only
            error = error or e
        c = seq.handle.completion
        if c.ttft_s:
            c.decode_s = time.perf_counter() - seq.arrived - c.ttft_s
        with self._lock:
            self._by_handle.pop(seq.handle, None)
        seq.handle.close(error)

    # -- counters -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s, pool = self.scheduler, self.pool
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            kv_blocks_used=pool.num_used,
            kv_blocks_free=pool.num_available,
            kv_blocks_total=pool.num_blocks - 1,
            prefix_cache_hit_rate=s.cached_tokens / s.prompt_tokens if s.prompt_tokens else 0.0,
            preemptions=s.preemptions,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            prefill_tokens=self._prefill_tokens,
            decode_tokens=self._decode_tokens,
            prefill_tokens_per_s=self._prefill_tokens / self._prefill_s if self._prefill_s else 0,
            decode_tokens_per_s=self._decode_tokens / self._decode_s if self._decode_s else 0,
            steps=self._steps,
        )
