"""The serving engine: continuous batching must not change any sequence's tokens, prefix
blocks are shared, memory pressure degrades to recomputation, cancellation frees blocks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import hexin.engine.engine
from hexin.engine import Engine, EngineBusy
from hexin.engine.blocks import BlockPool, PagedBatch
from hexin.engine.graphs import GraphedDecode, bucket
from hexin.errors import HexinError
from hexin.generate import TextStream
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)
STORY_PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Tom and Sue went to the park and saw a big tree. They",
    "A big red ball",
    "One day, a girl named Lily found a shiny stone in the garden. She",
    "The sun was hot",
    "Ben had a toy car",
    "In a small town there lived an old man who liked to sing. Every morning he",
]


@pytest.fixture(scope="module")
def story(story_model):
    return Llama(story_model.config, story_model.weights), story_model.tokenizer


@pytest.fixture(scope="module")
def smol(default_model):
    return Llama(default_model.config, default_model.weights), default_model.tokenizer


def alone(model, tok, prompt_ids, params):
    return TextStream(model, tok, prompt_ids, params).run()


def requests_16(tok):
    """16 requests of different prompt lengths and token budgets."""
    out = []
    for i in range(16):
        text = STORY_PROMPTS[i % len(STORY_PROMPTS)] + " and then" * (i // 8)
        out.append((tok.encode(text), GREEDY.with_(max_tokens=8 + 5 * i)))
    return out


def test_paged_batch_attention_equals_contiguous_cache(story):
    """The paged view gives the same logits as the contiguous cache, padding included."""
    model, tok = story
    pool = BlockPool(model.config, 32, block_size=4)
    a, b = tok.encode("Once upon a time there was a cat"), tok.encode("The dog")
    tables = [[pool.allocate() for _ in range(4)], [pool.allocate() for _ in range(2)]]
    for ids, table in ((a, tables[0]), (b, tables[1])):
        model.forward(torch.tensor([ids]), PagedBatch.of(pool, [table], [0], [len(ids)]))
    nxt = torch.tensor([[5], [9]])
    view = PagedBatch.of(pool, tables, [len(a), len(b)], [1, 1])
    batched = model.forward(nxt, view)
    for i, ids in enumerate((a, b)):
        ref = model.forward(torch.tensor([[*ids, int(nxt[i])]]), model.new_cache())[0]
        assert (batched[i] - ref).abs().max().item() < 1e-4


def test_graph_buckets_pad_batch_and_history_without_changing_logits(story):
    """The padding CUDA graphs need (batch rounded up to a power of two with rows over the
    null block, histories gathered to a power-of-two number of blocks) leaves each real
    row's logits as the exact-size step gives them. Run eagerly here (no GPU needed)."""
    model, tok = story
    pool = BlockPool(model.config, 64, block_size=4)
    prompts = [tok.encode(p) for p in STORY_PROMPTS[:3]]  # 3 rows -> a bucket of 4
    tables = []
    for ids in prompts:
        table = [pool.allocate() for _ in range(-(-(len(ids) + 1) // 4))]
        model.forward(torch.tensor([ids]), PagedBatch.of(pool, [table], [0], [len(ids)]))
        tables.append(table)
    offsets = [len(ids) for ids in prompts]
    graphs = GraphedDecode(model, pool, capture=False)
    # the same step twice writes the same K/V slots, so both paths see the same cache
    padded = graphs([5, 9, 11], tables, offsets)
    exact = model.forward(
        torch.tensor([[5], [9], [11]]), PagedBatch.of(pool, tables, offsets, [1, 1, 1])
    )
    assert padded.shape == exact.shape
    torch.testing.assert_close(padded, exact, atol=1e-4, rtol=0)
    assert bucket(3) == 4 and bucket(5, 4) == 8 and bucket(1, 4) == 4


def test_16_concurrent_requests_give_the_tokens_each_gives_alone(story):
    model, tok = story
    reqs = requests_16(tok)
    expected = [alone(model, tok, ids, p).token_ids for ids, p in reqs]
    with Engine(model, tok, EngineConfig(prefill_chunk=16)) as engine:
        handles = [engine.submit(ids, p) for ids, p in reqs]
        results = [h.result() for h in handles]
        assert engine.stats().steps < sum(len(e) for e in expected)  # batched, not serial
    assert [r.token_ids for r in results] == expected
    assert all(r.stop_reason in ("length", "eos") for r in results)


def test_penalties_bias_and_logprobs_stay_with_their_own_request(story):
    """Requests with changed logits or log-probabilities beside plain greedy ones: each
    gives what it gives alone, and the greedy ones are untouched."""
    model, tok = story
    reqs = requests_16(tok)[:8]
    special = [
        GREEDY.with_(max_tokens=20, frequency_penalty=1.5),
        GREEDY.with_(max_tokens=20, logit_bias=((tok.encode(" the")[-1], -100),)),
        SamplingParams(temperature=0.9, seed=5, max_tokens=20, repetition_penalty=1.3, min_p=0.1),
        GREEDY.with_(max_tokens=20, logprobs=3),
    ]
    reqs += [(reqs[i][0], p) for i, p in enumerate(special)]
    expected = [alone(model, tok, ids, p) for ids, p in reqs]
    with Engine(model, tok) as engine:
        results = [h.result() for h in [engine.submit(ids, p) for ids, p in reqs]]
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    for r, (_, p) in zip(results, reqs, strict=True):
        assert len(r.logprobs) == (len(r.token_ids) if p.logprobs is not None else 0)
    assert results[-1].logprobs and all(e.top[0][0] == e.token for e in results[-1].logprobs)
    assert results[8].token_ids != results[0].token_ids  # the penalty changed the reply


def test_choices_of_one_prompt_fork_its_cache(story):
    """n replies to one prompt: the prompt is computed once, each reply is what it would
    be alone, and a cancelled choice or a cancelled first choice leaves the rest going."""
    model, tok = story
    ids = tok.encode(STORY_PROMPTS[2])  # 15 tokens: no full block, so nothing is cached
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=12) for s in (1, 2, 3)]
    with Engine(model, tok, EngineConfig(block_size=16)) as engine:
        handles = engine.submit_choices(ids, params)
        results = [h.result().token_ids for h in handles]
        assert engine.stats().prefill_tokens == len(ids)
        assert results == [engine.generate(ids, p).token_ids for p in params]
        assert len({tuple(r) for r in results}) == 3
        first, second, third = engine.submit_choices(ids, params)
        first.cancel()
        second.cancel()
        assert third.result().token_ids == results[2]
        assert engine.stats().kv_blocks_used == 0


def test_concurrent_requests_on_default_model_match_alone(smol):
    model, tok = smol
    prompts = ["What is 2+2?", "Name a color.", "Write a haiku about rain.", "Say hi."]
    reqs = [
        (tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])), i)
        for i, p in enumerate(prompts)
    ]
    params = [GREEDY.with_(max_tokens=10 + 4 * i) for i in range(len(prompts))]
    expected = [alone(model, tok, ids, params[i]).token_ids for ids, i in reqs]
    with Engine(model, tok) as engine:
        handles = [engine.submit(ids, params[i]) for ids, i in reqs]
        assert [h.result().token_ids for h in handles] == expected


