"""Which sequences run in the next step, and the KV blocks they need for it.

Each step: admit waiting sequences while blocks and slots allow (prefix-cached blocks are
taken over, the rest of the prompt gets fresh blocks); give prefilling sequences a chunk
of their prompt within a token budget, so a long prompt cannot stall everyone's decoding;
put every sequence with one pending token in the decode batch, finding it a block when it
crosses a block boundary, by preempting the youngest running sequence if memory is out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hexin.engine.blocks import BlockPool, block_digest
from hexin.engine.sequence import Sequence, Status
from hexin.errors import HexinError
from hexin.options import EngineConfig


class EngineBusy(HexinError):
    """Too many requests are waiting; try again later."""


@dataclass
class Step:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens)
    decode: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, pool: BlockPool, config: EngineConfig) -> None:
        """Only ``config``'s batch limits matter here (the pool is already sized)."""
        self.pool = pool
        self.max_running, self.max_waiting = config.max_running, config.max_waiting
        self.prefill_chunk = config.prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def check(self, prompt_tokens: int, queued: int = 0) -> None:
        """Refuse a request that could never run, or that would overfill the queue."""
        if len(self.waiting) + queued >= self.max_waiting:
            raise EngineBusy(f"server busy: {self.max_waiting} requests already waiting")
        need = self._blocks_for(prompt_tokens + 1)
        if need > self.pool.num_blocks - 1:
            raise HexinError(
                f"prompt of {prompt_tokens} tokens needs {need} KV blocks, more than "
                f"the pool's {self.pool.num_blocks - 1}; raise the KV memory budget"
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    # -- the step -----------------------------------------------------------------------
    def schedule(self) -> Step:
        self._admit()
        step = Step()
        budget = self.prefill_chunk
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted while finding room for an earlier sequence
            # a prompt's last token too goes through the prompt kernels (``prompt=True``),
            # as when the prompt runs whole: the decode step's (int4 weights, bf16 keys)
            # would give it other logits when a chunk or a cached prefix leaves it alone
            if seq.num_pending > 1 or seq.num_computed < len(seq.prompt_ids):
                if budget > 0:
                    n = min(seq.num_pending, budget)
                    budget -= n
                    step.prefill.append((seq, n))
            elif seq.num_pending == 1 and self._room_for_one(seq):
                step.decode.append(seq)
        # finding room may have preempted a sequence already placed in this step
        step.prefill = [(s, n) for s, n in step.prefill if s.status is Status.RUNNING]
        step.decode = [s for s in step.decode if s.status is Status.RUNNING]
        return step

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            table: list[int] = []
            cached = 0
            if seq.params.prompt_logprobs is None:  # scoring a prompt computes all of it
                table, cached = self.pool.match_prefix(seq.token_ids, seq.cache_key)
            need = self._blocks_for(len(seq.token_ids)) - len(table)
            if need > self.pool.num_available:
                for block in table:
                    self.pool.decref(block)
                break
            table += [self.pool.allocate() for _ in range(need)]
            self.waiting.popleft()
            seq.block_table, seq.num_computed = table, cached
            seq.handle.computed(cached)
            seq.digest, seq.num_digested = b"", 0
            self._digest_full_blocks(seq, register=False)
            if seq.preemptions == 0:
                self.prompt_tokens += len(seq.token_ids)
                self.cached_tokens += cached
                seq.output.completion.cached_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Start ``child``, whose prompt is ``parent``'s, from ``parent``'s computed
        prompt: the full blocks shared, the partly filled last one copied (the child writes
        its own tokens there). False when the batch is full or no block is free for the
        copy; the child then waits and is admitted as any other, its prompt mostly cached."""
        bs = self.pool.block_size
        full, part = divmod(parent.num_computed, bs)
        if len(self.running) >= self.max_running or (part and self.pool.num_available == 0):
            return False
        table = parent.block_table[:full]
        for block in table:
            self.pool.incref(block)
        if part:
            copy = self.pool.allocate()
            self.pool.copy_prefix(parent.block_table[full], copy, part)
            table = [*table, copy]
        child.block_table, child.num_computed = table, parent.num_computed
        child.handle.computed(parent.num_computed)
        child.digest, child.num_digested = parent.digest, parent.num_digested
        self.prompt_tokens += len(child.token_ids)
        self.cached_tokens += parent.num_computed
        child.output.completion.cached_tokens = parent.num_computed
        child.status = Status.RUNNING
        self.running.append(child)
        return True

    def _room_for_one(self, seq: Sequence) -> bool:
        """Make sure ``seq`` has a slot for its next token, preempting if need be."""
        if len(seq.block_table) * self.pool.block_size > seq.num_computed:
            return True
        while self.pool.num_available == 0:
            victim = max(
                (s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.arrived
            )
            self.preempt(victim)
            if victim is seq:
                return False
        seq.block_table.append(self.pool.allocate())
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the front and is recomputed."""
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def computed(self, seq: Sequence, n: int) -> None:
        """``n`` more tokens of ``seq`` have their KV in the pool; index newly full blocks."""
        seq.num_computed += n
        seq.handle.computed(seq.num_computed)
        self._digest_full_blocks(seq, register=True)

    def _digest_full_blocks(self, seq: Sequence, *, register: bool) -> None:
        bs = self.pool.block_size
        while (seq.num_digested + 1) * bs <= seq.num_computed:
            i = seq.num_digested
            seq.digest = block_digest(seq.digest, seq.token_ids[i * bs : (i + 1) * bs])
            if register:
                self.pool.register(seq.block_table[i], seq.digest)
            seq.num_digested += 1

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence: its blocks become idle (reusable until evicted)."""
        if seq.cache_key is not None and seq.block_table:
            self.pool.retain(seq.cache_key, seq.token_ids[: seq.num_computed], seq.block_table)
        self._release(seq)
        seq.status = Status.FINISHED

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.pool.decref(block)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)
