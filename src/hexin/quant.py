"""Linear layers over weights kept in a compact form, for memory-bound decoding.

Decoding one token reads every weight once, so its speed is set by weight bytes: fp32
weights of the default model are ~540 MB a step, its GGUF Q4_1 blocks ~96 MB. GGUF's
4-bit blocks (32 values, a scale, and for Q4_1 a minimum) map onto PyTorch's group-quantized
int4 CPU kernel, whose groups are also 32 values with a scale and a zero point, so they are
repacked value for value, not re-quantized; only the per-group scale and zero are rounded to
bf16, the kernel's activation dtype. Other weights (the Q8_0 embedding / LM head, K-quants,
fp16) go to per-row int8, whose kernel is the next fastest.

Both kernels are tuned for a few rows of activations. Prompt processing and wide batches
multiply many rows at once, where dense fp32 BLAS is faster on a CPU without AMX, so each
layer can keep its dense weight too and picks the kernel by the number of rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_SIZE = 32  # values per GGUF Q4 block and per int4 kernel group
PACK_INNER_K_TILES = 2  # the CPU packing's only supported tiling
#: Calls with more activation rows than this use a layer's dense weight when it has one:
#: measured on a 2-core AVX-512 CPU, fp32 BLAS overtakes the int4 kernel at about 8 rows.
DENSE_ABOVE_ROWS = 8


class Linear:
    """y = x @ W^T for W stored (out, in), dense in fp32 (or the model dtype)."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: Tensor) -> Tensor:
        return x @ self.weight.mT

    @property
    def nbytes(self) -> int:
        """Bytes read per call on the memory-bound path."""
        return self.weight.numel() * self.weight.element_size()


class QuantLinear(Linear):
    """A linear layer with a quantized weight for calls with few rows (decode) and,
    optionally, the dense weight for calls with many (prefill, wide batches)."""

    def __init__(self, dense: Tensor | None, out_features: int, in_features: int) -> None:
        self.weight = dense  # type: ignore[assignment]
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if self.weight is not None and rows > DENSE_ABOVE_ROWS:
            return x @ self.weight.mT
        lead = x.shape[:-1]
        y = self._quantized(x.reshape(rows, x.shape[-1]).to(torch.bfloat16))
        return y.to(x.dtype).view(*lead, self.out_features)

    def _quantized(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def refine_top(self, x: Tensor, y: Tensor, k: int = 32) -> Tensor:
        """``y`` = self(x) with its ``k`` largest outputs per row recomputed from the dense
        weight in fp32.

        The kernels return bf16, whose 8-bit mantissa rounds logits near 16 to steps of
        0.125: enough to tie or swap the two likeliest tokens and change a greedy reply.
        Recomputing the few candidates that can win costs k dot products, not a pass over
        the whole vocabulary. A no-op without a dense weight or when ``y`` came from it.
        """
        rows = x.numel() // x.shape[-1]
        if self.weight is None or rows > DENSE_ABOVE_ROWS:
            return y
        top = y.topk(min(k, y.shape[-1]), dim=-1).indices  # (..., k)
        exact = (self.weight[top] @ x.unsqueeze(-1).to(self.weight.dtype)).squeeze(-1)
        return y.scatter(-1, top, exact.to(y.dtype))


class Int4Linear(QuantLinear):
    """Group-quantized int4 weight: w = (q - 8) * scale + zero per group of 32 inputs."""

    def __init__(
        self, q: Tensor, scale: Tensor, zero: Tensor, *, dense: Tensor | None = None
    ) -> None:
        """``q`` (out, in) integers in [0, 15]; ``scale`` and ``zero`` (out, in / 32)."""
        out_features, in_features = q.shape
        if in_features % GROUP_SIZE:
            raise ValueError(f"int4 weights need inputs in groups of {GROUP_SIZE}")
        super().__init__(dense, out_features, in_features)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), PACK_INNER_K_TILES
        )
        # the kernel wants (in / 32, out, 2) in the activation dtype
        self.scales_zeros = (
            torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        )

    @classmethod
    def quantize(cls, weight: Tensor, *, keep_dense: bool = False) -> Int4Linear:
        """Round a dense weight to int4 per group of 32 (asymmetric: the group's minimum
        and maximum map to 0 and 15). Lossy, unlike a GGUF Q4 file's blocks."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
        dense = weight if keep_dense else None
        return cls(q.reshape(out_features, in_features), scale, lo + 8 * scale, dense=dense)

    def _quantized(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, GROUP_SIZE, self.scales_zeros
        )

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.nbytes


class Int8Linear(QuantLinear):
    """Per-output-row int8 weight: w = q * scale, q in [-127, 127]."""

    def __init__(self, weight: Tensor, *, keep_dense: bool = False) -> None:
        out_features, in_features = weight.shape
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        super().__init__(weight if keep_dense else None, out_features, in_features)
        self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def _quantized(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.nbytes


def concat_int4(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack (q, scale, zero) triples along the output dimension: one fused projection."""
    return tuple(torch.cat(list(xs), dim=0) for xs in zip(*parts, strict=True))  # type: ignore[return-value]
