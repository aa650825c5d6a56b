"""Model families (Llama 3.x tied and untied, Qwen2, Qwen3, Mistral with a sliding window,
Gemma 2, Gemma 3, Phi-3 with its fused projections, plain and with LongRoPE) against
transformers, from HF folders and from GGUF files.

Each family is a tiny random-weight model built with transformers' own config class, the
family's structural options switched on: Llama 3 RoPE scaling (written by transformers 5 as
``rope_parameters``) with a short original context, so a 40-token prompt reaches the scaled
frequencies; Qwen2's Q/K/V bias; Qwen3's q/k norms with a head_dim unlike hidden / heads;
Mistral's sliding window of 16 keys, shorter than the prompt; Gemma 3's q/k norms and its
sliding layers' own RoPE base beside linearly scaled global ones; LongRoPE with an original
context of 32, which the prompt passes. It is saved as an HF folder
with the story model's tokenizer (so its GGUF carries that vocabulary, as llama.cpp's
converter writes it), and checked for:

(a) last-token logits within 1e-4 of transformers in fp32, on a 40-token prompt;
(b) 64 greedy tokens identical to transformers' ``generate``;
(c) the paged, batched engine giving each request what it gives alone;
(d) the GGUF the converter would write, loaded back: the HF folder's logits;
(e) Q8_0 and Q4_0 GGUFs running through the quantized kernels, close to the fp32 logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gguf import Hparams, llama3_rope_factors, spm_meta, story_vocab, write_gguf
from test_loading import TINY
from test_reference import hexin_last_logits, hf_greedy, hf_last_logits

from hexin import native
from hexin.config import ModelConfig
from hexin.engine import Engine
from hexin.errors import ModelFormatError
from hexin.generate import TextStream
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.quant import BlockLinear, Int4Linear, Int8Linear
from hexin.sampling import SamplingParams
from hexin.weights import LoadedModel, load_model

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

Q = gguf.GGMLQuantizationType

#: wavelengths 2 pi 10000^(i/16) of the 8 frequency pairs are 6.3, 20, 63, 199, ...: with an
#: original context of 64 the first is kept, the next two blended, the rest slowed 8x
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6}
#: Phi-3's long-context RoPE, per frequency pair, over an original context of 32 (the
#: model's 512 give transformers' attention factor sqrt(1 + ln 16 / ln 32) = 1.33)
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0],
    "long_factor": [1.0, 1.3, 2.1, 3.5, 6.0, 9.0, 14.0, 20.0],
}
#: the story tokenizer's size (the GGUF carries its vocabulary) and its BOS / EOS
SHAPE = TINY | dict(max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    """A family's tiny model: transformers' config class (by name) and its options."""

    config_class: str
    #: llama.cpp's ``general.architecture``
    arch: str
    options: dict[str, Any] = field(default_factory=dict)
    #: whether hexin's one-call native decode layer can run it (Llama's layer with Qwen's
    #: bias and q/k norms and sliding windows; not Gemma's norms, caps and activation)
    fusable: bool = True
    #: hexin's family name from the HF folder, where it is not ``arch`` (Mistral's GGUF is
    #: ``llama``)
    hf_arch: str | None = None


FAMILIES = {
    "llama3-untied": Family("LlamaConfig", "llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama3-tied": Family(
        "LlamaConfig", "llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}
    ),
    "qwen2": Family(
        "Qwen2Config",
        "qwen2",
        {"rope_parameters": QWEN_ROPE, "tie_word_embeddings": True},
    ),
    "qwen3": Family(
        "Qwen3Config",
        "qwen3",
        {"rope_parameters": QWEN_ROPE, "head_dim": 32},
    ),
    # a window shorter than the prompt: every layer slides, so the prompt's last token
    # and every decode step see only the last 16 keys
    "mistral-sliding": Family(
        "MistralConfig",
        "llama",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": 16},
        hf_arch="mistral",
    ),
    # sliding (16 keys) and global layers alternating; soft-caps low enough to bite on these
    # weights; query_pre_attn_scalar = head_dim, as in Gemma 2 2B and 9B (a GGUF does not
    # carry it: llama.cpp takes head_dim but for the 27B)
    "gemma2": Family(
        "Gemma2Config",
        "gemma2",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "head_dim": 16,
            "sliding_window": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 8.0,
            "tie_word_embeddings": True,
        },
        fusable=False,
    ),
    # Gemma 2's layer without the attention cap, with Qwen3's q/k norms (1 + weight, as
    # Gemma's norms) and two RoPEs: the sliding layers' base 10000 unscaled, the global
    # layers' base 1e6 slowed 8x (as Gemma 3 4B and up)
    "gemma3": Family(
        "Gemma3TextConfig",
        "gemma3",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
            "head_dim": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
        fusable=False,
    ),
    # Llama's layer with Q/K/V and gate/up stored fused (split at load); plain RoPE. The
    # default pad id (32000) lies outside this vocabulary
    "phi3": Family(
        "Phi3Config",
        "phi3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "pad_token_id": None},
    ),
    # the 128k models' LongRoPE: the 512-token context passes the original 32, so hexin
    # takes the long factors, as transformers does for the 40-token prompt
    "phi3-longrope": Family(
        "Phi3Config",
        "phi3",
        {
            "rope_parameters": LONGROPE,
            "original_max_position_embeddings": 32,
            "pad_token_id": None,
        },
    ),
}
PROMPT = [int(i) for i in torch.randint(3, 2048, (40,), generator=torch.Generator().manual_seed(7))]
GREEDY = SamplingParams(temperature=0, max_tokens=64)


@dataclass
class Built:
    """One family's model: the HF folder, transformers' model of it, hexin's."""

    family: Family
    folder: Path
    hf: torch.nn.Module
    loaded: LoadedModel
    model: Llama
    #: the 64 greedy tokens transformers gives after ``PROMPT``
    greedy: list[int]


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory, story_dir) -> Built:
    family = FAMILIES[request.param]
    config = getattr(transformers, family.config_class)(**SHAPE, **family.options)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # far from transformers' tiny init, so every part matters
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in name and config.model_type.startswith("gemma"):
                # scaled by sqrt(hidden) = 8 and tied: at 0.2 each token's own embedding
                # outweighs the layers and greedy repeats one token
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.5 if name.endswith("bias") else 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(story_dir / name, folder / name)
    loaded = load_model(folder)
    greedy = hf_greedy(hf, PROMPT, loaded.tokenizer.eos_token_ids, n=64)
    assert len(greedy) == 64, "the random model stopped early: pick another seed"
    return Built(family, folder, hf, loaded, Llama(loaded.config, loaded.weights), greedy)


