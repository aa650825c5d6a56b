"""The scheduler without a model: admission, the prefill chunk budget, preemption, the
queue limit, and that every block comes back. A small driver plays the engine's part
(each scheduled token "computed", a made-up next token accepted)."""

from __future__ import annotations

import pytest

from hexin.engine.blocks import NULL_BLOCK, BlockPool
from hexin.engine.scheduler import EngineBusy, Scheduler, Step
from hexin.engine.sequence import RequestHandle, Sequence, Status
from hexin.errors import HexinError
from hexin.options import EngineConfig
from hexin.output import OutputProcessor
from hexin.sampling import Sampler, SamplingParams

EOS = 2


class Decoder:
    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


class StubTokenizer:
    """What an OutputProcessor needs of a tokenizer: the EOS ids and a streaming decoder."""

    eos_token_ids = (EOS,)

    def stream_decoder(self) -> Decoder:
        return Decoder()


def make_seq(
    prompt: list[int], *, max_tokens: int = 4, arrived: float = 0.0, cache_key: str | None = None
) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    handle = RequestHandle(len(prompt), lambda _: None)
    output = OutputProcessor(StubTokenizer(), params, max_tokens, handle.completion)
    return Sequence(
        prompt_ids=prompt,
        params=params,
        handle=handle,
        output=output,
        sampler=Sampler(params),
        cache_key=cache_key,
        arrived=arrived,
    )


