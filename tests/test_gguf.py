"""GGUF loading: config, dequantization, RoPE un-permutation, tokenizer rebuild, bad files.

References used, each independent of the code under test:

* transformers' own GGUF loader (dequantizes with the ``gguf`` package and un-permutes Q/K)
  and its separate torch block decoders, for every tensor of the default model;
* block formats decoded by hand here, element by element as ggml's C reference does;
* tiny GGUF files written with ``gguf.GGUFWriter`` from known HF-layout weights, Q/K permuted
  the way llama.cpp's converter permutes them, so the un-permuted result has a ground truth;
* transformers' GGUF tokenizer and the story model's own ``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from hexin.config import RopeScaling
from hexin.errors import ModelFormatError
from hexin.weights.gguf import GGUFModel, GGUFTensor, dequantize_raw, load_gguf
from hexin.weights.registry import bundled_path

Q = gguf.GGMLQuantizationType

STORY_DIR = bundled_path("story")


@pytest.fixture(scope="module")
def smol(default_gguf: Path) -> GGUFModel:
    return load_gguf(default_gguf)


# ============================================================================================
# 1. The default model
# ============================================================================================


def test_default_model_config_and_metadata(smol: GGUFModel) -> None:
    c = smol.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.intermediate_size, c.vocab_size) == (64, 1536, 49152)
    assert c.rope_theta == 100000.0
    assert c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings
    assert "lm_head.weight" not in smol.tensors

    assert smol.bos_token_id == 1 and smol.eos_token_id == 2
    assert c.bos_token_id == 1
    assert c.eos_token_ids[0] == 2  # <|im_end|>, then llama.cpp's other end-of-turn tokens
    assert smol.tokenizer.id_to_token(2) == "<|im_end|>"
    assert not smol.add_bos_token
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template
    assert smol.metadata["general.architecture"] == "llama"
    assert smol.metadata["llama.block_count"] == 30
    assert "tokenizer.ggml.tokens" not in smol.metadata  # the big arrays stay out

    assert len(smol.tensors) == 2 + 9 * 30
    embed = smol.tensors["model.embed_tokens.weight"]
    assert embed.ggml_type == Q.Q8_0 and embed.shape == (49152, 576)
    q = smol.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.ggml_type == Q.Q4_1 and q.shape == (576, 576)
    assert q.data.dtype == np.uint8 and q.data.shape == (576, 576 // 32 * 20)
    down = smol.tensors["model.layers.29.mlp.down_proj.weight"]
    assert down.ggml_type == Q.Q4_1 and down.shape == (576, 1536)
    norm = smol.tensors["model.norm.weight"]
    assert norm.ggml_type == Q.F32 and norm.data.dtype == np.float32
    for name, t in smol.tensors.items():
        assert t.name == name


# ============================================================================================
# 2. Every tensor of the default model vs transformers' own GGUF loader
# ============================================================================================


@pytest.fixture(scope="module")
def transformers_state_dict(default_gguf: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("transformers", reason="transformers is the reference GGUF reader")
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    with torch.device("meta"):  # only used to map names; no memory
        model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=model)
    return parsed["tensors"]


def test_every_tensor_matches_transformers_gguf_loader(
    smol: GGUFModel, transformers_state_dict: dict[str, torch.Tensor]
) -> None:
    assert set(smol.tensors) == set(transformers_state_dict)
    differ = [
        name
        for name, tensor in smol.tensors.items()
        if not torch.equal(tensor.dequantize(), transformers_state_dict[name].float())
    ]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_block_decoders_match_transformers_torch_dequant(smol: GGUFModel) -> None:
    """transformers also ships torch block decoders of its own (not the gguf package's)."""
    pytest.importorskip("transformers", reason="transformers is the reference GGUF reader")
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    for name in (
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.v_proj.weight",  # Q4_1, no RoPE permutation
        "model.layers.17.mlp.down_proj.weight",
    ):
        t = smol.tensors[name]
        raw = torch.from_numpy(np.array(t.data)).reshape(-1)
        ref = hf_dequantize(raw, int(t.ggml_type)).reshape(t.shape)
        assert torch.equal(t.dequantize(), ref), name


def test_q_and_k_are_unpermuted_rows_of_the_stored_tensor(smol: GGUFModel) -> None:
    """Re-applying llama.cpp's converter permutation to our q/k gives back the stored rows."""
    for name, heads in (("q_proj", 9), ("k_proj", 3)):
        t = smol.tensors[f"model.layers.5.self_attn.{name}.weight"]
        stored = dequantize_raw(t.data, t.ggml_type, t.shape)
        ours = t.dequantize()
        assert not torch.equal(ours, stored)
        assert torch.equal(_llama_cpp_permute(ours, heads), stored)


# ============================================================================================
# Tiny GGUF files written in the test
# ============================================================================================

HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 512
HEAD_DIM = HIDDEN // HEADS


def _llama_cpp_permute(w: torch.Tensor | np.ndarray, n_head: int) -> Any:
    """llama.cpp's convert_hf_to_gguf ``permute``: HF rotate-half rows -> interleaved rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _tiny_byte_level_vocab() -> dict[str, Any]:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += list(_bytes_to_unicode().values())
    tokens += ["Ġt", "he", "Ġthe", "<think>"]
    types = [3, 3, 3] + [1] * 256 + [1, 1, 1, 4]
    return {"tokens": tokens, "types": types, "merges": ["Ġ t", "h e", "Ġt he"]}


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """A plain Q4_K quantizer: 8 sub-blocks of 32 with 6-bit scales and mins per 256."""
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(blocks.min(-1), 0)
    scale = (blocks.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / d32)), 0, 63).astype(np.uint8)
        mn = np.clip(np.nan_to_num(np.rint(-lo / dmin32)), 0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.nan_to_num((blocks + (dmin32 * mn)[..., None]) / step)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)
    packed = np.empty((blocks.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk i: sub-blocks 2i, 2i+1
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1
    )


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """A plain Q6_K quantizer: 16 groups of 16 with int8 scales, 6-bit values per 256."""
    groups = x.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(groups).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / d32)), -128, 127).astype(np.int8)
        q = np.nan_to_num(groups / (d32 * sc)[..., None])
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = q & 15, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    n = groups.shape[0]
    return np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)],
        axis=1,
    )


def _encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    """``w`` (float32, rows x cols) in the stored form of ``qtype``."""
    if qtype == Q.F32:
        return w
    if qtype == Q.Q4_K:
        return _q4_k_blocks(w).reshape(w.shape[0], -1)
    if qtype == Q.Q6_K:
        return _q6_k_blocks(w).reshape(w.shape[0], -1)
    if qtype in (Q.IQ4_NL, Q.Q2_K):  # types hexin refuses: any bytes of the right size do
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((w.shape[0], w.shape[1] // block_size * type_size), dtype=np.uint8)
    return gguf.quants.quantize(w, qtype)


@dataclass(frozen=True)
class Hparams:
    """The model shape a GGUF header declares (``write_gguf``), under llama.cpp's keys."""

    layers: int = 1
    hidden: int = HIDDEN
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    ffn: int = FFN
    #: written as ``attention.key_length`` when given, as the converter does for an HF
    #: config that names its ``head_dim``
    head_dim: int | None = None
    context: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    hparams: Hparams = Hparams(),
    arch: str = "llama",
    types: dict[str, Q] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    vocab: dict[str, Any] | None = None,
    tokenizer_model: str = "gpt2",
    more_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """Write ``tensors`` (float32, Hugging Face layout, GGUF names) the way llama.cpp's
    converter lays a file out: ``hparams`` under the architecture's keys, the vocabulary,
    each tensor stored as ``types`` names it (F32 otherwise). Q and K rows (weights and
    biases) are permuted for the interleaved RoPE in a ``llama`` file only: the converter's
    LlamaModel does that, its Qwen2 and Qwen3 models keep HF's rows (llama.cpp runs those
    with rotate-half RoPE). ``extra`` tensors go in as given. tests/test_families.py writes
    its models' GGUF files with it too.
    """
    types, extra = types or {}, extra or {}
    vocab = vocab or _tiny_byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hparams.layers)
    w.add_context_length(hparams.context)
    w.add_embedding_length(hparams.hidden)
    w.add_feed_forward_length(hparams.ffn)
    w.add_head_count(hparams.heads)
    w.add_head_count_kv(hparams.kv_heads)
    if hparams.head_dim is not None:
        w.add_key_length(hparams.head_dim)
        w.add_value_length(hparams.head_dim)
    w.add_layer_norm_rms_eps(hparams.rms_eps)
    w.add_rope_freq_base(hparams.rope_theta)
    w.add_rope_dimension_count(hparams.head_dim or hparams.hidden // hparams.heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab.get("bos", 0))
    w.add_eos_token_id(vocab.get("eos", 0))
    w.add_chat_template("{{ messages[0]['content'] }}")
    if more_metadata is not None:
        more_metadata(w)

    rope_heads = {"attn_q": hparams.heads, "attn_k": hparams.kv_heads} if arch == "llama" else {}
    for name, hf in tensors.items():
        stored = hf
        heads = rope_heads.get(name.split(".")[2]) if name.startswith("blk.") else None
        if heads and hf.shape[0] % heads == 0:
            stored = _llama_cpp_permute(hf, heads)
        qtype = types.get(name, Q.F32)
        data = _encode(np.ascontiguousarray(stored), qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, data in extra.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(
    path: Path,
    *,
    drop: tuple[str, ...] = (),
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Write a one-layer Llama GGUF of random weights (``write_gguf``; ``options`` are its
    keywords), with ``drop`` left out and ``shapes`` changed.

    Returns the float32 weights in Hugging Face layout (before the Q/K permutation and
    quantization), keyed by GGUF name.
    """
    n_vocab = len((options.get("vocab") or _tiny_byte_level_vocab())["tokens"])
    rng = np.random.default_rng(seed)
    layout = {
        "token_embd.weight": (n_vocab, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (n_vocab, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    layout.update(shapes or {})
    originals: dict[str, np.ndarray] = {}
    for name, shape in layout.items():
        if name in drop:
            continue
        hf = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        if len(shape) == 1:
            hf += 1.0
        originals[name] = hf
    write_gguf(path, originals, **options)
    return originals


# ============================================================================================
# 3. Every supported type round-trips; block formats decoded by hand
# ============================================================================================

#: Largest error allowed per element, as a fraction of the largest |value| in its block
#: (32 values; 256 for the K types), from each format's step size plus fp16 scale rounding.
ROUND_TRIP_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 2**-11,
    Q.BF16: 2**-8,
    Q.Q8_0: 0.5 / 127 + 2**-10,  # step amax/127
    Q.Q4_0: 1 / 8 + 2**-8,  # step amax/8; the side opposite the max clips at 7 steps
    Q.Q4_1: 1 / 15 + 2**-8,  # step range/15 <= 2 amax/15, so half a step is amax/15
    Q.Q5_0: 1 / 16 + 2**-8,
    Q.Q5_1: 1 / 31 + 2**-8,
    Q.Q4_K: 0.14,  # 4-bit values on top of 6-bit scales and mins
    Q.Q6_K: 0.05,  # 6-bit values on top of 8-bit scales
}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP_TOLERANCE), ids=lambda q: q.name)
def test_each_type_round_trips_and_q_k_are_unpermuted(tmp_path: Path, qtype: Q) -> None:
    typed = ("blk.0.ffn_up.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight")
    originals = write_tiny_gguf(tmp_path / "t.gguf", types=dict.fromkeys(typed, qtype))
    model = load_gguf(tmp_path / "t.gguf")
    names = {
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    }
    block = 256 if qtype in (Q.Q4_K, Q.Q6_K) else 32
    for gguf_name, hf_name in names.items():
        t = model.tensors[hf_name]
        assert t.ggml_type == qtype
        original = originals[gguf_name]
        assert t.shape == original.shape
        out = t.dequantize()
        assert out.dtype == torch.float32 and tuple(out.shape) == original.shape
        if qtype == Q.F32:  # exact, so the un-permutation is checked exactly too
            assert np.array_equal(out.numpy(), original), hf_name
            continue
        # Rows hold whole blocks, so the bound holds block by block in HF row order too, and
        # holds only if q/k rows were put back where the HF original has them.
        err = np.abs(out.numpy() - original).reshape(-1, block)
        amax = np.abs(original).reshape(-1, block).max(-1, keepdims=True)
        assert (err <= ROUND_TRIP_TOLERANCE[qtype] * amax).all(), hf_name
        assert err.max() > 0  # the values really went through quantization


def test_dtype_argument_and_raw_data_kept_as_stored(tmp_path: Path) -> None:
    originals = write_tiny_gguf(tmp_path / "t.gguf", types={"blk.0.attn_q.weight": Q.F16})
    t = load_gguf(tmp_path / "t.gguf").tensors["model.layers.0.self_attn.q_proj.weight"]
    assert t.data.dtype == np.float16
    # raw data stays in llama.cpp's (permuted) order
    stored = _llama_cpp_permute(originals["blk.0.attn_q.weight"], HEADS).astype(np.float16)
    assert np.array_equal(np.asarray(t.data), stored)
    half = t.dequantize(torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, torch.from_numpy(originals["blk.0.attn_q.weight"]).half())


def _blocks_of(t: GGUFTensor) -> np.ndarray:
    _, type_size = gguf.GGML_QUANT_SIZES[t.ggml_type]
    return np.asarray(t.data).reshape(-1, type_size)


def _f16_at(block: np.ndarray, at: int) -> np.float32:
    return np.float32(block[at : at + 2].view(np.float16)[0])


def _hand_q8_0(block: np.ndarray) -> list[np.float32]:
    d = _f16_at(block, 0)
    return [np.float32(int(q)) * d for q in block[2:34].view(np.int8)]


def _hand_q4_1(block: np.ndarray) -> list[np.float32]:
    d, m = _f16_at(block, 0), _f16_at(block, 2)
    qs = [int(b) for b in block[4:20]]
    return [d * np.float32(b & 15) + m for b in qs] + [d * np.float32(b >> 4) + m for b in qs]


def _k_scale_min(j: int, s: np.ndarray) -> tuple[int, int]:
    s = [int(v) for v in s]
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _hand_q4_k(block: np.ndarray) -> list[np.float32]:
    d, dmin = _f16_at(block, 0), _f16_at(block, 2)
    scales, qs = block[4:16], [int(b) for b in block[16:144]]
    out: list[np.float32] = []
    for chunk in range(4):
        q = qs[32 * chunk : 32 * chunk + 32]
        sc1, m1 = _k_scale_min(2 * chunk, scales)
        sc2, m2 = _k_scale_min(2 * chunk + 1, scales)
        d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
        d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
        out += [d1 * np.float32(b & 15) - dm1 for b in q]
        out += [d2 * np.float32(b >> 4) - dm2 for b in q]
    return out


def _hand_q6_k(block: np.ndarray) -> list[np.float32]:
    ql, qh = [int(b) for b in block[0:128]], [int(b) for b in block[128:192]]
    sc, d = block[192:208].view(np.int8), _f16_at(block, 208)
    y = [np.float32(0)] * 256
    for half in range(2):
        lo, hi, s, base = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for i in range(32):
            g = i // 16
            q1 = ((lo[i] & 15) | ((hi[i] & 3) << 4)) - 32
            q2 = ((lo[i + 32] & 15) | (((hi[i] >> 2) & 3) << 4)) - 32
            q3 = ((lo[i] >> 4) | (((hi[i] >> 4) & 3) << 4)) - 32
            q4 = ((lo[i + 32] >> 4) | (((hi[i] >> 6) & 3) << 4)) - 32
            y[base + i] = d * np.float32(s[g]) * np.float32(q1)
            y[base + i + 32] = d * np.float32(s[g + 2]) * np.float32(q2)
            y[base + i + 64] = d * np.float32(s[g + 4]) * np.float32(q3)
            y[base + i + 96] = d * np.float32(s[g + 6]) * np.float32(q4)
    return y


HAND_DECODERS = {Q.Q8_0: _hand_q8_0, Q.Q4_1: _hand_q4_1, Q.Q4_K: _hand_q4_k, Q.Q6_K: _hand_q6_k}


@pytest.mark.parametrize("qtype", list(HAND_DECODERS), ids=lambda q: q.name)
def test_blocks_equal_a_hand_decode(tmp_path: Path, qtype: Q) -> None:
    write_tiny_gguf(tmp_path / "t.gguf", types={"blk.0.ffn_down.weight": qtype})
    t = load_gguf(tmp_path / "t.gguf").tensors["model.layers.0.mlp.down_proj.weight"]
    ours = t.dequantize().numpy().reshape(-1)
    blocks = _blocks_of(t)
    per_block = gguf.GGML_QUANT_SIZES[qtype][0]
    for i in (0, 1, len(blocks) // 2, len(blocks) - 1):
        expected = np.array(HAND_DECODERS[qtype](blocks[i]), dtype=np.float32)
        assert np.array_equal(ours[i * per_block : (i + 1) * per_block], expected), i


@pytest.mark.parametrize(
    "qtype",
    [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_random_blocks_equal_the_gguf_package_decoder(qtype: Q) -> None:
    """Arbitrary bit patterns (not just what a quantizer emits) decode bit-identically to the
    ``gguf`` package's numpy reference."""
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(48, type_size), dtype=np.uint8)
    f16_fields = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
    for at in f16_fields.get(qtype, (0,)):  # keep the fp16 scales finite
        scales = rng.standard_normal((48, 1)).astype(np.float16)
        raw[:, at : at + 2] = scales.view(np.uint8)
    raw = raw.reshape(6, 8 * type_size)
    ours = dequantize_raw(raw, qtype, (6, 8 * block_size)).numpy()
    assert np.array_equal(ours, gguf.quants.dequantize(raw, qtype))


# ============================================================================================
# Config details: rope_freqs (Llama 3 scaling), eos ids
# ============================================================================================


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, ctx: int
) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's converter writes for Llama 3.1+ models."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path: Path) -> None:
    """Llama 3.1+ GGUFs carry their RoPE scaling only as the per-frequency divisors in
    ``rope_freqs.weight``; the loader must recover the parameters (or refuse)."""
    theta = 10000.0  # what write_tiny_gguf declares
    factors = llama3_rope_factors(HEAD_DIM, theta, 32.0, 1.0, 4.0, 8192)
    assert ((factors > 1.0) & (factors < 32.0)).sum() >= 2  # the blended band is covered

    def meta(w: gguf.GGUFWriter) -> None:
        w.add_uint32("llama.rope.scaling.original_context_length", 8192)

    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, extra={"rope_freqs.weight": factors}, more_metadata=meta)
    m = load_gguf(path)
    assert m.config.rope_scaling == RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert "rope_freqs.weight" not in m.tensors

    wrong = llama3_rope_factors(HEAD_DIM, 500000.0, 32.0, 1.0, 4.0, 8192)  # not this theta
    write_tiny_gguf(path, extra={"rope_freqs.weight": wrong}, more_metadata=meta)
    _expect_error(path, "rope_freqs")


