"""Linear layers over weights kept in a compact form.

Decoding one token reads every weight once, so its speed is set by weight bytes: fp32
weights of the default model are ~540 MB a step, its GGUF Q4_1 blocks ~96 MB. GGUF's
4-bit blocks (32 values, a scale, and for Q4_1 a minimum) map onto PyTorch's group-quantized
int4 CPU kernel, whose groups are also 32 values with a scale and a zero point, so they are
repacked value for value, not re-quantized; only the per-group scale and zero are rounded to
bf16, the kernel's activation dtype.

Many rows at once (a prompt, a wide decode batch) are compute-bound instead, and the int4
kernel does not scale with rows. There the fastest CPU path is integer arithmetic: weights
rounded to int8 per output row, each activation row rounded to int8 on the fly, and an
int8 x int8 -> int32 matrix product (VNNI), measured at about 4x fp32 BLAS on a 2-core
AVX-512 machine; where the CPU has AMX, hexin's own kernel runs the same sums on its tiles
(``native.AmxWeight``), rounding, products and scaling in one call, bitwise the same result
at about twice the speed. The int8 copy is also what the LM head and other non-Q4 matrices
use.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch
from torch import Tensor

from hexin import cpu, native, ops

log = logging.getLogger(__name__)

GROUP_SIZE = 32  # values per GGUF Q4 block and per int4 kernel group
PACK_INNER_K_TILES = 2  # the CPU packing's only supported tiling


class Linear:
    """y = x @ W^T for W stored (out, in), dense in the model dtype."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: Tensor, *, prompt: bool = False) -> Tensor:
        """``prompt``: the rows are prompt tokens, not decode steps (see ``Int4Linear``)."""
        return ops.matmul_transb(x, self.weight)

    @property
    def nbytes(self) -> int:
        """Bytes of weights one call reads."""
        return self.weight.numel() * self.weight.element_size()

    def refine_top(self, x: Tensor, y: Tensor) -> Tensor:
        """Outputs ``y`` = self(x), made exact where a quantized kernel rounded them (see
        ``Int8Linear.refine_top``); dense outputs are already."""
        return y


class Int8Linear(Linear):
    """Per-output-row int8 weight (w = q * scale, q in [-127, 127]) multiplied by
    per-row int8 activations in integers: x @ W^T = (xq @ q^T) * sx * scale."""

    def __init__(self, weight: Tensor, *, terms: int = 2) -> None:
        """``terms``: int8 terms per activation row (see ``_int8_matmul_eager``); one is
        enough for an LM head, whose likeliest outputs ``refine_top`` recomputes. The
        integer weight is kept in the form this CPU's kernel takes (``int_mm``)."""
        self.out_features, self.in_features = weight.shape
        self.terms = terms
        w = weight.float()
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / self.scale[:, None]).to(torch.int8).contiguous()
        kernel = cpu.int8_kernel()
        kernels = native.kernels() if kernel == "amx" else None
        self.amx: native.AmxWeight | None = None
        if kernels is not None and kernels.amx and native.AmxWeight.fits(*q.shape):
            self.kernels, self.amx = kernels, native.AmxWeight(q, self.scale)
            self.q = q[:0]  # the packed copy is the weight now
        else:
            self.q = q if kernel in ("amx", "vnni") else q.float()

    def __call__(self, x: Tensor, *, prompt: bool = False) -> Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1]).float()
        if self.amx is not None:
            y = self.kernels.amx_linear(self.amx, x2, terms=self.terms)
        else:
            matmul = _int8_matmul if self.terms == 2 else _int8_matmul_one_term
            y = matmul(x2, self.q, self.scale)
        return y.to(x.dtype).view(*lead, self.out_features)

    @property
    def nbytes(self) -> int:
        if self.amx is not None:
            return self.amx.nbytes
        return self.q.numel() * self.q.element_size() + self.scale.nbytes

    def rows(self, index: Tensor) -> Tensor:
        """Dequantized fp32 rows ``index`` of the weight (exactly what the kernel uses)."""
        q = self.amx.rows(index) if self.amx is not None else self.q[index]
        return q.float() * self.scale[index].unsqueeze(-1)

    def refine_top(self, x: Tensor, y: Tensor, k: int = 32) -> Tensor:
        """``y`` = self(x) with its ``k`` largest outputs per row recomputed in fp32 from
        the unrounded activations.

        Rounding activations to int8 once moves logits by a few hundredths (an int4 head's
        bf16 output by up to 0.125): enough to swap two near-tied likeliest tokens and change
        a greedy reply. The candidates that can win
        are recomputed with k dot products, not a pass over the whole vocabulary.
        """
        top = y.topk(min(k, y.shape[-1]), dim=-1).indices  # (..., k)
        # a product and a sum along each row, not a batched matmul, whose rounding would
        # depend on how many rows the batch has
        exact = (self.rows(top) * x.float().unsqueeze(-2)).sum(-1)
        return y.scatter(-1, top, exact.to(y.dtype))


