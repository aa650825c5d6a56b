"""ModelConfig: the shape of a Llama-family model, from config.json or GGUF metadata.

Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma 2 share one forward pass; what tells them apart
is data here (``qkv_bias``, ``qk_norm``, ``sliding_window``, Gemma's norms, activation and
soft-caps), read from either source. Both sources are reduced to one
validated dataclass so that the model code never needs to know where its weights came from:
:meth:`ModelConfig.from_hf` reads a ``config.json`` dictionary, :meth:`ModelConfig.from_gguf`
the key/values of a GGUF header (parsed by :mod:`hexin.weights.gguf`). :func:`expected_shapes`
is the one statement of the tensors (under Hugging Face names) and shapes a config implies,
checked by both the GGUF loader and the model.

This module stays free of torch and of the weights package (stdlib and :mod:`hexin.errors`
only), so that configs can be read and checked without importing either.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hexin.errors import ModelFormatError

#: HF ``architectures`` entries hexin runs, and the family each is (``ModelConfig.architecture``).
#: Mistral differs from Llama only in its optional sliding-window attention (``sliding_window``);
#: Qwen2 adds a Q/K/V bias (and may slide some layers), Qwen3 a per-head q/k norm; Gemma 2
#: differs in the fields from ``hidden_act`` on, Gemma 3 adds Qwen3's q/k norms and a RoPE
#: base of its own for the sliding layers. Phi-3 is Llama's layer (a sliding window
#: optional, as Mistral's) with Q/K/V and gate/up stored fused, split at load
#: (:func:`split_fused_names`), and LongRoPE scaling in its long-context models.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
#: ``transformers.Gemma3TextConfig``'s defaults (5.24; the two RoPE bases as its
#: ``default_theta``, the pattern as its ``sliding_window_pattern`` argument): a multimodal
#: Gemma 3 folder's ``text_config`` states little beyond the sizes (the 4B's: hidden and MLP
#: width, layers, window, RoPE scaling), transformers filling in the rest from these
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
#: multimodal HF architectures whose text model hexin runs (text only): the text-only
#: architecture that model is, and the defaults of the settings its ``text_config`` omits.
#: The loader drops the vision tensors and strips the language model's name prefix
#: (``hexin.weights.safetensors.text_model_name``)
HF_MULTIMODAL = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", GEMMA3_TEXT_DEFAULTS)}
#: GGUF ``general.architecture`` values hexin runs (llama.cpp's names; its key prefix too)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
#: the Gemma families, which share embedding scale, norm offset, sandwich norms and GELU
GEMMA = ("gemma2", "gemma3")
#: gated MLP activations hexin implements (``ops.GATED_ACTIVATIONS``)
HIDDEN_ACTS = ("silu", "gelu_tanh")
#: transformers' names of those activations
HF_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
#: attention layer kinds hexin implements, as transformers names them (``layer_types``)
LAYER_TYPES = ("full_attention", "sliding_attention")
#: RoPE types hexin implements, as transformers names them (``rope_type``)
ROPE_TYPES = ("default", "llama3", "linear", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``ops.rope_inv_freq``); ``None`` on the config means plain
    RoPE. ``rope_type`` as transformers names it: "llama3" (Llama 3.1+: ``factor`` and the
    two blend bounds), "linear" (every frequency slowed by ``factor``) or "longrope" (Phi-3's
    per-frequency ``short_factor`` / ``long_factor``, cos and sin times ``attention_factor``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    #: the context the model was pre-trained at (LongRoPE: sequences past it take the long
    #: factors)
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only Llama-family model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    #: sliding-window attention: a query of a sliding layer sees only the last
    #: ``sliding_window`` keys, itself included (``ops.causal_mask``); None: none slides
    sliding_window: int | None = None
    #: each layer's kind as transformers names it (``full_attention``, ``sliding_attention``);
    #: empty: every layer slides when ``sliding_window`` is set (Mistral)
    layer_types: tuple[str, ...] = ()
    #: the family (``HF_ARCHITECTURES``' values), for display; the fields below carry
    #: everything in which the families' forward passes differ
    architecture: str = "llama"
    #: a bias on the query, key and value projections (Qwen2), added after the product
    qkv_bias: bool = False
    #: RMSNorm over each query and key head before RoPE (Qwen3's ``q_norm`` / ``k_norm``)
    qk_norm: bool = False
    #: the gated MLP's activation (``ops.GATED_ACTIVATIONS``): ``silu`` (SwiGLU) or
    #: ``gelu_tanh`` (Gemma)
    hidden_act: str = "silu"
    #: embeddings multiplied by this (Gemma: sqrt(hidden_size)); None: not scaled
    embedding_multiplier: float | None = None
    #: every RMSNorm weight is stored as an offset from this (Gemma: 1, the norm scales by
    #: 1 + weight); the model adds it at load
    norm_weight_offset: float = 0.0
    #: Gemma 2's sandwich norms: the attention and MLP outputs normed again before their
    #: residual adds (``post_attention_layernorm``, ``post_feedforward_layernorm``), the MLP's
    #: input by ``pre_feedforward_layernorm``
    post_norms: bool = False
    #: attention scores times this (None: 1 / sqrt(head_dim); Gemma: query_pre_attn_scalar
    #: ** -0.5)
    attention_scale: float | None = None
    #: soft-cap of the attention scores (``ops.soft_cap``; Gemma 2), None: none
    attn_logit_softcap: float | None = None
    #: soft-cap of the final logits (Gemma 2), None: none
    final_logit_softcap: float | None = None
    #: RoPE base of the sliding layers (Gemma 3's ``rope_local_base_freq``), which take no
    #: scaling; None: they rotate as the full-attention layers do
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ModelFormatError(
                f"config: hidden_act {self.hidden_act!r} is not supported (hexin: "
                f"{', '.join(HIDDEN_ACTS)})"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ModelFormatError(
                f"config: sliding_window must be a positive integer, got {self.sliding_window!r}"
            )
        scaling = self.rope_scaling
        if scaling is not None and scaling.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(scaling, name)) != self.head_dim // 2:
                    raise ModelFormatError(
                        f"config: LongRoPE {name} has {len(getattr(scaling, name))} entries, "
                        f"expected head_dim / 2 = {self.head_dim // 2}"
                    )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ModelFormatError(
                    f"config: layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_layers} layers"
                )
            kinds = set(self.layer_types) - set(LAYER_TYPES)
            if kinds:
                raise ModelFormatError(
                    f"config: layer_types {sorted(kinds)} are not supported (hexin runs "
                    f"{', '.join(LAYER_TYPES)})"
                )

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(base, scaling) of layer ``layer``'s RoPE."""
        if self.local_rope_theta is not None and self.window(layer) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def group_size(self) -> int:
        """How many consecutive query heads share one KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary.

        A setting that would change the math and that hexin does not implement (another
        activation, biases beyond Qwen2's, a RoPE type, sliding-window layers of Qwen) is
        refused here by name: running the model without it would give wrong text silently.
        """
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch in HF_MULTIMODAL:
            cfg = _hf_text_config(cfg, arch)
            arch = cfg["architectures"][0]
        family = HF_ARCHITECTURES.get(arch)
        if family is None:
            hint = ""
            if str(arch).endswith("ForConditionalGeneration"):  # e.g. Llava, Mistral 3
                hint = " (a multimodal checkpoint: a GGUF of its text model may run)"
            raise ModelFormatError(
                f"unsupported architecture {arch!r}{hint}; hexin runs "
                f"{', '.join([*HF_ARCHITECTURES, *HF_MULTIMODAL])}"
            )
        _check_hf_settings(cfg, family)
        rope_theta, rope_scaling, local_rope_theta = _hf_rope(cfg, family)
        sliding_window, layer_types = _hf_sliding_window(cfg, family)
        gemma = family in GEMMA
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=sliding_window,
                layer_types=layer_types,
                architecture=family,
                qkv_bias=family == "qwen2",
                qk_norm=family in ("qwen3", "gemma3"),
                hidden_act=HF_ACTS[cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")],
                embedding_multiplier=hidden**0.5 if gemma else None,
                norm_weight_offset=1.0 if gemma else 0.0,
                post_norms=gemma,
                attention_scale=(
                    float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None
                ),
                attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping"))
                if gemma
                else None,
                final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping"))
                if gemma
                else None,
                local_rope_theta=local_rope_theta,
            )
        except KeyError as e:
            raise ModelFormatError(f"config.json is missing {e.args[0]!r}") from None

    @classmethod
    def from_gguf(
        cls,
        metadata: Mapping[str, Any],
        *,
        source: str,
        vocab_rows: int | None,
        tie_word_embeddings: bool,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        qkv_bias: bool = False,
        rope_scaling_from_freqs: Callable[[float, int, int], RopeScaling | None] | None = None,
        longrope_factors: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> ModelConfig:
        """Build from the ``<arch>.*`` key/values of a GGUF header (``general.architecture``
        one of ``GGUF_ARCHITECTURES``; llama.cpp prefixes every hyper-parameter with it).

        ``source`` (the file) prefixes every error. What the metadata does not say comes from the
        loader: ``vocab_rows``, the token embedding's rows (else the token count), used when
        ``<arch>.vocab_size`` is absent; whether the file has no separate ``output.weight``; the
        BOS/EOS ids of its vocabulary; ``<arch>.attention.sliding_window``, when present,
        slides every layer (a Mistral file; llama.cpp's converter may leave it out, and such
        a file runs full attention); whether it has Q/K/V biases (``attn_q.bias``: llama.cpp
        requires them of qwen2 files and takes them in llama ones). Qwen3 always has q/k norms.
        llama.cpp stores Llama 3 RoPE scaling as a
        ``rope_freqs.weight`` tensor; when the file has one, ``rope_scaling_from_freqs`` recovers
        the scaling from it, given ``(rope_theta, head_dim, original_context_length)``;
        Phi-3's LongRoPE as two tensors, ``rope_factors_short`` and ``rope_factors_long``,
        passed as ``longrope_factors`` (short, long). Linear scaling is metadata (Gemma 3).
        """
        arch = check_gguf_architecture(metadata, source)
        meta = metadata
        hidden = _meta_int(meta, f"{arch}.embedding_length", source)
        heads = _meta_int(meta, f"{arch}.attention.head_count", source)
        kv_heads = _meta_int(meta, f"{arch}.attention.head_count_kv", source, heads)
        head_dim = _meta_int(
            meta,
            f"{arch}.attention.key_length",
            source,
            meta.get(f"{arch}.rope.dimension_count", hidden // heads if heads else None),
        )
        rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise ModelFormatError(
                f"{source}: partial rotary embedding (rope.dimension_count {rope_dims} < "
                f"head_dim {head_dim}) is not supported"
            )
        vocab_size = _meta_int(meta, f"{arch}.vocab_size", source, vocab_rows)
        theta = _meta_float(meta, f"{arch}.rope.freq_base", source, 10000.0)

        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", "", None, "linear"):
            raise ModelFormatError(
                f"{source}: RoPE scaling type {scaling_type!r} is not supported (hexin supports "
                "plain RoPE, linear, Llama 3 and LongRoPE scaling)"
            )
        context = _meta_int(meta, f"{arch}.context_length", source, 2048)
        original = _meta_int(meta, f"{arch}.rope.scaling.original_context_length", source, 8192)
        rope_scaling = None
        if scaling_type == "linear":
            factor = _meta_float(meta, f"{arch}.rope.scaling.factor", source, 1.0)
            rope_scaling = RopeScaling(factor=factor, rope_type="linear") if factor != 1 else None
        elif longrope_factors is not None:
            attention = _meta_float(meta, f"{arch}.rope.scaling.attn_factor", source, 1.0)
            rope_scaling = RopeScaling(
                factor=context / original,
                original_max_position_embeddings=original,
                rope_type="longrope",
                short_factor=longrope_factors[0],
                long_factor=longrope_factors[1],
                attention_factor=attention,
            )
        elif rope_scaling_from_freqs is not None:
            rope_scaling = rope_scaling_from_freqs(theta, head_dim, original)

        # read before the ``try`` below, whose messages get the ``source`` prefix added
        layers = _meta_int(meta, f"{arch}.block_count", source)
        ffn = _meta_int(meta, f"{arch}.feed_forward_length", source)
        eps = _meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", source, 1e-5)
        window = meta.get(f"{arch}.attention.sliding_window")
        gemma_options: dict[str, Any] = {}
        if arch in GEMMA:
            # as llama.cpp runs gemma2 and gemma3 files: layers slide by the pattern (Gemma
            # 2: 0, 2, ...; Gemma 3: five in six) unless the file gives its own; norms stored
            # as 1 + weight by the converter (so no offset here); the query scale is not in
            # the file: 1 / sqrt(hidden / heads) for the 27B models (46 and 62 layers), else
            # 1 / sqrt(head_dim), which are the models' query_pre_attn_scalar; Gemma 3's
            # sliding layers rotate with base 10000 unless the file gives another
            gemma3 = arch == "gemma3"
            pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6 if gemma3 else 2)
            if isinstance(pattern, numbers.Integral):
                slides = [bool((i + 1) % int(pattern)) for i in range(layers)]
            else:
                slides = [bool(b) for b in pattern]
            gemma_options = dict(
                layer_types=tuple(
                    "sliding_attention" if slide else "full_attention" for slide in slides
                ),
                hidden_act="gelu_tanh",
                embedding_multiplier=hidden**0.5,
                post_norms=True,
                attention_scale=(hidden / heads if layers in (46, 62) else head_dim) ** -0.5,
                attn_logit_softcap=_meta_optional_float(meta, f"{arch}.attn_logit_softcapping"),
                final_logit_softcap=_meta_optional_float(meta, f"{arch}.final_logit_softcapping"),
                local_rope_theta=_meta_float(meta, f"{arch}.rope.freq_base_swa", source, 10000.0)
                if gemma3
                else None,
            )
        window = (
            None if window is None else _meta_int(meta, f"{arch}.attention.sliding_window", source)
        )
        try:
            return cls(
                vocab_size=vocab_size,
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=ffn,
                rms_norm_eps=eps,
                rope_theta=theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=context,
                tie_word_embeddings=tie_word_embeddings,
                bos_token_id=bos_token_id,
                eos_token_ids=eos_token_ids,
                architecture=arch,
                qkv_bias=qkv_bias,
                qk_norm=arch in ("qwen3", "gemma3"),
                sliding_window=window,
                **gemma_options,
            )
        except ModelFormatError as e:
            raise ModelFormatError(f"{source}: {e}") from None


def expected_shapes(
    config: ModelConfig, *, lm_head: bool | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor ``config`` implies, under its Hugging Face name, with its shape.

    ``lm_head.weight`` is listed when ``lm_head`` is true; by default only for untied
    embeddings (a file with tied embeddings stores the one matrix as
    ``model.embed_tokens.weight``). The model, which resolves the tie itself, always wants it.
    """
    c = config
    h = c.hidden_size
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if lm_head if lm_head is not None else not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (c.intermediate_size, h),
            p + "mlp.up_proj.weight": (c.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, c.intermediate_size),
        }
        if c.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if c.post_norms:
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (h,),
                p + "post_feedforward_layernorm.weight": (h,),
            }
        if c.qk_norm:
            shapes |= {
                p + "self_attn.q_norm.weight": (c.head_dim,),
                p + "self_attn.k_norm.weight": (c.head_dim,),
            }
    return shapes


def split_fused_names(config: ModelConfig, layer: int) -> dict[str, list[tuple[str, int]]]:
    """Phi-3's fused tensors of layer ``layer`` and how they split by rows into the names
    :func:`expected_shapes` lists: ``qkv_proj`` into q, k, v and ``gate_up_proj`` into gate,
    up (gate first), each as (name, rows). Empty for the other families, whose files
    have no place for such tensors."""
    c = config
    if c.architecture != "phi3":
        return {}
    p = f"model.layers.{layer}."
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        p + "self_attn.qkv_proj.weight": [
            (p + "self_attn.q_proj.weight", q_out),
            (p + "self_attn.k_proj.weight", kv_out),
            (p + "self_attn.v_proj.weight", kv_out),
        ],
        p + "mlp.gate_up_proj.weight": [
            (p + "mlp.gate_proj.weight", c.intermediate_size),
            (p + "mlp.up_proj.weight", c.intermediate_size),
        ],
    }


def check_gguf_architecture(metadata: Mapping[str, Any], source: str) -> str:
    """The file's ``general.architecture``, refused unless it is a dense model of one of
    ``GGUF_ARCHITECTURES`` (``source`` names the file)."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelFormatError(
            f"{source}: unsupported architecture {arch!r} (general.architecture); "
            f"hexin runs {', '.join(map(repr, GGUF_ARCHITECTURES))}"
        )
    if _meta_int(metadata, f"{arch}.expert_count", source, 0) > 0:
        raise ModelFormatError(
            f"{source}: a mixture-of-experts {arch!r} model ({arch}.expert_count = "
            f"{metadata[f'{arch}.expert_count']}); hexin runs dense models only"
        )
    return arch


def _meta_int(meta: Mapping[str, Any], key: str, source: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ModelFormatError(f"{source}: required metadata {key!r} is missing")
    if getattr(value, "size", None) == 1 and hasattr(value, "item"):  # a one-element array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelFormatError(f"{source}: metadata {key!r} should be an integer, got {value!r}")
    return int(value)


def _meta_optional_float(meta: Mapping[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return None if value is None else float(value)


def _meta_float(meta: Mapping[str, Any], key: str, source: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelFormatError(f"{source}: metadata {key!r} should be a number, got {value!r}")
    return float(value)


def _hf_text_config(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """The text model's settings of a multimodal config.json (``HF_MULTIMODAL``), flat as
    its text-only architecture's: ``text_config`` over transformers' defaults for the keys
    it omits (as transformers builds it), then the top level's token ids and tie, which
    are the whole model's (Gemma 3 4B states its EOS ids only there; transformers ties the
    head by the top level's flag)."""
    causal, defaults = HF_MULTIMODAL[arch]
    text = cfg.get("text_config") or {}
    if not isinstance(text, Mapping):
        raise ModelFormatError(f"config.json: text_config must be an object, got {text!r}")
    top = ("bos_token_id", "eos_token_id", "tie_word_embeddings")
    return {**defaults, **text, **{k: cfg[k] for k in top if k in cfg}, "architectures": [causal]}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _hf_sliding_window(cfg: Mapping[str, Any], family: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers reads them: Mistral slides every layer
    by ``sliding_window`` (null: none); Qwen2 only with ``use_sliding_window``, the layers
    ``layer_types`` names (by default those from ``max_window_layers`` on)."""
    if family in ("mistral", "phi3"):
        window = cfg.get("sliding_window")
        return (None if window is None else int(window)), ()
    if family in GEMMA:  # Gemma 2: every other layer slides, the first one first; Gemma 3:
        # five in six (``sliding_window_pattern``), the sixth global
        window = cfg.get("sliding_window", 4096)
        layers = int(cfg.get("num_hidden_layers", 0))
        pattern = int(cfg.get("sliding_window_pattern", 2 if family == "gemma2" else 6))
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ]
        return (None if window is None else int(window)), tuple(types)
    if family != "qwen2":
        return None, ()
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layers = int(cfg.get("num_hidden_layers", 0))
    types = cfg.get("layer_types") or [
        "sliding_attention"
        if window is not None and i >= int(cfg.get("max_window_layers", 28))
        else "full_attention"
        for i in range(layers)
    ]
    return (None if window is None else int(window)), tuple(types)


def _check_hf_settings(cfg: Mapping[str, Any], family: str) -> None:
    """Refuse config.json settings that change the math and that hexin's forward pass does
    not implement, each by its key (absent keys take transformers' defaults)."""
    gemma = family in GEMMA
    key = "hidden_activation" if gemma else "hidden_act"
    act = cfg.get(key) or ("gelu_pytorch_tanh" if gemma else "silu")
    expected = "gelu_pytorch_tanh" if gemma else "silu"
    if act != expected:
        raise ModelFormatError(
            f"config.json: {key} {act!r} is not supported for {family} (hexin: {expected})"
        )
    # Qwen2's Q/K/V bias is its architecture's, not a setting; these put a bias on every
    # attention projection (the output one included) or on the MLP
    # Gemma 3's embedding models attend both ways
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise ModelFormatError(f"config.json: {key} = true is not supported")
    if family == "qwen2" or gemma:  # their sliding layers are read by _hf_sliding_window
        return
    if cfg.get("use_sliding_window"):
        raise ModelFormatError(
            f"config.json: use_sliding_window (sliding-window attention layers) is not "
            f"supported for {family}"
        )
    kinds = set(cfg.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        raise ModelFormatError(
            f"config.json: layer_types {sorted(kinds)} are not supported for {family} (hexin "
            "runs full_attention layers there)"
        )


def _hf_rope(cfg: Mapping[str, Any], family: str) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, scaling, local_rope_theta) from either layout of config.json.

    transformers 5 writes one ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and the
    scaling keys), or for Gemma 3 one per layer type; earlier versions a top-level
    ``rope_theta`` beside a ``rope_scaling`` dict (and Gemma 3's ``rope_local_base_freq``).
    As transformers does, the dict wins and top-level keys fill in what it lacks. A RoPE type
    hexin does not implement is refused by name: run as plain RoPE it would give wrong text.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    local_theta = None
    if family == "gemma3":
        local = params.get("sliding_attention") if isinstance(params, Mapping) else None
        if local is not None or "full_attention" in params:
            params = params.get("full_attention") or {}
            local = local or {}
            if (local.get("rope_type") or "default") != "default":
                raise ModelFormatError(
                    f"config.json: RoPE type {local['rope_type']!r} on sliding layers is not "
                    "supported"
                )
            local_theta = float(local.get("rope_theta") or 10000.0)
        else:
            local_theta = float(cfg.get("rope_local_base_freq") or 10000.0)
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise ModelFormatError(
            f"config.json: RoPE parameters per layer type ({params!r}) are not supported"
        )
    kind = params.get("rope_type", params.get("type")) or "default"
    kind = "longrope" if kind == "su" else kind  # its first name, in early Phi-3 configs
    if kind not in ROPE_TYPES:
        raise ModelFormatError(
            f"config.json: RoPE type {kind!r} is not supported (hexin runs "
            f"{', '.join(map(repr, ROPE_TYPES))})"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise ModelFormatError(
            f"config.json: partial_rotary_factor {partial!r} is not supported (RoPE over whole "
            "heads only)"
        )
    default_theta = 1e6 if family == "gemma3" else 10000.0
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or default_theta)
    if kind == "default":
        return theta, None, local_theta
    try:
        original = int(
            params.get("original_max_position_embeddings")
            or cfg.get("original_max_position_embeddings")
            or cfg["max_position_embeddings"]
        )
        if kind == "linear":
            scaling = RopeScaling(factor=float(params["factor"]), rope_type=kind)
        elif kind == "longrope":
            # as transformers: the factor is the context's growth unless given, and the
            # attention factor follows from it unless given
            factor = float(params.get("factor") or cfg["max_position_embeddings"] / original)
            attention = params.get("attention_factor")
            if attention is None:
                attention = (
                    math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
                )
            scaling = RopeScaling(
                factor=factor,
                original_max_position_embeddings=original,
                rope_type=kind,
                short_factor=tuple(float(f) for f in params["short_factor"]),
                long_factor=tuple(float(f) for f in params["long_factor"]),
                attention_factor=float(attention),
            )
        else:
            scaling = RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=original,
            )
    except KeyError as e:
        raise ModelFormatError(f"config.json: {kind} RoPE scaling needs {e.args[0]!r}") from None
    return theta, scaling, local_theta
