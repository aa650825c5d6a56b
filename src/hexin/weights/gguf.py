"""Loading llama.cpp's GGUF files (``config.GGUF_ARCHITECTURES``): metadata, tensors (kept
quantized) and the tokenizer.

A GGUF file is one self-describing blob: a header of typed key/value metadata (hyper-parameters,
the whole tokenizer vocabulary, the chat template), a table of tensor descriptors, then the
tensor data, aligned. This module parses the header itself with ``struct`` (the reference
``gguf.GGUFReader`` builds a Python object per vocabulary entry and needs seconds for a small
model; here the metadata reads in tens of milliseconds) and memory-maps the data, so loading a
file costs almost nothing until a tensor is dequantized.

Tensors are kept as stored. :class:`GGUFTensor` holds the raw blocks (``data``) exactly as the
file has them, so that speed work can later repack Q4/Q8 blocks losslessly instead of going
through floats; :meth:`GGUFTensor.dequantize` turns them into a dense ``torch.Tensor`` with hexin's
own vectorised decoders for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K.

RoPE layout -- the one transform that is not just a rename
------------------------------------------------------------
Hugging Face Llama checkpoints apply rotary embeddings in the "rotate-half" layout: within each
head of ``head_dim`` rows, row ``i`` is paired with row ``i + head_dim/2``. ggml's rope kernel
for Llama instead pairs *adjacent* rows (``2i``, ``2i+1``). llama.cpp's converter bridges the two
by permuting the rows of ``q_proj`` and ``k_proj`` (and of their biases, where a model has
them) when it writes a ``llama`` file: viewing one head's rows as ``(2, head_dim/2)``, it
transposes them to ``(head_dim/2, 2)``. hexin's model uses the rotate-half layout, so
:meth:`GGUFTensor.dequantize` undoes that permutation for the query (``num_heads`` heads) and
key (``num_kv_heads`` heads) projections. Only rows move, and a quantization block never spans
two rows, so the raw ``data`` stays exactly as stored and the same reordering can be applied to
raw block rows with :func:`rope_unpermute_index`. ``v_proj`` and every other tensor are
untouched by the converter and need no such step. ``qwen2`` and ``qwen3`` files keep Hugging
Face's rows as they are (llama.cpp runs those architectures with its rotate-half "NEOX" RoPE),
so nothing is permuted back for them.

Errors: every problem with a file -- missing, not GGUF, truncated, an architecture or tensor
type hexin cannot run, a tensor missing or of the wrong shape -- raises
:class:`~hexin.errors.ModelFormatError` naming the file and what was expected; no raw
``struct``/``numpy`` exception escapes for a bad file.
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch

from hexin.config import (
    ModelConfig,
    RopeScaling,
    check_gguf_architecture,
    expected_shapes,
    split_fused_names,
)
from hexin.errors import ModelFormatError
from hexin.weights.gguf_vocab import build_tokenizer, read_vocab

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFModel",
    "GGUFTensor",
    "dequantize_raw",
    "load_gguf",
    "rope_unpermute_index",
]

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
#: Metadata arrays longer than this (the vocabulary, merges, scores) stay out of
#: ``GGUFModel.metadata``: they are the tokenizer's business and would make the dict huge.
_MAX_METADATA_ARRAY = 1024


# --------------------------------------------------------------------------------------------
# Dequantization: one decoder per ggml type, each from a (n_blocks, type_size) uint8 tensor to
# (n_blocks, block_size) float32. The arithmetic follows ggml's reference C decoders in the same
# order (e.g. ``(d * scale) * q - dmin * m``) so results are bit-identical to them.
# --------------------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scalar at byte ``start`` of every block, as an (n_blocks, 1) float32 column."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Split packed 4-bit values ggml-style: byte ``j`` holds element ``j`` in its low nibble and
    element ``j + len(qs)`` in its high one (per row of ``qs``)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _low_bits(bits: torch.Tensor, count: int) -> torch.Tensor:
    """Bit ``j`` of a little-endian bit field, for ``j < count`` (one row per block)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    expanded = (bits.unsqueeze(-1) >> shifts) & 1
    return expanded.reshape(bits.shape[0], -1)[:, :count]


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: int8[32]
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 16 bytes of nibbles, value = nibble - 8
    q = _nibbles(b[:, 2:]).to(torch.int16) - 8
    return q.float() * _f16(b, 0)


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qs: 16 bytes of nibbles, value = d * nibble + m
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values: low 4 bits from the nibbles, bit 4 of element j from bit j of ``qh``."""
    return _nibbles(qs).to(torch.int16) | (_low_bits(qh, 32).to(torch.int16) << 4)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qh: 4 bytes | qs: 16 bytes, value = q - 16
    return (_q5_values(b[:, 2:6], b[:, 6:]) - 16).float() * _f16(b, 0)


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes, value = d * q + m
    return _f16(b, 0) * _q5_values(b[:, 4:8], b[:, 8:]).float() + _f16(b, 2)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins.

    Sub-blocks 0-3 keep their scale/min in the low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7
    take their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare top
    bits of bytes 0-3 (scales) / 4-7 (mins).
    """
    s = s.to(torch.int32)
    lo_sc, lo_m, packed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([lo_sc & 63, (packed & 0x0F) | ((lo_sc >> 6) << 4)], dim=1)
    mins = torch.cat([lo_m & 63, (packed >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_quant_4bit(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low bits as (n, 8, 32): each 32-byte chunk holds sub-block 2i in its low
    nibbles and sub-block 2i+1 in its high nibbles."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes -> 8 sub-blocks of 32
    scales, mins = _k_scales_mins(b[:, 4:16])
    d = (_f16(b, 0) * scales).unsqueeze(-1)
    dm = (_f16(b, 2) * mins).unsqueeze(-1)
    q = _k_quant_4bit(b[:, 16:]).float()
    return (d * q - dm).reshape(-1, 256)


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales: 12 | qh: 32 bytes | qs: 128 bytes; bit k of qh[l] is bit 4 of
    # element l of sub-block k
    scales, mins = _k_scales_mins(b[:, 4:16])
    d = (_f16(b, 0) * scales).unsqueeze(-1)
    dm = (_f16(b, 2) * mins).unsqueeze(-1)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (b[:, 16:48].unsqueeze(1) >> shifts) & 1
    q = (_k_quant_4bit(b[:, 48:]) | (high << 4)).float()
    return (d * q - dm).reshape(-1, 256)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes | qh: 64 bytes | scales: int8[16] | d: f16. Each half of 128 elements uses
    # 64 ql bytes (a = first 32, c = next 32) and 32 qh bytes: elements [0,32) = a low nibble,
    # [32,64) = c low, [64,96) = a high, [96,128) = c high; their top 2 bits are bits 0-1, 2-3,
    # 4-5, 6-7 of qh. One int8 scale per 16 consecutive elements.
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # (n, 2, 4, 32): a&F, c&F, a>>4, c>>4
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).unsqueeze(-1)
    return (d * q).reshape(n, 256)


_BLOCK_DECODERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
}

#: Every tensor type :meth:`GGUFTensor.dequantize` can decode.
SUPPORTED_TYPES: frozenset[Q] = frozenset({Q.F32, Q.F16, Q.BF16, *_BLOCK_DECODERS})


def _as_torch_bytes(data: np.ndarray) -> torch.Tensor:
    """A private, writable copy of ``data``'s bytes: the memory map is read-only, and torch
    warns about (and must never write into) read-only numpy buffers."""
    return torch.from_numpy(np.array(data, dtype=data.dtype, copy=True).view(np.uint8).reshape(-1))


def dequantize_raw(
    data: np.ndarray, ggml_type: Q, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode raw GGUF tensor bytes of type ``ggml_type`` into a dense tensor of ``shape``
    (PyTorch order). No RoPE un-permutation: that needs to know which tensor this is."""
    raw = _as_torch_bytes(data)
    if ggml_type == Q.F32:
        values = raw.view(torch.float32)
    elif ggml_type == Q.F16:
        values = raw.view(torch.float16)
    elif ggml_type == Q.BF16:
        values = raw.view(torch.bfloat16)
    elif ggml_type in _BLOCK_DECODERS:
        _, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        values = _BLOCK_DECODERS[ggml_type](raw.reshape(-1, type_size))
    else:
        raise ModelFormatError(f"hexin cannot dequantize ggml type {ggml_type.name}")
    return values.reshape(shape).to(dtype)


def rope_unpermute_index(rows: int, num_heads: int) -> torch.Tensor:
    """Row order that turns llama.cpp's interleaved-RoPE layout back into Hugging Face's
    rotate-half layout: ``hf_rows = gguf_rows[index]``.

    Works equally on dequantized rows and on raw quantized block rows (blocks never span rows).
    """
    head_dim = rows // num_heads
    if head_dim * num_heads != rows or head_dim % 2:
        raise ModelFormatError(
            f"cannot undo the RoPE permutation of {rows} rows over {num_heads} heads"
        )
    order = torch.arange(rows).reshape(num_heads, head_dim // 2, 2)
    return order.transpose(1, 2).reshape(-1)


@dataclass
class GGUFTensor:
    """One tensor as stored in the file: quantized blocks kept as raw bytes so the speed work
    can repack them losslessly later."""

    #: Hugging Face style name, e.g. ``model.layers.0.self_attn.q_proj.weight``.
    name: str
    ggml_type: gguf.GGMLQuantizationType
    #: PyTorch order, i.e. GGUF's dimensions reversed: (out_features, in_features) for a linear.
    shape: tuple[int, ...]
    #: The stored bytes, memory-mapped, shaped the way ``gguf.GGUFReader`` shapes them:
    #: float32/float16 arrays of ``shape`` for F32/F16, otherwise uint8 with the last dimension
    #: in bytes (``shape[:-1] + (row_bytes,)``). Rows of q/k are still in llama.cpp's RoPE order.
    data: np.ndarray
    #: For q_proj/k_proj (weights and biases) of a ``llama`` file: the head count whose RoPE
    #: row permutation ``dequantize`` undoes.
    rope_heads: int | None = field(default=None, repr=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense tensor of ``shape`` in ``dtype``, in Hugging Face layout (RoPE rows restored)."""
        values = dequantize_raw(self.data, self.ggml_type, self.shape, torch.float32)
        if self.rope_heads is not None:
            values = values[rope_unpermute_index(self.shape[0], self.rope_heads)]
        return values.to(dtype).contiguous()

    @property
    def is_blocks(self) -> bool:
        """A matrix stored in quantized blocks (any type but F32, F16 and BF16)."""
        return self.ggml_type not in (Q.F32, Q.F16, Q.BF16) and len(self.shape) == 2

    @property
    def is_int4(self) -> bool:
        """Stored as Q4_0, Q4_1 or Q4_K blocks, which ``int4_groups`` regroups without loss."""
        return self.ggml_type in (Q.Q4_0, Q.Q4_1, Q.Q4_K) and len(self.shape) == 2

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Q4_0 / Q4_1 / Q4_K blocks as (q, scale, zero) with w = (q - 8) * scale + zero, q
        (out, in) in [0, 15] and scale/zero (out, in / 32), RoPE rows restored; ``None`` for
        other types. Q4_0 is (q - 8) * d, so zero = 0; Q4_1 is q * d + m, so zero = m + 8d;
        Q4_K's 256 values are 8 groups of 32, each q * (d * scale) - dmin * min, so its
        groups are Q4_1's with d = d * scale and m = -dmin * min (all in fp32: the six-bit
        scale and min multiply the block's f16 d and dmin)."""
        if not self.is_int4:
            return None
        _, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        blocks = _as_torch_bytes(self.data).reshape(-1, type_size)
        rows, cols = self.shape
        if self.ggml_type == Q.Q4_K:
            scales, mins = _k_scales_mins(blocks[:, 4:16])
            d = (_f16(blocks, 0) * scales).view(rows, cols // 32)
            m = -(_f16(blocks, 2) * mins).view(rows, cols // 32)
            q, zero = _k_quant_4bit(blocks[:, 16:]), m + 8 * d
        elif self.ggml_type == Q.Q4_0:
            d = _f16(blocks, 0).view(rows, cols // 32)
            q, zero = _nibbles(blocks[:, 2:]), torch.zeros_like(d)
        else:
            d = _f16(blocks, 0).view(rows, cols // 32)
            q, zero = _nibbles(blocks[:, 4:]), _f16(blocks, 2).view(rows, cols // 32) + 8 * d
        q = q.reshape(rows, cols)
        if self.rope_heads is not None:
            index = rope_unpermute_index(rows, self.rope_heads)
            q, d, zero = q[index], d[index], zero[index]
        return q, d, zero


@dataclass
class GGUFModel:
    """Everything hexin needs from one GGUF file."""

    config: ModelConfig
    tensors: dict[str, GGUFTensor]
    #: Rebuilt from the GGUF vocabulary (see :mod:`hexin.weights.gguf_vocab`); ``encode`` adds
    #: BOS itself when ``add_bos_token`` is set, as a Hugging Face ``tokenizer.json`` would.
    tokenizer: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    #: Scalar, string and short-array metadata (the vocabulary-sized arrays are left out).
    metadata: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------


class _Truncated(Exception):
    """Internal: a read ran past the end of the file."""


_SCALARS: dict[int, struct.Struct] = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<u1",
    gguf.GGUFValueType.INT8: "<i1",
    gguf.GGUFValueType.UINT16: "<u2",
    gguf.GGUFValueType.INT16: "<i2",
    gguf.GGUFValueType.UINT32: "<u4",
    gguf.GGUFValueType.INT32: "<i4",
    gguf.GGUFValueType.FLOAT32: "<f4",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "<u8",
    gguf.GGUFValueType.INT64: "<i8",
    gguf.GGUFValueType.FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Cursor:
    """Sequential little-endian reads over the mapped file, raising :class:`_Truncated` instead
    of returning short data."""

    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack_from(self.buf, self.take(fmt.size))[0]

    def string(self) -> str:
        n = self.unpack(_U64)
        start = self.take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            etype = self.unpack(_U32)
            count = self.unpack(_U64)
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
            if count > self.size:  # every element needs at least one byte
                raise _Truncated
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-moving first
    type_id: int
    offset: int


def _open(path: Path) -> tuple[mmap.mmap, dict[str, Any], list[_TensorInfo], int]:
    """Map ``path`` and parse its header: (mapping, metadata, tensor infos, data start)."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size < 24:
                head = fh.read(4)
                if head != _MAGIC:
                    raise ModelFormatError(_bad_magic(path, head))
                raise ModelFormatError(f"{path} is truncated: {size} bytes, not even a header")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFormatError(f"GGUF file not found: {path}") from None
    except IsADirectoryError:
        raise ModelFormatError(f"{path} is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFormatError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None

    if buf[:4] != _MAGIC:
        raise ModelFormatError(_bad_magic(path, bytes(buf[:4])))
    cur = _Cursor(buf)
    cur.take(4)
    where = "the header"
    try:
        version = cur.unpack(_U32)
        if version not in _SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ModelFormatError(
                f"{path} is GGUF version {version}{hint}; hexin reads versions "
                f"{', '.join(map(str, _SUPPORTED_VERSIONS))}"
            )
        n_tensors = cur.unpack(_U64)
        n_kv = cur.unpack(_U64)
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            where = f"metadata entry {i}"
            key = cur.string()
            where = f"metadata key {key!r}"
            metadata[key] = cur.value(cur.unpack(_U32))
        infos: list[_TensorInfo] = []
        for i in range(n_tensors):
            where = f"tensor descriptor {i}"
            name = cur.string()
            where = f"the descriptor of tensor {name!r}"
            n_dims = cur.unpack(_U32)
            if n_dims > 8:
                raise ValueError(f"{n_dims} dimensions")
            dims = tuple(cur.unpack(_U64) for _ in range(n_dims))
            type_id = cur.unpack(_U32)
            infos.append(_TensorInfo(name, dims, type_id, cur.unpack(_U64)))
    except _Truncated:
        raise ModelFormatError(
            f"{path} is truncated or corrupt: the file ends inside {where}"
        ) from None
    except ValueError as e:
        raise ModelFormatError(f"{path} is corrupt: {where} is invalid ({e})") from None

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment must be a power of two, got {alignment}")
    data_start = -(-cur.pos // alignment) * alignment
    return buf, metadata, infos, data_start


def _bad_magic(path: Path, head: bytes) -> str:
    return f"{path} is not a GGUF file: it starts with {head!r}, not {_MAGIC!r}"


def _tensor_data(
    path: Path, buf: mmap.mmap, info: _TensorInfo, qtype: Q, data_start: int
) -> np.ndarray:
    """Memory-mapped view of one tensor's bytes, shaped like ``gguf.GGUFReader`` shapes them."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    np_shape = tuple(reversed(info.dims)) or (1,)
    n_elements = math.prod(np_shape)
    if info.dims and info.dims[0] % block_size:
        raise ModelFormatError(
            f"{path}: tensor {info.name!r} has rows of {info.dims[0]} values, not a multiple of "
            f"the {qtype.name} block size {block_size}"
        )
    n_bytes = n_elements // block_size * type_size
    start = data_start + info.offset
    if start + n_bytes > len(buf):
        raise ModelFormatError(
            f"{path} is truncated: tensor {info.name!r} needs bytes {start}..{start + n_bytes} "
            f"but the file has only {len(buf)} bytes"
        )
    if qtype == Q.F32:
        dtype, shape = np.dtype("<f4"), np_shape
    elif qtype == Q.F16:
        dtype, shape = np.dtype("<f2"), np_shape
    else:
        dtype = np.dtype(np.uint8)
        shape = (*np_shape[:-1], np_shape[-1] // block_size * type_size)
    count = n_bytes // dtype.itemsize
    return np.frombuffer(buf, dtype=dtype, count=count, offset=start).reshape(shape)


# --------------------------------------------------------------------------------------------
# Config and tensor mapping
# --------------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GEMMA_LAYER_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
#: Where an architecture's layer names differ from Llama's: Gemma's sandwich norms (llama.cpp
#: writes its ``pre_feedforward_layernorm`` as ``ffn_norm``)
_ARCH_LAYER_NAMES = {
    "gemma2": _GEMMA_LAYER_NAMES,
    "gemma3": _GEMMA_LAYER_NAMES,
    # Phi-3's fused projections (gate first in ``ffn_up``), split at load
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
#: The layer tensors that may have a ``.bias`` beside their ``.weight`` (Qwen2's Q/K/V bias).
_BIASED = frozenset({"attn_q", "attn_k", "attn_v"})
#: RoPE scaling stored as tensors, read into the config: Llama 3's frequency divisors,
#: Phi-3's LongRoPE factors
_ROPE_TENSORS = frozenset(
    {"rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight"}
)
#: Tensors llama.cpp may write that carry nothing the forward pass needs.
#: (``attn_rot_embd`` is an old converter's precomputed rotary table.)
_IGNORED_SUFFIXES = (".attn_rot_embd",)


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    block, kind, suffix = parts[1:]
    leaf = _ARCH_LAYER_NAMES.get(arch, {}).get(kind) or _LAYER_NAMES.get(kind)
    if leaf is None or not (suffix == "weight" or (suffix == "bias" and kind in _BIASED)):
        return None
    return f"model.layers.{int(block)}.{leaf}.{suffix}"


def _rope_scaling_from_freqs(
    factors: torch.Tensor, theta: float, head_dim: int, original_ctx: int, path: Path
) -> RopeScaling | None:
    """Recover Llama 3 RoPE scaling from the ``rope_freqs.weight`` tensor llama.cpp writes
    in its place (per-frequency divisors), and check the recovered parameters reproduce it.

    Llama 3 scaling divides each frequency by 1 (short wavelengths), by ``factor`` (long ones)
    or by a smooth blend in between, where the blend weight is linear in
    ``original_ctx / wavelength`` from ``low_freq_factor`` to ``high_freq_factor``; two blended
    frequencies pin both down (only their ratio to ``original_ctx`` matters).
    """
    factors = factors.double()
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise ModelFormatError(
            f"{path}: rope_freqs.weight has shape {tuple(factors.shape)}, expected "
            f"({head_dim // 2},)"
        )
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:  # all ones: no scaling
        return None
    x = original_ctx * inv_freq / (2 * math.pi)  # original_ctx / wavelength
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    blended = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    low, high = 1.0, 4.0  # Llama 3.1/3.2's values, kept if fewer than two blended frequencies
    if int(blended.sum()) >= 2:
        xs, ss = x[blended], smooth[blended]
        slope = float((ss[-1] - ss[0]) / (xs[-1] - xs[0]))
        if slope > 0:
            low = float(xs[0] - ss[0] / slope)
            high = low + 1 / slope
    scaling = RopeScaling(
        factor=round(factor, 4),
        low_freq_factor=round(low, 4),
        high_freq_factor=round(high, 4),
        original_max_position_embeddings=original_ctx,
    )
    span = scaling.high_freq_factor - scaling.low_freq_factor
    s = torch.clamp((x - scaling.low_freq_factor) / span, 0.0, 1.0)
    expected = 1 / ((1 - s) / scaling.factor + s)
    if not torch.allclose(expected, factors, rtol=1e-3, atol=1e-3):
        raise ModelFormatError(
            f"{path}: rope_freqs.weight does not follow Llama 3 RoPE scaling; hexin cannot "
            "reproduce these frequency factors"
        )
    return scaling


def _metadata_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata minus the vocabulary-sized arrays; numpy values turned into plain Python."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, (np.ndarray, list)):
            if len(value) > _MAX_METADATA_ARRAY:
                continue
            value = value.tolist() if isinstance(value, np.ndarray) else value
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_gguf(path: str | Path) -> GGUFModel:
    """Parse a GGUF file: config, memory-mapped tensors under Hugging Face names, tokenizer.

    Nothing is dequantized here; every tensor is checked for a supported type, a known name and
    the shape the config implies, so that a bad file fails now rather than mid-generation.
    """
    path = Path(path)
    buf, meta, info_list, data_start = _open(path)

    infos: dict[str, _TensorInfo] = {}
    for info in info_list:
        if info.name in infos:
            raise ModelFormatError(f"{path}: tensor {info.name!r} appears twice")
        infos[info.name] = info

    def qtype_of(info: _TensorInfo) -> Q:
        try:
            qtype = Q(info.type_id)
        except ValueError:
            raise ModelFormatError(
                f"{path}: tensor {info.name!r} has unknown ggml type id {info.type_id}"
            ) from None
        if qtype not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
            raise ModelFormatError(
                f"{path}: tensor {info.name!r} has type {qtype.name}, which hexin cannot "
                f"dequantize (supported: {supported})"
            )
        return qtype

    check_gguf_architecture(meta, str(path))  # before any tensor or vocabulary work
    vocab = read_vocab(meta, str(path))

    def rope_tensor(name: str) -> torch.Tensor:
        info = infos[name]
        qtype = qtype_of(info)
        data = _tensor_data(path, buf, info, qtype, data_start)
        return dequantize_raw(data, qtype, tuple(reversed(info.dims)))

    longrope_factors = None  # Phi-3's long-context models
    if "rope_factors_long.weight" in infos or "rope_factors_short.weight" in infos:
        try:
            longrope_factors = tuple(
                tuple(rope_tensor(f"rope_factors_{kind}.weight").flatten().tolist())
                for kind in ("short", "long")
            )
        except KeyError as e:
            raise ModelFormatError(f"{path}: LongRoPE needs tensor {e.args[0]!r} too") from None

    recover_rope_scaling = None
    if "rope_freqs.weight" in infos:
        rope_freqs = rope_tensor("rope_freqs.weight")

        def recover_rope_scaling(theta: float, head_dim: int, original: int) -> RopeScaling | None:
            return _rope_scaling_from_freqs(rope_freqs, theta, head_dim, original, path)

    # Embedding rows may exceed the token list (padded vocabularies); the metadata, then the
    # embedding itself, then the token list say how many rows the model has.
    embd = infos.get("token_embd.weight")
    rows = embd.dims[1] if embd is not None and len(embd.dims) == 2 else len(vocab.tokens)
    config = ModelConfig.from_gguf(
        meta,
        source=str(path),
        vocab_rows=rows or None,
        tie_word_embeddings="output.weight" not in infos,
        qkv_bias="blk.0.attn_q.bias" in infos,
        bos_token_id=vocab.bos_token_id,
        eos_token_ids=vocab.eos_token_ids,
        rope_scaling_from_freqs=recover_rope_scaling,
        longrope_factors=longrope_factors,  # type: ignore[arg-type]
    )

    tensors: dict[str, GGUFTensor] = {}
    unknown: list[str] = []
    for gguf_name, info in infos.items():
        hf_name = _hf_name(gguf_name, config.architecture)
        if hf_name is None:
            if gguf_name.endswith(tuple(s + ".weight" for s in _IGNORED_SUFFIXES)):
                logger.debug("%s: ignoring tensor %s", path, gguf_name)
            elif gguf_name not in _ROPE_TENSORS:  # consumed by the config above
                unknown.append(gguf_name)
            continue
        qtype = qtype_of(info)
        rope_heads = None  # rows the converter permuted: q and k of llama files only
        if config.architecture == "llama" and ".self_attn.q_proj." in hf_name:
            rope_heads = config.num_heads
        elif config.architecture == "llama" and ".self_attn.k_proj." in hf_name:
            rope_heads = config.num_kv_heads
        tensors[hf_name] = GGUFTensor(
            name=hf_name,
            ggml_type=qtype,
            shape=tuple(reversed(info.dims)),
            data=_tensor_data(path, buf, info, qtype, data_start),
            rope_heads=rope_heads,
        )
    for layer in range(config.num_layers):
        for fused, parts in split_fused_names(config, layer).items():
            tensor = tensors.pop(fused, None)
            if tensor is not None:
                tensors |= _split_rows(tensor, parts, path)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ModelFormatError(
            f"{path}: tensors hexin's model has no place for: {shown} (biases or other "
            "extras it would silently drop)"
        )

    expected = expected_shapes(config)
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelFormatError(
                f"{path}: required tensor {_gguf_name_for(name, config.architecture)!r} ({name}) "
                "is missing"
            )
        if tensor.shape != shape:
            raise ModelFormatError(
                f"{path}: tensor {_gguf_name_for(name, config.architecture)!r} ({name}) has shape "
                f"{tensor.shape}, "
                f"expected {shape} from the model's metadata"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelFormatError(
            f"{path}: tensors the {config.num_layers}-layer {config.architecture!r} model its "
            "metadata declares has no place for: "
            + ", ".join(_gguf_name_for(n, config.architecture) for n in extra[:5])
        )

    tokenizer = build_tokenizer(vocab, str(path))
    return GGUFModel(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        bos_token_id=vocab.bos_token_id,
        eos_token_id=vocab.eos_token_id,
        add_bos_token=vocab.add_bos_token,
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=_metadata_summary(meta),
    )


def _split_rows(
    tensor: GGUFTensor, parts: list[tuple[str, int]], path: Path
) -> dict[str, GGUFTensor]:
    """A fused 2-D tensor (Phi-3's ``attn_qkv``, ``ffn_up``) as consecutive row ranges under
    ``parts``' names; quantized blocks lie within rows, so each part stays as stored."""
    rows = sum(n for _, n in parts)
    if len(tensor.shape) != 2 or tensor.shape[0] != rows:
        raise ModelFormatError(
            f"{path}: fused tensor {tensor.name} has shape {tensor.shape}, expected {rows} rows"
        )
    out, start = {}, 0
    for name, n in parts:
        out[name] = GGUFTensor(
            name=name,
            ggml_type=tensor.ggml_type,
            shape=(n, tensor.shape[1]),
            data=tensor.data[start : start + n],
        )
        start += n
    return out


def _gguf_name_for(hf_name: str, arch: str = "llama") -> str:
    """The GGUF spelling of a Hugging Face tensor name, for error messages."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf_name:
            return g
    parts = hf_name.split(".")
    leaf = ".".join(parts[3:-1])
    for g, h in (_LAYER_NAMES | _ARCH_LAYER_NAMES.get(arch, {})).items():
        if h == leaf:
            return f"blk.{parts[2]}.{g}.{parts[-1]}"
    return hf_name
