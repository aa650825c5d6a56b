"""Kernel selection by CPU feature, and the int8 kernels agreeing bitwise: every path runs
here whatever the machine, by forcing ``HEXIN_CPU_FEATURES``."""

from __future__ import annotations

import pytest
import torch

from hexin import cpu, native
from hexin.model import Llama
from hexin.quant import EXACT_K, Int8Linear, int_mm

AVX2_ONLY = "avx2,fma"  # an AMD Zen 3 or an Intel Core without AVX-512
VNNI = "avx2,fma,avx512f,avx512_vnni"
AMX = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512_vnni,amx_tile,amx_int8"


@pytest.fixture
def cpu_features(monkeypatch):
    """Set the features hexin sees (None: detect them again); the kernels built for them
    are found again too."""

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("HEXIN_CPU_FEATURES", raising=False)
        else:
            monkeypatch.setenv("HEXIN_CPU_FEATURES", value)
        cpu.features.cache_clear()
        native.kernels.cache_clear()

    yield force
    monkeypatch.delenv("HEXIN_CPU_FEATURES", raising=False)
    cpu.features.cache_clear()
    native.kernels.cache_clear()


def test_selection_follows_the_features(cpu_features, monkeypatch):
    cpu_features(AVX2_ONLY)
    assert cpu.int8_kernel() == "fp32"
    assert cpu.report()["forced"] is True and cpu.report()["features"] == ["avx2", "fma"]
    cpu_features(VNNI)
    assert cpu.int8_kernel() == "vnni"
    cpu_features(AMX)  # AMX's kernel is hexin's own, in its AVX-512 VNNI build
    assert cpu.int8_kernel() == ("amx" if cpu.c_compiler() else "vnni")
    monkeypatch.setenv("HEXIN_NATIVE", "0")
    assert cpu.int8_kernel() == "vnni"


def test_no_scalar_kernel_is_selected_on_this_machine(cpu_features):
    """PyTorch runs ``torch._int_mm`` through oneDNN only with AVX-512 VNNI; anywhere
    else it is a scalar loop, which must never be chosen."""
    cpu_features(None)
    if cpu.int8_kernel() == "amx":
        assert {"amx_tile", "amx_int8", "avx512_vnni"} <= cpu.features()
    elif cpu.int8_kernel() == "vnni":
        assert "avx512_vnni" in cpu.features()
    else:
        assert cpu.int8_kernel() == "fp32"


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("k", [64, EXACT_K, 1536, 2 * EXACT_K + 3])
def test_both_int8_kernels_give_the_exact_integer_sums(m, k):
    g = torch.Generator().manual_seed(m * 10_000 + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (40, k), generator=g, dtype=torch.int8)
    a[0], q[0] = 127, -127  # the extreme product everywhere: the largest possible sums
    exact = (a.long() @ q.long().mT).to(torch.int32)
    assert torch.equal(int_mm(a, q), exact)
    assert torch.equal(int_mm(a, q.float()), exact)


def test_int8_linear_is_bitwise_the_same_on_either_kernel(cpu_features):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 1536, generator=g)
    x = torch.randn(5, 1536, generator=g)
    built = {}
    for name, features in (("vnni", VNNI), ("fp32", AVX2_ONLY)):
        cpu_features(features)
        built[name] = (Int8Linear(weight), Int8Linear(weight, terms=1))  # layer, LM head
    (vnni, head_vnni), (fp32, head_fp32) = built["vnni"], built["fp32"]
    assert vnni.q.dtype == torch.int8 and fp32.q.dtype == torch.float32
    assert torch.equal(vnni(x), fp32(x))
    assert torch.equal(head_vnni.refine_top(x, head_vnni(x)), head_fp32.refine_top(x, head_fp32(x)))
    cpu_features(AMX)
    if {"amx_tile", "amx_int8"} <= cpu.detected() and cpu.int8_kernel() == "amx":
        amx, head_amx = Int8Linear(weight), Int8Linear(weight, terms=1)
        assert amx.amx is not None and head_amx.amx is not None
        assert torch.equal(amx(x), vnni(x))
        top_amx = head_amx.refine_top(x, head_amx(x))
        assert torch.equal(top_amx, head_vnni.refine_top(x, head_vnni(x)))


def test_q4_model_logits_are_the_same_without_vnni(default_model, cpu_features, monkeypatch):
    """PyTorch's kernels built for an AVX2-only machine compute what they compute on a
    VNNI machine, bit for bit: prompt and decode logits alike. (hexin's own decode kernels
    sum floats in a different order per instruction set; tests/test_native_kernels.py.)"""
    monkeypatch.setenv("HEXIN_NATIVE", "0")
    ids = default_model.tokenizer.encode("The sky is blue because")
    logits = {}
    for name, features in (("vnni", VNNI), ("fp32", AVX2_ONLY)):
        cpu_features(features)
        model = Llama.from_loaded(default_model, quant="q4")
        cache = model.new_cache()
        prompt = model.forward(torch.tensor([ids]), cache)
        step = model.forward(torch.tensor([[int(prompt[0].argmax())]]), cache)
        logits[name] = (prompt, step)
    assert torch.equal(logits["vnni"][0], logits["fp32"][0])
    assert torch.equal(logits["vnni"][1], logits["fp32"][1])
