"""The operators of a Llama-family forward pass, one named function each.

Every function works on plain tensors with optional leading batch dimensions, so the same
code runs one sequence or a padded batch of many. Shapes use: B batch, T new tokens,
L keys (cached + new), H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def embedding(token_ids: Tensor, table: Tensor) -> Tensor:
    """Gather the rows of ``table`` (vocab, hidden) for ``token_ids`` (any shape)."""
    return table[token_ids]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Root-mean-square layer norm over the last dimension: x / rms(x) * weight.

    The statistic is taken in fp32 even for half-precision inputs, as the reference does,
    because squaring bf16 values loses the precision the normalisation needs.
    """
    # conversions only when needed: a decode step runs 61 norms, each call counts
    x32 = x if x.dtype == torch.float32 else x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (normed if normed.dtype == x.dtype else normed.to(x.dtype))


def head_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each attention head on its own: x (..., heads, D) scaled by weight (D,), or
    (heads, D) for a different weight per head.

    Qwen3 norms queries and keys this way before RoPE (``q_norm``, ``k_norm``), which keeps
    attention logits bounded however large the projections grow. The statistic is each
    head's D values, not the hidden size as in the layer norms; the arithmetic is
    ``rms_norm``'s over the last dimension, fp32 statistic included.
    """
    return rms_norm(x, weight, eps)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: object | None = None,
    *,
    long: bool = False,
) -> Tensor:
    """Inverse frequencies theta^(-2i/D) for the D/2 rotation pairs, scaled as ``scaling``
    (a ``config.RopeScaling``) says by its ``rope_type``:

    - "llama3": long wavelengths slowed by ``factor``, short ones kept, a smooth blend between;
    - "linear": every frequency slowed by ``factor`` (Gemma 3's global layers);
    - "longrope": each frequency divided by its own factor, ``short_factor`` for sequences
      within the original context, ``long_factor`` (``long=True``) past it (Phi-3).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.rope_type  # type: ignore[attr-defined]
    factor = scaling.factor  # type: ignore[attr-defined]
    if kind == "linear":
        return inv_freq / factor
    if kind == "longrope":
        factors = scaling.long_factor if long else scaling.short_factor  # type: ignore[attr-defined]
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor  # type: ignore[attr-defined]
    old_ctx = scaling.original_max_position_embeddings  # type: ignore[attr-defined]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    positions: Tensor, inv_freq: Tensor, attention_factor: float = 1.0
) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, shape positions.shape + (D/2,), both times
    ``attention_factor`` (LongRoPE's, which sharpens attention at long contexts)."""
    angles = positions.float().unsqueeze(-1) * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotary position embedding of ``x`` (..., T, heads, D) by angles cos/sin (..., T, D/2).

    Two layouts pair up the D dimensions differently:
    - rotate-half (Hugging Face, ``interleaved=False``): dimension i pairs with i + D/2;
    - interleaved (GGUF / Meta's original, ``interleaved=True``): 2i pairs with 2i + 1.
    hexin's model runs rotate-half; GGUF Q/K weights are permuted back to it at load, so
    the interleaved form is here for completeness and for that permutation's tests.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def causal_mask(
    num_queries: int,
    num_keys: int,
    offset: Tensor | int,
    device: torch.device | None = None,
    *,
    window: int | None = None,
) -> Tensor:
    """Boolean (…, T, L) mask, True where query i may see key j, i.e. j <= offset + i.

    ``offset`` is the number of tokens already cached before the queries: an int, or a
    tensor of per-sequence offsets shaped like the scores' leading dimensions (e.g. (B, 1)
    for (B, H, T, L) scores). In a right-padded batch the padding keys of a shorter
    sequence lie beyond its offset + i, so the same mask hides them.

    ``window``: sliding-window attention (Mistral, Qwen2's sliding layers, Gemma's local
    layers), each query sees only the last ``window`` keys, itself included:
    offset + i - window < j <= offset + i, as transformers' ``sliding_window_overlay``.
    Keys are a sequence's positions in order, so the window is a band of the causal mask.
    """
    q = torch.arange(num_queries, device=device).unsqueeze(-1)
    k = torch.arange(num_keys, device=device)
    if isinstance(offset, Tensor):
        offset = offset[..., None, None]
    pos = q + offset
    mask = k <= pos
    if window is not None:
        mask = mask & (k > pos - window)
    return mask


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_pytorch_tanh``):
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def geglu_tanh(gate: Tensor, up: Tensor) -> Tensor:
    """Gemma's gated MLP activation: gelu_tanh(gate) * up (SwiGLU with GELU for SiLU)."""
    return gelu_tanh(gate) * up


#: the gated MLP activation of each ``ModelConfig.hidden_act``
GATED_ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu_tanh}


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """Soft-capping (Gemma 2's attention and final logits): cap * tanh(x / cap), smooth,
    near x for |x| much below ``cap`` and never beyond it."""
    return torch.tanh(x / cap) * cap


def embedding_scale(x: Tensor, multiplier: float) -> Tensor:
    """Embeddings times ``multiplier`` (Gemma's sqrt(hidden)), the multiplier first rounded
    to the embeddings' dtype as transformers does (``embed_scale.to(weight.dtype)``)."""
    return x * torch.tensor(multiplier, dtype=torch.float32).to(x.dtype)