def test_q4_tokens_do_not_depend_on_batch_or_prefix_cache(default_model, kernel_selection):
    """The default CPU mode keeps the property the exact mode has: a request's tokens are
    the same alone, beside others (int4 decode rows are computed independently), and when
    its prompt is served from the prefix cache (prompt tokens always take the int8 path,
    whose integer sums do not depend on how many rows a call has). On every kernel
    selection."""
    model, tok = Llama.from_loaded(default_model, quant="q4"), default_model.tokenizer
    prompts = ["What is 2+2?", "Name a color.", "Write a haiku about rain.", "Say hi."]
    reqs = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    params = [GREEDY.with_(max_tokens=12), GREEDY.with_(max_tokens=16)] + [
        SamplingParams(temperature=1.0, top_p=1.0, seed=7 + i, max_tokens=14) for i in range(2)
    ]
    expected = [alone(model, tok, ids, p).token_ids for ids, p in zip(reqs, params, strict=True)]
    engine = Engine(model, tok)
    # queued before the loop starts: all four are admitted together and none finds the
    # shared system prompt in the cache by accident of timing; the cache is checked below
    handles = [engine.submit(ids, p) for ids, p in zip(reqs, params, strict=True)]
    with engine:
        assert [h.result().token_ids for h in handles] == expected
        again = engine.submit(reqs[2], params[2])  # its prompt's blocks are cached now
        assert again.result().token_ids == expected[2]
        assert again.completion.cached_tokens > 0


