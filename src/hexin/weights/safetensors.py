"""Hugging Face model folders: ``config.json`` + ``model.safetensors`` (or a sharded index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hexin.config import ModelConfig
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


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder by their HF names, as stored (dtype unchanged)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{path}: unreadable or truncated safetensors ({e})") from None
    return tensors
