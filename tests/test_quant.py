"""Quantized linear layers: the GGUF Q4 regroup is lossless, int8 matmuls are accurate and
independent of how many rows a call has, and torch.compile falls back cleanly."""

from __future__ import annotations

import logging

import pytest
import torch

from hexin import quant
from hexin.quant import COMPILE_MIN_ROWS, Int4Linear, Int8Linear, Linear


@pytest.fixture(scope="module")
def q_proj(default_gguf):
    from hexin.weights.gguf import load_gguf

    return load_gguf(default_gguf).tensors["model.layers.0.self_attn.q_proj.weight"]


def test_q4_blocks_regroup_into_int4_groups_without_loss(q_proj):
    """(q - 8) * scale + zero over the regrouped blocks is the file's dequantized tensor,
    bit for bit (RoPE row order restored on both)."""
    q, scale, zero = q_proj.int4_groups()
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(Int4Linear.dequantize(q, scale, zero), q_proj.dequantize())


def test_int4_kernel_matches_the_dense_weight_and_prompts_take_the_wide_path(q_proj):
    dense = q_proj.dequantize()
    layer = Int4Linear(*q_proj.int4_groups(), wide=Linear(dense))
    x = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ dense.mT
    err = (layer(x) - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, err  # bf16 activations in the kernel
    assert torch.equal(layer(x, prompt=True), ref)  # the wide (here dense) layer, as is


def test_int8_two_term_matmul_is_accurate_and_row_independent():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(70, 128, generator=g) * torch.linspace(0.1, 20, 128)  # outlier columns
    layer = Int8Linear(w)
    ref = x @ (layer.rows(torch.arange(96))).mT  # the int8 weight, exactly, in fp32
    y = layer(x)
    assert (y - ref).abs().max() / ref.abs().max() < 1e-3
    # integer sums do not depend on the batch: each row alone gives the same bits
    alone = torch.cat([layer(x[i : i + 1]) for i in range(5)])
    assert torch.equal(alone, y[:5])


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch):
    compiled = quant._Compiled()
    monkeypatch.setattr(quant, "_can_compile", lambda: False)
    x, q, s = torch.randn(COMPILE_MIN_ROWS, 32), torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
    out = compiled(x, q, s)
    assert compiled.fn is quant._int8_matmul_eager
    torch.testing.assert_close(out, quant._int8_matmul_eager(x, q, s))


def test_compile_failure_is_logged_and_eager_takes_over(monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no working C++ compiler")

        return run

    compiled = quant._Compiled()
    monkeypatch.setattr(quant, "_can_compile", lambda: True)
    monkeypatch.setattr(torch, "compile", broken)
    x, q, s = torch.randn(COMPILE_MIN_ROWS, 32), torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
    with caplog.at_level(logging.WARNING, logger="hexin.quant"):
        out = compiled(x, q, s)
    assert "torch.compile failed" in caplog.text
    assert compiled.fn is quant._int8_matmul_eager
    torch.testing.assert_close(out, quant._int8_matmul_eager(x, q, s))