def test_seeded_sampling_is_independent_of_batch_neighbours(story):
    model, tok = story
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, max_tokens=30)
    ids = tok.encode("Once upon a time")
    expected = alone(model, tok, ids, params).token_ids
    with Engine(model, tok) as engine:
        noise = [engine.submit(tok.encode(p), params.with_(seed=i)) for i, p in enumerate("abc")]
        got = engine.submit(ids, params).result().token_ids
        for h in noise:
            h.result()
    assert got == expected


def test_shared_system_prompt_blocks_are_computed_once(smol):
    model, tok = smol
    system = "You are a careful assistant. " + "Answer briefly and politely. " * 100
    chats = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": q}]
            )
        )
        for q in ("Hello!", "Good morning!")
    ]
    assert len(chats[0]) > 500
    with Engine(model, tok) as engine:
        first = engine.generate(chats[0], GREEDY.with_(max_tokens=2), cache_key="a")
        computed = engine.stats().prefill_tokens
        second = engine.generate(chats[1], GREEDY.with_(max_tokens=2), cache_key="b")
        stats = engine.stats()
    bs = engine.pool.block_size
    shared = next(i for i, (x, y) in enumerate(zip(*chats, strict=False)) if x != y)
    assert first.cached_tokens == 0
    assert second.cached_tokens == shared // bs * bs >= 496
    # the second request prefilled only what follows the shared blocks
    assert stats.prefill_tokens - computed == len(chats[1]) - second.cached_tokens
    assert stats.prefix_cache_hit_rate == pytest.approx(
        second.cached_tokens / (len(chats[0]) + len(chats[1]))
    )


def test_cache_key_resumes_the_whole_previous_sequence(story):
    """A session's next turn reuses everything, the partial last block included."""
    model, tok = story
    ids = tok.encode("Once upon a time")
    with Engine(model, tok) as engine:
        turn = engine.generate(ids, GREEDY.with_(max_tokens=9), cache_key="s", cache_tail=True)
        follow = [*ids, *turn.token_ids, *tok.encode(" Then", add_bos=False)]
        nxt = engine.submit(follow, GREEDY.with_(max_tokens=5), cache_key="s").result()
    assert nxt.cached_tokens == len(ids) + len(turn.token_ids)
    assert nxt.token_ids == alone(model, tok, follow, GREEDY.with_(max_tokens=5)).token_ids


def test_pool_too_small_for_all_requests_still_completes_correctly(story):
    model, tok = story
    reqs = requests_16(tok)
    expected = [alone(model, tok, ids, p).token_ids for ids, p in reqs]
    per_block = BlockPool.bytes_per_block(model.config)
    with Engine(model, tok, EngineConfig(kv_memory=14 * per_block)) as engine:  # 13 usable blocks
        handles = [engine.submit(ids, p) for ids, p in reqs]
        results = [h.result() for h in handles]
        stats = engine.stats()
    assert [r.token_ids for r in results] == expected
    assert stats.preemptions > 0
    assert stats.kv_blocks_used == 0


class GatedLlama(Llama):
    """The story model, one forward pass per permit the test gives (``allow``): the engine
    can run only the steps a test lets it, so a test acts between steps without racing a
    fast model. Leaving the ``with`` block opens the gate, so the engine can shut down."""

    def __init__(self, loaded) -> None:
        super().__init__(loaded.config, loaded.weights)
        self.passes = 0
        self._permits = threading.Semaphore(0)

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def forward(self, *args, **kw):
        if not self._permits.acquire(timeout=60):
            raise AssertionError("the test never let this forward pass run")
        self.passes += 1
        return super().forward(*args, **kw)

    def __enter__(self) -> GatedLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.allow(1_000_000)


def test_cancel_frees_blocks_within_a_step(story_model):
    model, tok = GatedLlama(story_model), story_model.tokenizer
    with Engine(model, tok) as engine, model:
        handle = engine.submit(tok.encode("Once upon a time"), GREEDY.with_(max_tokens=400))
        model.allow(2)  # the prompt and one decode step, no more
        stream = iter(handle)
        next(stream)
        assert engine.stats().kv_blocks_used > 0  # it cannot have finished
        passes = model.passes
        handle.cancel()
        model.allow(1_000_000)  # the engine may run freely now: the cancel must stop it
        assert handle.done.wait(30)
        completion = handle.completion
        assert completion.stop_reason == "cancelled"
        # at most the step already under way when cancel() came ran after it
        assert model.passes <= passes + 1
        assert 0 < completion.completion_tokens <= model.passes
        assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


