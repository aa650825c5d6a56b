"""Chat sessions on disk: they outlive the objects and the processes that wrote them, a
process killed mid-reply leaves a database that opens cleanly, and the schema is versioned."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hexin.chat import ChatError, ChatService, open_store
from hexin.chat.store import SCHEMA_VERSION
from hexin.engine import Engine
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.sampling import SamplingParams
from hexin.tokenizer import Tokenizer

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def story_chat(story_model):
    tok = story_model.tokenizer
    templated = Tokenizer(
        tok.inner,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=tok.eos_token_ids,
        add_bos=tok.add_bos,
        chat_template=CHATML,
    )
    return Llama(story_model.config, story_model.weights), templated


def story_service(story_chat, db) -> ChatService:
    model, tok = story_chat
    return ChatService(
        Engine(model, tok, EngineConfig(kv_memory=64 << 20)).start(),
        open_store(db),
        model_name="story",
        default_params=SamplingParams(temperature=0, max_tokens=12),
    )


def query(db, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def run_hexin(*args: str, home, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hexin.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HEXIN_HOME": str(home)},
    )


# -- across objects and processes ----------------------------------------------------------------


def test_session_continues_with_new_store_and_service_objects(story_chat, tmp_path):
    db = tmp_path / "chat.db"
    first = story_service(story_chat, db)
    s = first.create(session_id="abc", system_prompt="Tell stories.", params={"seed": 5})
    one = first.send("abc", "The cat sat.").text()
    first.regenerate("abc").text()
    first.switch_version("abc", first.get("abc").active_id, -1)
    before = first.export("abc")
    first.store.close()
    del first

    second = story_service(story_chat, db)  # as a new process would
    assert second.export("abc") == before
    assert [x["id"] for x in second.list()] == ["abc"]
    reply = second.send("abc", "The dog ran.")
    two = reply.text()
    assert reply.usage["cached_tokens"] == 0  # a new service has no cache yet: recomputed
    path = second.get("abc").path()
    assert [m.role for m in path] == ["user", "assistant"] * 2
    assert [m.content for m in path] == ["The cat sat.", one, "The dog ran.", two]
    assert second.get("abc").params.seed == 5 and second.get("abc").system_prompt == s.system_prompt

    # the same two turns in one long-lived service give the same replies (greedy)
    control = story_service(story_chat, tmp_path / "control.db")
    c = control.create(system_prompt="Tell stories.")
    assert control.send(c.id, "The cat sat.").text() == one
    assert control.send(c.id, "The dog ran.").text() == two


def test_session_continues_across_real_processes(default_gguf, tmp_path):
    db = tmp_path / "chat.db"
    common = ("--model", str(default_gguf), "--db", str(db), "--session", "abc")
    common += ("--temperature", "0", "--max-tokens", "16")
    first = run_hexin("chat", *common, "--once", "What is the capital of France?", home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert "[session abc]" in first.stderr
    second = run_hexin("chat", *common, "--once", "And of Germany?", home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip()

    store = open_store(db)
    session = store.load("abc")
    path = session.path()
    assert [m.role for m in path] == ["user", "assistant", "user", "assistant"]
    assert len(session.messages) == 4
    assert path[0].content == "What is the capital of France?"
    assert path[2].content == "And of Germany?"
    assert path[1].content.strip() == first.stdout.strip()
    assert path[3].content.strip() == second.stdout.strip()
    assert all(m.status == "complete" for m in path)
    assert path[3].meta["cached_tokens"] == 0  # a new process starts with no cache
    assert session.title == "What is the capital of France?"
    store.close()


KILL_SCRIPT = """
import sys, time
from hexin.chat import ChatService, open_store
from hexin.engine import Engine
from hexin.model import Llama
from hexin.sampling import SamplingParams
from hexin.tokenizer import Tokenizer
from hexin.weights import load_model

loaded = load_model(sys.argv[1])
t = loaded.tokenizer
tok = Tokenizer(t.inner, bos_token_id=t.bos_token_id, eos_token_ids=t.eos_token_ids,
                add_bos=t.add_bos, chat_template=sys.argv[3])
forward = Llama.forward
def slow_forward(self, *args, **kw):  # a slow model: the reply is in flight for a while
    time.sleep(0.05)
    return forward(self, *args, **kw)
Llama.forward = slow_forward
engine = Engine(Llama(loaded.config, loaded.weights), tok).start()
service = ChatService(engine, open_store(sys.argv[2]),
                      default_params=SamplingParams(temperature=0, max_tokens=400))
service.create(session_id="victim")
for delta in service.send("victim", "Tell me a very long story about a dragon."):
    print("DELTA", flush=True)
print("FINISHED", flush=True)
"""


def test_kill_mid_reply_leaves_a_clean_database(story_chat, story_dir, tmp_path):
    db = tmp_path / "chat.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(story_dir), str(db), CHATML],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HEXIN_HOME": str(tmp_path)},
    )
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        # the user message is committed before the reply starts
        deadline = time.monotonic() + 120
        rows: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    rows = query(db, "SELECT role, content FROM messages WHERE session_id='victim'")
                except sqlite3.OperationalError:  # schema not created yet
                    rows = []
            if rows:
                break
            time.sleep(0.02)
        assert rows == [("user", "Tell me a very long story about a dragon.")], (
            proc.stderr.read() if proc.poll() is not None else "timed out"
        )
        assert proc.stdout.readline().strip() == "DELTA"  # a reply is streaming
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "PRAGMA foreign_key_check") == []
    service = story_service(story_chat, db)
    session = service.get("victim")
    assert [(m.role, m.content) for m in session.messages.values()] == [
        ("user", "Tell me a very long story about a dragon.")
    ]
    assert session.active_id == next(iter(session.messages))
    assert session.title == "Tell me a very long story about a dragon."

    reply = service.send("victim", "Then tell me a short one.")
    text = reply.text()
    assert reply.message.status == "complete"
    path = service.get("victim").path()
    assert [m.role for m in path] == ["user", "user", "assistant"]
    assert path[-1].content == text
    # the interrupted message can also get its own reply, as a regenerate would
    service.rollback("victim")
    service.rollback("victim")
    regen = service.regenerate("victim")
    regen.text()
    assert [m.role for m in service.get("victim").path()] == ["user", "assistant"]


# -- schema --------------------------------------------------------------------------------------


def test_fresh_database_has_current_schema_version_and_wal(tmp_path):
    db = tmp_path / "sub" / "dir" / "chat.db"
    store = open_store(db)
    store.close()
    assert db.is_file()
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "messages"} <= tables
    open_store(db).close()  # reopening an up-to-date database migrates nothing and works
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_database_from_a_newer_hexin_is_refused_naming_both_versions(tmp_path):
    db = tmp_path / "chat.db"
    query(db, f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ChatError) as err:
        open_store(db)
    message = str(err.value)
    assert str(SCHEMA_VERSION + 1) in message and str(SCHEMA_VERSION) in message
    assert "newer" in message
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]  # left as it was


def test_a_file_that_is_not_a_database_is_a_chat_error(tmp_path):
    db = tmp_path / "chat.db"
    db.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(ChatError, match="cannot open"):
        open_store(db)


def test_default_db_path_follows_hexin_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXIN_HOME", str(tmp_path))
    store = open_store()
    try:
        assert store.path == tmp_path / "hexin.db"
        assert (tmp_path / "hexin.db").is_file()
    finally:
        store.close()
