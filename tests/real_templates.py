"""The models' own chat templates, fetched at test time (this repository keeps no copy).

llama.cpp keeps the ``chat_template`` of many models, byte for byte as the models' files hold
it, in ``models/templates/<org>-<model>.jinja``, and the source distribution of the Python
package llama-cpp-python vendors llama.cpp whole. ``template_folder`` downloads that sdist
once with pip (a pinned version, its sha256 checked), takes the ``*.jinja`` files asked for
out of it and keeps them in hexin's cache folder for later runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from hexin.paths import cache_dir

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/templates/"
#: a folder of ``*.jinja`` files to use instead of the download
OVERRIDE_ENV = "HEXIN_CHAT_TEMPLATES"


def override() -> Path | None:
    folder = os.environ.get(OVERRIDE_ENV)
    return Path(folder) if folder else None


def template_folder(names: Iterable[str]) -> Path:
    """A folder holding the templates ``names`` (file names): ``HEXIN_CHAT_TEMPLATES`` when
    set, else the cache, filled from the sdist when a name is missing there. A failed fetch
    fails the test that asked (it is never skipped)."""
    if (folder := override()) is not None:
        return folder
    folder = cache_dir("chat-templates") / f"{PACKAGE}-{VERSION}"
    if missing := {n for n in names if not (folder / n).is_file()}:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            _extract(_download(Path(tmp)), missing, folder)
    return folder


def _download(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE]
    cmd += ["--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(into)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        run = None
    sdists = list(into.glob("*.tar.gz"))
    if run is None or run.returncode or len(sdists) != 1:
        said = (run.stdout + run.stderr)[-2000:] if run else "(timed out after 900 s)"
        pytest.fail(
            f"could not fetch the models' chat templates ({PACKAGE}=={VERSION}'s sdist) with "
            f"`python {' '.join(cmd[1:])}`; it needs the package registry, or set "
            f"{OVERRIDE_ENV} to a folder of the *.jinja files.\n{said}",
            pytrace=False,
        )
    with sdists[0].open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != SDIST_SHA256:
        pytest.fail(f"{sdists[0].name}: sha256 {digest}, expected {SDIST_SHA256}", pytrace=False)
    return sdists[0]


def _extract(sdist: Path, names: set[str], folder: Path) -> None:
    """Write the members ``names`` of ``models/templates/`` into ``folder``, each whole or
    not at all (one pass over the compressed archive)."""
    found = set()
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix(MEMBER_PREFIX)
            if member.isfile() and member.name.startswith(MEMBER_PREFIX) and name in names:
                part = folder / f"{name}.part"
                part.write_bytes(tar.extractfile(member).read())
                part.replace(folder / name)
                found.add(name)
    if names - found:
        pytest.fail(f"{sdist.name} has no {sorted(names - found)} in {MEMBER_PREFIX}")