def test_eot_token_joins_eos_ids_and_user_defined_tokens_stay_whole(tmp_path: Path) -> None:
    def meta(w: gguf.GGUFWriter) -> None:
        w.add_eot_token_id(2)
        w.add_add_bos_token(True)

    vocab = _tiny_byte_level_vocab() | {"bos": 1, "eos": 0}
    write_tiny_gguf(tmp_path / "t.gguf", vocab=vocab, more_metadata=meta)
    m = load_gguf(tmp_path / "t.gguf")
    assert m.config.eos_token_ids == (0, 2)
    assert m.eos_token_id == 0 and m.bos_token_id == 1 and m.add_bos_token
    assert not m.config.tie_word_embeddings  # output.weight is present
    n = len(vocab["tokens"])
    enc = m.tokenizer.encode("<think> the<|im_end|>")
    assert enc.ids == [1, n - 1, n - 2, 2]  # BOS, <think>, Ġthe (merged), <|im_end|>
    assert m.tokenizer.encode("the", add_special_tokens=False).ids[0] != 1
    assert (
        m.tokenizer.decode(enc.ids, skip_special_tokens=False)
        == "<|im_start|><think> the<|im_end|>"
    )


# ============================================================================================
# 4. Tokenizer, byte-level BPE ("gpt2"): the default model vs transformers
# ============================================================================================

