"""SQLite persistence of sessions and their message trees.

Every change is its own committed transaction, in WAL mode, so a process killed at any
moment leaves a database that opens cleanly with everything but the reply in flight. The
schema carries its version in ``PRAGMA user_version``; ``MIGRATIONS[i]`` upgrades a
database from version i to i + 1.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hexin.chat.tree import ChatError, Message, Session, SessionNotFound
from hexin.sampling import SamplingParams

MIGRATIONS: list[str] = [
    # 0 -> 1: sessions and messages
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        system_prompt TEXT,
        params TEXT NOT NULL DEFAULT '{}',
        active_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_session ON messages(session_id, created_at);
    CREATE INDEX sessions_by_update ON sessions(updated_at DESC);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_db_path() -> Path:
    """$HEXIN_HOME/hexin.db, else the XDG data folder."""
    if home := os.environ.get("HEXIN_HOME"):
        return Path(home) / "hexin.db"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "hexin" / "hexin.db"


class Store:
    """Sessions in one SQLite file, safe to share between threads (one lock)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._lock = threading.RLock()
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ChatError(f"cannot open the chat database {self.path}: {e}") from None

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ChatError(
                f"{self.path} has schema version {version}, newer than this hexin "
                f"({SCHEMA_VERSION}); upgrade hexin"
            )
        for target in range(version, SCHEMA_VERSION):
            with self._tx():
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target + 1}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- writes -------------------------------------------------------------------------
    def save_session(self, s: Session) -> None:
        """Insert or update the session row (not its messages)."""
        with self._tx() as db:
            _upsert_session(db, s)

    def add_message(self, s: Session, m: Message) -> None:
        """Insert a message and move the session's active pointer, atomically."""
        with self._tx() as db:
            _insert_message(db, s.id, m)
            _upsert_session(db, s)

    def delete_messages(self, s: Session, ids: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM messages WHERE id=?", [(i,) for i in ids])
            _upsert_session(db, s)

    def delete_session(self, session_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM sessions WHERE id=?", (session_id,)).rowcount > 0

    def import_session(self, s: Session) -> None:
        """Write a whole session, messages parents-first, in one transaction."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sessions WHERE id=?", (s.id,)).fetchone():
                raise ChatError(f"session {s.id!r} already exists")
            _upsert_session(db, s)
            for m in sorted(s.messages.values(), key=lambda m: len(s.path(m.id))):
                _insert_message(db, s.id, m)

    # -- reads --------------------------------------------------------------------------
    def exists(self, session_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,))
            return row.fetchone() is not None

    def load(self, session_id: str) -> Session:
        with self._lock:
            row = self._db.execute(
                """SELECT id, title, model, system_prompt, params, active_id, created_at,
                       updated_at FROM sessions WHERE id=?""",
                (session_id,),
            ).fetchone()
            if row is None:
                raise SessionNotFound(f"unknown session {session_id!r}")
            rows = self._db.execute(
                """SELECT id, parent_id, role, content, status, meta, created_at
                   FROM messages WHERE session_id=? ORDER BY created_at""",
                (session_id,),
            ).fetchall()
        params: dict[str, Any] = json.loads(row[4])
        params["stop"] = tuple(params.get("stop") or ())
        messages = {
            r[0]: Message(
                id=r[0],
                parent_id=r[1],
                role=r[2],
                content=r[3],
                status=r[4],
                meta=json.loads(r[5]),
                created_at=r[6],
            )
            for r in rows
        }
        return Session(
            id=row[0],
            title=row[1],
            model=row[2],
            system_prompt=row[3],
            params=SamplingParams(**params),
            active_id=row[5],
            created_at=row[6],
            updated_at=row[7],
            messages=messages,
        )

    def list_sessions(self, query: str | None = None) -> list[dict[str, Any]]:
        """Session summaries, newest first; with ``query``, only those whose title or any
        message contains it (case-insensitive)."""
        sql = """SELECT s.id, s.title, s.model, s.created_at, s.updated_at,
                        (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id)
                 FROM sessions s"""
        args: tuple[Any, ...] = ()
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern += "%"
            sql += """ WHERE s.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m
                       WHERE m.session_id = s.id AND m.content LIKE ? ESCAPE '\\')"""
            args = (pattern, pattern)
        sql += " ORDER BY s.updated_at DESC"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        keys = ("id", "title", "model", "created_at", "updated_at", "message_count")
        return [dict(zip(keys, r, strict=True)) for r in rows]


def _upsert_session(db: sqlite3.Connection, s: Session) -> None:
    db.execute(
        """INSERT INTO sessions (id, title, model, system_prompt, params, active_id,
               created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(id) DO UPDATE SET title=excluded.title, model=excluded.model,
               system_prompt=excluded.system_prompt, params=excluded.params,
               active_id=excluded.active_id, updated_at=excluded.updated_at""",
        (
            s.id,
            s.title,
            s.model,
            s.system_prompt,
            json.dumps(s.params.to_dict()),
            s.active_id,
            s.created_at,
            s.updated_at,
        ),
    )


def _insert_message(db: sqlite3.Connection, session_id: str, m: Message) -> None:
    db.execute(
        """INSERT INTO messages (id, session_id, parent_id, role, content, status, meta,
               created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            m.id,
            session_id,
            m.parent_id,
            m.role,
            m.content,
            m.status,
            json.dumps(m.meta),
            m.created_at,
        ),
    )
