"""KV memory as a pool of fixed-size blocks shared by every sequence.

Each sequence owns a block table (its blocks in order). A full block is identified by a
digest of all tokens up to its end, so two sequences with the same prefix (a shared system
prompt, a branched conversation, a repeated API prompt) find and share its blocks,
ref-counted. Blocks nobody references keep their contents and stay findable until memory
is needed: the prefix cache costs nothing until the pool is full, then the least recently
used go first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hexin import native, ops
from hexin.config import ModelConfig
from hexin.errors import HexinError

NULL_BLOCK = 0  # never allocated: padding rows of a batch write here and read nothing


class OutOfBlocks(HexinError):
    """The pool has no free or evictable block left."""


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """Identity of a full block: its tokens and (through ``parent``) everything before."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


@dataclass
class Retained:
    """Blocks left behind by a finished sequence of a cache key (a chat session), so its
    next request can resume exactly where the last one ended, partial block included."""

    token_ids: list[int]
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (block, generation)


class BlockPool:
    """Keys and values of shape (layers, blocks, block_size, K, D), plus the bookkeeping:
    free list, reference counts, the digest index of full blocks, and an LRU of idle
    blocks whose contents may still be reused."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # zeros, not empty: padding reads must be finite, since 0 * NaN would poison a row
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.ref = [0] * num_blocks
        self.generation = [0] * num_blocks  # bumped on reallocation: stale Retained entries
        self.digest_of: dict[int, bytes] = {}
        self.by_digest: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(1, num_blocks))
        self.idle: OrderedDict[int, None] = OrderedDict()  # ref 0, contents kept, LRU first
        self.retained: OrderedDict[str, Retained] = OrderedDict()

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int = 16, dtype: torch.dtype = torch.float32
    ) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem
        return per_token * block_size

    # -- counts -------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now (free, or idle and evictable)."""
        return len(self.free) + len(self.idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_available

    # -- allocation ---------------------------------------------------------------------
    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            self._forget(block)
        else:
            raise OutOfBlocks("KV block pool exhausted")
        self.ref[block] = 1
        self.generation[block] += 1
        return block

    def incref(self, block: int) -> None:
        if self.ref[block] == 0:
            self.idle.pop(block, None)
        self.ref[block] += 1

    def decref(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.idle[block] = None  # keep contents for reuse until memory is needed

    def _forget(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None and self.by_digest.get(digest) == block:
            del self.by_digest[digest]

    def register(self, block: int, digest: bytes) -> None:
        """Index a block that has just become full under its prefix digest."""
        if digest not in self.by_digest:
            self.by_digest[digest] = block
            self.digest_of[block] = digest

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy-on-write: the first ``n`` slots of ``src`` into ``dst``."""
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]

    # -- prefix matching ----------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], cache_key: str | None) -> tuple[list[int], int]:
        """Blocks holding the longest cached prefix of ``token_ids`` (their refs taken) and
        its length in tokens, capped below the whole prompt (the last prompt token must be
        run to get logits). A trailing partial block is copied into a fresh block, so a
        sequence never writes into a block another one can read."""
        bs, limit = self.block_size, len(token_ids) - 1
        # full blocks found by digest
        matched: list[int] = []
        parent = b""
        for start in range(0, limit - bs + 1, bs):
            parent = block_digest(parent, token_ids[start : start + bs])
            block = self.by_digest.get(parent)
            if block is None:
                break
            matched.append(block)
        length = len(matched) * bs
        # the cache key's own previous sequence may reach further (partial block included)
        kept = self.retained.get(cache_key) if cache_key else None
        if kept is not None:
            common = 0
            for a, b in zip(kept.token_ids, token_ids[:limit], strict=False):
                if a != b:
                    break
                common += 1
            alive = 0
            for block, gen in kept.blocks:
                if self.generation[block] != gen:
                    break
                alive += 1
            common = min(common, alive * bs)
            if common > length:
                matched, length = [b for b, _ in kept.blocks[: -(-common // bs)]], common
        full = length // bs
        for block in matched[:full]:
            self.incref(block)
        table = matched[:full]
        if length % bs:
            fresh = self.allocate()
            self.copy_prefix(matched[full], fresh, length % bs)
            table.append(fresh)
        return table, length

    def retain(self, cache_key: str, token_ids: list[int], table: list[int]) -> None:
        """Remember a finished sequence's blocks under its cache key (LRU, bounded)."""
        self.retained.pop(cache_key, None)
        self.retained[cache_key] = Retained(
            list(token_ids), [(b, self.generation[b]) for b in table]
        )
        while len(self.retained) > 4 * self.num_blocks:
            self.retained.popitem(last=False)


class PagedBatch:
    """The KV view of a batch of sequences for one forward step, in the interface the model
    expects of a cache (``offsets``, ``padded``, ``reserve``, ``update``, ``advance``).

    ``update`` scatters the step's keys and values into each sequence's slots and gathers
    each sequence's history, right-padded to ``width`` tokens; the causal mask with
    per-sequence offsets hides the padding. Built from tensors already on the pool's
    device with torch ops only, so a CUDA graph can capture it (see ``graphs``).
    """

    def __init__(
        self,
        pool: BlockPool,
        table: Tensor,
        offsets: Tensor,
        width: int,
        lengths: list[int] | None = None,
    ) -> None:
        """``table`` (B, W) block ids (NULL_BLOCK past a sequence's own), ``offsets`` (B,)
        tokens cached before the step, ``width`` positions gathered per sequence
        (<= W * block size), ``lengths`` new tokens per row of the step's (B, T) tokens
        (``None``: one each, a decode step)."""
        self.pool = pool
        bs = pool.block_size
        dev = table.device
        t_max = max(lengths) if lengths else 1
        self._table, self._blocks, self._width = table, table.flatten(), width
        self._batch_shape = (table.shape[0], table.shape[1] * bs)
        steps = torch.arange(t_max, device=dev)
        if lengths is None:
            valid = torch.ones(table.shape[0], 1, dtype=torch.bool, device=dev)
        else:
            valid = steps < torch.tensor(lengths, device=dev).unsqueeze(1)
        new_pos = torch.where(valid, offsets.unsqueeze(1) + steps, 0)  # (B, T)
        scatter = table.gather(1, new_pos // bs) * bs + new_pos % bs
        # padding rows write the null block, which no sequence reads unmasked
        self._scatter = torch.where(valid, scatter, NULL_BLOCK * bs).flatten()
        self._offsets = offsets
        self.padded = True

    @classmethod
    def of(
        cls, pool: BlockPool, tables: list[list[int]], offsets: list[int], lengths: list[int]
    ) -> PagedBatch:
        """The view for sequences given as Python lists, gathered to the longest one (for
        a decode step, to whole ``ops.KEY_GROUP``s of keys: see ``ops.key_width``)."""
        bs = pool.block_size
        l_max = max(o + n for o, n in zip(offsets, lengths, strict=True))
        width = ops.key_width(l_max) if all(n == 1 for n in lengths) else l_max
        blocks = -(-width // bs)
        table = torch.full((len(tables), blocks), NULL_BLOCK, dtype=torch.long)
        for i, row in enumerate(tables):
            table[i, : len(row)] = torch.tensor(row[:blocks], dtype=torch.long)
        device = pool.k.device
        view = cls(pool, table.to(device), torch.tensor(offsets, device=device), width, lengths)
        # a single sequence gathered exactly to its own keys has nothing to mask
        view.padded = len(tables) > 1 or width != l_max
        return view

    @property
    def offsets(self) -> Tensor:
        return self._offsets

    def reserve(self, num_new: int) -> None:
        """Blocks were allocated by the scheduler before the step."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kf = self.pool.k[layer].flatten(0, 1)  # (blocks * block_size, K, D)
        vf = self.pool.v[layer].flatten(0, 1)
        kf.index_copy_(0, self._scatter, k.flatten(0, 1).to(kf.dtype))
        vf.index_copy_(0, self._scatter, v.flatten(0, 1).to(vf.dtype))
        # whole blocks, each one contiguous run of memory: copies at memcpy speed
        shape = (*self._batch_shape, *kf.shape[1:])
        keys = self.pool.k[layer].index_select(0, self._blocks).view(shape)
        values = self.pool.v[layer].index_select(0, self._blocks).view(shape)
        return keys[:, : self._width], values[:, : self._width]

    def slots(self) -> native.Slots:
        """The pool's slots for the native decode kernel (see ``native.Slots``)."""
        pool = self.pool
        return native.Slots(
            self._table, pool.block_size, pool.k.flatten(1, 2), pool.v.flatten(1, 2)
        )

    def advance(self, tokens: Tensor) -> None:
        """The scheduler moves each sequence's counters after the step."""
