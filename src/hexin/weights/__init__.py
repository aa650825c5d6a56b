"""Model loading: one entry point for HF folders, GGUF files and registered names.

torch is imported only when weights are loaded, so that ``hexin.weights.registry`` (and
with it ``hexin models`` and ``hexin pull``) starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hexin.config import ModelConfig
from hexin.errors import ModelFormatError, ModelNotFoundError
from hexin.tokenizer import Tokenizer
from hexin.weights import registry

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    """Config, tokenizer and weights of a model, ready to build a ``Llama`` from.

    ``weights`` are dense tensors under Hugging Face names; ``quantized`` keeps a GGUF
    file's tensors in their stored form for code that can use them directly.
    """

    name: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]
    quantized: dict[str, object] = field(default_factory=dict)


def resolve(spec: str | Path | None) -> Path:
    """Turn ``--model`` (a folder, a .gguf file, a registered name, or nothing for the
    default) into a path on disk, fetching a registered model on first use."""
    if spec is None:
        return registry.pull(registry.DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in registry.REGISTRY or str(spec) in registry.BUNDLED:
        return registry.pull(str(spec))
    known = ", ".join(sorted({*registry.REGISTRY, *registry.BUNDLED}))
    raise ModelNotFoundError(
        f"model {str(spec)!r} not found: give a model folder, a .gguf file, "
        f"or a registered name ({known})"
    )


def load_model(spec: str | Path | None = None, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load config, tokenizer and weights (GGUF tensors dequantized to ``dtype``, float32
    when None)."""
    import torch

    if dtype is None:
        dtype = torch.float32
    path = resolve(spec)
    if path.is_dir():
        from hexin.weights.safetensors import load_hf_weights, read_hf_config, split_fused

        config = read_hf_config(path)
        tokenizer = Tokenizer.from_hf_folder(path, eos_token_ids=config.eos_token_ids)
        weights = split_fused(config, load_hf_weights(path))
        return LoadedModel(path.name, path, config, tokenizer, weights)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        from hexin.weights.gguf import load_gguf

        g = load_gguf(path)
        tokenizer = Tokenizer(
            g.tokenizer,
            bos_token_id=g.bos_token_id,
            eos_token_ids=g.config.eos_token_ids,
            add_bos=g.add_bos_token,
            chat_template=g.chat_template,
        )
        weights = {name: t.dequantize(dtype) for name, t in g.tensors.items()}
        return LoadedModel(path.stem, path, g.config, tokenizer, weights, dict(g.tensors))
    raise ModelFormatError(
        f"{path}: unsupported model file (expected a Hugging Face folder or a .gguf file)"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
