"""Loading HF folders: the story model's shape, tied embeddings, shards, Mistral, RoPE
settings in both config.json layouts, and clear errors for every way a folder can be wrong
(settings hexin does not implement included)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hexin.config import RopeScaling
from hexin.errors import ModelFormatError, ModelNotFoundError
from hexin.model import Llama
from hexin.weights import load_model

transformers = pytest.importorskip("transformers", reason="transformers builds the random models")


def test_story_model_parameters_load_with_expected_shape(story_model):
    c = story_model.config
    assert (c.vocab_size, c.num_layers, c.num_heads, c.num_kv_heads) == (2048, 2, 8, 4)
    assert (c.hidden_size, c.head_dim, c.intermediate_size) == (128, 16, 384)
    assert c.tie_word_embeddings
    # the file stores only lm_head.weight; the embedding is the same matrix
    assert "model.embed_tokens.weight" not in story_model.weights
    model = Llama(c, story_model.weights)
    assert torch.equal(model.embed, model.lm_head.weight)
    # q, k and v stacked into one projection: 8 query heads + 2 x 4 key/value heads of 16
    qkv = model.layers[1].qkv.weight
    assert qkv.shape == ((8 + 2 * 4) * 16, 128)
    k_proj = story_model.weights["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(qkv[8 * 16 : 12 * 16], k_proj)


#: a tiny model's shape: the story tokenizer's vocabulary, two small layers
TINY = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _random_hf_folder(tmp_path: Path, story_dir: Path, arch: str = "llama", **overrides) -> Path:
    """A tiny random model saved by transformers, with the story model's tokenizer."""
    kw = TINY | dict(tie_word_embeddings=False) | overrides
    if arch == "mistral":
        config = transformers.MistralConfig(sliding_window=4096, **kw)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(story_dir / name, folder / name)
    return folder


def _logits_agree(folder: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = load_model(folder)
    model = Llama(loaded.config, loaded.weights)
    ids = [1, 5, 99, 300, 7, 1000]
    ours = model.forward(torch.tensor([ids]), model.new_cache())[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_random_llama_folder_matches_transformers(tmp_path, story_dir, tied):
    _logits_agree(_random_hf_folder(tmp_path, story_dir, tie_word_embeddings=tied))


def test_mistral_folder_loads_and_matches_transformers(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir, arch="mistral")
    assert load_model(folder).config.architecture == "mistral"
    _logits_agree(folder)


def test_sharded_folder_loads_like_single_file(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    tensors = load_model(folder).weights
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / shard))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    resharded = load_model(folder).weights
    assert sorted(resharded) == names
    assert all(torch.equal(resharded[k], tensors[k]) for k in names)


def test_missing_model_names_the_choices(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"not found.*registered name"):
        load_model(tmp_path / "nowhere")


def test_unsupported_architecture_is_named(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(folder)


def test_folder_without_weights_is_reported(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"no model\.safetensors"):
        load_model(folder)


def test_truncated_safetensors_is_reported(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(folder)


def test_missing_shard_is_named(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "gone.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=r"gone\.safetensors"):
        load_model(folder)


def test_shape_mismatch_names_the_tensor(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(folder)
    with pytest.raises(ModelFormatError, match=r"gate_proj.weight.*\(96, 64\).*\(100, 64\)"):
        Llama(loaded.config, loaded.weights)


def test_missing_tensor_is_named(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    loaded = load_model(folder)
    del loaded.weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"model.layers.1.mlp.up_proj.weight"):
        Llama(loaded.config, loaded.weights)


def test_invalid_config_json_is_reported(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="invalid JSON"):
        load_model(folder)


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="unsupported model file"):
        load_model(path)


# -- RoPE settings in both config.json layouts ----------------------------------------------

#: Llama 3 scaling with a short original context, so that a 40-token prompt reaches the
#: scaled frequencies, and a base only ``rope_parameters`` states
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
PROMPT = [int(i) for i in torch.randint(3, 2048, (40,), generator=torch.Generator().manual_seed(3))]


def _edit_config(folder: Path, edit) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _last_logits(folder: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hexin's, transformers') last-token logits of ``ids`` on the folder, fp32."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = load_model(folder)
    model = Llama(loaded.config, loaded.weights)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    return model.forward(torch.tensor([ids]), model.new_cache())[0], theirs


def test_rope_parameters_of_transformers_5_are_read(tmp_path, story_dir):
    """transformers 5 writes RoPE scaling and base only inside ``rope_parameters``; read as
    before, the model ran unscaled with the default base, silently."""
    folder = _random_hf_folder(tmp_path, story_dir, rope_parameters=dict(LLAMA3_ROPE))
    saved = json.loads((folder / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3"
    assert saved.get("rope_scaling") is None and saved.get("rope_theta") is None
    config = load_model(folder).config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    ours, theirs = _last_logits(folder, PROMPT)
    assert (ours - theirs).abs().max().item() < 1e-4

    plain = _edit_config(
        shutil.copytree(folder, tmp_path / "plain"),
        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    )
    unscaled, _ = _last_logits(plain, PROMPT)
    assert (ours - unscaled).abs().max().item() > 1e-2  # the scaling matters at this length


def test_rope_scaling_and_rope_theta_of_the_older_layout_still_work(tmp_path, story_dir):
    folder = _random_hf_folder(tmp_path, story_dir, rope_parameters=dict(LLAMA3_ROPE))
    new_layout = load_model(folder).config
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}

    def older(cfg: dict) -> None:
        del cfg["rope_parameters"]
        cfg.update(rope_theta=500000.0, rope_scaling=scaling)

    _edit_config(folder, older)
    assert load_model(folder).config == new_layout
    ours, theirs = _last_logits(folder, PROMPT)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "longrope RoPE scaling needs"),
        ({"rope_parameters": None, "rope_scaling": {"type": "linear"}}, "linear RoPE .* 'factor'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ],
    ids=[
        "yarn",
        "dynamic",
        "longrope",
        "linear",
        "partial",
        "gelu",
        "attn-bias",
        "mlp-bias",
        "sliding",
        "layer-types",
    ],
)
def test_settings_that_change_the_math_are_refused_by_name(tmp_path, story_dir, edit, named):
    """Never run as if they were absent: one line naming the setting."""
    folder = _edit_config(_random_hf_folder(tmp_path, story_dir), lambda c: c.update(edit))
    with pytest.raises(ModelFormatError, match=named) as info:
        load_model(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention"]])
def test_qwen2_sliding_window_layers_match_transformers(tmp_path, story_dir, layer_types):
    """Qwen2's ``use_sliding_window``: the layers from ``max_window_layers`` on (or those
    ``layer_types`` names) see only the last ``sliding_window`` keys. A 30-token prompt
    over a window of 8, then decode steps one token at a time through the cache."""
    config = transformers.Qwen2Config(
        **TINY,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=layer_types,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(story_dir / name, tmp_path / "qwen2" / name)
    loaded = load_model(tmp_path / "qwen2")
    expected_types = tuple(layer_types or ["full_attention", "sliding_attention"])
    assert loaded.config.sliding_window == 8 and loaded.config.layer_types == expected_types
    model = Llama(loaded.config, loaded.weights)
    ids = [
        int(i) for i in torch.randint(3, 2048, (34,), generator=torch.Generator().manual_seed(3))
    ]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    cache = model.new_cache()
    ours = [model.forward(torch.tensor([ids[:30]]), cache)[0]]
    ours += [model.forward(torch.tensor([[t]]), cache)[0] for t in ids[30:33]]
    assert (torch.stack(ours) - theirs[29:33]).abs().max().item() < 1e-4