def matmul_transb(
    a: Tensor,
    b: Tensor,
    c: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> Tensor:
    """C = alpha * A @ B^T + beta * C, with B stored row-major as (out, in) like every
    weight matrix, so a projection is ``matmul_transb(x, weight)``. Returns a new tensor."""
    if c is None or beta == 0.0:
        out = a @ b.mT
        return out if alpha == 1.0 else out * alpha
    if a.dim() == 2 and c.dim() == 2:
        return torch.addmm(c, a, b.mT, beta=beta, alpha=alpha)
    return alpha * (a @ b.mT) + beta * c


#: decode attention reads keys in whole groups of this many: the fused kernel's sums over
#: keys round differently for different key counts, even when the extra keys are masked,
#: but not across whole groups of 16. Padding every decode step's keys to whole groups
#: makes a sequence's result the same whatever else is batched with it (tested).
KEY_GROUP = 16


def key_width(length: int) -> int:
    """Keys a decode step over ``length`` cached-plus-new tokens attends over: whole
    ``KEY_GROUP``s, the padding masked."""
    return -(-length // KEY_GROUP) * KEY_GROUP


#: how ``fused_attention`` hides what a query must not see: a boolean mask tensor (or None),
#: and whether the kernel's own causal masking applies instead
AttentionMask = tuple[Tensor | None, bool]


def attention_mask(
    t: int,
    length: int,
    offset: Tensor | int,
    *,
    padded: bool,
    device: torch.device,
    window: int | None = None,
) -> AttentionMask:
    """The mask for ``t`` queries over ``length`` keys after ``offset`` cached tokens.
    Built only when needed: over unpadded keys (``padded=False``: exactly offset + T of
    them) one query token sees them all, and a whole prompt with nothing cached is the
    kernel's own causal case, which skips the masked half of the work. Every layer of a
    step with the same ``window`` (see ``causal_mask``) has the same one, so the model
    builds it once per step and window. A window of at least ``length`` keys hides
    nothing and is left out."""
    if window is not None and length > window:
        if isinstance(offset, Tensor):
            offset = offset.view(*offset.shape, 1)
        return causal_mask(t, length, offset, device=device, window=window), False
    if not padded and t == length:  # a whole prompt, nothing cached: plain causal
        return None, t > 1
    if t > 1 or padded:
        if isinstance(offset, Tensor):
            offset = offset.view(*offset.shape, 1)  # broadcast over the head axis
        return causal_mask(t, length, offset, device=device), False
    return None, False


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offset: Tensor | int,
    *,
    padded: bool = True,
    mask: AttentionMask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Grouped-query causal self-attention through PyTorch's fused scaled-dot-product kernel.

    q (…, T, H, D); k, v (…, L, K, D) holding the cached keys followed by the new ones;
    ``offset`` = cached tokens before the queries, per sequence; keys past a sequence's
    own (right padding) are hidden by the same causal mask (``attention_mask``, or
    ``mask`` when the caller built it already). Returns (…, T, H * D).

    ``scale`` multiplies the scores (default 1 / sqrt(D); Gemma's query_pre_attn_scalar
    ** -0.5). ``softcap`` soft-caps the scaled scores before the mask and softmax
    (``soft_cap``, Gemma 2); the fused kernel has no such step, so those scores are
    written out (``capped_attention``).

    The kernel never materialises the (T, L) score tensor and serves grouped-query heads
    without copies. The tests hold it equal (to float rounding) to a readable
    reference written out op by op (tests/reference_ops.py), which is several times
    slower for decoding.
    """
    *lead, t, h, d = q.shape
    if mask is None:
        mask = attention_mask(t, k.shape[-3], offset, padded=padded, device=q.device)
    attn_mask, causal = mask
    if softcap is not None:
        if attn_mask is None and causal:
            attn_mask = causal_mask(t, k.shape[-3], 0, device=q.device)
        return capped_attention(q, k, v, attn_mask, scale=scale, softcap=softcap)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.movedim(-3, -2),
        k.movedim(-3, -2),
        v.movedim(-3, -2),
        attn_mask=attn_mask,
        is_causal=causal,
        enable_gqa=True,
        scale=scale,
    )
    return out.movedim(-3, -2).reshape(*lead, t, h * d)


def capped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    scale: float | None,
    softcap: float,
) -> Tensor:
    """Grouped-query attention with soft-capped scores, written out as transformers' eager
    Gemma 2 attention: scores = soft_cap(q k^T * scale, softcap), masked, softmax in fp32.
    q (…, T, H, D); k, v (…, L, K, D); ``mask`` a boolean (…, T, L) or (…, 1, T, L), True
    where a query sees a key. Returns (…, T, H * D).

    On a CPU the arithmetic runs in float64 and the result is rounded once: the sums over
    keys of a written-out attention round differently for different key counts (a batch's
    padding, a prompt in chunks), and float64 leaves those differences far below the
    output's rounding, so a sequence gets the same bits alone or batched."""
    *lead, t, h, d = q.shape
    group = h // k.shape[-2]
    acc = torch.float64 if q.device.type == "cpu" else torch.float32
    qh = q.movedim(-3, -2).to(acc)
    kh = k.movedim(-3, -2).to(acc).repeat_interleave(group, dim=-3)
    vh = v.movedim(-3, -2).to(acc).repeat_interleave(group, dim=-3)
    scores = soft_cap((qh @ kh.mT) * (d**-0.5 if scale is None else scale), softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vh).to(q.dtype).movedim(-3, -2).reshape(*lead, t, h * d)
