"""hexin's own CPU kernels (``kernels.c``), compiled for this machine at first use.

PyTorch has no fast kernel for a 4-bit weight times an fp32 activation on most CPUs (its
packed int4 kernel is vectorised for bf16 activations only, and does not scale with rows),
and a decode step of a small model spends more time dispatching ~60 small PyTorch ops per
layer than multiplying. ``kernels.c`` does both jobs the way llama.cpp does the first:
activations rounded to int8 per block of 32, multiplied by the 4-bit weights in integers
(VNNI ``dpbusd`` on AVX-512 VNNI and AVX-VNNI, ``maddubs`` on plain AVX2), and a whole
decode layer (norms, projections, RoPE, cache write, attention, MLP) in one call. Where the
CPU has AMX, its tile unit takes a wide decode batch's products (bit for bit what VNNI
gives a single row) and a prompt's int8 products (``AmxWeight``).

The library is compiled with the C compiler once per machine and instruction set, into
the user's cache (``$HEXIN_HOME/kernels``, else ``~/.cache/hexin/kernels``), and loaded
with ctypes. Without a compiler, or with ``HEXIN_NATIVE=0``, hexin runs its PyTorch
kernels instead (slower, same interface); both cases say so once on stderr.
``HEXIN_NATIVE=generic`` builds the portable C without SIMD (for tests).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from hexin import cpu, paths

if TYPE_CHECKING:
    from hexin.config import ModelConfig

SOURCE = Path(__file__).with_name("kernels.c")
BLOCK = 32  # inputs per quantization block (GGUF's Q4 block)
TILES_VNNI, TILES_AMX = 1, 2  # kernels.c's layouts in AMX's tiles (``Kernels.tiles``)

#: compiler flags per instruction set; each selection compiles to its own library
ISA_FLAGS = {
    "avx512_vnni": [
        "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
        "-mavx512vnni",
    ],
    "avx_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}  # fmt: skip
assert tuple(ISA_FLAGS) == cpu.OWN_BUILDS
COMMON_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno"]


def _note(text: str) -> None:
    print(f"hexin: {text}", file=sys.stderr, flush=True)


def library_path(isa: str, cc: str) -> Path:
    """Where the build for ``isa`` by ``cc`` lives: named by a digest of the source, the
    flags and the compiler's version, so an edit or a new compiler builds afresh."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(ISA_FLAGS[isa] + COMMON_FLAGS).encode() + version.encode()
    ).hexdigest()[:16]
    return paths.cache_dir("kernels") / f"kernels-{isa}-{digest}.so"


