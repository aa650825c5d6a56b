"""Shared fixtures: the two real models every test runs on (loaded once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hexin.weights.registry import bundled_path

#: the package's own copy of the seed's story model
STORY_DIR = bundled_path("story")


@pytest.fixture(scope="session")
def story_dir() -> Path:
    """The seed's TinyStories model folder, bundled with hexin."""
    assert (STORY_DIR / "config.json").is_file(), f"story model missing at {STORY_DIR}"
    return STORY_DIR


@pytest.fixture(scope="session")
def story_model(story_dir: Path):
    from hexin.weights import load_model

    return load_model(story_dir)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default SmolLM2-135M-Instruct GGUF, fetched into the user cache on first use."""
    from hexin.weights import registry

    return registry.pull(registry.DEFAULT_MODEL, quiet=True)


@pytest.fixture(scope="session")
def default_model(default_gguf: Path):
    from hexin.weights import load_model

    return load_model(default_gguf)