def test_config_reads_the_family_options(built):
    c, options = built.loaded.config, built.family.options
    assert c.architecture == (built.family.hf_arch or built.family.arch)
    assert c.sliding_window == options.get("sliding_window")
    if "query_pre_attn_scalar" in options:
        assert c.attention_scale == options["query_pre_attn_scalar"] ** -0.5
        assert c.attn_logit_softcap == options.get("attn_logit_softcapping")
        assert c.final_logit_softcap == options.get("final_logit_softcapping")
        assert c.layer_types == ("sliding_attention", "full_attention")
    assert c.qkv_bias == (c.architecture == "qwen2")
    assert c.qk_norm == (c.architecture in ("qwen3", "gemma3"))
    assert c.tie_word_embeddings == options.get("tie_word_embeddings", False)
    assert c.head_dim == options.get("head_dim", 16)
    rope = options["rope_parameters"]
    rope = rope.get("full_attention", rope)  # Gemma 3's: one per layer kind
    assert c.rope_theta == rope["rope_theta"]
    assert (c.rope_scaling is not None) == (rope["rope_type"] != "default")
    if c.rope_scaling is not None:
        assert c.rope_scaling.rope_type == rope["rope_type"]
    if c.architecture == "gemma3":  # the sliding layer rotates with its own base, unscaled
        assert [c.rope(i) for i in range(2)] == [(10000.0, None), (1e6, c.rope_scaling)]


