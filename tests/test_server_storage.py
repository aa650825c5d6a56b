"""A full disk under a real ``hexin serve``: writes answer 507 "storage full" and change
nothing, and deleting sessions still works, so a user can free space. The database lives
on a tiny tmpfs (skipped where this process may not mount one)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from server_util import GREEDY, Server

DISK_BYTES = 16 << 20  # the database, its WAL and the store's 4 MiB reserve fit easily


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; return the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 10, 1):  # big writes, then the last few bytes
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(size)) == size:
                    pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_gives_a_clear_error_and_deleting_still_works(default_gguf, tiny_disk, tmp_path):
    server = Server(default_gguf, tmp_path / "home", db=tiny_disk / "chat.db")
    (tmp_path / "home").mkdir()
    server.start()
    try:
        with server.http() as http:
            r = http.post("/api/sessions", json={"id": "keep", "params": GREEDY})
            assert r.status_code == 201, r.text
            r = http.post("/api/sessions/keep/messages", json={"content": "Hi!"})
            assert r.status_code == 200, r.text
            before = http.get("/api/sessions/keep").json()
            filler = fill(tiny_disk)

            # a write needing new pages: refused clearly, nothing half-stored
            big = "x" * 90_000
            r = http.post("/api/sessions", json={"id": "new", "system_prompt": big})
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert error["code"] == "storage_full" and "storage full" in error["message"]
            assert "Traceback" not in r.text
            r = http.patch("/api/sessions/keep", json={"system_prompt": big})
            assert r.status_code == 507, r.text
            assert http.get("/api/sessions/new").status_code == 404
            assert http.get("/api/sessions/keep").json() == before

            # deleting frees space even now
            assert http.delete("/api/sessions/keep").status_code == 204
            assert http.get("/api/sessions/keep").status_code == 404
            assert http.get("/health").status_code == 200

            filler.unlink()
            r = http.post("/api/sessions", json={"id": "after", "system_prompt": big})
            assert r.status_code == 201, r.text
    finally:
        server.stop()
