"""The operators in ``hexin.ops`` against exact values and naive loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_ops
import torch
import torch.nn.functional as F

from hexin import ops
from hexin.config import RopeScaling

RTOL = 1e-5


def _close(actual, expected, rtol=RTOL, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- exact values from the seed ---------------------------------------------------------


def test_swiglu_is_up_times_silu_of_gate():
    gate = torch.tensor([[1.0, 2.0, 3.0]])
    up = torch.tensor([[2.0, 3.0, 4.0]])
    _close(ops.swiglu(gate, up), torch.tensor([[1.4621172, 5.2847824, 11.43089]]))


def test_rms_norm_exact_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    expected = torch.tensor([[0.6324554, 2.5298216], [0.8485281, 2.2627416]])
    _close(ops.rms_norm(x, w, 1e-6), expected)


def test_rms_norm_of_half_precision_input_keeps_its_dtype_and_matches_fp32():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    w = torch.rand(16, generator=torch.Generator().manual_seed(1))
    out = ops.rms_norm(x.bfloat16(), w.bfloat16(), 1e-6)
    assert out.dtype == torch.bfloat16
    _close(out.float(), ops.rms_norm(x, w, 1e-6), rtol=2e-2, atol=2e-2)


_A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
_B = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
_C = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


def test_matmul_transb_alpha_one_beta_one():
    _close(ops.matmul_transb(_A, _B, _C, alpha=1.0, beta=1.0), torch.tensor([[15.0, 34], [35, 81]]))


@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 0.5), (0.5, -1.0), (1.0, 3.0), (-1.5, 1.0)])
def test_matmul_transb_other_alpha_beta(alpha, beta):
    ab_t = torch.tensor([[14.0, 32.0], [32.0, 77.0]])  # A @ B^T
    expected = alpha * ab_t + beta * _C
    _close(ops.matmul_transb(_A, _B, _C, alpha=alpha, beta=beta), expected)


def test_matmul_transb_beta_zero_ignores_c_even_if_it_holds_nan():
    c = torch.full((2, 2), float("nan"))
    out = ops.matmul_transb(_A, _B, c, alpha=2.0, beta=0.0)
    _close(out, torch.tensor([[28.0, 64.0], [64.0, 154.0]]))


def test_matmul_transb_without_c_is_a_projection():
    _close(ops.matmul_transb(_A, _B), torch.tensor([[14.0, 32.0], [32.0, 77.0]]))


def test_matmul_transb_returns_new_tensor_and_leaves_c_untouched():
    c = _C.clone()
    out = ops.matmul_transb(_A, _B, c, alpha=1.0, beta=1.0)
    assert out.data_ptr() != c.data_ptr()
    torch.testing.assert_close(c, _C)


def test_matmul_transb_batched_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 5, generator=g)
    b = torch.randn(4, 5, generator=g)
    c = torch.randn(2, 3, 4, generator=g)
    out = ops.matmul_transb(a, b, c, alpha=0.7, beta=1.3)
    expected = torch.empty(2, 3, 4)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                expected[n, i, j] = (
                    0.7 * sum(a[n, i, k] * b[j, k] for k in range(5)) + 1.3 * c[n, i, j]
                )
    _close(out, expected, atol=1e-5)


def test_mlp_with_residual_exact_values():
    residual = torch.ones(4, 2)
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])  # (di, d) for both gate and up
    w_down = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # (d, di)
    out = reference_ops.mlp(residual, torch.ones(2), w, w, w_down, 1e-6)
    _close(out, torch.tensor([[1.3429964, 1.7290739]]).expand(4, 2))


# -- per-head RMSNorm (Qwen3's q_norm / k_norm) -------------------------------------------


def test_head_rms_norm_norms_each_head_on_its_own():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 8, generator=g) * torch.arange(1, 5).view(4, 1)  # (B, T, H, D)
    shared, per_head = torch.rand(8, generator=g), torch.rand(4, 8, generator=g)
    for weight in (shared, per_head):
        out = ops.head_rms_norm(x, weight, 1e-6)
        expected = torch.empty_like(x)
        for b, t, h in np.ndindex(2, 3, 4):
            v = x[b, t, h].double()
            w = weight if weight.dim() == 1 else weight[h]
            expected[b, t, h] = (v / torch.sqrt((v * v).mean() + 1e-6) * w).float()
        _close(out, expected)
    # not the hidden-size statistic of the layer norms: heads of different scale differ
    whole = ops.rms_norm(x.flatten(-2), shared.repeat(4), 1e-6).unflatten(-1, (4, 8))
    assert not torch.allclose(ops.head_rms_norm(x, shared, 1e-6), whole, atol=1e-3)


def test_head_rms_norm_matches_transformers_qwen3_q_norm():
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    g = torch.Generator().manual_seed(6)
    norm = qwen3.Qwen3RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    q = torch.randn(2, 5, 4 * 16, generator=g).view(2, 5, 4, 16)  # (B, T, H, D)
    with torch.no_grad():
        expected = norm(q)
    _close(ops.head_rms_norm(q, norm.weight.detach(), 1e-6), expected, rtol=1e-6, atol=1e-6)


# -- embedding ---------------------------------------------------------------------------


def test_embedding_gathers_table_rows_like_an_indexing_loop():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(11, 6, generator=g)
    ids = torch.tensor([[0, 5, 10], [5, 5, 1]])
    out = ops.embedding(ids, table)
    assert out.shape == (2, 3, 6)
    for r in range(2):
        for c in range(3):
            assert torch.equal(out[r, c], table[int(ids[r, c])])


# -- RoPE ---------------------------------------------------------------------------------


def _naive_inv_freq(head_dim, theta):
    return [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]


def _naive_rope(x, positions, inv_freq, *, interleaved):
    """x (T, H, D) with positions (T,): rotate every pair by position * frequency."""
    t, h, d = x.shape
    out = torch.empty_like(x)
    for ti in range(t):
        for hi in range(h):
            for i in range(d // 2):
                # the angle is formed in fp32 as the reference does; cos/sin then in fp64
                angle = float(np.float32(positions[ti]) * np.float32(inv_freq[i]))
                cos, sin = math.cos(angle), math.sin(angle)
                a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
                xa, xb = float(x[ti, hi, a]), float(x[ti, hi, b])
                out[ti, hi, a] = xa * cos - xb * sin
                out[ti, hi, b] = xb * cos + xa * sin
    return out


POSITIONS = [0, 1, 2, 17, 511, 4095, 65_537, 131_071]


def test_rope_inv_freq_plain_matches_theta_power():
    for head_dim, theta in [(8, 10000.0), (64, 10000.0), (128, 500000.0)]:
        expected = torch.tensor(_naive_inv_freq(head_dim, theta), dtype=torch.float32)
        _close(ops.rope_inv_freq(head_dim, theta), expected, rtol=1e-6, atol=0)


def test_rope_cos_sin_shape_and_values():
    inv_freq = ops.rope_inv_freq(8, 10000.0)
    positions = torch.tensor([[0, 3, 100], [7, 8, 9]])
    cos, sin = ops.rope_cos_sin(positions, inv_freq)
    assert cos.shape == sin.shape == (2, 3, 4)
    for b in range(2):
        for t in range(3):
            for i in range(4):
                angle = float(np.float32(positions[b, t]) * np.float32(inv_freq[i]))
                assert float(cos[b, t, i]) == pytest.approx(math.cos(angle), abs=1e-6)
                assert float(sin[b, t, i]) == pytest.approx(math.sin(angle), abs=1e-6)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_rope_without_batch_matches_naive_pair_rotation(interleaved):
    g = torch.Generator().manual_seed(4)
    d, h = 8, 3
    x = torch.randn(len(POSITIONS), h, d, generator=g)
    inv_freq = ops.rope_inv_freq(d, 10000.0)
    cos, sin = ops.rope_cos_sin(torch.tensor(POSITIONS), inv_freq)
    out = ops.rope(x, cos, sin, interleaved=interleaved)
    _close(out, _naive_rope(x, POSITIONS, inv_freq, interleaved=interleaved), atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_rope_with_batch_and_per_sequence_positions_matches_naive(interleaved):
    g = torch.Generator().manual_seed(5)
    d, h = 16, 2
    positions = torch.tensor([[0, 1, 2, 3], [500, 501, 502, 503], [9000, 70_000, 131_000, 3]])
    x = torch.randn(3, 4, h, d, generator=g)
    inv_freq = ops.rope_inv_freq(d, 500000.0)
    cos, sin = ops.rope_cos_sin(positions, inv_freq)
    out = ops.rope(x, cos, sin, interleaved=interleaved)
    assert out.shape == x.shape
    for b in range(3):
        expected = _naive_rope(x[b], positions[b].tolist(), inv_freq, interleaved=interleaved)
        _close(out[b], expected, atol=1e-5)


def test_rope_at_position_zero_is_identity_and_preserves_pair_norms():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, generator=g)
    inv_freq = ops.rope_inv_freq(8, 10000.0)
    cos, sin = ops.rope_cos_sin(torch.tensor([0, 12345]), inv_freq)
    out = ops.rope(x, cos, sin)
    _close(out[0], x[0])
    pair_norm = lambda v: v[..., :4] ** 2 + v[..., 4:] ** 2  # noqa: E731
    _close(pair_norm(out[1]), pair_norm(x[1]), atol=1e-5)


def _gguf_permutation(d):
    """Index map of the GGUF Q/K permutation within one head: HF dimension h * D/2 + i
    (rotate-half pairs i with i + D/2) lands at GGUF dimension 2i + h (interleaved pairs)."""
    return torch.arange(d).view(2, d // 2).T.reshape(-1)


def test_gguf_permutation_links_the_two_rope_layouts():
    g = torch.Generator().manual_seed(7)
    d = 16
    x = torch.randn(2, len(POSITIONS), 3, d, generator=g)
    positions = torch.tensor([POSITIONS, POSITIONS[::-1]])
    cos, sin = ops.rope_cos_sin(positions, ops.rope_inv_freq(d, 10000.0))
    perm = _gguf_permutation(d)
    rotated_half = ops.rope(x, cos, sin, interleaved=False)
    rotated_interleaved = ops.rope(x[..., perm], cos, sin, interleaved=True)
    _close(rotated_interleaved, rotated_half[..., perm], atol=1e-5)


# -- Llama 3 frequency scaling -------------------------------------------------------------

LLAMA3_SETTINGS = [
    # (head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_positions)
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B / 3B
    (64, 10000.0, 4.0, 1.0, 4.0, 256),  # a short original context: every regime on 32 pairs
]


def _naive_llama3_inv_freq(head_dim, theta, factor, low, high, old_ctx):
    """Meta's ``apply_scaling``, one frequency at a time; also returns which regime each
    frequency fell in."""
    out, regimes = [], set()
    for freq in _naive_inv_freq(head_dim, theta):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(freq)
            regimes.add("high")
        elif wavelen > old_ctx / low:
            out.append(freq / factor)
            regimes.add("low")
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
            regimes.add("medium")
    return out, regimes


@pytest.mark.parametrize("setting", LLAMA3_SETTINGS)
def test_rope_inv_freq_llama3_scaling_matches_naive_formula(setting):
    head_dim, theta, factor, low, high, old_ctx = setting
    expected, regimes = _naive_llama3_inv_freq(head_dim, theta, factor, low, high, old_ctx)
    assert regimes == {"high", "low", "medium"}, "the setting must exercise all three regimes"
    scaling = RopeScaling(factor, low, high, old_ctx)
    out = ops.rope_inv_freq(head_dim, theta, scaling)
    _close(out, torch.tensor(expected, dtype=torch.float32), rtol=2e-6, atol=0)


def _transformers_llama3_inv_freq(head_dim, theta, factor, low, high, old_ctx):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    init = getattr(rope_utils, "ROPE_INIT_FUNCTIONS", {}).get("llama3")
    if init is None:
        pytest.skip("transformers.modeling_rope_utils has no 'llama3' RoPE init function")
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx,
    }
    shape = {
        "hidden_size": head_dim * 4,
        "num_attention_heads": 4,
        "head_dim": head_dim,
        "max_position_embeddings": old_ctx * int(factor),
    }
    try:
        probe = transformers.LlamaConfig()
        if hasattr(probe, "standardize_rope_params"):  # transformers 5: rope_parameters
            cfg = transformers.LlamaConfig(**shape, rope_parameters={**params, "rope_theta": theta})
        else:  # transformers 4: rope_theta + rope_scaling
            cfg = transformers.LlamaConfig(**shape, rope_theta=theta, rope_scaling=params)
        inv_freq, _ = init(cfg, "cpu")
    except (TypeError, KeyError, AttributeError) as e:
        pytest.skip(f"transformers' llama3 RoPE init API differs from the expected one: {e!r}")
    return inv_freq


@pytest.mark.parametrize("setting", LLAMA3_SETTINGS)
def test_rope_inv_freq_llama3_scaling_matches_transformers(setting):
    expected = _transformers_llama3_inv_freq(*setting)
    head_dim, theta, factor, low, high, old_ctx = setting
    out = ops.rope_inv_freq(head_dim, theta, RopeScaling(factor, low, high, old_ctx))
    _close(out, expected.float(), rtol=1e-6, atol=0)


# -- masked softmax ------------------------------------------------------------------------


def _naive_masked_softmax_rows(scores_2d, offset):
    """scores (T, L): row i softmaxes keys j <= offset + i, zeros beyond."""
    t, length = scores_2d.shape
    out = torch.zeros(t, length, dtype=torch.float64)
    for i in range(t):
        visible = [float(scores_2d[i, j]) for j in range(length) if j <= offset + i]
        m = max(visible)
        exps = [math.exp(s - m) for s in visible]
        total = sum(exps)
        for j, e in enumerate(exps):
            out[i, j] = e / total
    return out.float()


@pytest.mark.parametrize(("t", "offset"), [(5, 0), (1, 0), (1, 6), (3, 4)])
def test_masked_softmax_int_offset_matches_naive(t, offset):
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(2, t, offset + t, generator=g) * 3  # (H, T, L)
    out = reference_ops.masked_softmax(scores, offset)
    for h in range(2):
        _close(out[h], _naive_masked_softmax_rows(scores[h], offset))
    hidden = torch.arange(offset + t) > (offset + torch.arange(t)).unsqueeze(-1)
    assert (out[:, hidden] == 0).all(), "masked keys must get probability exactly 0"


def test_masked_softmax_per_sequence_offsets_against_4d_scores():
    g = torch.Generator().manual_seed(9)
    b, h, t = 3, 2, 2
    offsets = torch.tensor([[0], [3], [6]])  # (B, 1) against (B, H, T, L)
    length = int(offsets.max()) + t + 1  # one padding key beyond every sequence
    scores = torch.randn(b, h, t, length, generator=g) * 2
    out = reference_ops.masked_softmax(scores, offsets)
    assert out.shape == scores.shape
    for bi in range(b):
        for hi in range(h):
            expected = _naive_masked_softmax_rows(scores[bi, hi], int(offsets[bi, 0]))
            _close(out[bi, hi], expected)


def test_masked_softmax_per_sequence_offsets_against_3d_scores():
    g = torch.Generator().manual_seed(10)
    offsets = torch.tensor([2, 0])  # (B,) against (B, T, L)
    scores = torch.randn(2, 3, 5, generator=g)
    out = reference_ops.masked_softmax(scores, offsets)
    for bi in range(2):
        _close(out[bi], _naive_masked_softmax_rows(scores[bi], int(offsets[bi])))


# -- attention -------------------------------------------------------------------------------


def _naive_attention(q, k, v, offset):
    """q (T, H, D), k/v (L, K, D): query head h reads KV head h // (H / K)."""
    t, h, d = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    out = torch.zeros(t, h * d, dtype=torch.float64)
    for hi in range(h):
        kvh = hi // group
        for i in range(t):
            keys = range(offset + i + 1)
            scores = [float(q[i, hi] @ k[j, kvh]) / math.sqrt(d) for j in keys]
            m = max(scores)
            weights = [math.exp(s - m) for s in scores]
            total = sum(weights)
            for j, w in zip(keys, weights, strict=True):
                out[i, hi * d : (hi + 1) * d] += (w / total) * v[j, kvh].double()
    return out.float()


