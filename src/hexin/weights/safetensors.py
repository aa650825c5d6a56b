"""Hugging Face model folders: ``config.json`` + ``model.safetensors`` (or a sharded index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hexin.config import ModelConfig, split_fused_names
from hexin.errors import ModelFormatError


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e})") from None
    return ModelConfig.from_hf(raw)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: one ``model.safetensors`` or the shards its
    ``model.safetensors.index.json`` names."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{index}: not a valid shard index ({e})") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelFormatError(f"{folder}: missing weight shards {', '.join(missing)}")
        return shards
    raise ModelFormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")


#: name prefixes of a multimodal folder's language model (Gemma 3 4B and up), as
#: transformers has written them (``language_model.model.``, also what 5.x saves; 4.5x's
#: ``model.language_model.``), and the text-only model's names for them
_TEXT_MODEL_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
#: the image side of such a folder: the vision tower and its projection into the text model
_IMAGE_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def text_model_name(name: str) -> str | None:
    """The name hexin's text-only model gives a stored tensor, None to skip it.

    A multimodal checkpoint (``config.HF_MULTIMODAL``) keeps its language model under a
    prefix beside an image encoder hexin does not run: the prefix is stripped, so the
    tensors read as the text-only model's, and the image tensors are skipped unread (the
    27B's vision tower is some 400M parameters). Other folders' names pass unchanged."""
    if name.startswith(_IMAGE_PREFIXES):
        return None
    for prefix, ours in _TEXT_MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder by hexin's (text-only) HF names (:func:`text_model_name`),
    as stored (dtype unchanged)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    ours = text_model_name(name)
                    if ours is not None:
                        tensors[ours] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{path}: unreadable or truncated safetensors ({e})") from None
    return tensors


def split_fused(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` split by rows into the separate
    projections hexin's model names (and fuses again itself); other tensors as they are."""
    for layer in range(config.num_layers):
        for fused, parts in split_fused_names(config, layer).items():
            tensor = tensors.pop(fused, None)
            if tensor is None:
                continue
            rows = sum(n for _, n in parts)
            if tensor.ndim != 2 or tensor.shape[0] != rows:
                raise ModelFormatError(
                    f"tensor {fused} has shape {tuple(tensor.shape)}, expected {rows} rows"
                )
            for (name, _), part in zip(parts, tensor.split([n for _, n in parts]), strict=True):
                tensors[name] = part.contiguous()
    return tensors
