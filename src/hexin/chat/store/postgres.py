"""The shared store: one PostgreSQL database that every replica reads and writes.

Statements are the ones every backend runs (``base``), through a psycopg 3 connection pool:
each write is one transaction at READ COMMITTED, each read one REPEATABLE READ snapshot (a
session's row and its messages from the same moment). The schema version lives in a
one-row table, and migrations run under a transaction-scoped advisory lock, so replicas
starting together migrate once.

Session locks are PostgreSQL advisory locks, held by one connection of this process that
is kept for them alone: the replica that produces a session's reply holds its lock, a
second writer anywhere gets "busy", and a replica that dies drops its connection and with
it every lock it held, so its sessions are free at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hexin.chat.store.base import StorageError, StorageFull, Store
from hexin.chat.tree import ChatError

try:
    import psycopg
    import psycopg_pool
    from psycopg import errors as pg_errors
except ImportError:  # pragma: no cover - the extra is missing
    psycopg = None  # type: ignore[assignment]

#: the key of the advisory lock that serializes migrations (any fixed 64-bit number)
MIGRATION_LOCK = 0x6865_7869_6E00
#: the key space of session locks: hashtextextended(session id, this seed)
SESSION_LOCK_SEED = 17


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"


class _PgConnection:
    """A psycopg connection seen through the statements' ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        with self._conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


class PostgresStore(Store):
    """Sessions in a PostgreSQL database (``url``: ``postgresql://user@host/db``)."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        if psycopg is None:
            raise ChatError("a postgresql:// database needs psycopg: pip install 'hexin[postgres]'")
        self.url, self.location = url, redact(url)
        try:
            self._pool = psycopg_pool.ConnectionPool(
                url, min_size=1, max_size=pool_size, open=True, timeout=10
            )
            self._pool.wait(timeout=10)
            self._locks = psycopg.connect(url, autocommit=True)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise ChatError(f"cannot open the chat database {self.location}: {e}") from None
        self._locks_guard = threading.Lock()
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS hexin_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM hexin_schema").fetchone()
            version = row[0] if row else 0
            new = self._migrate_from(db, version, self.location)
            if row is None:
                db.execute("INSERT INTO hexin_schema (version) VALUES (?)", (new,))
            elif new != version:
                db.execute("UPDATE hexin_schema SET version=?", (new,))

    def close(self) -> None:
        self._pool.close()
        self._locks.close()

    @contextmanager
    def _tx(self) -> Iterator[_PgConnection]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgConnection(conn)
        except pg_errors.DiskFull:
            raise StorageFull(
                f"storage full: the chat database {self.location} could not be written; "
                "delete sessions to free space"
            ) from None
        except pg_errors.IntegrityError as e:
            raise StorageError(f"conflicting write: {e}; nothing was changed") from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise StorageError(f"storage error: {e}; nothing was changed") from None

    @contextmanager
    def _read(self) -> Iterator[_PgConnection]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield _PgConnection(conn)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise StorageError(f"storage error: {e}") from None

    def _lock_call(self, function: str, session_id: str) -> bool:
        """``function`` (pg_try_advisory_lock / pg_advisory_unlock) of the session's key on
        the locks' connection; a lost connection is opened again (its locks are gone with
        it, as they are for a replica that died)."""
        sql = f"SELECT {function}(hashtextextended(%s, %s))"
        with self._locks_guard:
            for attempt in (0, 1):
                try:
                    if self._locks.closed:
                        self._locks = psycopg.connect(self.url, autocommit=True)
                    return bool(
                        self._locks.execute(sql, (session_id, SESSION_LOCK_SEED)).fetchone()[0]
                    )
                except psycopg.OperationalError as e:
                    self._locks.close()
                    if attempt:
                        raise StorageError(f"storage error: {e}") from None
        raise AssertionError("unreachable")

    def try_lock(self, session_id: str) -> bool:
        return self._lock_call("pg_try_advisory_lock", session_id)

    def unlock(self, session_id: str) -> None:
        self._lock_call("pg_advisory_unlock", session_id)