GPT2_TEXTS = [
    "Hello, world! How are you today?",
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))",
    "The year 2024 had 366 days; pi = 3.14159, e=2.71828.",
    "Grüße aus München — naïve café, 日本語のテキスト, русский текст",
    "emoji 😀🎉👍🏽 and a ZWJ family 👨\u200d👩\u200d👧",
    "multiple   spaces\n\n\nand newlines\t\ttabs   ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll've done it, wouldn't they? DON'T",
    "   leading and trailing   ",
    "<|endoftext|> at the start",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def transformers_smol_tokenizer(default_gguf: Path) -> Any:
    pytest.importorskip("transformers", reason="transformers is the reference GGUF tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.mark.parametrize("text", GPT2_TEXTS)
def test_byte_level_tokenizer_matches_transformers(
    smol: GGUFModel, transformers_smol_tokenizer: Any, text: str
) -> None:
    ours = smol.tokenizer.encode(text).ids
    assert ours == transformers_smol_tokenizer.encode(text)
    assert smol.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_chat_markup_is_parsed_as_special_tokens(smol: GGUFModel) -> None:
    enc = smol.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>"]
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert smol.tokenizer.decode(enc.ids) == "user\nHi"  # specials skipped by default


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a  1", ["a", "ĠĠ", "1"]),
        ("  12", ["ĠĠ", "1", "2"]),
        ("id\n\n42", ["id", "ĊĊ", "4", "2"]),
        ("x 2024", ["x", "Ġ", "2", "0", "2", "4"]),
    ],
)
def test_smollm_pre_tokenizer_isolates_digits_first(
    smol: GGUFModel, text: str, tokens: list[str]
) -> None:
    """llama.cpp's "smollm" pre-tokenizer (SmolLM's Digits + ByteLevel) cuts every digit out
    before the GPT-2 regex, so whitespace runs before a digit stay one token. transformers'
    GGUF tokenizer skips that step and splits the first three differently."""
    assert smol.tokenizer.encode(text).tokens == tokens
    assert smol.tokenizer.decode(smol.tokenizer.encode(text).ids) == text