def test_consumer_leaving_early_cancels_the_request(story_model):
    model, tok = GatedLlama(story_model), story_model.tokenizer
    with Engine(model, tok) as engine, model:
        handle = engine.submit(tok.encode("The little dog"), GREEDY.with_(max_tokens=400))
        model.allow(1)  # the prompt: its first token
        for _ in handle:
            break  # the generator closes: the request is cancelled
        assert model.passes == 1
        model.allow(1_000_000)
        assert handle.done.wait(30)
        assert handle.completion.stop_reason == "cancelled"
        assert model.passes <= 2 and handle.completion.completion_tokens <= 2
        assert engine.stats().kv_blocks_used == 0


def progress_after(handle, before: tuple[int, int]) -> tuple[int, int]:
    """The handle's prefill progress once it differs from ``before`` (the engine thread
    moves it after the forward pass the test allowed)."""
    deadline = time.monotonic() + 30
    while (now := handle.prefill_progress) == before:
        assert time.monotonic() < deadline, f"prefill progress stuck at {before}"
        time.sleep(0.001)
    return now


def test_prefill_progress_moves_chunk_by_chunk_from_the_cached_prefix(story_model):
    """A long prompt's progress rises one prefill chunk per forward pass to (total,
    total); a prompt served from the prefix cache starts at its cached count."""
    model, tok = GatedLlama(story_model), story_model.tokenizer
    ids = tok.encode(" ".join(STORY_PROMPTS) * 6)
    total = len(ids)
    assert 300 < total < 450  # several chunks of 64, inside the model's 512 positions
    with Engine(model, tok, EngineConfig(prefill_chunk=64)) as engine, model:
        handle = engine.submit(ids, GREEDY.with_(max_tokens=1))
        assert handle.prefill_progress == (0, total)
        seen = [handle.prefill_progress]
        while not handle.done.is_set() and seen[-1][0] < total:
            model.allow(1)  # one prefill chunk
            seen.append(progress_after(handle, seen[-1]))
        handle.result()
        assert seen == [(done, total) for done in [*range(0, total, 64), total]]
        assert handle.prefill_progress == (total, total)

        again = engine.submit(ids, GREEDY.with_(max_tokens=1))  # its blocks are cached
        start = progress_after(again, (0, total))  # admitted: no forward pass let run yet
        model.allow(1_000_000)
        assert again.result().cached_tokens == start[0] >= total - 16
        assert start == (again.completion.cached_tokens, total)
        assert again.prefill_progress == (total, total)


def test_queue_limit_gives_busy_error_not_a_hang(story):
    model, tok = story
    engine = Engine(
        model, tok, EngineConfig(max_waiting=2)
    )  # not started: nothing leaves the queue
    ids = tok.encode("Once")
    engine.submit(ids, GREEDY.with_(max_tokens=2))
    engine.submit(ids, GREEDY.with_(max_tokens=2))
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(ids, GREEDY.with_(max_tokens=2))
    engine.shutdown()


def test_max_running_limits_the_batch(story):
    """Every step is recorded from the engine's own thread, not sampled by polling."""
    model, tok = story
    engine = Engine(model, tok, EngineConfig(max_running=3))
    handles = [engine.submit(tok.encode(p), GREEDY.with_(max_tokens=20)) for p in "abcdef"]
    schedule, batches = engine.scheduler.schedule, []

    def recorded():
        step = schedule()
        batches.append(len(engine.scheduler.running))
        return step

    engine.scheduler.schedule = recorded
    with engine:  # all six are queued before the first step
        results = [h.result() for h in handles]
    assert batches[0] == 3 and max(batches) == 3  # full batches, never more
    assert all(r.stop_reason in ("length", "eos") for r in results)


def test_bad_requests_are_refused_clearly(story):
    model, tok = story
    per_block = BlockPool.bytes_per_block(model.config)
    with Engine(model, tok, EngineConfig(kv_memory=4 * per_block)) as engine:
        with pytest.raises(HexinError, match="KV blocks"):
            engine.submit(list(range(3, 200)), GREEDY)
        with pytest.raises(HexinError, match="context limit"):
            engine.submit([1] * 600, GREEDY)
        with pytest.raises(ValueError, match="empty prompt"):
            engine.submit([], GREEDY)
        # max_tokens is bounded by the context
        c = engine.submit([1, 2, 3], GREEDY.with_(max_tokens=10_000)).result()
        assert c.completion_tokens <= 512 - 3