def _round_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``x`` as int8 values times a per-row scale (its largest magnitude / 127)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


#: inputs per fp32 GEMM in ``int_mm``: 1024 products of int8 values (at most 127 * 127
#: each) sum below 2^24, so every partial sum is an integer fp32 holds exactly
EXACT_K = 1024


def int_mm(a: Tensor, q: Tensor) -> Tensor:
    """a (M, K) int8 @ q (N, K)^T as exact int32 sums, by the kernel ``q`` was made for
    (``cpu.int8_kernel``): int8 ``q`` through ``torch._int_mm`` (oneDNN, VNNI), integer-
    valued fp32 ``q`` through fp32 GEMMs over ``EXACT_K`` inputs at a time. The sums are
    the same integers either way, so results never depend on the kernel or on how many
    rows a call has."""
    if q.dtype == torch.int8:
        return torch._int_mm(a, q.mT)
    af = a.float()
    acc = None
    for start in range(0, a.shape[1], EXACT_K):
        end = start + EXACT_K
        part = (af[:, start:end] @ q[:, start:end].mT).to(torch.int32)
        acc = part if acc is None else acc + part
    assert acc is not None, "int_mm needs at least one input column"
    return acc


def _int8_matmul_one_term(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) fp32 @ (q * scale)^T with each row of x rounded to int8 once."""
    high, s_high = _round_rows(x)
    return int_mm(high, q) * (s_high * scale)


def _int8_matmul_eager(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) fp32 @ (q * scale)^T with x in two int8 terms per row: the row rounded,
    then its rounding error rounded again, so activations keep ~14 bits where one term
    keeps 7 (one term cost 4.8% perplexity on the default model; two cost none)."""
    rows = x.shape[0]
    high, s_high = _round_rows(x)
    low, s_low = _round_rows(x - high * s_high)
    acc = int_mm(torch.cat((high, low)), q).float()
    return (acc[:rows] * s_high + acc[rows:] * s_low) * scale


#: Calls with fewer rows run eagerly: compiling costs seconds on first use (a short prompt
#: or a decode step would wait for it) and saves little there; a long prompt gains 2-3x.
COMPILE_MIN_ROWS = 64


