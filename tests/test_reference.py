"""The fp32 path against Hugging Face transformers on the same weights.

Last-token logits must agree within 1e-4 and greedy decoding must give the same 100 tokens,
on the story model (safetensors folder) and on SmolLM2-135M-Instruct (GGUF, dequantized).
"""

from __future__ import annotations

import json

import pytest
import torch

from hexin.generate import TextStream
from hexin.model import Llama
from hexin.sampling import SamplingParams

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

GREEDY = SamplingParams(temperature=0, max_tokens=100)
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def hf_model_from(loaded) -> torch.nn.Module:
    """A transformers LlamaForCausalLM holding exactly hexin's (dequantized) weights."""
    c = loaded.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids),
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = dict(loaded.weights)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    state.setdefault("model.embed_tokens.weight", state["lm_head.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def hf_greedy(hf, ids: list[int], eos: tuple[int, ...], n: int = 100) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
        )
    new = out[0, len(ids) :].tolist()
    return new[:-1] if new and new[-1] in eos else new  # hexin does not return the EOS


def hexin_last_logits(model: Llama, ids: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor([ids]), model.new_cache())[0]


@pytest.fixture(scope="module")
def story_pair(story_dir, story_model):
    hf = transformers.LlamaForCausalLM.from_pretrained(story_dir, dtype=torch.float32).eval()
    return Llama(story_model.config, story_model.weights), hf


@pytest.fixture(scope="module")
def smol_pair(default_model):
    return Llama(default_model.config, default_model.weights), hf_model_from(default_model)


def test_story_model_last_token_logits_match_transformers(story_pair, story_model, story_dir):
    model, hf = story_pair
    cases = json.loads((story_dir / "REFERENCE.json").read_text())["cases"]
    for case in cases:
        ids = story_model.tokenizer.encode(case["prompt"])
        assert ids == case["prompt_ids"]
        ours, theirs = hexin_last_logits(model, ids), hf_last_logits(hf, ids)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_story_model_greedy_reproduces_reference_json(story_pair, story_model, story_dir):
    model, _ = story_pair
    for case in json.loads((story_dir / "REFERENCE.json").read_text())["cases"]:
        stream = TextStream(model, story_model.tokenizer, case["prompt_ids"], GREEDY)
        completion = stream.run()
        assert completion.token_ids == case["greedy_ids"]
        assert completion.text == case["greedy_text"]


def test_story_model_greedy_matches_transformers_generate(story_pair, story_model):
    model, hf = story_pair
    ids = story_model.tokenizer.encode("The little dog")
    ours = TextStream(model, story_model.tokenizer, ids, GREEDY).run().token_ids
    assert ours == hf_greedy(hf, ids, story_model.tokenizer.eos_token_ids)


def test_smollm2_gguf_logits_match_transformers_on_same_weights(smol_pair, default_model):
    model, hf = smol_pair
    for prompt in (CHAT_PROMPT, "The capital of France is"):
        ids = default_model.tokenizer.encode(prompt)
        ours, theirs = hexin_last_logits(model, ids), hf_last_logits(hf, ids)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_smollm2_gguf_logits_match_transformers_own_gguf_loader(default_model, default_gguf):
    """transformers dequantizes and un-permutes the GGUF itself: an independent check of
    hexin's GGUF reader, not just of its forward pass."""
    pytest.importorskip("gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    model = Llama(default_model.config, default_model.weights)
    ids = default_model.tokenizer.encode(CHAT_PROMPT)
    ours, theirs = hexin_last_logits(model, ids), hf_last_logits(hf, ids)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_smollm2_gguf_greedy_100_tokens_match_transformers(smol_pair, default_model):
    model, hf = smol_pair
    tok = default_model.tokenizer
    ids = tok.encode(CHAT_PROMPT)
    ours = TextStream(model, tok, ids, GREEDY).run().token_ids
    theirs = hf_greedy(hf, ids, tok.eos_token_ids)
    assert len(ours) >= 20  # a real reply, not an early stop
    assert ours == theirs


def test_kv_cache_decode_equals_full_recompute(smol_pair, default_model):
    """Logits of a token decoded on top of the cache equal those of one full pass."""
    model, _ = smol_pair
    ids = default_model.tokenizer.encode(CHAT_PROMPT)
    cache = model.new_cache()
    model.forward(torch.tensor([ids[:-5]]), cache)
    for i in range(len(ids) - 5, len(ids)):
        step = model.forward(torch.tensor([[ids[i]]]), cache)[0]
    full = hexin_last_logits(model, ids)
    assert (step - full).abs().max().item() < 1e-4
