"""Persistence of sessions and their message trees: SQLite by default, PostgreSQL for
replicas that share one store (``open_store``)."""

from __future__ import annotations

import os
from pathlib import Path

from hexin.chat.store.base import SCHEMA_VERSION, StorageError, StorageFull, Store
from hexin.chat.store.sqlite import SqliteStore, default_db_path

#: the environment variable that names the store when ``--db`` does not
DB_ENV = "HEXIN_DB"


def open_store(db: str | Path | None = None) -> Store:
    """The store ``db`` names: a ``postgresql://`` URL, a SQLite file, or None for
    ``$HEXIN_DB``, else the default SQLite file."""
    db = db if db is not None else os.environ.get(DB_ENV) or None
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        from hexin.chat.store.postgres import PostgresStore

        return PostgresStore(db)
    return SqliteStore(db)


__all__ = [
    "DB_ENV",
    "SCHEMA_VERSION",
    "SqliteStore",
    "StorageError",
    "StorageFull",
    "Store",
    "default_db_path",
    "open_store",
]