# ============================================================================================
# 5. Tokenizer, SentencePiece BPE ("llama"): the story model's vocabulary
# ============================================================================================

SPM_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    'She said, "Hello!" and ran away. The end.',
    " leading space and  two  spaces",
    "line one\nline two\n\nline four",
    "Tom's dog can't swim; it's 3 o'clock.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "你好, world! 😀 café",  # no byte tokens in this vocabulary: unknown, fused
    "",
]


def story_vocab(scores: str, with_bytes: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GGUF vocabulary written as llama.cpp's converter would, matching tokenizer.json).

    ``scores="hf"``: what convert_hf_to_gguf writes for a tokenizer.json-only Llama tokenizer
    (gguf.LlamaHfVocab): every score -1000. ``scores="spm"``: what it writes from a
    SentencePiece model, whose BPE piece scores fall with the merge order: -id.
    ``with_bytes``: insert the 256 ``<0xNN>`` byte tokens after the specials, as Llama's
    vocabulary has them, in both the GGUF and the reference tokenizer.json.
    """
    spec = json.loads((STORY_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    tokens = sorted(vocab, key=vocab.get)
    if with_bytes:
        n_special = len(specials)
        assert tokens[:n_special] == ["<unk>", "<|start_story|>", "<|end_story|>"]
        tokens = tokens[:n_special] + [f"<0x{b:02X}>" for b in range(256)] + tokens[n_special:]
        spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    types = [3 if t in specials else 6 if t.startswith("<0x") else 1 for t in tokens]
    if scores == "hf":
        score_list = [-1000.0] * len(tokens)
    else:
        score_list = [0.0 if k != 1 else -float(i) for i, k in enumerate(types)]
    gguf_vocab = {
        "tokens": tokens,
        "types": types,
        "scores": score_list,
        "bos": tokens.index("<|start_story|>"),
        "eos": tokens.index("<|end_story|>"),
    }
    return gguf_vocab, spec


def spm_meta(w: gguf.GGUFWriter) -> None:
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)


@pytest.mark.parametrize("scores", ["hf", "spm"])
def test_sentencepiece_vocab_matches_story_tokenizer_json(tmp_path: Path, scores: str) -> None:
    gguf_vocab, spec = story_vocab(scores)
    reference = Tokenizer.from_str(json.dumps(spec))
    write_tiny_gguf(
        tmp_path / "spm.gguf",
        vocab=gguf_vocab,
        tokenizer_model="llama",
        more_metadata=spm_meta,
    )
    m = load_gguf(tmp_path / "spm.gguf")
    assert m.add_bos_token and m.bos_token_id == 1 and m.eos_token_id == 2
    for text in SPM_TEXTS:
        ours = m.tokenizer.encode(text)
        assert ours.ids == reference.encode(text).ids, (text, ours.tokens)
        assert ours.ids[0] == 1  # BOS, as the reference's post-processor adds
        if "你" not in text:
            assert m.tokenizer.decode(ours.ids) == text
    # Special tokens written in the text are parsed whole (llama.cpp does; this reference's
    # normalized specials do not, so it is not compared here).
    enc = m.tokenizer.encode("The end.<|end_story|>", add_special_tokens=False)
    assert enc.tokens[-1] == "<|end_story|>" and enc.ids[-1] == 2


def test_sentencepiece_byte_fallback(tmp_path: Path) -> None:
    gguf_vocab, spec = story_vocab("spm", with_bytes=True)
    reference = Tokenizer.from_str(json.dumps(spec))
    write_tiny_gguf(
        tmp_path / "spm.gguf",
        vocab=gguf_vocab,
        tokenizer_model="llama",
        more_metadata=spm_meta,
    )
    tok = load_gguf(tmp_path / "spm.gguf").tokenizer
    for text in [*SPM_TEXTS, "漢字とカタカナ 🎉🎉", "tab\there ümlaut"]:
        enc = tok.encode(text)
        assert enc.ids == reference.encode(text).ids, (text, enc.tokens)
        assert tok.decode(enc.ids) == text
    enc = tok.encode("你", add_special_tokens=False)
    assert enc.tokens == ["▁", "<0xE4>", "<0xBD>", "<0xA0>"]


# ============================================================================================
# 6. Bad files
# ============================================================================================


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ModelFormatError) as info:
        load_gguf(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.gguf", "not found", "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path, "directory")


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(200))
    _expect_error(bad, "not a GGUF file", "bad.gguf")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GG")
    _expect_error(tiny, "not a GGUF file")


@pytest.mark.parametrize("keep", [10, 30, 200, 3000, 0.5, -1])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    """Cut inside the header, the metadata, the vocabulary, the tensor table and the data."""
    full = tmp_path / "full.gguf"
    write_tiny_gguf(full)
    data = full.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:cut])
    _expect_error(short, "truncated", "short.gguf")


def test_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "g.gguf"
    write_tiny_gguf(path, arch="gpt2")
    _expect_error(path, "unsupported architecture", "gpt2")


def test_unsupported_rope_scaling_type_is_refused_by_name(tmp_path: Path) -> None:
    """Under the file's own architecture's keys: llama.cpp writes Qwen2.5's YaRN this way."""
    path = tmp_path / "y.gguf"
    write_tiny_gguf(
        path,
        arch="qwen2",
        more_metadata=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
    )
    _expect_error(path, "RoPE scaling type 'yarn'")


def test_phi3_longrope_needs_both_factor_tensors(tmp_path: Path) -> None:
    """llama.cpp writes Phi-3's LongRoPE as per-frequency factor tensors, short and long
    (tests/test_families.py runs such files); one without the other is refused."""
    path = tmp_path / "p.gguf"
    factors = np.ones(HEAD_DIM // 2, np.float32)
    write_tiny_gguf(path, arch="phi3", extra={"rope_factors_long.weight": factors})
    _expect_error(path, "LongRoPE", "rope_factors_short.weight")


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.Q2_K], ids=lambda q: q.name)
def test_unsupported_tensor_type(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, types={"blk.0.ffn_up.weight": qtype})
    _expect_error(path, qtype.name, "blk.0.ffn_up.weight", "supported")


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, drop=("blk.0.ffn_down.weight",))
    _expect_error(path, "blk.0.ffn_down.weight", "missing")


def test_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "s.gguf"
    write_tiny_gguf(path, shapes={"blk.0.ffn_up.weight": (FFN + 32, HIDDEN)})
    _expect_error(path, "blk.0.ffn_up.weight", f"({FFN + 32}, {HIDDEN})", f"({FFN}, {HIDDEN})")


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.gguf"
    # llama.cpp takes an output-projection bias in a llama file; hexin has no place for one
    write_tiny_gguf(path, extra={"blk.0.attn_output.bias": np.zeros(HIDDEN, np.float32)})
    _expect_error(path, "blk.0.attn_output.bias", "no place for")


def test_copy_of_default_model_truncated(default_gguf: Path, tmp_path: Path) -> None:
    """A real download cut short: the last tensors' data is missing."""
    short = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as src, short.open("wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
        dst.truncate(default_gguf.stat().st_size - 1000)
    _expect_error(short, "truncated", "cut.gguf")
