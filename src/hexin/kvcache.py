"""Per-sequence key/value cache.

The model talks to a cache through ``offsets`` (tokens already cached, per sequence),
``padded`` (whether the keys it returns carry padding to mask), ``reserve(n)`` (room for
this step), ``update(layer, k, v)`` (store this step's keys and values, return everything
attention must see) and ``advance(tokens)`` once all layers are done. Any layout that
provides them (this contiguous one, or a paged block pool shared by many sequences) plugs in
without touching the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from hexin import native, ops
from hexin.config import ModelConfig


class KVView(Protocol):
    """What the model needs of a cache for one forward step."""

    @property
    def offsets(self) -> Tensor: ...

    #: whether ``update`` may return keys past a sequence's own (right padding), which
    #: attention must then mask even for a single query token
    padded: bool

    def reserve(self, num_new: int) -> None: ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def advance(self, tokens: Tensor) -> None: ...


class KVCache:
    """Contiguous cache of one sequence: keys and values of shape (layers, capacity, K, D).

    Capacity grows by doubling up to ``max_tokens``, so a short chat does not reserve the
    model's whole context up front.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial_capacity: int = 256,
    ) -> None:
        self.num_layers = config.num_layers
        self.max_tokens = max_tokens or config.max_position_embeddings
        self._shape = (config.num_kv_heads, config.head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.length = 0
        self.padded = False  # set by each update: a decode step's keys are padded
        self._alloc(min(initial_capacity, self.max_tokens))

    def _alloc(self, capacity: int) -> None:
        # room for a decode step's whole key groups (zeros past the length, masked)
        shape = (self.num_layers, ops.key_width(capacity), *self._shape)
        k = torch.zeros(shape, dtype=self._dtype, device=self._device)
        v = torch.zeros(shape, dtype=self._dtype, device=self._device)
        if hasattr(self, "k"):
            k[:, : self.length] = self.k[:, : self.length]
            v[:, : self.length] = self.v[:, : self.length]
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def __len__(self) -> int:
        return self.length

    @property
    def offsets(self) -> Tensor:
        """Cached tokens before this step's queries, one per sequence in the batch (here 1)."""
        return torch.tensor([self.length], device=self._device)

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more tokens, or refuse beyond ``max_tokens``."""
        need = self.length + num_new
        if need > self.max_tokens:
            raise ValueError(
                f"sequence of {need} tokens exceeds the context limit of {self.max_tokens}"
            )
        if need > self.capacity:
            capacity = self.capacity
            while capacity < need:
                capacity *= 2
            self._alloc(min(capacity, self.max_tokens))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v of shape (1, T, K, D) after the cached tokens of ``layer``; return the
        layer's keys and values so far, (1, length + T, K, D), or for a decode step (T = 1)
        padded to whole key groups as the engine's batches are (``ops.key_width``), so a
        sequence decodes to the same result alone and batched."""
        t = k.shape[-3]
        end = self.length + t
        self.k[layer, self.length : end] = k[0]
        self.v[layer, self.length : end] = v[0]
        width = ops.key_width(end) if t == 1 else end
        self.padded = width != end
        return self.k[layer, :width].unsqueeze(0), self.v[layer, :width].unsqueeze(0)

    def slots(self) -> native.Slots:
        """Where the native decode kernel finds and puts keys and values: one block of the
        whole capacity."""
        table = torch.zeros(1, 1, dtype=torch.int64)
        return native.Slots(table, self.capacity, self.k, self.v)

    def advance(self, tokens: Tensor) -> None:
        """Count this step's tokens (1, T) as cached, after every layer has stored them."""
        self.length += tokens.shape[-1]