def test_a_last_token_logits_match_transformers(built):
    ours = hexin_last_logits(built.model, PROMPT)
    assert (ours - hf_last_logits(built.hf, PROMPT)).abs().max().item() < 1e-4


def test_a_the_sliding_window_matters_at_this_prompt(built):
    """Where a family slides, the prompt reaches past the window: full attention over it
    would be far from transformers' logits (so test (a) checks the window itself)."""
    config = built.loaded.config
    if config.sliding_window is None:
        pytest.skip("no sliding window in this family")
    assert len(PROMPT) > config.sliding_window
    full = Llama(dataclasses.replace(config, sliding_window=None), built.loaded.weights)
    diff = hexin_last_logits(full, PROMPT) - hf_last_logits(built.hf, PROMPT)
    assert diff.abs().max().item() > 1e-2


def test_b_greedy_64_tokens_match_transformers_generate(built):
    tok = built.loaded.tokenizer
    assert TextStream(built.model, tok, PROMPT, GREEDY).run().token_ids == built.greedy


def _engine_matches_alone(model: Llama, tok, prompts: list[list[int]]) -> None:
    """Requests of different lengths and budgets, batched and prefilled in chunks of 16
    over blocks of 16: each gives what it gives alone."""
    requests = [(ids, GREEDY.with_(max_tokens=10 + 6 * i)) for i, ids in enumerate(prompts)]
    expected = [TextStream(model, tok, ids, p).run().token_ids for ids, p in requests]
    with Engine(model, tok, EngineConfig(prefill_chunk=16)) as engine:
        handles = [engine.submit(ids, p) for ids, p in requests]
        assert [h.result().token_ids for h in handles] == expected


def test_c_paged_engine_gives_what_single_sequence_gives(built):
    """Prompts that share prefixes, so later ones find earlier ones' blocks cached."""
    prompts = [PROMPT[: 12 + 9 * i] for i in range(4)]
    _engine_matches_alone(built.model, built.loaded.tokenizer, prompts)


def test_c_paged_engine_on_a_q4_gguf_gives_what_single_sequence_gives(built, tmp_path):
    """In q4 mode (a Gemma layer op by op, its norms and caps beside the block kernels; the
    other families' layers in one native call): the same tokens alone or batched. Distinct
    prompts: a prompt partly served from the prefix cache is not yet bitwise in the
    quantized modes (README, design notes).

    Chunks of 16 can leave a prompt's last token alone (the 21-token prompt, 4 + 16 + 1
    when it arrives beside the 12-token one): it must still take the prompt kernels, as
    alone, not the decode step's int4 weights and bf16 keys, whose logits differ by up to
    0.1 (enough to swap Gemma 2's near-tied first token)."""
    path = tmp_path / "model-Q4_0.gguf"
    write_family_gguf(built, path, Q.Q4_0)
    loaded = load_model(path)
    seeds = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    prompts = [
        [int(t) for t in torch.randint(3, 2048, (12 + 9 * i,), generator=g)]
        for i, g in enumerate(seeds)
    ]
    _engine_matches_alone(Llama.from_loaded(loaded, quant="q4"), loaded.tokenizer, prompts)


