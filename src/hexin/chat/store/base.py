"""The chat store's interface and what its backends share: the schema, its migrations and
every statement.

A store keeps sessions and their message trees. Every change is one committed transaction,
so a process killed at any moment leaves a store that opens cleanly with everything but the
reply in flight. The schema carries its version (``MIGRATIONS[i]`` upgrades a store from
version i to i + 1); both backends run the same migrations and the same statements, written
once here with ``?`` placeholders:

* :class:`~hexin.chat.store.sqlite.SqliteStore`, one file, the embedded default;
* :class:`~hexin.chat.store.postgres.PostgresStore`, one database that many replicas share.

Session locks (:meth:`Store.try_lock`) say that one process is producing a session's reply;
they work across processes where the backend can (PostgreSQL's advisory locks).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from hexin.chat.tree import (
    ChatError,
    Message,
    Session,
    SessionExists,
    SessionNotFound,
    new_id,
    now,
)
from hexin.errors import HexinError
from hexin.sampling import SamplingParams

T = TypeVar("T")

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
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        meta TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX messages_by_session ON messages(session_id, created_at);
    CREATE INDEX sessions_by_update ON sessions(updated_at DESC);
    """,
    # 1 -> 2: tool calls. A session's tools; messages may be tool results (a CHECK changes
    # only by rebuilding the table; its parent link names the new table, so dropping the
    # old one cascades into nothing, and the rename points the link back at "messages")
    """
    ALTER TABLE sessions ADD COLUMN tools TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE messages_v2 (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        parent_id TEXT REFERENCES messages_v2(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        meta TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL
    );
    INSERT INTO messages_v2 SELECT id, session_id, parent_id, role, content, status, meta,
        created_at FROM messages ORDER BY created_at;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE INDEX messages_by_session ON messages(session_id, created_at);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StorageError(HexinError):
    """The chat store could not be written (locked too long, an I/O error, a lost
    connection): the change was not made; trying again later may work."""


class StorageFull(StorageError):
    """The disk holding the chat store is full: the change was not written."""


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the shared statements need of a backend's connection in a transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


class Store(ABC):
    """Sessions and their message trees, safe to share between threads; each backend
    supplies transactions, reads and session locks."""

    #: where the store is, for messages (a file path, or a URL without its password)
    location: str

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Connection]:
        """One write transaction: committed when the block ends, rolled back (nothing
        changed) on an error, which is raised as ``StorageError`` / ``StorageFull``."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Connection]:
        """A consistent snapshot to read from (one session's row and its messages agree)."""

    @abstractmethod
    def close(self) -> None: ...

    def try_lock(self, session_id: str) -> bool:
        """Take the session's lock for this process, without waiting: False when another
        process holds it. The backend's default: one process uses the store, so the
        service's own bookkeeping is the lock."""
        return True

    def unlock(self, session_id: str) -> None:
        """Give back a lock ``try_lock`` took."""
        return None

    def _freeing(self, write: Callable[[], T]) -> T:
        """Run a write that frees space (a delete); a backend may make room for it first."""
        return write()

    def _migrate_from(self, db: Connection, version: int, describe: str) -> int:
        """Run the migrations after ``version`` in ``db``'s transaction; the new version."""
        if version > SCHEMA_VERSION:
            raise ChatError(
                f"{describe} has schema version {version}, newer than this hexin "
                f"({SCHEMA_VERSION}); upgrade hexin"
            )
        for target in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
        return SCHEMA_VERSION

    # -- writes -------------------------------------------------------------------------
    def create_session(self, s: Session) -> None:
        """Insert a new session's row. The id is claimed in the same statement, so of two
        processes creating one id, one wins and the other gets ``SessionExists``."""
        with self._tx() as db:
            if not _insert_session(db, s):
                raise SessionExists(f"session {s.id!r} already exists")

    def add_message(self, session_id: str, *ms: Message, title: str | None = None) -> None:
        """Insert messages (each a child of the one before) and make the last the
        session's active one, atomically; with ``title``, also name a session that has no
        title yet. Nothing else in the session row is written: a rename or a new system
        prompt saved meanwhile stays."""
        with self._tx() as db:
            db.executemany(INSERT_MESSAGE, [_message_row(session_id, m) for m in ms])
            m = ms[-1]
            db.execute(
                """UPDATE sessions SET active_id=?, updated_at=?,
                       title=CASE WHEN title='' AND CAST(? AS TEXT) IS NOT NULL
                                  THEN ? ELSE title END
                   WHERE id=?""",
                (m.id, m.created_at, title, title, session_id),
            )

    def update_message(self, session_id: str, m: Message) -> None:
        """Write a message's content, status and meta (a continued reply), and make it
        the session's active one, atomically."""
        with self._tx() as db:
            found = db.execute(
                "UPDATE messages SET content=?, status=?, meta=? WHERE id=? AND session_id=?",
                (m.content, m.status, json.dumps(m.meta), m.id, session_id),
            ).rowcount
            if not found:
                raise ChatError(f"no message {m.id!r} in session {session_id!r}")
            db.execute(
                "UPDATE sessions SET active_id=?, updated_at=? WHERE id=?",
                (m.id, now(), session_id),
            )

    def update_session(self, session_id: str, **columns: Any) -> None:
        """Write only the given columns of a session row (``params`` as SamplingParams,
        ``tools`` as a list)."""
        allowed = {"title", "system_prompt", "params", "tools", "active_id", "updated_at"}
        if unknown := set(columns) - allowed:
            raise ValueError(f"not a session column: {sorted(unknown)}")
        if "params" in columns:
            columns["params"] = json.dumps(columns["params"].to_dict())
        if "tools" in columns:
            columns["tools"] = json.dumps(columns["tools"])
        assignments = ", ".join(f"{name}=?" for name in columns)
        with self._tx() as db:
            found = db.execute(
                f"UPDATE sessions SET {assignments} WHERE id=?", (*columns.values(), session_id)
            ).rowcount
        if not found:
            raise SessionNotFound(f"unknown session {session_id!r}")

    def delete_messages(self, session_id: str, ids: list[str], *, active_id: str | None) -> None:
        """Delete messages and move the session's active pointer, atomically (the rest of
        the session row is left as it is)."""

        def delete() -> None:
            with self._tx() as db:
                db.executemany("DELETE FROM messages WHERE id=?", [(i,) for i in ids])
                db.execute(
                    "UPDATE sessions SET active_id=?, updated_at=? WHERE id=?",
                    (active_id, now(), session_id),
                )

        self._freeing(delete)

    def delete_session(self, session_id: str) -> bool:
        def delete() -> bool:
            with self._tx() as db:
                return db.execute("DELETE FROM sessions WHERE id=?", (session_id,)).rowcount > 0

        return self._freeing(delete)

    def import_session(self, s: Session, *, keep_id: bool = True) -> None:
        """Write a whole, checked session (``Session.from_dict``) in one transaction,
        messages parents-first. Ids are resolved inside it, so no other write can slip in
        between: a session id in use (or ``keep_id`` False) makes a copy, with a new
        session id and fresh message ids; message ids that any stored session uses get
        fresh ones, parent links and the active id following. ``s`` is changed to match
        what was stored. Linear in the number of messages."""
        with self._tx() as db:
            if not keep_id or db.execute("SELECT 1 FROM sessions WHERE id=?", (s.id,)).fetchone():
                s.id = new_id()
                s.renumber()
            elif _any_message_exists(db, list(s.messages)):
                s.renumber()
            if not _insert_session(db, s):  # created meanwhile by another process
                raise SessionExists(f"session {s.id!r} already exists; import it again")
            db.executemany(
                INSERT_MESSAGE,
                [_message_row(s.id, m) for m in s.tree_order()],
            )

    # -- reads --------------------------------------------------------------------------
    def exists(self, session_id: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,))
            return row.fetchone() is not None

    def load(self, session_id: str) -> Session:
        with self._read() as db:
            row = db.execute(
                """SELECT id, title, model, system_prompt, params, active_id, created_at,
                       updated_at, tools FROM sessions WHERE id=?""",
                (session_id,),
            ).fetchone()
            if row is None:
                raise SessionNotFound(f"unknown session {session_id!r}")
            rows = db.execute(
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
            tools=json.loads(row[8]),
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
            # lower() on both sides: SQLite's LIKE ignores ASCII case only, PostgreSQL's none
            sql += """ WHERE lower(s.title) LIKE lower(?) ESCAPE '\\' OR EXISTS (SELECT 1
                       FROM messages m WHERE m.session_id = s.id
                       AND lower(m.content) LIKE lower(?) ESCAPE '\\')"""
            args = (pattern, pattern)
        sql += " ORDER BY s.updated_at DESC"
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        keys = ("id", "title", "model", "created_at", "updated_at", "message_count")
        return [dict(zip(keys, r, strict=True)) for r in rows]


def _insert_session(db: Connection, s: Session) -> bool:
    """Insert the row unless the id is taken; whether it was inserted."""
    params, tools = json.dumps(s.params.to_dict()), json.dumps(s.tools)
    row = (s.id, s.title, s.model, s.system_prompt, params, s.active_id, s.created_at,
           s.updated_at, tools)  # fmt: skip
    inserted = db.execute(
        """INSERT INTO sessions (id, title, model, system_prompt, params, active_id,
               created_at, updated_at, tools) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(id) DO NOTHING""",
        row,
    )
    return inserted.rowcount > 0


def _any_message_exists(db: Connection, ids: list[str]) -> bool:
    for i in range(0, len(ids), 500):  # SQLite's older builds allow 999 parameters
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        if db.execute(f"SELECT 1 FROM messages WHERE id IN ({marks}) LIMIT 1", chunk).fetchone():
            return True
    return False


INSERT_MESSAGE = """INSERT INTO messages (id, session_id, parent_id, role, content, status,
    meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""


def _message_row(session_id: str, m: Message) -> tuple[Any, ...]:
    return (
        m.id,
        session_id,
        m.parent_id,
        m.role,
        m.content,
        m.status,
        json.dumps(m.meta),
        m.created_at,
    )