def build(isa: str, cc: str) -> Path:
    """Compile ``kernels.c`` for ``isa`` unless it is in the cache already."""
    target = library_path(isa, cc)
    if target.exists():
        return target
    _note(f"compiling CPU kernels for {isa} (once for this machine)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *COMMON_FLAGS, *ISA_FLAGS[isa], str(SOURCE), "-o", str(out), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise RuntimeError(errors[0] if errors else f"{cc} exited with {done.returncode}")
        os.replace(out, target)  # atomic: concurrent first uses never load half a file
    return target


class Weight(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("tiles", ctypes.c_int32),
    ]


class Int8Weight(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("intermediate", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
        ("qkv", ctypes.POINTER(Weight)),
        ("wo", ctypes.POINTER(Weight)),
        ("gate_up", ctypes.POINTER(Weight)),
        ("down", ctypes.POINTER(Weight)),
        # other families' parts, NULL / 0 where a layer has none (``layer_struct``)
        ("qkv_bias", ctypes.c_void_p),
        ("qk_norm", ctypes.c_void_p),
        ("window", ctypes.c_int32),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int32),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("positions", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("table_width", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
    ]


class Kernels:
    """The loaded library for one instruction set."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.hx_isa.restype = ctypes.c_char_p
        lib.hx_q8_signed.restype = ctypes.c_int
        lib.hx_init.argtypes = [ctypes.c_int]
        lib.hx_linear.argtypes = [
            ctypes.POINTER(Weight),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.hx_decode_layer.argtypes = [
            ctypes.POINTER(Layer),
            ctypes.POINTER(Step),
            ctypes.c_void_p,
        ]
        lib.hx_amx_linear.argtypes = [
            ctypes.POINTER(Int8Weight),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.lib, self.path = lib, path
        self.isa = lib.hx_isa().decode()
        #: whether AMX tiles run here: the CPU has them, this build holds their kernel
        #: (avx512_vnni) and Linux granted the process their state
        self.amx = cpu.amx() and bool(lib.hx_amx_init())
        #: the ``tiles`` value for this build's block weights (``kernels.c``): 0, the row
        #: layout; TILES_VNNI, AMX's tile layout; TILES_AMX, the same and the tile unit too
        self.tiles = min(lib.hx_tiles(), TILES_AMX if self.amx else TILES_VNNI)
        self.q8_signed = bool(lib.hx_q8_signed())
        self.threads = lib.hx_init(torch.get_num_threads())

    def linear(self, weight: BlockWeight, x: Tensor, *, terms: int = 2) -> Tensor:
        """x (rows, K) fp32 @ weight^T -> (rows, N) fp32, activations rounded to 8 bits per
        block in ``terms`` terms (2: 15 bits)."""
        return self._product(self.lib.hx_linear, weight, x, terms, "linear")

    def amx_linear(self, weight: AmxWeight, x: Tensor, *, terms: int = 2) -> Tensor:
        """x (rows, K) fp32 @ weight^T -> (rows, N) fp32 through AMX tiles, each activation
        row rounded to int8 in ``terms`` terms (see ``quant.Int8Linear``)."""
        return self._product(self.lib.hx_amx_linear, weight, x, terms, "AMX")

    @staticmethod
    def _product(fn, weight: BlockWeight | AmxWeight, x: Tensor, terms: int, what: str) -> Tensor:
        """``fn`` (one of the library's products) of ``x`` and ``weight`` into a new tensor."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], weight.out_features, dtype=torch.float32)
        if fn(ctypes.byref(weight.struct), x.shape[0], terms, x.data_ptr(), y.data_ptr()):
            raise MemoryError(f"hexin's {what} kernel ran out of memory")
        return y

    def decode_layer(self, layer: Layer, step: Step, x: Tensor) -> None:
        """One decoder layer over ``x`` (rows, hidden) fp32, in place."""
        if self.lib.hx_decode_layer(ctypes.byref(layer), ctypes.byref(step), x.data_ptr()):
            raise MemoryError("hexin's decode kernel ran out of memory")


@functools.cache
def kernels() -> Kernels | None:
    """The library for this machine, built at first use; None where it cannot be (and
    hexin runs PyTorch's kernels)."""
    isa = cpu.own_isa()
    if isa is None:
        return None
    cc = cpu.c_compiler()
    if cc is None:
        _note("no C compiler found: running PyTorch's kernels instead (slower)")
        return None
    try:
        return Kernels(build(isa, cc))
    except (OSError, RuntimeError) as e:
        _note(f"could not build CPU kernels ({e}): running PyTorch's kernels (slower)")
        return None


class BlockWeight:
    """A weight in ``kernels.c``'s layout: values in blocks of 32 inputs, w = q * d + m
    per block (d and m in fp16, as GGUF stores them), the values packed ``bits`` wide."""

    bits: int
    tiles: int = 0
    q: Tensor
    d: Tensor
    m: Tensor
    out_features: int
    in_features: int

    def _describe(self) -> None:
        self.struct = Weight(
            self.q.data_ptr(),
            self.d.data_ptr(),
            self.m.data_ptr(),
            self.out_features,
            self.in_features,
            self.bits,
            self.tiles,
        )

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.m.nbytes


class Q4Weight(BlockWeight):
    """4-bit values from (q, scale, zero) groups with w = (q - 8) * scale + zero
    (``GGUFTensor.int4_groups``): nibbles (N, K / 32, 16), d = scale, m = zero - 8 scale;
    with ``tiles`` (``Kernels.tiles``), in AMX's tiles instead (``tile_order``)."""

    bits = 4

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, *, tiles: int = 0) -> None:
        n, k = q.shape
        m = zero.float() - 8 * scale.float()
        self.tiles = tiles
        if tiles:
            t = tile_order(q.to(torch.uint8))
            self.q = (t[..., :256] | (t[..., 256:] << 4)).contiguous()
            self.d, self.m = tile_order_scales(scale), tile_order_scales(m)
        else:
            blocks = q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
            self.q = (blocks[..., :16] | (blocks[..., 16:] << 4)).contiguous()
            self.d, self.m = scale.half().contiguous(), m.half().contiguous()
        self.out_features, self.in_features = n, k
        self._describe()


class Q8Weight(BlockWeight):
    """8-bit values (GGUF's Q8_0 rule: per block, d = |max| / 127), bytes in the order the
    kernel lays activations out (``block_order``), offset by 128 (m = -128 d) where the
    kernel's integer product wants unsigned weights."""

    bits = 8

    def __init__(self, weight: Tensor, *, signed: bool, tiles: int = 0) -> None:
        n, k = weight.shape
        groups = weight.float().view(n, k // BLOCK, BLOCK)
        self.d = (groups.abs().amax(-1) / 127).half().contiguous()
        d = self.d.float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(groups * inv[..., None]).clamp(-127, 127).view(n, k)
        self.tiles = tiles
        if tiles:  # signed: the tile unit multiplies signed bytes by signed bytes
            self.q = tile_order(q.to(torch.int8)).view(torch.uint8).contiguous()
            self.m = tile_order_scales(torch.zeros_like(self.d))
            self.d = tile_order_scales(self.d)
        elif signed:
            q = q[:, block_order(k)]
            self.q = q.to(torch.int8).view(torch.uint8).contiguous()
            self.m = torch.zeros_like(self.d)
        else:
            q = q[:, block_order(k)]
            self.q = (q + 128).to(torch.uint8).contiguous()
            self.m = (-128 * self.d).contiguous()  # exact in fp16
        self.out_features, self.in_features = n, k
        self._describe()


class AmxWeight:
    """An int8 weight (w = q * scale per output row) packed for AMX: tiles of 16 outputs,
    each row of a tile 4 consecutive inputs of each of the 16 (the layout ``tdpbssd``
    reads its second operand in)."""

    #: what the packing needs: whole tiles of outputs and of inputs
    OUT_MULTIPLE, IN_MULTIPLE = 16, 64

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        n, k = q.shape
        self.q = q.view(n // 16, 16, k // 4, 4).transpose(1, 2).contiguous()
        self.scale = scale.float().contiguous()
        self.out_features, self.in_features = n, k
        self.struct = Int8Weight(self.q.data_ptr(), self.scale.data_ptr(), n, k)

    @classmethod
    def fits(cls, out_features: int, in_features: int) -> bool:
        return out_features % cls.OUT_MULTIPLE == 0 and in_features % cls.IN_MULTIPLE == 0

    def rows(self, index: Tensor) -> Tensor:
        """The int8 rows ``index`` (any shape) of the unpacked weight."""
        picked = self.q[index // 16, :, index % 16, :]  # (*index.shape, K / 4, 4)
        return picked.reshape(*index.shape, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def tile_order(q: Tensor) -> Tensor:
    """(N, K) byte values as AMX tiles: (N / 16, K / 32, 512), one tile per group of 16
    output rows and block of 32 inputs, whose row r holds inputs 4r..4r+3 of each of the 16
    outputs in turn (the layout ``tdpbssd`` reads its second operand in)."""
    n, k = q.shape
    tiles = q.view(n // 16, 16, k // BLOCK, BLOCK // 4, 4)  # group, output, block, row, input
    return tiles.permute(0, 2, 3, 1, 4).reshape(n // 16, k // BLOCK, 16 * BLOCK)


def tile_order_scales(x: Tensor) -> Tensor:
    """Per-(output, block) values (N, K / 32) as (N / 16, K / 32, 16) fp16, with the tiles."""
    n, nb = x.shape
    return x.view(n // 16, 16, nb).transpose(1, 2).half().contiguous()


def block_order(k: int) -> Tensor:
    """Input index at each position of ``kernels.c``'s activation layout: blocks of 32 in
    groups of 4 (then 2, then 1), each group's first halves before its second halves."""
    order, b, nb = [], 0, k // BLOCK
    while b < nb:
        g = 4 if nb - b >= 4 else 2 if nb - b >= 2 else 1
        for half in (0, 16):
            for j in range(g):
                start = (b + j) * BLOCK + half
                order.extend(range(start, start + 16))
        b += g
    return torch.tensor(order)


def layer_struct(
    config: ModelConfig,
    attn_norm: Tensor,
    mlp_norm: Tensor,
    projections: tuple[BlockWeight, BlockWeight, BlockWeight, BlockWeight],
    *,
    qkv_bias: Tensor | None = None,
    qk_norm: Tensor | None = None,
    window: int | None = None,
) -> Layer:
    """``hx_decode_layer``'s description of one layer: its shapes, fp32 norms and its
    (qkv, o, gate_up, down) weights, which must outlive the struct; where the layer has
    them, Qwen2's Q/K/V bias ((H + 2K) * D), Qwen3's q/k norm weights (H + K, D) and a
    sliding window (``ModelConfig.window``). The kernel reads the tensors through raw
    pointers, so they must be contiguous fp32 on the CPU (refused otherwise, rather than
    read wrong)."""
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    for name, t, shape in (
        ("attn_norm", attn_norm, (config.hidden_size,)),
        ("mlp_norm", mlp_norm, (config.hidden_size,)),
        ("qkv_bias", qkv_bias, ((h + 2 * kv) * d,)),
        ("qk_norm", qk_norm, (h + kv, d)),
    ):
        if t is not None and not (
            t.dtype == torch.float32
            and t.device.type == "cpu"
            and t.is_contiguous()
            and tuple(t.shape) == shape
        ):
            raise ValueError(f"the native decode layer needs {name} as contiguous fp32 {shape}")
    qkv, wo, gate_up, down = (ctypes.pointer(w.struct) for w in projections)
    return Layer(
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        config.rms_norm_eps,
        attn_norm.data_ptr(),
        mlp_norm.data_ptr(),
        qkv,
        wo,
        gate_up,
        down,
        0 if qkv_bias is None else qkv_bias.data_ptr(),
        0 if qk_norm is None else qk_norm.data_ptr(),
        window or 0,
    )


class Slots(NamedTuple):
    """Where a decode step's keys and values live, for the native kernel: each row's
    token ``t`` is at slot ``table[row, t // block_size] * block_size + t % block_size``
    of ``k`` and ``v`` (layers, slots, kv heads, head dim), bf16."""

    table: Tensor
    block_size: int
    k: Tensor
    v: Tensor


class DecodeStep:
    """One decode step's rows for ``Kernels.decode_layer``: positions, rotations and the
    cache's slots (the tensors are kept alive here for as long as the step runs)."""

    def __init__(self, positions: Tensor, cos: Tensor, sin: Tensor, slots: Slots) -> None:
        self.positions = positions.to(torch.int32).contiguous()
        self.cos, self.sin = cos.float().contiguous(), sin.float().contiguous()
        self.table = slots.table.to(torch.int64).contiguous()
        self.k, self.v = slots.k, slots.v
        if self.k.dtype != torch.bfloat16 or not (
            self.k.is_contiguous() and self.v.is_contiguous()
        ):
            raise ValueError("the native decode kernel needs a contiguous bf16 cache")
        self.layer_bytes = self.k[0].nbytes
        self.struct = Step(
            self.positions.shape[0],
            self.cos.data_ptr(),
            self.sin.data_ptr(),
            self.positions.data_ptr(),
            self.table.data_ptr(),
            self.table.shape[1],
            slots.block_size,
            0,
            0,
        )

    def at_layer(self, i: int) -> Step:
        """The struct pointed at layer ``i``'s keys and values."""
        self.struct.k = self.k.data_ptr() + i * self.layer_bytes
        self.struct.v = self.v.data_ptr() + i * self.layer_bytes
        return self.struct