def test_requests_from_many_threads(story):
    model, tok = story
    ids = tok.encode("Once upon a time")
    expected = alone(model, tok, ids, GREEDY.with_(max_tokens=12)).token_ids
    results: list[list[int]] = []
    with Engine(model, tok) as engine:

        def client() -> None:
            results.append(engine.generate(ids, GREEDY.with_(max_tokens=12)).token_ids)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [expected] * 6


class FailingSampler(Sampler):
    """A sampler that breaks on its third draw: a stand-in for any fault in one
    sequence's own postprocessing."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu", prompt=()):
        super().__init__(params, device, prompt)
        self.draws = 0

    def __call__(self, logits: torch.Tensor) -> int:
        self.draws += 1
        if self.draws == 3:
            raise RuntimeError("sampler fault")
        return super().__call__(logits)


def test_a_failing_sequence_ends_alone_and_the_batch_goes_on(story, monkeypatch):
    """One sequence's sampling fault ends that request with its error; its three batch
    neighbours finish with the tokens each gives alone, and the engine keeps serving."""
    model, tok = story
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=24)
    poison = sampled.with_(seed=666)
    real = hexin.engine.engine.Sampler

    def make(params: SamplingParams, device: torch.device | str = "cpu", prompt=()) -> Sampler:
        return (FailingSampler if params.seed == 666 else real)(params, device, prompt)

    monkeypatch.setattr(hexin.engine.engine, "Sampler", make)
    jobs = [
        (tok.encode(STORY_PROMPTS[0]), GREEDY.with_(max_tokens=24)),
        (tok.encode(STORY_PROMPTS[1]), sampled),
        (tok.encode(STORY_PROMPTS[2]), poison),
        (tok.encode(STORY_PROMPTS[3]), GREEDY.with_(max_tokens=24)),
    ]
    with Engine(model, tok) as engine:
        handles = [engine.submit(ids, params) for ids, params in jobs]
        results = []
        for handle in handles:
            try:
                results.append(handle.result())
            except RuntimeError as e:
                results.append(e)
        assert isinstance(results[2], RuntimeError) and "sampler fault" in str(results[2])
        for (ids, params), c in zip(jobs, results, strict=True):
            if params is not poison:
                assert c.token_ids == alone(model, tok, ids, params).token_ids
        assert engine.stats().kv_blocks_used == 0
        again = engine.generate(jobs[0][0], GREEDY.with_(max_tokens=24))
        assert again.token_ids == results[0].token_ids


def test_a_tiny_temperature_samples_like_greedy_beside_others(story):
    """temperature=1e-40 is valid; it divides logits stably and picks the top token, so
    it neither fails nor harms the requests batched with it."""
    model, tok = story
    ids = [tok.encode(p) for p in STORY_PROMPTS[:4]]
    tiny = SamplingParams(temperature=1e-40, max_tokens=16, seed=1)
    with Engine(model, tok) as engine:
        handles = [engine.submit(i, tiny if n == 0 else GREEDY.with_(max_tokens=16))
                   for n, i in enumerate(ids)]  # fmt: skip
        results = [h.result() for h in handles]
    for i, c in zip(ids, results, strict=True):
        assert c.token_ids == alone(model, tok, i, GREEDY.with_(max_tokens=16)).token_ids


def test_16_seeded_q4_requests_give_the_tokens_each_gives_alone(default_model, kernel_selection):
    """The default CPU mode, sampled and seeded, batched 16 at a time as requests come and
    go: each request's tokens are those it gives alone ("The sky is" among them, which once
    changed its words beside two other requests). On every kernel selection."""
    model, tok = Llama.from_loaded(default_model, quant="q4"), default_model.tokenizer
    texts = ["The sky is"] + [f"{p} Then" for p in STORY_PROMPTS] + STORY_PROMPTS[:7]
    jobs = [
        (tok.encode(text), SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i,
                                          max_tokens=6 + 2 * i))
        for i, text in enumerate(texts)
    ]  # fmt: skip
    expected = [alone(model, tok, ids, params).token_ids for ids, params in jobs]
    with Engine(model, tok) as engine:
        handles = [engine.submit(ids, params) for ids, params in jobs]
        assert [h.result().token_ids for h in handles] == expected
        assert engine.stats().cached_tokens == 0  # nothing came from the prefix cache
