"""The Llama forward pass over a batch of sequences with a KV cache, built from ``ops``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hexin import ops
from hexin.config import ModelConfig
from hexin.errors import ModelFormatError
from hexin.kvcache import KVCache, KVView


@dataclass
class LayerWeights:
    """One decoder layer's tensors, weight matrices stored (out, in)."""

    attn_norm: Tensor
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    mlp_norm: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor


class Llama:
    """A Llama decoder: embedding, N x (attention + SwiGLU MLP, each pre-normed with a
    residual), final norm, LM head. Holds no per-sequence state: caches are passed in."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        w = _checked_weights(config, weights, dtype, self.device)
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = w["lm_head.weight"]
        self.layers = [
            LayerWeights(
                attn_norm=w[f"model.layers.{i}.input_layernorm.weight"],
                wq=w[f"model.layers.{i}.self_attn.q_proj.weight"],
                wk=w[f"model.layers.{i}.self_attn.k_proj.weight"],
                wv=w[f"model.layers.{i}.self_attn.v_proj.weight"],
                wo=w[f"model.layers.{i}.self_attn.o_proj.weight"],
                mlp_norm=w[f"model.layers.{i}.post_attention_layernorm.weight"],
                w_gate=w[f"model.layers.{i}.mlp.gate_proj.weight"],
                w_up=w[f"model.layers.{i}.mlp.up_proj.weight"],
                w_down=w[f"model.layers.{i}.mlp.down_proj.weight"],
            )
            for i in range(config.num_layers)
        ]
        self.inv_freq = ops.rope_inv_freq(
            config.head_dim, config.rope_theta, config.rope_scaling
        ).to(self.device)

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.config, max_tokens=max_tokens, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVView, *, all_logits: bool = False) -> Tensor:
        """Run ``tokens`` (B, T) after what ``cache`` holds and append them to it.

        Prefill is one call with the whole prompt; decode is one call per token (T = 1).
        Returns fp32 logits (B, V) of the last position, or (B, T, V) with ``all_logits``.
        """
        cfg = self.config
        b, t = tokens.shape
        offsets = cache.offsets  # (B,)
        cache.reserve(t)
        positions = offsets.unsqueeze(-1) + torch.arange(t, device=self.device)  # (B, T)
        cos, sin = ops.rope_cos_sin(positions, self.inv_freq)
        x = ops.embedding(tokens.to(self.device), self.embed)
        for i, layer in enumerate(self.layers):
            n = ops.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            q = ops.matmul_transb(n, layer.wq).view(b, t, cfg.num_heads, cfg.head_dim)
            k = ops.matmul_transb(n, layer.wk).view(b, t, cfg.num_kv_heads, cfg.head_dim)
            v = ops.matmul_transb(n, layer.wv).view(b, t, cfg.num_kv_heads, cfg.head_dim)
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            keys, values = cache.update(i, k, v)
            x = x + ops.matmul_transb(ops.attention(q, keys, values, offsets), layer.wo)
            x = ops.mlp(x, layer.mlp_norm, layer.w_gate, layer.w_up, layer.w_down, cfg.rms_norm_eps)
        cache.advance(tokens)
        if not all_logits:
            x = x[:, -1]
        return ops.matmul_transb(ops.rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head).float()


def _checked_weights(
    config: ModelConfig, weights: Mapping[str, Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """Every tensor the config implies, with the right shape, converted; tied embeddings
    resolved whichever of the two names the file stored."""
    w = dict(weights)
    if "lm_head.weight" not in w and "model.embed_tokens.weight" in w:
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    if "model.embed_tokens.weight" not in w and "lm_head.weight" in w:
        w["model.embed_tokens.weight"] = w["lm_head.weight"]
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    expected = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "lm_head.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_out, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_out),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
    out: dict[str, Tensor] = {}
    for name, shape in expected.items():
        if name not in w:
            raise ModelFormatError(f"weights are missing tensor {name!r}")
        tensor = w[name]
        if tuple(tensor.shape) != shape:
            raise ModelFormatError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {shape}"
            )
        out[name] = tensor.to(device=device, dtype=dtype)
    return out
