"""ModelConfig: the shape of a Llama-family model, from config.json or GGUF metadata.

Llama, Mistral, Qwen2/2.5 and Qwen3 share one forward pass; what tells them apart is data
here (``qkv_bias``, ``qk_norm``), read from either source. Both sources are reduced to one
validated dataclass so that the model code never needs to know where its weights came from:
:meth:`ModelConfig.from_hf` reads a ``config.json`` dictionary, :meth:`ModelConfig.from_gguf`
the key/values of a GGUF header (parsed by :mod:`hexin.weights.gguf`). :func:`expected_shapes`
is the one statement of the tensors (under Hugging Face names) and shapes a config implies,
checked by both the GGUF loader and the model.

This module stays free of torch and of the weights package (stdlib and :mod:`hexin.errors`
only), so that configs can be read and checked without importing either.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hexin.errors import ModelFormatError

#: HF ``architectures`` entries hexin runs, and the family each is (``ModelConfig.architecture``).
#: Mistral differs from Llama only in its optional sliding-window attention, which hexin does
#: not apply (see ``sliding_window``); Qwen2 adds a Q/K/V bias, Qwen3 a per-head q/k norm.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
#: GGUF ``general.architecture`` values hexin runs (llama.cpp's names; its key prefix too)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
#: RoPE types hexin implements, as transformers names them (``rope_type``)
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("rope_type": "llama3"); ``None`` on the config means
    plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    #: Mistral's sliding window, recorded but not applied: every model hexin ships runs
    #: within its window, and full attention is exact there.
    sliding_window: int | None = None
    #: the family (``HF_ARCHITECTURES``' values), for display; the fields below carry
    #: everything in which the families' forward passes differ
    architecture: str = "llama"
    #: a bias on the query, key and value projections (Qwen2), added after the product
    qkv_bias: bool = False
    #: RMSNorm over each query and key head before RoPE (Qwen3's ``q_norm`` / ``k_norm``)
    qk_norm: bool = False

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
        family = HF_ARCHITECTURES.get(arch)
        if family is None:
            raise ModelFormatError(
                f"unsupported architecture {arch!r}; hexin runs {', '.join(HF_ARCHITECTURES)}"
            )
        _check_hf_settings(cfg)
        rope_theta, rope_scaling = _hf_rope(cfg)
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
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=cfg.get("sliding_window") if family == "mistral" else None,
                architecture=family,
                qkv_bias=family == "qwen2",
                qk_norm=family == "qwen3",
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
    ) -> ModelConfig:
        """Build from the ``<arch>.*`` key/values of a GGUF header (``general.architecture``
        one of ``GGUF_ARCHITECTURES``; llama.cpp prefixes every hyper-parameter with it).

        ``source`` (the file) prefixes every error. What the metadata does not say comes from the
        loader: ``vocab_rows``, the token embedding's rows (else the token count), used when
        ``<arch>.vocab_size`` is absent; whether the file has no separate ``output.weight``; the
        BOS/EOS ids of its vocabulary; whether it has Q/K/V biases (``attn_q.bias``: llama.cpp
        requires them of qwen2 files and takes them in llama ones). Qwen3 always has q/k norms.
        llama.cpp stores Llama 3 RoPE scaling as a
        ``rope_freqs.weight`` tensor; when the file has one, ``rope_scaling_from_freqs`` recovers
        the scaling from it, given ``(rope_theta, head_dim, original_context_length)``.
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
        if scaling_type not in ("none", "", None):
            raise ModelFormatError(
                f"{source}: RoPE scaling type {scaling_type!r} is not supported (hexin supports "
                "plain RoPE and Llama 3 frequency scaling)"
            )
        context = _meta_int(meta, f"{arch}.context_length", source, 2048)
        rope_scaling = None
        if rope_scaling_from_freqs is not None:
            original = _meta_int(meta, f"{arch}.rope.scaling.original_context_length", source, 8192)
            rope_scaling = rope_scaling_from_freqs(theta, head_dim, original)

        # read before the ``try`` below, whose messages get the ``source`` prefix added
        layers = _meta_int(meta, f"{arch}.block_count", source)
        ffn = _meta_int(meta, f"{arch}.feed_forward_length", source)
        eps = _meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", source, 1e-5)
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
                qk_norm=arch == "qwen3",
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
        if c.qk_norm:
            shapes |= {
                p + "self_attn.q_norm.weight": (c.head_dim,),
                p + "self_attn.k_norm.weight": (c.head_dim,),
            }
    return shapes


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


def _meta_float(meta: Mapping[str, Any], key: str, source: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelFormatError(f"{source}: metadata {key!r} should be a number, got {value!r}")
    return float(value)


def _check_hf_settings(cfg: Mapping[str, Any]) -> None:
    """Refuse config.json settings that change the math and that hexin's forward pass does
    not implement, each by its key (absent keys take transformers' defaults)."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"config.json: hidden_act {act!r} is not supported (hexin: silu)")
    # Qwen2's Q/K/V bias is its architecture's, not a setting; these put a bias on every
    # attention projection (the output one included) or on the MLP
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ModelFormatError(f"config.json: {key} = true is not supported")
    if cfg.get("use_sliding_window"):
        raise ModelFormatError(
            "config.json: use_sliding_window (sliding-window attention layers) is not supported"
        )
    kinds = set(cfg.get("layer_types") or ()) - {"full_attention"}
    if kinds:
        raise ModelFormatError(
            f"config.json: layer_types {sorted(kinds)} are not supported (hexin runs "
            "full_attention layers)"
        )


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either layout of config.json.

    transformers 5 writes one ``rope_parameters`` dict (``rope_type``, ``rope_theta`` and the
    scaling keys); earlier versions a top-level ``rope_theta`` beside a ``rope_scaling`` dict.
    As transformers does, the dict wins and top-level keys fill in what it lacks. A RoPE type
    hexin does not implement is refused by name: run as plain RoPE it would give wrong text.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise ModelFormatError(
            f"config.json: RoPE parameters per layer type ({params!r}) are not supported"
        )
    kind = params.get("rope_type", params.get("type")) or "default"
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
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    if kind == "default":
        return theta, None
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings")
                or cfg.get("original_max_position_embeddings")
                or cfg["max_position_embeddings"]
            ),
        )
    except KeyError as e:
        raise ModelFormatError(f"config.json: {kind} RoPE scaling needs {e.args[0]!r}") from None
