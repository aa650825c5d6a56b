"""The embedded store: one SQLite file in WAL mode, shared by the threads of one process.

The schema version lives in ``PRAGMA user_version``. A file of ``reserve_bytes`` beside
the database holds space back: when the disk is full, writes fail with ``StorageFull``,
but a delete gives the reserve up and runs, so a user can always free space by deleting
sessions. Session locks are the process's own (``Store.try_lock``'s default): one
process serves a SQLite store; replicas share a PostgreSQL one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hexin.chat.store.base import StorageError, StorageFull, Store, T
from hexin.chat.tree import ChatError

#: room kept beside the database for deletes when the disk fills: in WAL mode even a
#: delete must write pages before it frees any; as large as the biggest request body
RESERVE_BYTES = 4 << 20


def default_db_path() -> Path:
    """$HEXIN_HOME/hexin.db, else the XDG data folder."""
    if home := os.environ.get("HEXIN_HOME"):
        return Path(home) / "hexin.db"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "hexin" / "hexin.db"


class SqliteStore(Store):
    """Sessions in one SQLite file, safe to share between threads (one lock)."""

    def __init__(self, path: str | Path | None = None, *, reserve_bytes: int = RESERVE_BYTES):
        self.path = Path(path) if path is not None else default_db_path()
        self.location = str(self.path)
        self._reserve = None
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._reserve = (self.path.with_name(self.path.name + "-reserve"), reserve_bytes)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._lock = threading.RLock()
            with self._tx() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version != (new := self._migrate_from(db, version, str(self.path))):
                    db.execute(f"PRAGMA user_version={new}")
        except sqlite3.DatabaseError as e:
            raise ChatError(f"cannot open the chat database {self.path}: {e}") from None
        self._keep_reserve()

    def _keep_reserve(self) -> None:
        """Make sure the reserve file exists at full size, if the disk has room for it."""
        if self._reserve is None:
            return
        path, size = self._reserve
        try:
            if not path.is_file() or path.stat().st_size < size:
                with path.open("wb") as f:
                    f.write(bytes(size))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:  # no room yet: try again after the next delete
            path.unlink(missing_ok=True)

    def _freeing(self, write: Callable[[], T]) -> T:
        """If the disk is full, give up the reserve and run the delete again, then let
        SQLite hand the space back."""
        try:
            return write()
        except StorageFull:
            if self._reserve is None or not self._reserve[0].is_file():
                raise
            self._reserve[0].unlink()
        result = write()
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._keep_reserve()
        return result

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a full disk is reported as ``StorageFull``, nothing written."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if not isinstance(e, sqlite3.OperationalError):
                    raise
                if e.sqlite_errorcode == sqlite3.SQLITE_FULL:
                    raise StorageFull(
                        f"storage full: the chat database {self.path} could not be written; "
                        "delete sessions to free space"
                    ) from None
                raise StorageError(f"storage error: {e}; nothing was changed") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:  # one connection: its reads see every committed write
            yield self._db