class _Compiled:
    """``_int8_matmul_eager`` through ``torch.compile``, which fuses its dozen element-wise
    passes into a few loops around the integer matmul (2-3x faster for a 512-token prompt).
    Inductor needs a C++ compiler at run time: without one, with HEXIN_COMPILE=0, or if
    compiling fails, the eager function runs instead (same results)."""

    def __init__(self) -> None:
        self.fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def __call__(self, x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
        if x.shape[0] < COMPILE_MIN_ROWS:
            return _int8_matmul_eager(x, q, scale)
        if self.fn is None:
            self.fn = _int8_matmul_eager
            if _can_compile():
                self.fn = torch.compile(_int8_matmul_eager, dynamic=True)
        try:
            return self.fn(x, q, scale)
        except Exception as e:  # e.g. a compiler that fails on this machine
            if self.fn is _int8_matmul_eager:
                raise
            log.warning("torch.compile failed (%s); running int8 matmuls eagerly", e)
            self.fn = _int8_matmul_eager
            return self.fn(x, q, scale)


def _can_compile() -> bool:
    if os.environ.get("HEXIN_COMPILE", "1") == "0":
        return False
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


_int8_matmul = _Compiled()


class Int4Linear(Linear):
    """Group-quantized int4 weight, w = (q - 8) * scale + zero per group of 32 inputs, for
    decode steps; prompt tokens go to ``wide`` (int8).

    The split is by phase, not by row count, so that each token's result never depends on
    its neighbours: a prompt gives the same logits whether 0 or all but one of its tokens
    were cached (int8 matmuls are exact integer sums, the same for any number of rows),
    and the int4 kernel computes each decode row on its own, whatever the batch."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, *, wide: Linear) -> None:
        """``q`` (out, in) integers in [0, 15]; ``scale`` and ``zero`` (out, in / 32)."""
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP_SIZE:
            raise ValueError(f"int4 weights need inputs in groups of {GROUP_SIZE}")
        self.wide = wide
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), PACK_INNER_K_TILES
        )
        # the kernel wants (in / 32, out, 2) in the activation dtype
        self.scales_zeros = (
            torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        )

    @staticmethod
    def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The fp32 weight the groups encode."""
        out_features, in_features = q.shape
        groups = (q.float() - 8).view(out_features, -1, GROUP_SIZE)
        return (groups * scale[..., None] + zero[..., None]).view(out_features, in_features)

    def refine_top(self, x: Tensor, y: Tensor) -> Tensor:
        return self.wide.refine_top(x, y)

    def __call__(self, x: Tensor, *, prompt: bool = False) -> Tensor:
        if prompt:
            return self.wide(x)
        rows = x.numel() // x.shape[-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, x.shape[-1]).to(torch.bfloat16),
            self.packed,
            GROUP_SIZE,
            self.scales_zeros,
        )
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.nbytes


class BlockLinear(Linear):
    """A weight in blocks of 32 (4 or 8 bits a value) multiplied by hexin's own kernel
    (``native``) for decode steps, activations rounded to 8 bits per block, each row on its
    own; prompt tokens go to ``wide`` (int8), as in ``Int4Linear``, or with no ``wide`` to
    the same kernel (each row on its own there too)."""

    def __init__(
        self,
        weight: native.BlockWeight,
        kernels: native.Kernels,
        *,
        wide: Linear | None,
        terms: int = 2,
    ) -> None:
        """``kernels``: the build ``weight`` was laid out for (kept, so that a later change
        of selection never pairs them wrongly); ``terms``: int8 terms per activation block
        (see ``kernels.c``'s quantize_row): two for a layer, one for an LM head, whose
        likeliest outputs ``refine_top`` recomputes from ``wide``."""
        self.native, self.kernels, self.wide, self.terms = weight, kernels, wide, terms
        self.out_features, self.in_features = weight.out_features, weight.in_features

    def __call__(self, x: Tensor, *, prompt: bool = False) -> Tensor:
        if prompt and self.wide is not None:
            return self.wide(x)
        x2 = x.reshape(-1, self.in_features).float()
        y = self.kernels.linear(self.native, x2, terms=self.terms)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def refine_top(self, x: Tensor, y: Tensor) -> Tensor:
        if self.wide is None:
            raise TypeError("refine_top needs the int8 copy an LM head keeps (wide)")
        return self.wide.refine_top(x, y)

    @property
    def nbytes(self) -> int:
        return self.native.nbytes


def concat_int4(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack (q, scale, zero) triples along the output dimension: one fused projection."""
    return tuple(torch.cat(list(xs), dim=0) for xs in zip(*parts, strict=True))  # type: ignore[return-value]