def write_family_gguf(built: Built, path: Path, qtype: Q = Q.F32) -> None:
    """The HF folder as llama.cpp's converter writes it: its tensor names (the ``gguf``
    package's map, the one the converter uses), 2-D tensors in ``qtype`` and norms and biases
    in F32, the story vocabulary, Llama 3 scaling as the ``rope_freqs.weight`` divisors,
    LongRoPE as ``rope_factors_short`` / ``_long`` tensors with its attention factor."""
    cfg = json.loads((built.folder / "config.json").read_text())
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[built.family.arch]
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    gemma = built.family.arch in ("gemma2", "gemma3")
    tensors = {
        # llama.cpp's Gemma2Model writes norms as 1 + weight, what the norm scales by
        names.get_name(name, try_suffixes=(".weight", ".bias")): (
            t.float() + (1 if gemma and name.endswith("norm.weight") else 0)
        ).numpy()
        for name, t in load_file(built.folder / "model.safetensors").items()
    }
    rope = cfg["rope_parameters"]
    rope = rope.get("full_attention", rope)  # Gemma 3's global layers' (the file's base)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    extra = {}
    if rope["rope_type"] == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(
            head_dim,
            rope["rope_theta"],
            rope["factor"],
            rope["low_freq_factor"],
            rope["high_freq_factor"],
            rope["original_max_position_embeddings"],
        )
    if rope["rope_type"] == "longrope":
        for kind in ("short", "long"):
            extra[f"rope_factors_{kind}.weight"] = torch.tensor(rope[f"{kind}_factor"]).numpy()
    hparams = Hparams(
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"],
        ffn=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim"),
        context=cfg["max_position_embeddings"],
        rope_theta=rope["rope_theta"],
        rms_eps=cfg["rms_norm_eps"],
    )
    vocab, _ = story_vocab("hf")

    def metadata(w: gguf.GGUFWriter) -> None:
        spm_meta(w)
        if cfg.get("sliding_window") is not None:
            w.add_sliding_window(cfg["sliding_window"])
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(key) is not None:
                getattr(w, f"add_{key}")(cfg[key])
        if built.family.arch == "gemma3":  # the pattern of 6 llama.cpp assumes unless given
            w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "longrope":  # as the converter computes it
            original = rope["original_max_position_embeddings"]
            factor = cfg["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)))
            w.add_rope_scaling_orig_ctx_len(original)

    write_gguf(
        path,
        tensors,
        hparams=hparams,
        arch=built.family.arch,
        types={name: qtype for name, a in tensors.items() if a.ndim == 2},
        extra=extra,
        vocab=vocab,
        tokenizer_model="llama",
        more_metadata=metadata,
    )


def test_d_gguf_of_the_model_gives_the_folders_logits(built, tmp_path):
    path = tmp_path / "model.gguf"
    write_family_gguf(built, path)
    loaded = load_model(path)
    assert loaded.config.architecture == built.family.arch
    assert loaded.config.qkv_bias == built.loaded.config.qkv_bias
    assert loaded.config.qk_norm == built.loaded.config.qk_norm
    assert loaded.config.head_dim == built.loaded.config.head_dim
    for option in ("sliding_window", "attention_scale", "attn_logit_softcap", "local_rope_theta"):
        assert getattr(loaded.config, option) == getattr(built.loaded.config, option)
    layers = range(loaded.config.num_layers)
    assert [loaded.config.window(i) for i in layers] == [
        built.loaded.config.window(i) for i in layers
    ]
    model = Llama(loaded.config, loaded.weights)
    # the converter writes Llama 3 scaling as per-frequency divisors and no original
    # context: hexin recovers parameters that give the same frequencies
    for ours, theirs in zip(model.layer_rotary, built.model.layer_rotary, strict=True):
        torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, rtol=1e-6, atol=0)
        assert ours.attention_factor == pytest.approx(theirs.attention_factor, rel=1e-6)
    ours = hexin_last_logits(model, PROMPT)
    assert (ours - hexin_last_logits(built.model, PROMPT)).abs().max().item() < 1e-5


def test_longrope_within_the_original_context_takes_the_short_factors(built):
    """A model run at a context within LongRoPE's original one rotates by the short factors,
    as transformers does every sequence that stays within it; the long ones would be far."""
    scaling = built.loaded.config.rope_scaling
    if scaling is None or scaling.rope_type != "longrope":
        pytest.skip("no LongRoPE in this family")
    original = scaling.original_max_position_embeddings
    prompt = PROMPT[:original]
    short = Llama(built.loaded.config, built.loaded.weights, context=original)
    theirs = hf_last_logits(built.hf, prompt)
    assert (hexin_last_logits(short, prompt) - theirs).abs().max().item() < 1e-4
    assert (hexin_last_logits(built.model, prompt) - theirs).abs().max().item() > 1e-2
    with Engine(short, built.loaded.tokenizer) as engine:
        assert engine.context_limit == original


