"""Shared fixtures (the two real models, loaded once per session, and a tiny model shape for
the model-free tests) and the markers that split the suite.

Markers, applied here by file and by the fixtures a test uses, so the test files stay
free of them:

- ``slow``: needs the default SmolLM2 model (a download on first use, and seconds per
  test on a CPU), spawns a process, or took over a second in a full run;
- ``server``: runs a real ``hexin serve``; ``browser``: drives Chromium as well;
- ``gpu``: needs CUDA (skipped without it);
- ``postgres``: runs a real PostgreSQL server (``postgres_server``), which the store tests
  use beside SQLite (``store_db``);
- ``cluster``: runs a Ray Serve cluster of replicas (the ``cluster`` fixture of
  tests/test_cluster.py); slow as well.

``python3 -m pytest -m "not slow and not server and not browser"`` is the quick run;
plain ``python3 -m pytest`` runs everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hexin.config import ModelConfig
from hexin.weights.registry import bundled_path

#: the package's own copy of the seed's story model
STORY_DIR = bundled_path("story")

#: whole files, by marker
FILE_MARKERS = {
    "test_web_ui.py": ("slow", "server", "browser"),
    "test_cuda.py": ("gpu",),
    "test_reference.py": ("slow",),  # transformers as the reference, on the default model
    "test_families.py": ("slow",),  # random Llama 3 / Qwen2 / Qwen3 against transformers
    "test_quality.py": ("slow",),  # perplexity over a text
    "test_chat_persistence.py": ("slow",),  # real processes, killed and restarted
    "test_chat_cli.py": ("slow",),  # the REPL in a subprocess
    "test_cli.py": ("slow",),  # each test starts the hexin command (a second or more)
    "test_store_concurrency.py": ("slow", "server"),  # two servers on one PostgreSQL
}
#: a test using any of these (directly or through another fixture) is slow
SLOW_FIXTURES = {"default_gguf", "default_model", "real_template_dir"}
#: a test using any of these runs a Ray cluster
CLUSTER_FIXTURES = {"cluster"}
#: single tests that took over a second and a half in a full run (nodeid prefixes)
SLOW_TESTS = (
    "tests/test_hub.py::test_model_flag_fetches_on_first_use_then_runs_from_the_cache",
    "tests/test_hub.py::test_interrupted_pull_continues_where_it_stopped",
    "tests/test_hub.py::test_missing_repo_from_the_command_line",
    "tests/test_engine.py::test_16_concurrent_requests_give_the_tokens_each_gives_alone",
    "tests/test_engine.py::test_pool_too_small_for_all_requests_still_completes_correctly",
    "tests/test_engine.py::test_requests_from_many_threads",
    "tests/test_chat_service.py::test_a_stalled_store_does_not_pause_other_sessions_streams",
    "tests/test_quant.py::test_int8_two_term_matmul_is_accurate_and_row_independent",
    "tests/test_loading.py::test_random_llama_folder_matches_transformers",
    "tests/test_native_kernels.py::test_the_one_call_decode_layer_gives_what_the_op_by_op_path",
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the whole run (``postgres_server.running_server``)."""
    from postgres_server import running_server

    with running_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """What ``--db`` takes, for each backend: a SQLite file, or a fresh PostgreSQL
    database's URL. The store tests take this, so each runs on both."""
    if request.param == "sqlite":
        yield str(tmp_path / "chat.db")
        return
    from postgres_server import fresh_database

    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        marks = set(FILE_MARKERS.get(name, ()))
        if name.startswith("test_server_"):
            marks |= {"slow", "server"}
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            marks.add("slow")
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            marks |= {"slow", "cluster"}
        if item.nodeid.startswith(SLOW_TESTS):
            marks.add("slow")
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("store_db") == "postgresql"
        if on_postgres or "postgres_url" in getattr(item, "fixturenames", ()):
            marks.add("postgres")
        for mark in sorted(marks):
            item.add_marker(mark)


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


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A model shape small enough that a KV pool of it costs nothing: 2 layers, 1 KV head
    of 4 dimensions (2 query heads share it). No weights: for the block pool, the paged
    batch and the scheduler, which only need the shape."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        intermediate_size=16,
    )


@pytest.fixture
def http(server):
    """An HTTP client of the requesting module's ``server`` (a ``server_util.Server``)."""
    with server.http() as client:
        yield client


#: an AVX-512 VNNI CPU without AMX (Intel Xeon 3rd gen, AMD Zen 4)
AVX512_VNNI = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512_vnni"
#: every kernel selection a machine can be given, as (HEXIN_CPU_FEATURES, HEXIN_NATIVE):
#: hexin's own kernels built for each instruction set, and PyTorch's kernels (the fallback
#: without a compiler) with and without AVX-512; None leaves a variable unset
KERNEL_SELECTIONS = {
    "own-amx": (None, None),
    "own-avx512_vnni": (AVX512_VNNI, None),
    "own-avx_vnni": ("avx2,fma,f16c,avx_vnni", None),
    "own-avx2": ("avx2,fma,f16c", None),
    "pytorch": (None, "0"),
    "pytorch-avx2": ("avx2,fma,f16c", "0"),
}
#: what the real CPU must have for a selection to run on it (else the test is skipped)
NEEDS = {
    "own-amx": "amx_int8",
    "own-avx512_vnni": "avx512_vnni",
    "own-avx_vnni": "avx_vnni",
    "own-avx2": "avx2",
}


def force_kernels(monkeypatch: pytest.MonkeyPatch, features: str | None, own: str | None) -> None:
    """Make hexin select kernels as it would for ``features``, or with ``HEXIN_NATIVE=own``."""
    from hexin import cpu, native

    for name, value in (("HEXIN_CPU_FEATURES", features), ("HEXIN_NATIVE", own)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cpu.features.cache_clear()
    native.kernels.cache_clear()


@pytest.fixture(params=list(KERNEL_SELECTIONS))
def kernel_selection(request, monkeypatch) -> str:
    """Each kernel selection in turn (models built inside the test use it)."""
    from hexin import cpu, native

    force_kernels(monkeypatch, None, None)
    if (need := NEEDS.get(request.param)) and need not in cpu.features():
        pytest.skip(f"this CPU has no {need}")
    force_kernels(monkeypatch, *KERNEL_SELECTIONS[request.param])
    if request.param.startswith("own") and native.kernels() is None:
        pytest.skip("no C compiler: hexin's own kernels cannot be built here")
    yield request.param
    monkeypatch.undo()
    cpu.features.cache_clear()
    native.kernels.cache_clear()
