"""The KV block pool and the paged batch view, without a model: reference counts, the
prefix index, eviction of idle blocks, copy-on-write of a partial block, and where a
step's keys and values land and are gathered from."""

from __future__ import annotations

import pytest
import torch

from hexin import ops
from hexin.engine.blocks import NULL_BLOCK, BlockPool, OutOfBlocks, PagedBatch, block_digest


def digests(tokens: list[int], bs: int) -> list[bytes]:
    """The chained digest of each full block of ``tokens``."""
    out, parent = [], b""
    for start in range(0, len(tokens) - bs + 1, bs):
        parent = block_digest(parent, tokens[start : start + bs])
        out.append(parent)
    return out


def cached_sequence(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Blocks for ``tokens`` as the scheduler leaves them: allocated (ref 1), every full
    block registered under its digest, the keys filled with recognisable values."""
    bs = pool.block_size
    table = [pool.allocate() for _ in range(-(-len(tokens) // bs))]
    for block, digest in zip(table, digests(tokens, bs), strict=False):
        pool.register(block, digest)
    for block in table:
        pool.k[:, block] = float(block) + torch.arange(bs, dtype=torch.float32).view(1, bs, 1, 1)
    return table


# -- BlockPool ------------------------------------------------------------------------------
def test_block_digest_covers_the_tokens_their_order_and_everything_before():
    a = block_digest(b"", [1, 2, 3, 4])
    assert len(a) == 16 and a == block_digest(b"", [1, 2, 3, 4])
    assert a != block_digest(b"", [2, 1, 3, 4])
    assert a != block_digest(b"", [1, 2, 3, 4 + 256])  # token ids beyond one byte count
    assert block_digest(a, [5, 6, 7, 8]) != block_digest(b"", [5, 6, 7, 8])


def test_allocation_never_hands_out_the_null_block_and_counts_add_up(tiny_config):
    pool = BlockPool(tiny_config, 5, block_size=4)
    assert pool.k.shape == (2, 5, 4, 1, 4) and pool.num_available == 4 and pool.num_used == 0
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [1, 2, 3, 4] and NULL_BLOCK not in blocks
    assert [pool.ref[b] for b in blocks] == [1] * 4
    assert pool.num_used == 4 and pool.num_available == 0
    with pytest.raises(OutOfBlocks):
        pool.allocate()
    assert BlockPool.bytes_per_block(tiny_config, 4) == 2 * 2 * 1 * 4 * 4 * 4
    with pytest.raises(ValueError):
        BlockPool(tiny_config, 1)


def test_reference_counts_and_idle_blocks(tiny_config):
    pool = BlockPool(tiny_config, 4, block_size=4)
    b = pool.allocate()
    pool.incref(b)
    pool.decref(b)
    assert pool.ref[b] == 1 and b not in pool.idle and pool.num_used == 1
    pool.decref(b)  # nobody holds it: idle, contents kept, available again
    assert pool.ref[b] == 0 and b in pool.idle and pool.num_used == 0
    assert pool.num_available == 3
    pool.incref(b)  # taken back (a prefix hit) before anyone evicted it
    assert pool.ref[b] == 1 and b not in pool.idle and pool.num_used == 1


def test_free_blocks_go_before_idle_ones(tiny_config):
    """The prefix cache costs nothing until the pool is full."""
    pool = BlockPool(tiny_config, 4, block_size=4)
    (a,) = cached_sequence(pool, [1, 2, 3, 4])
    pool.decref(a)
    fresh = [pool.allocate(), pool.allocate()]
    assert a not in fresh and pool.by_digest == {digests([1, 2, 3, 4], 4)[0]: a}


def test_idle_blocks_are_evicted_least_recently_used_first_and_forgotten(tiny_config):
    pool = BlockPool(tiny_config, 4, block_size=4)
    seqs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    (a,), (b,), (c,) = (cached_sequence(pool, s) for s in seqs)
    for block in (b, a, c):
        pool.decref(block)
    pool.incref(b)  # b used again: now the most recently released
    pool.decref(b)
    assert list(pool.idle) == [a, c, b] and not pool.free

    assert pool.allocate() == a
    assert a not in pool.digest_of and digests(seqs[0], 4)[0] not in pool.by_digest
    assert pool.generation[a] == 2
    assert pool.match_prefix([*seqs[0], 99], None) == ([], 0)  # forgotten
    table, length = pool.match_prefix([*seqs[1], 99], None)  # b's contents are still found
    assert (table, length) == ([b], 4) and pool.ref[b] == 1

    assert pool.allocate() == c  # b is held now; c is the only idle block left
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_match_prefix_shares_full_blocks_by_their_chained_digest(tiny_config):
    pool = BlockPool(tiny_config, 16, block_size=4)
    tokens = list(range(10, 20))  # two full blocks and a partial one
    table = cached_sequence(pool, tokens)
    assert len(table) == 3 and len(pool.by_digest) == 2

    shared, length = pool.match_prefix([*tokens[:8], 50, 51], None)
    assert shared == table[:2] and length == 8
    assert [pool.ref[b] for b in table] == [2, 2, 1]  # the partial block is never shared
    for block in shared:
        pool.decref(block)

    # the whole prompt is never matched: its last token must run to give logits
    shared, length = pool.match_prefix(tokens[:8], None)
    assert shared == table[:1] and length == 4
    pool.decref(shared[0])
    # a block with the same tokens after a different prefix is another block
    assert pool.match_prefix([*range(30, 34), *tokens[4:8], 1], None) == ([], 0)
    assert pool.match_prefix([*tokens[:3], 0, *tokens[4:8], 1], None) == ([], 0)
    assert [pool.ref[b] for b in table] == [1, 1, 1]


def test_retained_partial_block_is_copied_before_anyone_writes_to_it(tiny_config):
    pool = BlockPool(tiny_config, 8, block_size=4)
    tokens = [5, 6, 7, 8, 9, 10]  # one full block, two tokens in the second
    full, partial = cached_sequence(pool, tokens)
    pool.v[:, partial] = -pool.k[:, partial]
    pool.retain("chat", tokens, [full, partial])
    pool.decref(full)
    pool.decref(partial)
    before_k, before_v = pool.k[:, partial].clone(), pool.v[:, partial].clone()

    table, length = pool.match_prefix([*tokens, 11, 12], "chat")
    assert length == 6 and table[0] == full and table[1] not in (full, partial, NULL_BLOCK)
    fresh = table[1]
    assert pool.ref[full] == 1 and pool.ref[fresh] == 1 and pool.ref[partial] == 0
    torch.testing.assert_close(pool.k[:, fresh, :2], before_k[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(pool.v[:, fresh, :2], before_v[:, :2], rtol=0, atol=0)
    assert not pool.k[:, fresh, 2:].any()  # only the first n slots are copied
    torch.testing.assert_close(pool.k[:, partial], before_k, rtol=0, atol=0)  # source intact
    # another cache key, or none, finds only the full block
    assert pool.match_prefix([*tokens, 11, 12], "other")[1] == 4


def test_retained_blocks_reallocated_since_are_not_trusted(tiny_config):
    pool = BlockPool(tiny_config, 4, block_size=4)
    tokens = list(range(1, 10))  # blocks: full, full, partial (1 token)
    table = cached_sequence(pool, tokens)
    pool.retain("chat", tokens, table)
    for block in reversed(table):  # the last block becomes the least recently used
        pool.decref(block)
    assert pool.allocate() == table[2]  # reused by someone else: its generation moved on
    got, length = pool.match_prefix([*tokens, 42], "chat")
    assert got == table[:2] and length == 8  # the retained entry stops at the stale block


def test_retained_entries_are_bounded(tiny_config):
    pool = BlockPool(tiny_config, 2, block_size=4)
    for i in range(10):
        pool.retain(f"k{i}", [i], [])
    assert list(pool.retained) == [f"k{i}" for i in range(2, 10)]  # 4 * num_blocks, LRU out


# -- PagedBatch -----------------------------------------------------------------------------
def step_values(b: int, t: int, seed: int) -> torch.Tensor:
    """Distinct keys (B, T, K=1, D=4) for a step, each row recognisable."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 1, 4, generator=g)


def test_scatter_lands_at_block_times_size_plus_position_and_padding_hits_the_null_block(
    tiny_config,
):
    pool = BlockPool(tiny_config, 8, block_size=4)
    # row 0: 5 tokens cached in blocks [3, 1], 2 new at positions 5, 6 (block 1, slots 1, 2)
    # row 1: 1 token cached in block [2], 1 new at position 1; its second step row is padding
    view = PagedBatch.of(pool, [[3, 1], [2]], [5, 1], [2, 1])
    k, v = step_values(2, 2, 0), step_values(2, 2, 1)
    pool.k[1].fill_(7.0)
    keys, values = view.update(0, k, v)
    assert torch.equal(pool.k[0, 1, 1], k[0, 0]) and torch.equal(pool.k[0, 1, 2], k[0, 1])
    assert torch.equal(pool.v[0, 1, 2], v[0, 1])
    assert torch.equal(pool.k[0, 2, 1], k[1, 0]) and torch.equal(pool.v[0, 2, 1], v[1, 0])
    assert torch.equal(pool.k[0, NULL_BLOCK, 0], k[1, 1])  # the padding row
    written = {(1, 1), (1, 2), (2, 1), (NULL_BLOCK, 0)}
    for block in range(8):
        for slot in range(4):
            if (block, slot) not in written:
                assert not pool.k[0, block, slot].any(), (block, slot)
    assert (pool.k[1] == 7.0).all()  # other layers untouched

    # gathered to the longest row (7 positions), the shorter row right-padded
    assert keys.shape == values.shape == (2, 7, 1, 4)
    assert torch.equal(keys[0, :4], pool.k[0, 3]) and torch.equal(keys[0, 4:], pool.k[0, 1, :3])
    assert torch.equal(keys[1, :2], pool.k[0, 2, :2]) and torch.equal(keys[1, 1], k[1, 0])
    assert torch.equal(keys[1, 4:], pool.k[0, NULL_BLOCK, :3])  # past its table: null block
    assert torch.equal(values[0, 6], v[0, 1])
    assert view.padded and view.offsets.tolist() == [5, 1]


def test_decode_view_writes_each_row_at_its_offset(tiny_config):
    """The constructor's own decode form (``lengths`` None), as the CUDA graphs use it,
    with a history width larger than any row needs."""
    pool = BlockPool(tiny_config, 8, block_size=4)
    table = torch.tensor([[4, 6], [5, NULL_BLOCK], [NULL_BLOCK, NULL_BLOCK]])
    offsets = torch.tensor([4, 3, 0])  # row 2 is a padding row of a bucketed batch
    view = PagedBatch(pool, table, offsets, width=8)
    k = step_values(3, 1, 2)
    keys, _ = view.update(1, k, k)
    assert torch.equal(pool.k[1, 6, 0], k[0, 0])  # position 4: second block, slot 0
    assert torch.equal(pool.k[1, 5, 3], k[1, 0])  # position 3: first block, slot 3
    assert torch.equal(pool.k[1, NULL_BLOCK, 0], k[2, 0])
    assert keys.shape == (3, 8, 1, 4) and torch.equal(keys[0, 4], k[0, 0])


def test_single_sequence_view_is_not_padded(tiny_config):
    pool = BlockPool(tiny_config, 8, block_size=4)
    view = PagedBatch.of(pool, [[1, 2]], [0], [6])
    keys, _ = view.update(0, step_values(1, 6, 3), step_values(1, 6, 4))
    assert not view.padded and keys.shape == (1, 6, 1, 4)


def test_offsets_mask_the_padding_attention_equals_each_row_alone(tiny_config):
    """The causal mask built from the view's offsets hides a shorter row's padding: batched
    attention over the gathered keys equals attention over each row's own keys."""
    pool = BlockPool(tiny_config, 16, block_size=4)
    lengths = [7, 2, 4]  # tokens cached per row
    tables = [[1, 2, 5], [3], [4, 6]]  # room for the history and the step's 2 new tokens
    for table, n in zip(tables, lengths, strict=True):  # fill each row's history
        kv = step_values(1, n, n), step_values(1, n, 100 + n)
        PagedBatch.of(pool, [table], [0], [n]).update(0, *kv)
    pool.k[0, NULL_BLOCK] = 1e3  # padding that would dominate if it were not masked
    pool.v[0, NULL_BLOCK] = 1e3
    new = 2
    view = PagedBatch.of(pool, tables, lengths, [new] * 3)
    k, v = step_values(3, new, 10), step_values(3, new, 11)
    keys, values = view.update(0, k, v)
    q = step_values(3, new * 2, 12).view(3, new, 2, 4)  # 2 query heads on the 1 KV head
    batched = ops.fused_attention(q, keys, values, view.offsets, padded=view.padded)
    mask = ops.causal_mask(new, keys.shape[1], view.offsets.view(3, 1))
    for i, n in enumerate(lengths):
        assert mask[i].sum().item() == new * n + new * (new + 1) // 2  # own keys only
        own = n + new
        alone = ops.fused_attention(q[i], keys[i, :own], values[i, :own], n, padded=False)
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
        assert batched[i].abs().max() < 100  # no padding leaked in
