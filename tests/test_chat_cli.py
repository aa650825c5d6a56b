"""``hexin chat`` as a user runs it: a real subprocess on the default model, driven through
its arguments and stdin, stdout and stderr read back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hexin.chat import open_store


def hexin(*args: str, home, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hexin.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HEXIN_HOME": str(home)},
    )


def test_once_prints_a_reply_naming_paris(default_gguf, tmp_path):
    db = tmp_path / "chat.db"
    out = hexin(
        "chat", "--once", "What is the capital of France?", "--temperature", "0",
        "--model", str(default_gguf), "--db", str(db), home=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    match = re.search(r"\[session ([A-Za-z0-9_-]+)\]", out.stderr)
    assert match, out.stderr
    session = open_store(db).load(match.group(1))
    assert [m.role for m in session.path()] == ["user", "assistant"]
    assert session.path()[1].content.strip() == out.stdout.strip()


REPL_INPUT = "/undo\nHello\n/regen\n/versions\n/versions 9\n/undo\n/sessions\n/quit\n"


@pytest.fixture(scope="module")
def repl_run(default_gguf, tmp_path_factory):
    # --context 64 also bounds any reply to about 30 tokens, whatever the sampling
    home = tmp_path_factory.mktemp("repl")
    db = home / "chat.db"
    out = hexin(
        "chat", "--model", str(default_gguf), "--db", str(db), "--session", "repl-1",
        "--max-tokens", "8", "--temperature", "0", "--context", "64",
        home=home, stdin=REPL_INPUT,
    )  # fmt: skip
    return out, db


def test_repl_regen_versions_undo_sessions_and_quit(repl_run):
    out, db = repl_run
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "hexin chat, session repl-1" in out.stderr
    lines = out.stdout.splitlines()
    v1 = [line for line in lines if "<1/2>" in line]
    v2 = [line for line in lines if "<2/2>" in line]
    assert len(v1) == 1 and len(v2) == 1, out.stdout
    assert v2[0].lstrip("> ").startswith("*")  # the current version is marked
    assert "[removed the last message]" in out.stdout
    # /sessions lists this session, titled by its first message, after the undo
    assert re.search(r"repl-1\s+Hello\s+\(2 messages\)", out.stdout), out.stdout
    # REPL errors are one line each and the loop carries on
    assert "error: nothing to roll back" in out.stderr
    assert "error: choose a version from 1 to 2" in out.stderr
    # /undo removed the current version; the first version takes its place on the path
    session = open_store(db).load("repl-1")
    assert [m.role for m in session.path()] == ["user", "assistant"]
    assert session.path()[0].content == "Hello"
    assert len(session.messages) == 2
    assert session.version(session.active_id) == (1, 1)


def test_repl_regen_honours_the_sampling_flags(repl_run):
    """``/regen`` under ``--temperature 0 --max-tokens 8`` is greedy and short like the
    first reply, so both versions are the same text."""
    out, _ = repl_run
    usage = [line for line in out.stderr.splitlines() if re.match(r"\[\d+ tokens", line)]
    assert len(usage) == 2, out.stderr
    counts = [int(re.match(r"\[(\d+) tokens", line).group(1)) for line in usage]
    assert all(n <= 8 for n in counts), usage
    versions = [
        re.sub(r"^[> *]*<\d/2> ", "", line) for line in out.stdout.splitlines() if "/2>" in line
    ]
    assert len(versions) == 2 and versions[0] == versions[1], versions


def test_bad_session_id_is_one_clear_line(default_gguf, tmp_path):
    db = tmp_path / "chat.db"
    out = hexin(
        "chat", "--session", "bad id!", "--once", "hi", "--model", str(default_gguf),
        "--db", str(db), home=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("hexin: error: ") and "session id" in lines[0]
    assert "bad id!" in lines[0]
    assert open_store(db).list_sessions() == []
