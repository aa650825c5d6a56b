"""A real PostgreSQL server for the tests: the one ``HEXIN_TEST_POSTGRES`` names, else a
throwaway cluster started here in a temporary folder with the installed server's own
``initdb`` and ``pg_ctl`` (Debian's ``postgresql`` package; the README's test line
installs it), as the ``postgres`` user when the tests run as root (initdb refuses root).

Each test that wants a store gets a fresh database on it (``fresh_database``), dropped
afterwards, so tests never see each other's sessions.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

#: a server URL (``postgresql://user@host:port/postgres``) to use instead of starting one
SERVER_ENV = "HEXIN_TEST_POSTGRES"


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if found:
        return Path(found[-1]).parent
    if which := shutil.which("pg_ctl"):
        return Path(which).parent
    pytest.fail(
        "PostgreSQL is not installed: apt-get install postgresql (the README's test line "
        f"does), or set {SERVER_ENV} to a server's URL",
        pytrace=False,
    )


def _version(path: str) -> int:
    return int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for this test session (started and stopped here
    unless ``HEXIN_TEST_POSTGRES`` names one)."""
    if url := os.environ.get(SERVER_ENV):
        yield url
        return
    bin_dir, port = _bin_dir(), _free_port()
    folder = Path(tempfile.mkdtemp(prefix="hexin-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = folder / "data", folder / "server.log"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{tail}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "hexin", "-A", "trust", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    options += " -c max_connections=200 -c synchronous_commit=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
    try:
        yield f"postgresql://hexin@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new, empty database on ``server``; its URL. Dropped afterwards (connections to it
    closed by force)."""
    name = f"hexin_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
