"""Readable reference operators that the model's fused ones are tested against: attention
written out op by op (scores, masked softmax, weighted sum) and the SwiGLU feed-forward
block. The model runs ``ops.fused_attention`` and fused projections instead."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hexin.ops import causal_mask, matmul_transb, rms_norm, swiglu


def masked_softmax(scores: Tensor, offset: Tensor | int) -> Tensor:
    """Softmax over the last dimension of (…, T, L) attention scores with the causal mask
    for ``offset`` cached tokens applied; masked entries get probability exactly 0."""
    mask = causal_mask(scores.shape[-2], scores.shape[-1], offset, device=scores.device)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, offset: Tensor | int) -> Tensor:
    """Grouped-query causal self-attention.

    q (…, T, H, D); k, v (…, L, K, D) holding the cached keys followed by the new ones;
    ``offset`` = L - T for each sequence (cached tokens before the queries). Each run of
    H / K consecutive query heads shares one KV head; the query heads are reshaped onto
    their KV head instead of copying K and V H / K times. Returns (…, T, H * D).
    """
    *lead, t, h, d = q.shape
    kv_heads = k.shape[-2]
    group = h // kv_heads
    # (…, K, G, T, D) queries against (…, K, 1, D, L) keys -> (…, K, G, T, L) scores
    qg = q.reshape(*lead, t, kv_heads, group, d).movedim(-4, -2)
    kt = k.movedim(-3, -1).unsqueeze(-3)
    scores = (qg @ kt) * (1.0 / math.sqrt(d))
    if isinstance(offset, Tensor):
        offset = offset.view(*offset.shape, 1, 1)  # broadcast over the K and G axes
    probs = masked_softmax(scores, offset)
    out = probs @ v.movedim(-3, -2).unsqueeze(-3)  # (…, K, G, T, D)
    return out.movedim(-2, -4).reshape(*lead, t, h * d)


def mlp(
    x: Tensor,
    norm_weight: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    eps: float,
) -> Tensor:
    """The feed-forward block with its residual: x + down(swiglu(gate(n), up(n))), where
    n = rms_norm(x)."""
    n = rms_norm(x, norm_weight, eps)
    return x + matmul_transb(swiglu(matmul_transb(n, w_gate), matmul_transb(n, w_up)), w_down)