def make(tiny_config, num_blocks: int, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(
        BlockPool(tiny_config, num_blocks, block_size=block_size), EngineConfig(**config)
    )


def accept(sched: Scheduler, seq: Sequence) -> None:
    """The engine's sampling: a next token that is never EOS; retire when done."""
    token = 10 + len(seq.token_ids) % 40
    seq.output.add(token)
    seq.token_ids.append(token)
    if seq.output.finished:
        sched.finish(seq)


def run_step(sched: Scheduler, step: Step | None = None) -> Step:
    """One engine step: the scheduled one, or ``step`` if the test scheduled it itself."""
    step = sched.schedule() if step is None else step
    for seq, n in step.prefill:
        assert n <= seq.num_pending
        sched.computed(seq, n)
        if seq.num_pending == 0:
            accept(sched, seq)
    for seq in step.decode:
        assert seq.num_pending == 1
        assert seq.num_computed < len(seq.block_table) * sched.pool.block_size  # a slot
        sched.computed(seq, 1)
        accept(sched, seq)
    return step


def check_blocks(sched: Scheduler) -> None:
    """Every reference is held by a running sequence's table, and nothing else is used."""
    pool = sched.pool
    held: dict[int, int] = {}
    for seq in sched.running:
        assert NULL_BLOCK not in seq.block_table
        for block in seq.block_table:
            held[block] = held.get(block, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.status is Status.WAITING
    assert {b: r for b, r in enumerate(pool.ref) if r} == held
    assert pool.num_used == len(held)


def drive(sched: Scheduler, max_steps: int = 500) -> list[Step]:
    steps = []
    while sched.has_work:
        assert len(steps) < max_steps, "the scheduler stopped making progress"
        step = run_step(sched)
        assert step, "a step with nothing to run while work is left"
        assert len(sched.running) <= sched.max_running
        check_blocks(sched)
        steps.append(step)
    return steps


@pytest.mark.parametrize(
    ("prompt_len", "chunks"), [(20, [8, 8, 4]), (9, [8, 1])], ids=["split", "last-alone"]
)
def test_a_prompt_is_prefilled_in_chunks_of_the_budget_then_decoded(
    tiny_config, prompt_len, chunks
):
    """A prompt longer than the chunk budget is split across steps. A token a chunk leaves
    alone (9 in chunks of 8) still goes to the prompt kernels, as when the whole prompt
    runs at once (a quantized decode step's int4 weights and bf16 keys give it other
    logits, a different first token on a near-tie)."""
    sched = make(tiny_config, 16, prefill_chunk=8)
    seq = make_seq(list(range(3, 3 + prompt_len)), max_tokens=2)
    sched.add(seq)
    steps = drive(sched)
    assert [[(s.id, n) for s, n in st.prefill] for st in steps] == [
        *([(seq.id, n)] for n in chunks),
        [],
    ]
    assert [st.decode for st in steps] == [*([] for _ in chunks), [seq]]
    assert seq.handle.completion.completion_tokens == 2 and seq.status is Status.FINISHED


def test_the_budget_is_shared_and_decoding_goes_on_beside_a_long_prompt(tiny_config):
    sched = make(tiny_config, 32, prefill_chunk=8)
    a, b = make_seq([3] * 6, max_tokens=5), make_seq([4] * 6, max_tokens=5)
    sched.add(a)
    sched.add(b)
    first = run_step(sched)
    assert [(s, n) for s, n in first.prefill] == [(a, 6), (b, 2)] and first.decode == []
    late = make_seq(list(range(3, 40)), max_tokens=1)  # 37 tokens
    sched.add(late)
    second = run_step(sched)
    assert [(s, n) for s, n in second.prefill] == [(b, 4), (late, 4)]
    assert second.decode == [a]  # the long prompt does not hold up a's next token
    third = run_step(sched)
    assert [(s, n) for s, n in third.prefill] == [(late, 8)] and third.decode == [a, b]


def test_admission_stops_at_max_running_and_takes_the_queue_in_order(tiny_config):
    sched = make(tiny_config, 32, max_running=2)
    seqs = [make_seq([3, 4, 5], max_tokens=2 + i, arrived=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step = run_step(sched)
    assert [s for s, _ in step.prefill] == seqs[:2] and list(sched.waiting) == [seqs[2]]
    assert seqs[2].status is Status.WAITING and seqs[2].block_table == []
    steps = drive(sched)
    # seqs[0] finishes in the second step; seqs[2] takes its place in the third
    assert steps[0].decode == seqs[:2] and steps[0].prefill == []
    assert [s for s, _ in steps[1].prefill] == [seqs[2]] and steps[1].decode == [seqs[1]]
    assert all(s.handle.completion.completion_tokens == 2 + i for i, s in enumerate(seqs))


def test_admission_waits_for_blocks_and_gives_back_the_prefix_it_took(tiny_config):
    sched = make(tiny_config, 5)  # 4 usable blocks of 4 tokens
    shared = list(range(3, 11))  # 2 full blocks
    first = make_seq([*shared, 20, 21, 22, 23, 24, 25], max_tokens=3)  # 14 tokens: 4 blocks
    sched.add(first)
    run_step(sched)
    assert len(first.block_table) == 4 and sched.pool.num_available == 0
    prefix = first.block_table[:2]
    # its prefix is cached, but the rest cannot be allocated: it waits, holding nothing
    second = make_seq([*shared, 30, 31, 32], max_tokens=1)
    sched.add(second)
    step = run_step(sched)
    assert second.status is Status.WAITING and [s for s, _ in step.prefill] == []
    assert first.status is Status.RUNNING
    assert [sched.pool.ref[b] for b in prefix] == [1, 1]  # the prefix hit was handed back
    drive(sched)
    assert second.handle.completion.cached_tokens == 8  # admitted later on the cached prefix
    assert sched.pool.num_used == 0


def test_admission_takes_over_cached_prefix_blocks(tiny_config):
    sched = make(tiny_config, 32)
    system = list(range(3, 15))  # 12 tokens: 3 full blocks
    a = make_seq([*system, 40, 41], max_tokens=1)
    sched.add(a)
    step = sched.schedule()
    a_blocks = list(a.block_table)
    run_step(sched, step)
    assert a.status is Status.FINISHED and sched.pool.num_used == 0
    b = make_seq([*system, 50, 51, 52], max_tokens=1)
    sched.add(b)
    step = sched.schedule()
    assert b.block_table[:3] == a_blocks[:3]  # the system prompt's blocks, not copies
    assert b.block_table[3] != a_blocks[3] and b.num_computed == 12
    assert [(s, n) for s, n in step.prefill] == [(b, 3)]  # only what follows the prefix
    assert b.handle.completion.cached_tokens == 12
    assert sched.prompt_tokens == 14 + 15 and sched.cached_tokens == 12


def test_memory_pressure_preempts_the_youngest_running_sequence(tiny_config):
    sched = make(tiny_config, 4)  # 3 usable blocks of 4 tokens
    old, mid, young = (make_seq([3 + i] * 4, max_tokens=3, arrived=i) for i in range(3))
    for s in (mid, young, old):  # queue order is not age
        sched.add(s)
    first = run_step(sched)  # each prompt fills its one block; each samples a first token
    assert len(first.prefill) == 3 and sched.pool.num_available == 0

    # every next token needs a second block: the youngest go until one is free
    step = run_step(sched)
    assert step.decode == [old]
    assert list(sched.waiting) == [mid, young] and sched.preemptions == 2
    for s in (mid, young):
        assert s.status is Status.WAITING and s.preemptions == 1
        assert s.block_table == [] and s.num_computed == 0
    assert old.preemptions == 0 and len(old.block_table) == 2

    drive(sched)
    for s in (old, mid, young):  # recomputed after preemption, nothing lost
        assert s.handle.completion.completion_tokens == 3 and s.status is Status.FINISHED
    assert sched.prompt_tokens == 12  # a recomputed prompt is counted once


def test_the_waiting_queue_limit_raises_engine_busy(tiny_config):
    sched = make(tiny_config, 8, max_waiting=2)
    for _ in range(2):
        seq = make_seq([3, 4])
        sched.check(len(seq.token_ids))
        sched.add(seq)
    with pytest.raises(EngineBusy, match="busy"):
        sched.check(2)
    # requests accepted by the engine but not yet handed over count as well
    sched.waiting.pop()
    with pytest.raises(EngineBusy):
        sched.check(2, queued=1)
    sched.check(2, queued=0)


def test_a_prompt_the_whole_pool_cannot_hold_is_refused(tiny_config):
    sched = make(tiny_config, 4)  # 3 usable blocks: 12 tokens, the first new one included
    sched.check(11)  # 11 + 1
    with pytest.raises(HexinError, match="KV blocks") as info:
        sched.check(12)  # 12 + 1
    assert not isinstance(info.value, EngineBusy)


def test_no_block_leaks_once_every_sequence_finished(tiny_config):
    """A mixed load on a pool too small for all of it at once: shared prefixes, a session's
    cache key, preemption, queueing. Every step holds exactly the references its running
    sequences own; at the end all blocks are idle."""
    sched = make(tiny_config, 10, prefill_chunk=6, max_running=4)
    system = list(range(3, 11))
    seqs = [
        make_seq([*system, 20 + i, 21, 22][: 8 + i % 3], max_tokens=3 + 2 * i, arrived=i)
        for i in range(6)
    ]
    seqs.append(make_seq(list(range(30, 39)), max_tokens=6, arrived=6, cache_key="chat"))
    for s in seqs:
        sched.add(s)
    drive(sched)
    follow = [*seqs[-1].token_ids, 45, 46]  # the session's next turn reuses its sequence
    sched.add(make_seq(follow, max_tokens=2, arrived=7, cache_key="chat"))
    drive(sched)

    assert sched.preemptions > 0 and not sched.running and not sched.waiting
    for i, s in enumerate(seqs[:6]):
        assert s.handle.completion.completion_tokens == 3 + 2 * i
    assert sched.cached_tokens > 0
    pool = sched.pool
    assert pool.ref == [0] * pool.num_blocks
    assert pool.num_used == 0 and pool.num_available == pool.num_blocks - 1