def _prompt_and_decode_logits(model: Llama, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Logits at every position of ``ids``: the first ``prompt_len`` from one prompt pass
    (the prompt kernels), the rest one decode step at a time (the decode kernels)."""
    cache = model.new_cache()
    out = [model.forward(torch.tensor([ids[:prompt_len]]), cache, all_logits=True)[0]]
    out += [model.forward(torch.tensor([[t]]), cache) for t in ids[prompt_len:]]
    return torch.cat(out)


def _divergence(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || got) over the positions, share of positions whose top-1 differs)."""
    logp, logq = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return kl, (ref.argmax(-1) != got.argmax(-1)).float().mean().item()


#: Per format: the quant mode that runs it, and bounds on mean KL over the 104 positions
#: of the prompt and greedy continuation. Two losses are told apart:
#: - the format's own, KL(fp32 || fp32 math on the file's rounded weights), which no kernel
#:   can avoid. A random model is flat (top-1 probability about 0.04) and sensitive: Q8_0's
#:   step (amax/127 per block of 32) gives KL 1e-3 to 2.3e-3 here, and KL grows with the
#:   square of the step, so Q4_0's (amax/8, 16x) gives 0.25 to 0.43. Bounds: about 4x and
#:   2x that. A dropped Q/K/V bias or q/k norm, q/k rows left permuted or RoPE left
#:   unscaled give 1.2 to 1.9 (measured on these models, in fp32).
#: - hexin's kernels', KL(fp32 math on the rounded weights || the quantized kernels):
#:   activations rounded to int8 (two terms), keys and values in bf16, and for int8 a
#:   second per-row rounding of the weights. Measured at most 1.1e-3 on every kernel
#:   selection; bound 5e-3. On a model this flat a tiny change can swap near-tied top
#:   tokens: measured at most 7% of the positions, bound 15%.
#: Q5_0 (step amax/16, a quarter of Q4_0's loss) runs in q4 mode as 8-bit blocks, as the
#: Q5_0 and Q6_K matrices of a Q4_K_M file do; bound 0.3.
QUANT_BOUNDS = {Q.Q8_0: ("int8", 1e-2), Q.Q4_0: ("q4", 0.8), Q.Q5_0: ("q4", 0.3)}
KERNEL_KL, KERNEL_TOP1_CHANGED = 5e-3, 0.15


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS), ids=lambda q: q.name)
def test_e_quantized_gguf_runs_through_the_fast_kernels_close_to_fp32(
    built, tmp_path, qtype, kernel_selection
):
    """On every kernel selection this CPU can run (conftest's ``kernel_selection``)."""
    mode, format_kl = QUANT_BOUNDS[qtype]
    path = tmp_path / f"model-{qtype.name}.gguf"
    write_family_gguf(built, path, qtype)
    loaded = load_model(path)
    model = Llama.from_loaded(loaded, quant=mode)
    blocks = native.kernels() is not None  # hexin's own kernels, for 8-bit blocks too
    if qtype == Q.Q4_0 or (qtype == Q.Q5_0 and blocks):
        assert Llama.from_loaded(loaded).quant == "q4"  # what --quant auto runs
    if mode == "int8" or (qtype == Q.Q5_0 and not blocks):
        fast: tuple[type, ...] = (Int8Linear,)
    else:
        fast = (BlockLinear, Int4Linear)
    assert all(isinstance(m, fast) for ly in model.layers for m in (ly.qkv, ly.wo, ly.down))
    if mode == "q4" and native.kernels() is not None:
        # one native call per layer for Llama's layer and what Qwen2, Qwen3, Mistral and
        # Phi-3 add to it; Gemma's layers run op by op
        assert (model.fused is not None) == built.family.fusable

    ids = PROMPT + built.greedy
    fp32 = built.model.forward(torch.tensor([ids]), built.model.new_cache(), all_logits=True)[0]
    dense = Llama.from_loaded(loaded, quant="none")  # fp32 math on the file's weights
    rounded = dense.forward(torch.tensor([ids]), dense.new_cache(), all_logits=True)[0]
    got = _prompt_and_decode_logits(model, ids, len(PROMPT))
    assert _divergence(fp32, rounded)[0] < format_kl
    kl, changed = _divergence(rounded, got)
    assert kl < KERNEL_KL and changed <= KERNEL_TOP1_CHANGED, (kl, changed)


