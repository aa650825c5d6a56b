"""Decode steps replayed from CUDA graphs.

A decode step of a small model launches a few hundred small kernels; a GPU finishes each
faster than the host can launch the next, so eager decoding runs at the host's pace. A CUDA
graph records one step's launches once and replays them with a single call. Shapes must be
fixed for a recording, so steps are padded up to a bucket: the batch to a power of two
(padding rows read and write only the null block) and each sequence's gathered history to
a power-of-two number of blocks (positions past a sequence's own are masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hexin.engine.blocks import NULL_BLOCK, BlockPool, PagedBatch
from hexin.model import Llama


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= n (at least ``smallest``)."""
    size = smallest
    while size < n:
        size *= 2
    return size


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: Tensor  # (B, 1) inputs the graph reads
    table: Tensor  # (B, W)
    offsets: Tensor  # (B,)
    logits: Tensor  # (B, V) the graph's output


class GraphedDecode:
    """Runs decode steps of ``model`` over ``pool`` through CUDA graphs captured lazily, one
    per (batch bucket, width bucket). The engine's ``max_running`` bounds the batch, so the
    number of graphs stays small."""

    def __init__(self, model: Llama, pool: BlockPool, *, capture: bool = True) -> None:
        """``capture=False`` runs the same padded steps eagerly: how the CPU test suite
        checks the bucketing without a GPU."""
        self.model, self.pool = model, pool
        self.capture = capture
        self.max_blocks = -(-model.context // pool.block_size)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, tokens: list[int], tables: list[list[int]], offsets: list[int]) -> Tensor:
        """Logits (B, V) for one new token per sequence."""
        b = len(tokens)
        blocks = max(len(t) for t in tables)
        rows, width = bucket(b), min(bucket(blocks, 4), self.max_blocks)
        table = [row + [NULL_BLOCK] * (width - len(row)) for row in tables]
        table += [[NULL_BLOCK] * width] * (rows - b)
        padding = [0] * (rows - b)  # token 0 at offset 0 over null blocks only
        inputs = (
            torch.tensor(tokens + padding).unsqueeze(1),
            torch.tensor(table),
            torch.tensor(offsets + padding),
        )
        if not self.capture:
            dev = self.model.device
            return self._step(*(x.to(dev) for x in inputs))[:b]
        g = self._graphs.get((rows, width)) or self._capture(rows, width)
        for static, value in zip((g.tokens, g.table, g.offsets), inputs, strict=True):
            static.copy_(value, non_blocking=True)
        g.graph.replay()
        return g.logits[:b]

    def _step(self, tokens: Tensor, table: Tensor, offsets: Tensor) -> Tensor:
        width = table.shape[1] * self.pool.block_size
        return self.model.forward(tokens, PagedBatch(self.pool, table, offsets, width))

    def _capture(self, batch: int, width: int) -> _Graph:
        dev = self.model.device
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        table = torch.full((batch, width), NULL_BLOCK, dtype=torch.long, device=dev)
        offsets = torch.zeros(batch, dtype=torch.long, device=dev)

        def step() -> Tensor:
            return self._step(tokens, table, offsets)

        # warm up on a side stream (lazy initialisations must not land in the graph);
        # every row points at the null block, so nothing real is written
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = step()
        captured = _Graph(graph, tokens, table, offsets, logits)
        self._graphs[(batch, width)] = captured
        return captured
