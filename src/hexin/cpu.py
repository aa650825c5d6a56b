"""What the processor can do, found once, and the kernel each role runs because of it.

PyTorch's int8 x int8 matmul (``torch._int_mm``) calls oneDNN only where the CPU has
AVX-512 VNNI; elsewhere (AVX2 machines, AMD Zen 2/3, Intel Core without AVX-512) it is a
scalar loop, hundreds of times slower. There hexin runs the same integer products through
an fp32 GEMM instead, which is exact for int8 values in chunks of ``quant.EXACT_K``, so
both kernels give bitwise the same sums.

``HEXIN_CPU_FEATURES`` replaces the detected feature list (comma-separated, e.g.
``avx2,fma`` to pretend there is no AVX-512), so that every path can be tested on any
machine.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
from pathlib import Path

#: the features hexin's kernel choices look at, as Linux names them in /proc/cpuinfo
KNOWN = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)


@functools.cache
def features() -> frozenset[str]:
    """The CPU's feature flags (``detected``), or those ``HEXIN_CPU_FEATURES`` names."""
    forced = os.environ.get("HEXIN_CPU_FEATURES")
    if forced is not None:
        return frozenset(f.strip().lower() for f in forced.split(",") if f.strip())
    return detected()


@functools.cache
def detected() -> frozenset[str]:
    """What the CPU really has: x86 flags from /proc/cpuinfo; empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def amx() -> bool:
    """Whether int8 products can run on AMX tiles: the CPU has them and hexin's own
    kernels are built for AVX-512 VNNI here (the build that holds the AMX kernel)."""
    return {"amx_tile", "amx_int8"} <= features() and own_isa() == "avx512_vnni"


def int8_kernel() -> str:
    """The kernel for int8 x int8 products: "amx" (hexin's own, on AMX tiles), "vnni"
    (``torch._int_mm`` through oneDNN, on AVX-512 VNNI) or "fp32" (the same integer sums
    through an fp32 GEMM: vectorised on any CPU)."""
    found = features()
    if amx() and c_compiler() is not None:
        return "amx"
    return "vnni" if "avx512_vnni" in found else "fp32"


def native_isa() -> str | None:
    """The instruction set hexin's own kernels (``hexin.native``) are built for here: the
    widest integer dot product the CPU has, or None (PyTorch's kernels) on an x86 CPU
    without AVX2. Other architectures get the portable C."""
    found = features()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= found:
        return "avx512_vnni"
    if {"avx2", "fma", "f16c"} <= found:
        return "avx_vnni" if "avx_vnni" in found else "avx2"
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return None
    return "generic"


#: the builds of hexin's own kernels (``hexin.native``), one per instruction set
OWN_BUILDS = ("avx512_vnni", "avx_vnni", "avx2", "generic")
#: those with SIMD kernels for weights in AMX's tile layout (``kernels.c``)
TILED_BUILDS = ("avx512_vnni", "avx_vnni", "avx2")


def own_isa() -> str | None:
    """The build of hexin's own kernels to use: ``native_isa``, unless ``HEXIN_NATIVE``
    says otherwise ("0": PyTorch's kernels; a build's name: that build)."""
    choice = os.environ.get("HEXIN_NATIVE", "").strip().lower()
    if choice in ("0", "off", "false", "no"):
        return None
    if choice in OWN_BUILDS:
        return choice
    return native_isa()


def c_compiler() -> str | None:
    """The C compiler that builds hexin's kernels ($CC, else cc, gcc or clang), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def kernels() -> dict[str, str]:
    """The kernel each matrix role runs on this CPU (see ``hexin info``)."""
    int8 = f"int8 x int8, {int8_kernel()}"
    if int8_kernel() == "amx":
        int8 = "int8 x int8, hexin's own AMX tiles"
    prompt = int8
    isa = own_isa()
    if isa is None or c_compiler() is None:
        decode = "int4 weights x bf16 activations (PyTorch's packed int4 kernel)"
        head = f"{int8}, top 32 recomputed in fp32"
    else:
        decode = f"hexin's own q4 x q8 ({isa}), one call per layer"
        head = f"hexin's own q8 x q8 ({isa}), top 32 recomputed in fp32"
        if int8_kernel() == "fp32" and isa in TILED_BUILDS:  # see model._LinearFactory
            prompt = f"hexin's own q4 x q8 ({isa})"
    return {
        "dense (--quant none)": "fp32 / bf16 GEMM (MKL, oneDNN)",
        "prompt": prompt,
        "decode (q4)": decode,
        "decode (int8)": int8,
        "lm head (q4 mode)": head,
    }


def report() -> dict[str, object]:
    """What was found and what runs: for ``hexin info``, ``hexin bench`` and the server."""
    found = features()
    return {
        "cpu": model_name(),
        "features": sorted(f for f in KNOWN if f in found),
        "forced": "HEXIN_CPU_FEATURES" in os.environ,
        "kernels": kernels(),
    }