# Gemma 3 4B and up: multimodal folders (``Gemma3ForConditionalGeneration``), whose text
# model hexin runs


def _randomize(hf: torch.nn.Module) -> None:
    """As ``built`` does for the Gemma families: far from transformers' tiny init."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 0.05)
            else:
                p.normal_(0, 0.2)


def test_gemma3_multimodal_folder_runs_its_text_model(tmp_path, story_dir):
    """The gemma3 family's text model inside a tiny vision model (SigLIP, one layer, a
    28-pixel image of 2 x 2 patches): hexin reads ``text_config``, takes the language
    model's tensors under their prefix, skips the vision ones and ties the head, giving
    transformers' text-only logits and greedy tokens."""
    text = transformers.Gemma3TextConfig(**SHAPE, **FAMILIES["gemma3"].options)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomize(hf)
    folder = tmp_path / "gemma3-mm"
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(story_dir / name, folder / name)
    assert any(k.startswith("vision_tower.") for k in load_file(folder / "model.safetensors"))

    loaded = load_model(folder)
    assert loaded.config.architecture == "gemma3"
    assert loaded.config.layer_types == ("sliding_attention", "full_attention")
    assert loaded.config.sliding_window == 16 < len(PROMPT)
    assert all(k.startswith(("model.layers.", "model.embed", "model.norm")) for k in loaded.weights)
    model = Llama(loaded.config, loaded.weights)
    ours = hexin_last_logits(model, PROMPT)
    assert (ours - hf_last_logits(hf, PROMPT)).abs().max().item() < 1e-4
    greedy = hf_greedy(hf, PROMPT, loaded.tokenizer.eos_token_ids, n=16)
    assert len(greedy) == 16, "the random model stopped early: pick another seed"
    params = SamplingParams(temperature=0, max_tokens=16)
    assert TextStream(model, loaded.tokenizer, PROMPT, params).run().token_ids == greedy

    # the names transformers 4.5x saved, everything under ``model.``: the same tensors
    stored = load_file(folder / "model.safetensors")
    renamed = {
        f"model.{k}".replace("model.language_model.model.", "model.language_model."): v
        for k, v in stored.items()
    }
    save_file(renamed, str(folder / "model.safetensors"))
    again = load_model(folder).weights
    assert sorted(again) == sorted(loaded.weights)
    assert all(torch.equal(again[k], loaded.weights[k]) for k in again)


#: the text_config of Gemma 3 4B's config.json, all it states
GEMMA3_4B_TEXT = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "model_type": "gemma3_text",
    "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
}


@pytest.mark.parametrize("text_config", [{}, GEMMA3_4B_TEXT], ids=["empty", "4b"])
def test_gemma3_text_config_takes_transformers_defaults_for_missing_keys(text_config):
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_config}
    theirs = transformers.Gemma3Config(text_config=dict(text_config)).text_config.to_dict()
    expected = ModelConfig.from_hf(theirs | {"architectures": ["Gemma3ForCausalLM"]})
    assert ModelConfig.from_hf(raw) == expected
    # the top level's EOS ids (the 4B's, beside the end-of-turn token) are the model's
    assert ModelConfig.from_hf(raw | {"eos_token_id": [1, 106]}).eos_token_ids == (1, 106)


def test_other_multimodal_architectures_are_refused_by_name():
    raw = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {}}
    with pytest.raises(ModelFormatError, match=r"'LlavaForConditionalGeneration' .*multimodal"):
        ModelConfig.from_hf(raw)
