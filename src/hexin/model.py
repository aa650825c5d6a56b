"""The Llama-family forward pass over a batch of sequences with a KV cache, built from
``ops``: one pass for every family, what differs (a Q/K/V bias, q/k norms, sliding
windows, Gemma's norms, activation and soft-caps, a RoPE per layer kind) read from the
config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hexin import cpu, native, ops
from hexin.config import ModelConfig, RopeScaling, expected_shapes
from hexin.errors import ModelFormatError, UnsupportedOption
from hexin.kvcache import KVCache, KVView
from hexin.options import DTYPE_CHOICES, QUANT_CHOICES, ModelOptions
from hexin.quant import BlockLinear, Int4Linear, Int8Linear, Linear, concat_int4
from hexin.weights import LoadedModel


@dataclass
class LayerWeights:
    """One decoder layer: norms and its four projections, Q/K/V and gate/up each fused into
    one matrix so a step runs four matmuls per layer instead of seven."""

    attn_norm: Tensor
    qkv: Linear
    wo: Linear
    mlp_norm: Tensor
    gate_up: Linear
    down: Linear
    #: Qwen2's Q/K/V bias, fused like the projections, added after the (possibly quantized)
    #: product so that the weights keep their fast kernels
    qkv_bias: Tensor | None = None
    #: Qwen3's q_norm and k_norm weights, one row per query head then per key head (H + K, D),
    #: so that one call norms the heads that RoPE then rotates together
    qk_norm: Tensor | None = None
    #: Gemma 2's norms of the attention output and of the MLP output, before their residual
    #: adds (``mlp_norm`` is then its pre_feedforward_layernorm)
    post_attn_norm: Tensor | None = None
    post_mlp_norm: Tensor | None = None


@dataclass(frozen=True)
class Rotary:
    """One RoPE of the model, shared by the layers that rotate alike (Gemma 3 has two: its
    sliding and its global layers')."""

    inv_freq: Tensor
    #: cos and sin times this (LongRoPE's)
    attention_factor: float = 1.0

    @classmethod
    def build(
        cls,
        head_dim: int,
        theta: float,
        scaling: RopeScaling | None,
        context: int,
        device: torch.device,
    ) -> Rotary:
        """The RoPE for a model that runs sequences of up to ``context`` tokens.

        LongRoPE has two sets of frequencies. transformers picks one at each forward call,
        by the length the sequence reaches in it (the short factors up to the original
        context, the long ones past it), so keys already cached keep the other set's
        rotation, and a prompt's rotation would depend on how it is chunked and which
        prefix is cached. hexin picks once, as llama.cpp does, by the context it serves:
        the short factors when it is within the original context (then every sequence
        rotates as transformers rotates it), the long ones past it (as transformers rotates
        any prompt longer than the original context).
        """
        if scaling is None or scaling.rope_type != "longrope":
            return cls(ops.rope_inv_freq(head_dim, theta, scaling).to(device))
        long = context > scaling.original_max_position_embeddings
        inv_freq = ops.rope_inv_freq(head_dim, theta, scaling, long=long)
        return cls(inv_freq.to(device), scaling.attention_factor)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (..., D/2) at ``positions`` (any shape)."""
        return ops.rope_cos_sin(positions, self.inv_freq, self.attention_factor)


class Llama:
    """A Llama-family decoder: embedding, N x (attention + SwiGLU MLP, each pre-normed with a
    residual), final norm, LM head; Qwen2's Q/K/V bias and Qwen3's q/k norms where the config
    has them. Holds no per-sequence state: caches are passed in."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant: str = ModelOptions.quant,
        quantized: Mapping[str, object] | None = None,
        context: int | None = None,
    ) -> None:
        """``weights`` are the dense tensors under Hugging Face names; ``quantized`` a GGUF
        file's stored tensors (``LoadedModel.quantized``), used by ``quant="q4"``; ``quant``
        is one of ``options.QUANT_CHOICES`` ("auto" picks by device and file); ``context``
        the longest sequence it will run (default and most: the model's own)."""
        self.config = config
        limit = config.max_position_embeddings
        #: the longest sequence this model runs (an engine's context is at most this)
        self.context = min(context or limit, limit)
        self.dtype, self.device = dtype, torch.device(device)
        self.quant = resolve_quant(quant, self.device, quantized or {})
        #: keys and values are stored in bf16 by the quantized modes (half the bytes for
        #: attention to read, within their perplexity guard); "none" keeps ``dtype``, exact
        self.kv_dtype = dtype if self.quant == "none" else torch.bfloat16
        w = _checked_weights(config, weights, dtype, self.device)
        if config.norm_weight_offset:  # Gemma's norms scale by 1 + weight: add it once here
            for name, t in w.items():
                if name.endswith("norm.weight"):
                    w[name] = (t.float() + config.norm_weight_offset).to(dtype)
        self.mlp_act = ops.GATED_ACTIVATIONS[config.hidden_act]
        linear = _LinearFactory(w, quantized or {}, self.quant)
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = linear(["lm_head.weight"], head=True)
        self.layers = []
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv = [attn + "q_proj", attn + "k_proj", attn + "v_proj"]
            bias = torch.cat([w[name + ".bias"] for name in qkv]) if config.qkv_bias else None
            qk_norm = None
            if config.qk_norm:
                q_norm, k_norm = w[attn + "q_norm.weight"], w[attn + "k_norm.weight"]
                qk_norm = torch.cat([q_norm.expand(h, d), k_norm.expand(kv, d)])
            post = config.post_norms
            self.layers.append(
                LayerWeights(
                    attn_norm=w[p + "input_layernorm.weight"],
                    qkv=linear([name + ".weight" for name in qkv]),
                    wo=linear([attn + "o_proj.weight"]),
                    mlp_norm=w[
                        p
                        + ("pre_feedforward_layernorm" if post else "post_attention_layernorm")
                        + ".weight"
                    ],
                    gate_up=linear([mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
                    down=linear([mlp + "down_proj.weight"]),
                    qkv_bias=bias,
                    qk_norm=qk_norm,
                    post_attn_norm=w[p + "post_attention_layernorm.weight"] if post else None,
                    post_mlp_norm=w[p + "post_feedforward_layernorm.weight"] if post else None,
                )
            )
        #: each layer's sliding window (None: full attention)
        self.windows = [config.window(i) for i in range(config.num_layers)]
        rotaries: dict[tuple[float, RopeScaling | None], Rotary] = {}
        for i in range(config.num_layers):
            rope = config.rope(i)
            if rope not in rotaries:
                rotaries[rope] = Rotary.build(config.head_dim, *rope, self.context, self.device)
        #: each layer's RoPE (one for every layer but Gemma 3's)
        self.layer_rotary = [rotaries[config.rope(i)] for i in range(config.num_layers)]
        #: each layer as one call of hexin's own decode kernel, where every projection runs
        #: it (q4 weights, fp32 activations, bf16 cache on a CPU it was built for); else None
        self.fused: list[native.Layer] | None = None
        self.kernels: native.Kernels | None = None
        self._fuse_layers()

    def _fuse_layers(self) -> None:
        """Describe each layer to the native decode kernel where it can run the whole layer:
        Llama's, with Qwen2's Q/K/V bias, Qwen3's q/k norms and sliding windows (Mistral,
        Qwen2's sliding layers, Phi-3), which are what the most-run families add to it.
        Gemma's parts (post norms, soft-caps, GeGLU, embedding scale, a RoPE of its own for
        the sliding layers) are not in the kernel: such models run op by op, each
        projection still through the same block kernels (BlockLinear)."""
        if self.dtype != torch.float32 or self.kv_dtype != torch.bfloat16:
            return
        c = self.config
        kernel_layer = (
            not c.post_norms
            and c.hidden_act == "silu"
            and c.embedding_multiplier is None
            and c.norm_weight_offset == 0
            and c.attention_scale is None
            and c.attn_logit_softcap is None
            and c.final_logit_softcap is None
            # one rotation per step serves every layer (``_decode_fused``)
            and len({id(r) for r in self.layer_rotary}) == 1
        )
        if not kernel_layer:
            return
        fused, builds = [], set()
        for ly, window in zip(self.layers, self.windows, strict=True):
            mats = (ly.qkv, ly.wo, ly.gate_up, ly.down)
            if not all(isinstance(m, BlockLinear) for m in mats):
                return
            weights = tuple(m.native for m in mats)  # type: ignore[attr-defined]
            builds |= {m.kernels for m in mats}  # type: ignore[attr-defined]
            fused.append(
                native.layer_struct(
                    self.config,
                    ly.attn_norm,
                    ly.mlp_norm,
                    weights,
                    qkv_bias=ly.qkv_bias,
                    qk_norm=ly.qk_norm,
                    window=window,
                )
            )
        if len(builds) == 1:
            self.fused, self.kernels = fused, builds.pop()

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant: str = ModelOptions.quant,
        context: int | None = None,
    ) -> Llama:
        return cls(
            loaded.config,
            loaded.weights,
            dtype=dtype,
            device=device,
            quant=quant,
            quantized=loaded.quantized,
            context=context,
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a single-token decode step reads."""
        mats = [self.lm_head] + [
            m for ly in self.layers for m in (ly.qkv, ly.wo, ly.gate_up, ly.down)
        ]
        return sum(m.nbytes for m in mats)

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return KVCache(
            self.config,
            max_tokens=max_tokens or self.context,
            dtype=self.kv_dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: KVView,
        *,
        all_logits: bool = False,
        prompt: bool | None = None,
    ) -> Tensor:
        """Run ``tokens`` (B, T) after what ``cache`` holds and append them to it.

        Prefill is one call with the whole prompt; decode is one call per token (T = 1).
        ``prompt`` picks the prompt-processing kernels of a quantized model (default: when
        T > 1); pass True for a prompt's last token alone, after a prefix-cache hit, so
        every prompt token takes the same path (see ``quant.Int4Linear``).
        Returns fp32 logits (B, V) of the last position, or (B, T, V) with ``all_logits``.
        """
        cfg = self.config
        t = tokens.shape[1]
        wide = t > 1 if prompt is None else prompt
        if t == 1 and not wide and self.fused is not None and hasattr(cache, "slots"):
            logits = self._decode_fused(tokens, cache)
            return logits.unsqueeze(1) if all_logits else logits
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        offsets = cache.offsets  # (B,)
        cache.reserve(t)
        positions = offsets.unsqueeze(-1) + torch.arange(t, device=self.device)  # (B, T)
        rotations: dict[int, tuple[Tensor, Tensor]] = {}  # cos, sin per RoPE (by id)
        x = ops.embedding(tokens.to(self.device), self.embed)
        if cfg.embedding_multiplier is not None:
            x = ops.embedding_scale(x, cfg.embedding_multiplier)
        masks: dict[int | None, ops.AttentionMask] = {}  # per window, the same every layer
        for i, layer in enumerate(self.layers):
            n = ops.rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(n, prompt=wide)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk, v = qkv.unflatten(-1, (h + 2 * kv, d)).split((h + kv, kv), dim=-2)
            if layer.qk_norm is not None:
                qk = ops.head_rms_norm(qk, layer.qk_norm, cfg.rms_norm_eps)
            rotary = self.layer_rotary[i]
            cos_sin = rotations.get(id(rotary))
            if cos_sin is None:
                cos_sin = rotations[id(rotary)] = rotary.cos_sin(positions)
            q, k = ops.rope(qk, *cos_sin).split((h, kv), dim=-2)  # one rotation for both
            keys, values = cache.update(i, k, v)
            # decoding is memory-bound: attend in the cache's dtype (bf16 reads half the
            # bytes); prompts are compute-bound, where fp32 is faster on CPUs without AMX
            adt = x.dtype if wide else keys.dtype
            q, keys, values = (_cast(a, adt) for a in (q, keys, values))
            window = self.windows[i]
            mask = masks.get(window)
            if mask is None:
                mask = masks[window] = ops.attention_mask(
                    t,
                    keys.shape[-3],
                    offsets,
                    padded=cache.padded,
                    device=self.device,
                    window=window,
                )
            attn = ops.fused_attention(
                q,
                keys,
                values,
                offsets,
                mask=mask,
                scale=cfg.attention_scale,
                softcap=cfg.attn_logit_softcap,
            )
            out = layer.wo(_cast(attn, x.dtype), prompt=wide)
            if layer.post_attn_norm is not None:
                out = ops.rms_norm(out, layer.post_attn_norm, cfg.rms_norm_eps)
            x = x + out
            n = ops.rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(n, prompt=wide).chunk(2, -1)
            out = layer.down(self.mlp_act(gate, up), prompt=wide)
            if layer.post_mlp_norm is not None:
                out = ops.rms_norm(out, layer.post_mlp_norm, cfg.rms_norm_eps)
            x = x + out
        cache.advance(tokens)
        if not all_logits:
            x = x[:, -1]
        n = ops.rms_norm(x, self.norm, cfg.rms_norm_eps)
        logits = self.lm_head.refine_top(n, self.lm_head(n, prompt=wide).float())
        if cfg.final_logit_softcap is not None:
            logits = ops.soft_cap(logits, cfg.final_logit_softcap)
        return logits

    def _decode_fused(self, tokens: Tensor, cache: KVView) -> Tensor:
        """A decode step (T = 1) with each layer in one call of the native kernel, which
        computes every row on its own (the same result alone or in any batch)."""
        kernels, fused = self.kernels, self.fused
        assert kernels is not None and fused is not None
        offsets = cache.offsets
        cache.reserve(1)
        cos, sin = self.layer_rotary[0].cos_sin(offsets)  # one RoPE, as _fuse_layers asks
        step = native.DecodeStep(offsets, cos, sin, cache.slots())  # type: ignore[attr-defined]
        x = ops.embedding(tokens[:, 0], self.embed).float().contiguous()
        for i, layer in enumerate(fused):
            kernels.decode_layer(layer, step.at_layer(i), x)
        cache.advance(tokens)
        n = ops.rms_norm(x, self.norm, self.config.rms_norm_eps)
        return self.lm_head.refine_top(n, self.lm_head(n).float())


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a dispatch when it already is (hot-loop calls add up)."""
    return t if t.dtype == dtype else t.to(dtype)


DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" is the GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UnsupportedOption(f"unknown device {device!r}: use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedOption("--device cuda: torch sees no CUDA GPU on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" is float32 on a CPU (exact, and fastest for dense matmuls on CPUs without
    AMX) and bfloat16 on a GPU (tensor cores)."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise UnsupportedOption(
            f"unknown dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def load_llama(
    spec: str | None = None, options: ModelOptions | None = None
) -> tuple[LoadedModel, Llama]:
    """Load ``spec`` (see ``load_model``) and build the model the CLI flags ask for."""
    from hexin.weights import load_model

    options = options or ModelOptions()
    target = resolve_device(options.device)
    torch_dtype = resolve_dtype(options.dtype, target)
    loaded = load_model(spec)
    model = Llama.from_loaded(
        loaded, dtype=torch_dtype, device=target, quant=options.quant, context=options.context
    )
    return loaded, model


def resolve_quant(quant: str, device: torch.device, quantized: Mapping[str, object]) -> str:
    """The concrete mode for ``quant`` (see ``options.QUANT_CHOICES``) on ``device``."""
    if quant not in QUANT_CHOICES:
        raise UnsupportedOption(
            f"unknown quant mode {quant!r}: choose one of {', '.join(QUANT_CHOICES)}"
        )
    layer_matrices = [t for n, t in quantized.items() if n.startswith("model.layers.")]
    has_q4 = any(getattr(t, "is_int4", False) for t in layer_matrices)
    has_blocks = has_q4 or any(getattr(t, "is_blocks", False) for t in layer_matrices)
    if quant == "auto":
        # a quantized file runs quantized: its 4-bit blocks as int4, other blocks (Q5_0,
        # Q6_K, Q8_0, ...) in hexin's own 8-bit block kernel, fast on AVX2 and AVX-512
        # alike; without that kernel only 4-bit files gain over dense
        fast = has_q4 or (has_blocks and native.kernels() is not None)
        return "q4" if device.type == "cpu" and fast else "none"
    if quant != "none" and device.type != "cpu":
        raise UnsupportedOption(
            f"quant {quant!r} runs on the CPU only; on {device.type} use --quant none"
        )
    if quant == "q4" and not has_blocks:
        raise UnsupportedOption(
            "quant 'q4' needs a GGUF file with quantized weights (Q4_0, Q4_K_M, Q8_0, ...)"
        )
    return quant


class _LinearFactory:
    """Builds each (possibly fused) projection in the form the quant mode asks for."""

    def __init__(
        self, dense: Mapping[str, Tensor], quantized: Mapping[str, object], mode: str
    ) -> None:
        self.dense, self.quantized, self.mode = dense, quantized, mode

    def __call__(self, names: list[str], *, head: bool = False) -> Linear:
        """``head``: the LM head, whose top candidates are recomputed exactly after the
        product (``refine_top``), so one int8 term per activation row serves it."""
        weight = (
            torch.cat([self.dense[n] for n in names]) if len(names) > 1 else self.dense[names[0]]
        )
        if self.mode == "none":
            return Linear(weight)
        if self.mode == "q4":
            terms = 1 if head else 2
            kernels = native.kernels()
            groups = [getattr(self.quantized.get(n), "int4_groups", lambda: None)() for n in names]
            # in AMX's tiles where the build takes them, for whole groups of 16 outputs
            tiles = kernels.tiles if kernels is not None and weight.shape[0] % 16 == 0 else 0
            # prompts: int8 products where PyTorch (VNNI) or hexin (AMX) has a fast kernel;
            # elsewhere the tiled block kernel takes them too, faster than exact fp32 GEMMs
            # of int8 values (which read 4 bytes a weight), and the LM head keeps the int8
            # copy for ``refine_top``
            own_prompts = tiles and not head and cpu.int8_kernel() == "fp32"
            wide = None if own_prompts else Int8Linear(weight, terms=terms)
            if all(g is not None for g in groups):
                q, scale, zero = concat_int4(groups)  # type: ignore[arg-type]
                if kernels is not None:
                    weight4 = native.Q4Weight(q, scale, zero, tiles=tiles)
                    return BlockLinear(weight4, kernels, wide=wide, terms=terms)
                return Int4Linear(q, scale, zero, wide=Int8Linear(weight, terms=terms))
            if kernels is not None:  # e.g. the LM head, Q8_0 in the file (4 bits cost 2.2%)
                weight8 = native.Q8Weight(weight, signed=kernels.q8_signed, tiles=tiles)
                return BlockLinear(weight8, kernels, wide=wide, terms=terms)
        return Int8Linear(weight, terms=1 if head else 2)


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
    expected = expected_shapes(config, lm_head=True)
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
