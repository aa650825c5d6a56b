"""``hexin pull ORG/NAME[:QUANT]``, ``--model ORG/NAME`` and ``hexin models`` against a local
stand-in for the hub (a thread in this process, reached through ``HF_ENDPOINT``).

The stand-in speaks what huggingface_hub 2.x asks of the real hub for these calls:
``GET /api/models/{repo}/revision/{rev}`` (``sha``, ``siblings``), ``HEAD``/``GET
/{repo}/resolve/{commit}/{file}`` (``ETag``, ``X-Repo-Commit``, ``Content-Length``; weights
files answer 302 to a CDN address on another host with ``X-Linked-Etag``/``X-Linked-Size``,
as the hub does for LFS files), the CDN honouring ``Range``, and the hub's errors
(``X-Error-Code: RepoNotFound`` / ``GatedRepo``). Every request is logged, so a test can
check what was fetched and with which ``Range``.

Repositories served: the bundled story model as an HF folder (with a file that must not be
fetched), the same weights sharded with an index (and a decoy ``consolidated.safetensors``),
two GGUF files ``model-Q4_K_M.gguf``/``model-Q8_0.gguf`` written with the ``gguf`` package,
a repository with no model files, and a gated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hexin import cli, hub
from hexin.weights.registry import bundled_path

STORY = bundled_path("story")
STORY_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
LFS = (".safetensors", ".gguf")


def _gguf_bytes(tmp: Path, name: str, arch: str, seed: int, rows: int = 512) -> bytes:
    """A GGUF file (metadata and one tensor of ``rows`` x 256 random floats), as ``gguf``
    writes it."""
    import gguf

    path = tmp / name
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.random.default_rng(seed).random((rows, 256), "f4"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _sharded_story() -> dict[str, bytes]:
    """The story weights split in two shards with an index, as transformers saves them."""
    from safetensors.numpy import load_file, save

    tensors = load_file(STORY / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    files = {f: (STORY / f).read_bytes() for f in STORY_FILES if f != "model.safetensors"}
    weight_map = {}
    for shard, keys in shards.items():
        files[shard] = save({k: tensors[k] for k in keys}, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, shard)
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    files["consolidated.safetensors"] = (STORY / "model.safetensors").read_bytes()
    return files


class StandInHub:
    """The hub's file API on 127.0.0.1 and its "CDN" on localhost, same port."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str]) -> None:
        self.repos, self.gated = repos, gated
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.blobs = {
            hashlib.sha256(data).hexdigest(): data
            for files in repos.values()
            for data in files.values()
        }
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.cut_once: dict[str, int] = {}  # sha256 -> bytes sent before the next cut
        self.stall_once: dict[str, int] = {}  # sha256 -> bytes sent before stalling
        self.stalled = threading.Event()  # set when a stalled transfer is waiting
        self.release = threading.Event()  # set to end the stalled transfer
        self.lock = threading.Lock()
        hubself = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hubself.answer(self, body=False)

            def do_GET(self) -> None:
                hubself.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def fetched(self, method: str = "GET") -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    # --- the protocol ---

    def answer(self, h: http.server.BaseHTTPRequestHandler, *, body: bool) -> None:
        path = h.path.split("?")[0]
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self.model_info(h, m.group(1))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve(h, m.group(1), m.group(2), m.group(3), body=body)
        if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
            return self.cdn(h, m.group(1), body=body)
        self.error(h, 404, "Not Found")

    def error(self, h, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def model_info(self, h, repo: str) -> None:
        if repo not in self.repos:  # the hub answers 401 to an anonymous caller
            return self.error(h, 401, "RepoNotFound")
        info = {
            "id": repo,
            "modelId": repo,
            "sha": self.commits[repo],
            "private": False,
            "gated": "manual" if repo in self.gated else False,
            "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])],
        }
        data = json.dumps(info).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def resolve(self, h, repo: str, revision: str, name: str, *, body: bool) -> None:
        if repo not in self.repos:
            return self.error(h, 401, "RepoNotFound")
        if repo in self.gated:
            return self.error(h, 401, "GatedRepo")
        if revision not in ("main", self.commits[repo]):
            return self.error(h, 404, "RevisionNotFound")
        if name not in self.repos[repo]:
            return self.error(h, 404, "EntryNotFound")
        data = self.repos[repo][name]
        git_sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if name.endswith(LFS):  # the hub redirects LFS files to its CDN, on another host
            sha = hashlib.sha256(data).hexdigest()
            h.send_response(302)
            h.send_header("Location", f"http://localhost:{self.port}/cdn/{sha}")
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("ETag", f'"{git_sha}"')
            h.send_header("X-Repo-Commit", self.commits[repo])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("ETag", f'"{git_sha}"')
        h.send_header("X-Repo-Commit", self.commits[repo])
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def cdn(self, h, sha: str, *, body: bool) -> None:
        data = self.blobs[sha]
        start = 0
        if (rng := h.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{sha}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        with self.lock:
            cut = self.cut_once.pop(sha, None) if start == 0 else None
            stall = self.stall_once.pop(sha, None) if start == 0 else None
        if cut is not None:  # the connection drops midway
            h.wfile.write(data[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if stall is not None:  # the transfer hangs midway until the test releases it
            h.wfile.write(data[:stall])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(data[start:])


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("hub-files")
    story = {f: (STORY / f).read_bytes() for f in STORY_FILES}
    story["REFERENCE.json"] = (STORY / "REFERENCE.json").read_bytes()  # not a model file
    story["README.md"] = b"# story\n"
    return {
        "hexin-test/story": story,
        "hexin-test/story-sharded": _sharded_story(),
        "hexin-test/tiny-GGUF": {
            "model-Q4_K_M.gguf": _gguf_bytes(tmp, "a.gguf", "llama", 0),
            # over huggingface_hub's 10 MiB read chunk, so a cut transfer keeps a part
            "model-Q8_0.gguf": _gguf_bytes(tmp, "b.gguf", "qwen3", 1, rows=12 * 1024),
            "README.md": b"# tiny\n",
        },
        "hexin-test/no-model": {"README.md": b"# nothing\n", "notes.txt": b"hi\n"},
        "hexin-test/gated": {f: (STORY / f).read_bytes() for f in STORY_FILES},
    }


@pytest.fixture(scope="module")
def standin(repos):
    server = StandInHub(repos, gated={"hexin-test/gated"})
    yield server
    server.close()


@pytest.fixture
def env(standin, tmp_path, monkeypatch) -> dict[str, str]:
    """HF_ENDPOINT at the stand-in and a fresh HEXIN_HOME; the same variables for a
    subprocess."""
    standin.requests.clear()
    values = {
        "HF_ENDPOINT": standin.url,
        "HEXIN_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),  # no token or cache of the user's
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        # a transfer the stand-in stalls waits for the test, not for huggingface_hub's 10 s
        # read timeout (on a loaded machine it ran out first and the pull resumed by itself)
        "HF_HUB_DOWNLOAD_TIMEOUT": "300",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return values


def hexin_process(*args: str, env: dict[str, str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hexin.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        preexec_fn=_sigint_as_in_a_terminal,
        **kw,
    )


def _sigint_as_in_a_terminal() -> None:
    """In the child, before it starts: SIGINT at its default, so that Python turns Ctrl-C
    into KeyboardInterrupt (a test run started from a background job hands its children
    SIGINT ignored, and Python then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_masks(pid: int) -> str:
    """The process's ignored and caught signals, for a message."""
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return "; ".join(line for line in status if line.startswith(("SigIgn", "SigCgt")))
    return "(no /proc)"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_pull_folder_fetches_weights_config_and_tokenizer_only(env, standin, repos, capsys):
    code, out, err = run_cli(capsys, "pull", "hexin-test/story")
    assert code == 0, err
    folder = Path(out.strip())
    assert folder == Path(env["HEXIN_HOME"]) / "models" / "hub" / "hexin-test" / "story"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == STORY_FILES
    for name in STORY_FILES:
        assert (folder / name).read_bytes() == repos["hexin-test/story"][name], name
    assert "pulling hexin-test/story (6 files, 2.7 MB)" in err  # progress on stderr
    # a second pull asks the hub for the files' ETags and downloads nothing
    standin.requests.clear()
    assert run_cli(capsys, "pull", "hexin-test/story")[0] == 0
    assert [p for p in standin.fetched("GET") if "/api/" not in p] == []


def test_pull_sharded_folder_takes_the_indexed_shards_only(env, standin, capsys):
    code, out, err = run_cli(capsys, "pull", "hexin-test/story-sharded")
    assert code == 0, err
    folder = Path(out.strip())
    assert (folder / "model-00001-of-00002.safetensors").is_file()
    assert (folder / "model-00002-of-00002.safetensors").is_file()
    assert not (folder / "consolidated.safetensors").exists()


def test_model_flag_fetches_on_first_use_then_runs_from_the_cache(env, standin, capsys):
    """``--model ORG/NAME`` pulls what is absent (as ``ollama run`` does) and generates what
    the bundled copy of the same weights generates; the next run asks the hub nothing."""
    args = ("story", "--max-tokens", "5", "--temperature", "0")
    code, expected, err = run_cli(capsys, *args, "--model", "story")
    assert code == 0, err
    code, out, err = run_cli(capsys, *args, "--model", "hexin-test/story-sharded")
    assert code == 0, err
    assert "pulling hexin-test/story-sharded" in err
    assert out == expected and out.strip()
    standin.requests.clear()
    code, out, err = run_cli(capsys, *args, "--model", "hexin-test/story-sharded")
    assert code == 0, err
    assert out == expected and standin.requests == []


def test_pull_one_gguf_by_quant_name(env, standin, repos, capsys):
    code, out, err = run_cli(capsys, "pull", "hexin-test/tiny-GGUF:q4_k_m")  # any case
    assert code == 0, err
    path = Path(out.strip())
    assert path.name == "model-Q4_K_M.gguf"
    assert path.read_bytes() == repos["hexin-test/tiny-GGUF"]["model-Q4_K_M.gguf"]
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["model-Q4_K_M.gguf"]
    assert not any("Q8_0" in p or "README" in p for _, p, _ in standin.requests)
    assert hub.resolve("hexin-test/tiny-GGUF:Q4_K_M") == path  # from the cache


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hexin-test/tiny-GGUF:Q5_K_M", "has no GGUF file for Q5_K_M; quantizations there: "),
        ("hexin-test/tiny-GGUF:Q", "matches several GGUF files (model-Q4_K_M.gguf, model-Q8_0"),
        ("hexin-test/story:Q4_K_M", "hexin-test/story has no GGUF files"),
    ],
)
def test_quant_that_matches_no_file_or_several_lists_the_quants(env, capsys, spec, message):
    code, out, err = run_cli(capsys, "pull", spec)
    assert code == 1 and out == ""
    assert err.startswith("hexin: error: ") and message in err, err
    if "quantizations there" in message or "several" in message:
        assert "Q4_K_M, Q8_0" in err
    assert len(err.strip().splitlines()) == 1


def test_dropped_connection_is_resumed_with_a_range_request(env, standin, repos, capsys):
    """The CDN cuts the transfer midway; huggingface_hub's retry asks for the rest (of what it
    had written: it reads in 10 MiB chunks)."""
    data = repos["hexin-test/tiny-GGUF"]["model-Q8_0.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    standin.cut_once[sha] = len(data) - 1_000_000
    code, out, err = run_cli(capsys, "pull", "hexin-test/tiny-GGUF:Q8_0")
    assert code == 0, err
    assert Path(out.strip()).read_bytes() == data
    ranges = [r for m, p, r in standin.requests if p == f"/cdn/{sha}" and m == "GET"]
    assert ranges[0] is None and ranges[-1] is not None
    assert int(re.fullmatch(r"bytes=(\d+)-", ranges[-1]).group(1)) > 0


def test_interrupted_pull_continues_where_it_stopped(env, standin, repos, capsys):
    """Ctrl-C in the middle of a file keeps the part fetched; the next pull asks for the
    rest with a Range request and the file is byte-identical."""
    data = repos["hexin-test/tiny-GGUF"]["model-Q8_0.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    standin.stalled.clear()
    standin.release.clear()
    standin.stall_once[sha] = len(data) - 1_000_000
    proc = hexin_process("pull", "hexin-test/tiny-GGUF:Q8_0", env=env)
    try:
        assert standin.stalled.wait(120), "the pull never reached the CDN"
        partial_dir = Path(env["HEXIN_HOME"]) / "models/hub/hexin-test/tiny-GGUF/.hexin/partial"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list(partial_dir.glob("model-Q8_0.gguf.*.part"))
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        masks = _signal_masks(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the pull outlived Ctrl-C by 60 s ({masks})")
    finally:
        standin.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"{err}\n({masks})"
    assert "run it again to continue where it stopped" in err
    target = partial_dir.parent.parent / "model-Q8_0.gguf"
    assert not target.exists()  # never a truncated file under the model's name
    (part,) = partial_dir.glob("model-Q8_0.gguf.*.part")
    kept = part.stat().st_size
    assert 0 < kept < len(data)

    standin.requests.clear()
    code, out, err = run_cli(capsys, "pull", "hexin-test/tiny-GGUF:Q8_0")
    assert code == 0, err
    assert f"resuming model-Q8_0.gguf at {kept / 1e6:.1f} MB" in err
    assert Path(out.strip()) == target and target.read_bytes() == data
    assert [r for m, p, r in standin.requests if p == f"/cdn/{sha}"] == [f"bytes={kept}-"]
    assert list(partial_dir.glob("*.part")) == []


def test_a_resumed_download_that_fails_its_checksum_is_dropped(env, standin, repos, capsys):
    """A part that is not a prefix of the file (written by something else) is caught by the
    LFS sha256 once the rest is fetched; the next pull starts over and succeeds."""
    data = repos["hexin-test/tiny-GGUF"]["model-Q4_K_M.gguf"]
    sha = hashlib.sha256(data).hexdigest()
    partial_dir = Path(env["HEXIN_HOME"]) / "models/hub/hexin-test/tiny-GGUF/.hexin/partial"
    partial_dir.mkdir(parents=True)
    (partial_dir / f"model-Q4_K_M.gguf.{sha}.part").write_bytes(b"x" * 1000)
    code, out, err = run_cli(capsys, "pull", "hexin-test/tiny-GGUF:Q4_K_M")
    assert code == 1 and "model-Q4_K_M.gguf: the resumed download failed its checksum" in err
    assert list(partial_dir.glob("*.part")) == []
    code, out, err = run_cli(capsys, "pull", "hexin-test/tiny-GGUF:Q4_K_M")
    assert code == 0, err
    assert Path(out.strip()).read_bytes() == data


def test_models_lists_cached_repos_with_sizes_formats_and_families(env, repos, capsys):
    # the bare name of a GGUF-only repository gives its Q4_K_M file, listed once
    specs = ("hexin-test/story", "hexin-test/tiny-GGUF", "hexin-test/tiny-GGUF:Q4_K_M")
    for spec in (*specs, "hexin-test/tiny-GGUF:Q8_0"):
        assert run_cli(capsys, "pull", spec)[0] == 0
    code, out, err = run_cli(capsys, "models")
    assert code == 0, err
    hub_part = out[out.index("hub cache: ") :]
    story_mb = sum(len(repos["hexin-test/story"][f]) for f in STORY_FILES) / 1e6
    q4_mb = len(repos["hexin-test/tiny-GGUF"]["model-Q4_K_M.gguf"]) / 1e6
    assert (
        f"hexin-test/story\n  HF folder, llama (LlamaForCausalLM)\n  cached: {story_mb:.1f} MB"
    ) in hub_part
    assert f"hexin-test/tiny-GGUF:Q4_K_M\n  GGUF Q4_K_M, llama\n  cached: {q4_mb:.1f} MB" in (
        hub_part
    )
    assert "hexin-test/tiny-GGUF:Q8_0\n  GGUF Q8_0, qwen3\n" in hub_part
    assert hub_part.count("hexin-test/tiny-GGUF:Q4_K_M\n") == 1
    assert "hexin-test/tiny-GGUF\n" not in hub_part


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hexin-test/nope", "no model repository hexin-test/nope on the hub at "),
        ("hexin-test/gated", "hexin-test/gated is gated (HTTP 401)"),
        ("hexin-test/no-model", "hexin-test/no-model holds no model hexin can read"),
    ],
)
def test_hub_errors_are_one_line(env, capsys, spec, message):
    code, out, err = run_cli(capsys, "pull", spec)
    assert code == 1 and out == ""
    assert err.startswith(f"hexin: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreachable_hub_is_one_line(env, capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, out, err = run_cli(capsys, "story", "--model", "hexin-test/story")
    assert code == 1 and out == ""
    assert err.startswith(f"hexin: error: cannot reach the hub at http://127.0.0.1:{port}"), err
    assert len(err.strip().splitlines()) == 1


def test_missing_repo_from_the_command_line(env):
    """The real command: one line on stderr, exit status 1, no traceback."""
    proc = hexin_process("pull", "hexin-test/does-not-exist", env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out == ""
    assert err == (
        f"hexin: error: no model repository hexin-test/does-not-exist on the hub at "
        f"{env['HF_ENDPOINT']} (a private one needs HF_TOKEN)\n"
    )


def test_gguf_header_reader_finds_the_architecture(tmp_path):
    path = tmp_path / "x-Q8_0.gguf"
    path.write_bytes(_gguf_bytes(tmp_path, "y.gguf", "gemma3", 2))
    assert hub.gguf_architecture(path) == "gemma3"
    assert hub.gguf_architecture(tmp_path / "missing.gguf") is None
    assert hub.quant_of("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert hub.quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert hub.quant_of("qwen2.5-0.5b-instruct-q8_0.gguf") == "Q8_0"


def test_paths_and_names_are_not_hub_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(STORY, tmp_path / "org" / "story")
    assert not hub.is_hub_spec("org/story")  # a folder here wins
    assert hub.is_hub_spec("org/other") and hub.is_hub_spec("Qwen/Qwen3-0.6B-GGUF:Q8_0")
    assert not hub.is_hub_spec("story") and not hub.is_hub_spec("/abs/path")
    assert not hub.is_hub_spec("./rel/path") and not hub.is_hub_spec("a/b/c")
    assert not hub.is_hub_spec("models/missing.gguf")  # the loader's "not found" applies