def _sdpa_reference(q, k, v, offset, *, enable_gqa):
    """torch's SDPA on (T, H, D) / (L, K, D) with the causal mask for ``offset``."""
    t, h, d = q.shape
    length, kv_heads, _ = k.shape
    mask = torch.arange(length) <= offset + torch.arange(t).unsqueeze(-1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if not enable_gqa:
        kh = kh.repeat_interleave(h // kv_heads, dim=0)
        vh = vh.repeat_interleave(h // kv_heads, dim=0)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1).reshape(t, h * d)


ATTN_CASES = [
    # (T, offset, H, K, D)
    (1, 7, 8, 2, 16),  # decode, GQA group of 4
    (5, 0, 4, 4, 8),  # prefill, plain multi-head
    (6, 0, 6, 2, 8),  # prefill, GQA group of 3
    (4, 9, 8, 4, 16),  # prefill after a cached prefix
    (1, 0, 2, 1, 8),  # first token, MQA
]


def _qkv(t, offset, h, k, d, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, t, h, d, generator=g)
    keys = torch.randn(*batch, offset + t, k, d, generator=g)
    values = torch.randn(*batch, offset + t, k, d, generator=g)
    return q, keys, values


@pytest.mark.parametrize(("t", "offset", "h", "k", "d"), ATTN_CASES)
def test_attention_matches_naive_loop_with_consecutive_heads_sharing_kv(t, offset, h, k, d):
    q, keys, values = _qkv(t, offset, h, k, d, seed=11)
    out = reference_ops.attention(q, keys, values, offset)
    assert out.shape == (t, h * d)
    _close(out, _naive_attention(q, keys, values, offset), atol=1e-5)


@pytest.mark.parametrize(("t", "offset", "h", "k", "d"), ATTN_CASES)
@pytest.mark.parametrize("enable_gqa", [False, True], ids=["repeat_interleave", "enable_gqa"])
def test_attention_matches_torch_sdpa(t, offset, h, k, d, enable_gqa):
    q, keys, values = _qkv(t, offset, h, k, d, seed=12)
    expected = _sdpa_reference(q, keys, values, offset, enable_gqa=enable_gqa)
    _close(reference_ops.attention(q, keys, values, offset), expected, atol=1e-5)


def test_attention_batched_with_int_offset_matches_per_sequence():
    q, keys, values = _qkv(3, 4, 8, 2, 8, seed=13, batch=(2,))
    out = reference_ops.attention(q, keys, values, 4)
    for b in range(2):
        _close(out[b], _naive_attention(q[b], keys[b], values[b], 4), atol=1e-5)


@pytest.mark.parametrize(("t", "offset", "h", "k", "d"), ATTN_CASES)
def test_fused_attention_equals_the_reference_operator(t, offset, h, k, d):
    q, keys, values = _qkv(t, offset, h, k, d, seed=15)
    _close(
        ops.fused_attention(q, keys, values, offset),
        reference_ops.attention(q, keys, values, offset),
    )
    one = torch.tensor([offset])  # the model's (B,) offsets for a single sequence
    _close(
        ops.fused_attention(q[None], keys[None], values[None], one)[0],
        _naive_attention(q, keys, values, offset),
        atol=1e-5,
    )


@pytest.mark.parametrize("t", [1, 3])
def test_fused_attention_hides_each_sequences_padding_like_the_reference(t):
    offsets = torch.tensor([0, 5, 2])
    g = torch.Generator().manual_seed(16)
    q = torch.randn(3, t, 8, 8, generator=g)
    keys = torch.randn(3, int(offsets.max()) + t, 2, 8, generator=g)
    values = torch.randn_like(keys)
    keys[0, t:] = 1e4  # padding past the shortest sequence's keys must not leak in
    expected = reference_ops.attention(q, keys, values, offsets)
    _close(ops.fused_attention(q, keys, values, offsets), expected, atol=1e-5)


@pytest.mark.parametrize("t", [1, 3])
def test_attention_batch_with_per_sequence_offsets_sees_only_its_own_keys(t):
    h, k, d = 8, 2, 8
    offsets = torch.tensor([0, 5, 2])  # (B,): tokens cached before each sequence's queries
    length = int(offsets.max()) + t  # right-padded: shorter sequences carry padding keys
    g = torch.Generator().manual_seed(14)
    q = torch.randn(3, t, h, d, generator=g)
    keys = torch.randn(3, length, k, d, generator=g)
    values = torch.randn(3, length, k, d, generator=g)
    out = reference_ops.attention(q, keys, values, offsets)
    assert out.shape == (3, t, h * d)
    for b, off in enumerate(offsets.tolist()):
        own = off + t  # this sequence's real keys
        _close(out[b], _naive_attention(q[b], keys[b, :own], values[b, :own], off), atol=1e-5)
        expected = _sdpa_reference(q[b], keys[b, :own], values[b, :own], off, enable_gqa=False)
        _close(out[b], expected, atol=1e-5)

    # Garbage in each sequence's padding (and beyond each query row's own limit) changes
    # nothing: row i of sequence b reads keys j <= offset_b + i only.
    noisy_k, noisy_v = keys.clone(), values.clone()
    for b, off in enumerate(offsets.tolist()):
        noisy_k[b, off + t :] = 1e4
        noisy_v[b, off + t :] = -1e4
    torch.testing.assert_close(reference_ops.attention(q, noisy_k, noisy_v, offsets), out)
    for b, off in enumerate(offsets.tolist()):
        for i in range(t):
            poked_v = values.clone()
            poked_v[b, off + i + 1 :] = 1e6
            poked = reference_ops.attention(q, keys, poked_v, offsets)
            torch.testing.assert_close(poked[b, i], out[b, i])


# -- sliding-window attention ------------------------------------------------------------


@pytest.mark.parametrize(("t", "offset", "window"), [(6, 0, 3), (1, 9, 4), (3, 5, 1), (4, 2, 8)])
def test_causal_mask_with_a_window_sees_only_the_last_window_keys(t, offset, window):
    """Query i (at position offset + i) sees keys offset + i - window < j <= offset + i: the
    last ``window`` keys, itself included, as transformers' ``sliding_window_overlay``."""
    mask = ops.causal_mask(t, offset + t + 2, offset, window=window)
    for i in range(t):
        pos = offset + i
        seen = [j for j in range(offset + t + 2) if mask[i, j]]
        assert seen == list(range(max(0, pos - window + 1), pos + 1))


def test_causal_mask_window_matches_transformers_sliding_window_mask():
    masking = pytest.importorskip("transformers.masking_utils")
    causal = masking.and_masks(masking.causal_mask_function, masking.sliding_window_overlay(5))
    t, offset = 4, 7
    theirs = torch.tensor(
        [
            [
                bool(causal(0, 0, torch.tensor(offset + i), torch.tensor(j)))
                for j in range(offset + t)
            ]
            for i in range(t)
        ]
    )
    assert torch.equal(ops.causal_mask(t, offset + t, offset, window=5), theirs)


@pytest.mark.parametrize("t", [1, 5])
def test_fused_attention_with_a_window_equals_attention_over_the_window_alone(t):
    """Per sequence (offsets 9 and 3, right-padded): the windowed mask gives what attention
    over only the window's keys gives."""
    window, offsets = 4, torch.tensor([9, 3])
    g = torch.Generator().manual_seed(21)
    length = ops.key_width(int(offsets.max()) + t)
    q = torch.randn(2, t, 4, 8, generator=g)
    keys, values = (
        torch.randn(2, length, 2, 8, generator=g),
        torch.randn(2, length, 2, 8, generator=g),
    )
    mask = ops.attention_mask(t, length, offsets, padded=True, device=q.device, window=window)
    out = ops.fused_attention(q, keys, values, offsets, mask=mask)
    for b, off in enumerate(offsets.tolist()):
        for i in range(t):
            lo, hi = max(0, off + i - window + 1), off + i + 1
            alone = ops.fused_attention(
                q[b, i : i + 1], keys[b, lo:hi], values[b, lo:hi], hi - lo - 1, padded=False
            )
            _close(out[b, i], alone[0], atol=1e-5)


def test_attention_mask_leaves_out_a_window_that_hides_nothing():
    assert ops.attention_mask(5, 5, 0, padded=False, device=torch.device("cpu"), window=8) == (
        None,
        True,
    )
    mask, causal = ops.attention_mask(5, 5, 0, padded=False, device=torch.device("cpu"), window=2)
    assert not causal and torch.equal(mask, ops.causal_mask(5, 5, 0, window=2))


# -- Gemma 2's operators -----------------------------------------------------------------


def test_gelu_tanh_matches_its_formula_and_transformers():
    x = torch.linspace(-6, 6, 101)
    formula = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    _close(ops.gelu_tanh(x), formula)
    activations = pytest.importorskip("transformers.activations")
    _close(ops.gelu_tanh(x), activations.ACT2FN["gelu_pytorch_tanh"](x))
    gate, up = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    _close(ops.geglu_tanh(gate, up), ops.gelu_tanh(gate) * up)


def test_soft_cap_bounds_values_and_keeps_small_ones():
    x = torch.tensor([-1e4, -50.0, -0.01, 0.0, 0.01, 50.0, 1e4])
    out = ops.soft_cap(x, 30.0)
    assert out.abs().max() <= 30.0
    _close(out, 30.0 * torch.tanh(x / 30.0))
    assert abs(out[4].item() - 0.01) < 1e-7 and out[3].item() == 0.0


def test_embedding_scale_rounds_the_multiplier_to_the_embeddings_dtype():
    x = torch.ones(3, dtype=torch.bfloat16)
    expected = torch.tensor(64**0.5 * 1.1).to(torch.bfloat16)
    assert torch.equal(ops.embedding_scale(x, 64**0.5 * 1.1), x * expected)
    _close(ops.embedding_scale(torch.ones(2), 8.0), torch.full((2,), 8.0))


def _naive_capped_attention(q, k, v, offset, scale, cap, window=None):
    """Per query and head: scores q.k * scale, soft-capped, over the keys it may see."""
    t, h, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    for i in range(t):
        pos = offset + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for hi in range(h):
            kk, vv = k[lo : pos + 1, hi // group].double(), v[lo : pos + 1, hi // group].double()
            s = cap * torch.tanh((kk @ q[i, hi].double()) * scale / cap)
            out[i, hi] = torch.softmax(s, 0) @ vv
    return out.float().reshape(t, h * d)


@pytest.mark.parametrize(("t", "offset", "window"), [(5, 0, None), (1, 9, None), (3, 6, 4)])
def test_fused_attention_with_softcap_and_scale_matches_naive(t, offset, window):
    g = torch.Generator().manual_seed(31)
    q = torch.randn(t, 4, 8, generator=g) * 3
    keys = torch.randn(offset + t, 2, 8, generator=g) * 3
    values = torch.randn(offset + t, 2, 8, generator=g)
    mask = ops.attention_mask(t, offset + t, offset, padded=False, device=q.device, window=window)
    out = ops.fused_attention(q, keys, values, offset, mask=mask, scale=0.3, softcap=2.0)
    _close(out, _naive_capped_attention(q, keys, values, offset, 0.3, 2.0, window), atol=1e-5)


def test_capped_attention_gives_the_same_bits_alone_and_beside_padding():
    """A decode query over its own 20 keys, alone and padded to 48 keys in a batch."""
    g = torch.Generator().manual_seed(32)
    q = torch.randn(2, 1, 4, 8, generator=g)
    keys, values = torch.randn(2, 48, 2, 8, generator=g), torch.randn(2, 48, 2, 8, generator=g)
    offsets = torch.tensor([19, 47])
    mask = ops.attention_mask(1, 48, offsets, padded=True, device=q.device)
    batched = ops.fused_attention(q, keys, values, offsets, mask=mask, softcap=5.0)
    alone = ops.fused_attention(q[:1], keys[:1, :20], values[:1, :20], 19, softcap=5.0)
    assert torch.equal(batched[0], alone[0])
