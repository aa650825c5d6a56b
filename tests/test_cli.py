"""The ``hexin`` command as a user runs it: a real subprocess, stdout and stderr read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def hexin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hexin.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_story_greedy_prints_reference_continuation(story_dir):
    """``--model story`` is the bundled copy: nothing fetched, nothing beside the repo."""
    reference = json.loads((story_dir / "REFERENCE.json").read_text())["cases"][0]
    out = hexin(
        "story", "--model", "story", "--prompt", "Once upon a time",
        "--max-tokens", "100", "--temperature", "0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference["greedy_text"] + "\n"


def test_story_parses_special_tokens_and_answers_paris(default_gguf):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    out = hexin("story", "--model", str(default_gguf), "--prompt", prompt, "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."
    assert "<|im_end|>" not in out.stdout


def test_missing_model_is_one_clear_line(tmp_path):
    out = hexin("story", "--model", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert out.stderr.startswith("hexin: error: model ") and "not found" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_corrupt_model_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    out = hexin("story", "--model", str(bad))
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("hexin: error: ") and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "2", "top_p"),
        ("--max-tokens", "0", "max_tokens"),
    ],
)
def test_invalid_sampling_flags_are_refused_clearly(story_dir, flag, value, message):
    out = hexin("story", "--model", str(story_dir), flag, value)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


def test_models_lists_the_default_model_and_the_bundled_one(default_gguf, story_dir):
    out = hexin("models")
    assert out.returncode == 0
    assert "smollm2-135m-instruct (default)" in out.stdout
    assert str(default_gguf) in out.stdout
    assert f"bundled: {story_dir}" in out.stdout


# What a command imports is checked in a fresh interpreter: in this one, other tests have
# long since imported torch.
_RUN_AND_REPORT_TORCH = """
import contextlib, io, sys
from hexin.cli import build_parser, main

build_parser().parse_args(["story", "--prompt", "hi"])
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # --help
        code = e.code
print(repr(out.getvalue()))
print(code)
print("torch" in sys.modules)
"""


@pytest.mark.parametrize(
    ("argv", "printed"),
    [
        (["models"], "smollm2-135m-instruct (default)"),
        (["--help"], "story"),
        (["story", "--help"], "--prompt"),
        (["bench", "--help"], "--threads"),
        (["info"], "prompt: int8 x int8"),
    ],
)
def test_parsing_help_and_models_never_import_torch(tmp_path, argv, printed):
    """``hexin --help`` and ``hexin models`` start fast: torch is only for commands that
    run a model."""
    out = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_TORCH, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HEXIN_HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    shown, code, imported = out.stdout.strip().splitlines()
    assert printed in shown and code == "0"  # the command really ran
    assert imported == "False", f"hexin {' '.join(argv)} imported torch"
