"""Models from a Hugging Face hub: ``hexin pull ORG/NAME[:QUANT]`` and ``--model ORG/NAME[:QUANT]``.

``ORG/NAME`` fetches the repository's Hugging Face folder: ``config.json``, the safetensors
weights (``model.safetensors``, or the shards that ``model.safetensors.index.json`` names)
and the tokenizer files that are there (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja``); nothing
else. ``ORG/NAME:Q4_K_M`` fetches the one GGUF file of the repository whose name carries
that quantization (case-insensitive). A repository with GGUF files only, named without a
quantization, gives its Q4_K_M file (or its only GGUF file), as Ollama does.

The cache, under hexin's model cache (``paths.cache_dir("models")``)::

    <models>/hub/ORG/NAME/                  the repository's files, as they are named there
    <models>/hub/ORG/NAME/.hexin/pull.json  per file: ETag, size, commit; per pulled name
                                            (``""`` or the quantization): its files
    <models>/hub/ORG/NAME/.hexin/partial/   downloads under way, ``<file>.<etag>.part``

A file appears under its own name only once it is whole, so a model hexin loads is never
a truncated one. huggingface_hub supplies the hub protocol: the repository listing
(``HfApi.model_info``), each file's metadata (``get_hf_file_metadata``: ETag, size,
commit, the CDN redirect), authentication (``HF_TOKEN``), errors, and the transfer itself
(``file_download.http_get``: progress bar, retries that resume a dropped connection with a
``Range`` request). hexin keeps the partial file under a name of its own, because
huggingface_hub 2.x downloads each file to a temporary name unique to the process and
deletes it when the process stops: an interrupted ``hexin pull`` (Ctrl-C, a crash, a lost
network) continues where it stopped when it is run again, with a ``Range`` request.

``HF_ENDPOINT`` points hexin at another hub (a mirror, or the test suite's stand-in).
``--model ORG/NAME`` uses the cached copy without asking the hub; when there is none it is
fetched first, with the same progress as ``hexin pull`` (Ollama's ``run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hexin import __version__, paths
from hexin.errors import HexinError

#: the small files of a Hugging Face folder, fetched when the repository has them
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: the quantization a GGUF-only repository gives when none is named (Ollama's choice)
DEFAULT_QUANT = "Q4_K_M"

_SPEC = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?::[\w.-]+)?")
_QUANT = re.compile(r"(?i)(?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)")


class HubError(HexinError):
    """A hub repository could not be found, read or fetched."""


@dataclass(frozen=True)
class HubRef:
    """``ORG/NAME[:QUANT]``."""

    repo_id: str
    quant: str | None = None

    @property
    def tag(self) -> str:
        """The key a pull is recorded under: the quantization in capitals, or ``""``."""
        return (self.quant or "").upper()

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def is_hub_spec(spec: str | os.PathLike[str] | None) -> bool:
    """Whether ``--model spec`` names a hub repository: ``ORG/NAME[:QUANT]`` that is not a
    file or folder here."""
    if spec is None or not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        return False
    if spec.lower().endswith((".gguf", ".safetensors", ".json")):
        return False  # a file that is not there: the loader says so
    return not Path(spec).expanduser().exists()


def parse(spec: str) -> HubRef:
    if not _SPEC.fullmatch(spec):
        raise HubError(f"{spec!r} is not a hub model name: give ORG/NAME or ORG/NAME:QUANT")
    repo_id, _, quant = spec.partition(":")
    return HubRef(repo_id, quant or None)


def hub_dir() -> Path:
    """Where hub repositories are kept: ``<models cache>/hub``."""
    return paths.cache_dir("models") / "hub"


def repo_dir(repo_id: str) -> Path:
    """The folder of ``repo_id`` (an existing one whose name differs only in case is used:
    repository names on the hub are case-insensitive)."""
    exact = hub_dir() / repo_id
    if exact.is_dir():
        return exact
    org, name = repo_id.split("/")
    for candidate in hub_dir().glob("*/*"):
        if (candidate.parent.name.lower(), candidate.name.lower()) == (org.lower(), name.lower()):
            return candidate
    return exact


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT``, else huggingface_hub's default, read when called
    (so that a test or a caller can set the variable after import)."""
    if value := os.environ.get("HF_ENDPOINT"):
        return value.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


# --- the manifest -----------------------------------------------------------------------


def _manifest_path(folder: Path) -> Path:
    return folder / ".hexin" / "pull.json"


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(_manifest_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"files": {}, "tags": {}}
    data.setdefault("files", {})
    data.setdefault("tags", {})
    return data


def _write_manifest(folder: Path, data: dict[str, Any]) -> None:
    target = _manifest_path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(target)


def cached(ref: HubRef) -> Path | None:
    """The local path of a complete earlier pull of ``ref`` (no network), else None."""
    folder = repo_dir(ref.repo_id)
    entry = _read_manifest(folder)["tags"].get(ref.tag)
    if not entry or not all((folder / f).is_file() for f in entry["files"]):
        return None
    return folder / entry["path"]


def resolve(spec: str) -> Path:
    """``--model ORG/NAME[:QUANT]`` as a path: the cached copy, else fetched now."""
    ref = parse(spec)
    return cached(ref) or pull(ref, asked_as_model=True)


# --- choosing the files -------------------------------------------------------------------


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF file's name carries (``Q4_K_M``, ``IQ3_XS``, ``F16``)."""
    stem = Path(filename).name.removesuffix(".gguf").removesuffix(".GGUF")
    for part in reversed(re.split(r"[-.]", stem)):
        if _QUANT.fullmatch(part):
            return part.upper()
    m = re.search(r"(?i)(?<![A-Z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Z0-9])", stem)
    return m.group(1).upper() if m else None


def _ggufs(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(".gguf"))


def _quant_list(ggufs: list[str]) -> str:
    quants = sorted({quant_of(f) or Path(f).name for f in ggufs})
    return ", ".join(quants) if quants else "none"


def select_gguf(ref: HubRef, files: list[str]) -> str:
    """The one GGUF file of ``files`` that ``ref.quant`` names: a file whose name has the
    quantization as a whole part (``model-Q4_K_M.gguf``), else the only file whose name
    contains it; no match or several is an error listing what there is."""
    ggufs = _ggufs(files)
    if not ggufs:
        raise HubError(f"{ref.repo_id} has no GGUF files (pull {ref.repo_id} for its HF folder)")
    want = (ref.quant or DEFAULT_QUANT).upper()
    exact = [f for f in ggufs if quant_of(f) == want]
    matches = exact or [f for f in ggufs if want in Path(f).name.upper()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise HubError(
            f"{ref.repo_id} has no GGUF file for {ref.quant or DEFAULT_QUANT}; "
            f"quantizations there: {_quant_list(ggufs)}"
        )
    raise HubError(
        f"{ref} matches several GGUF files ({', '.join(matches)}): name one of "
        f"{_quant_list(ggufs)}" + (" (split GGUF files are not supported)" if exact else "")
    )


def _folder_files(ref: HubRef, files: list[str]) -> tuple[list[str], bool] | None:
    """The small files of the repository's HF folder (the single weights file included),
    and whether the weights are sharded (then the index is among the small files); None
    when the repository has no HF folder hexin reads."""
    top = set(files)
    if "config.json" not in top or not {SINGLE_WEIGHTS, WEIGHTS_INDEX} & top:
        return None
    small = [f for f in FOLDER_FILES if f in top]
    if WEIGHTS_INDEX in top:
        return [*small, WEIGHTS_INDEX], True
    return [*small, SINGLE_WEIGHTS], False


def _default_gguf(ref: HubRef, ggufs: list[str]) -> str:
    """The file ``ORG/NAME`` gives in a GGUF-only repository: its Q4_K_M, else its only
    GGUF file."""
    for f in ggufs:
        if quant_of(f) == DEFAULT_QUANT:
            return f
    if len(ggufs) == 1:
        return ggufs[0]
    raise HubError(
        f"{ref.repo_id} holds GGUF files only and no {DEFAULT_QUANT}: name one as "
        f"{ref.repo_id}:QUANT ({_quant_list(ggufs)})"
    )


def _no_model_error(ref: HubRef, files: list[str]) -> HubError:
    weights = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
    found = f" (it has {', '.join(weights[:3])})" if weights else ""
    return HubError(
        f"{ref.repo_id} holds no model hexin can read: neither config.json with "
        f"model.safetensors (or its index) nor a GGUF file{found}"
    )


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(f"{index}: not a valid safetensors index ({e})") from None


# --- fetching -----------------------------------------------------------------------------


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"hexin: {text}", file=sys.stderr, flush=True)


def _mb(size: int | None) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"


def pull(ref: HubRef | str, *, quiet: bool = False, asked_as_model: bool = False) -> Path:
    """Fetch ``ref`` into the cache (files already there with the hub's ETag are kept) and
    return the folder (HF) or the file (GGUF). Errors are :class:`HubError`, one line."""
    if isinstance(ref, str):
        ref = parse(ref)
    try:
        return _pull(ref, quiet=quiet)
    except HubError:
        raise
    except KeyboardInterrupt:
        _say(f"pull of {ref} interrupted; run it again to continue where it stopped", quiet)
        raise
    except Exception as e:
        raise _hub_error(e, ref, asked_as_model) from None


def _pull(ref: HubRef, *, quiet: bool) -> Path:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), library_name="hexin", library_version=__version__)
    info = api.model_info(ref.repo_id)  # its default branch
    files = [s.rfilename for s in info.siblings or []]
    if not info.sha:
        raise HubError(f"the hub at {endpoint()} gave no commit for {ref.repo_id}")
    fetcher = _Fetcher(ref, repo_dir(ref.repo_id), info.sha, quiet)
    if ref.quant is not None:
        chosen = select_gguf(ref, files)
        return fetcher.fetch([chosen], path=chosen)
    plan = _folder_files(ref, files)
    if plan is None:
        if not _ggufs(files):
            raise _no_model_error(ref, files)
        chosen = _default_gguf(ref, _ggufs(files))
        return fetcher.fetch([chosen], path=chosen)
    small, sharded = plan
    if not sharded:
        return fetcher.fetch(small, path=".")
    fetcher.fetch([WEIGHTS_INDEX], path=None, announce=False)  # it names the shards
    shards = _index_shards(fetcher.folder / WEIGHTS_INDEX)
    if missing := [s for s in shards if s not in files]:
        raise HubError(f"{ref.repo_id}: its index names files it does not have: {missing}")
    return fetcher.fetch([*small, *shards], path=".")


class _Fetcher:
    """Downloads files of one repository at one commit into its folder, resumably."""

    def __init__(self, ref: HubRef, folder: Path, commit: str, quiet: bool) -> None:
        self.ref, self.folder, self.commit, self.quiet = ref, folder, commit, quiet

    def fetch(self, names: list[str], *, path: str | None, announce: bool = True) -> Path:
        """Fetch ``names``; with ``path``, record the pull under ``ref.tag`` and return
        ``folder / path``."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(library_name="hexin", library_version=__version__)
        metas = {}
        for name in names:
            url = hf_hub_url(self.ref.repo_id, name, revision=self.commit, endpoint=endpoint())
            metas[name] = get_hf_file_metadata(url, headers=headers, endpoint=endpoint())
        if announce:
            total = sum(m.size or 0 for m in metas.values())
            what = names[0] if path and path != "." else f"{len(names)} files"
            _say(f"pulling {self.ref} ({what}, {_mb(total)}) from {endpoint()}", self.quiet)
        for name in names:
            self._fetch_one(name, metas[name], headers)
        if path is None:
            return self.folder
        manifest = _read_manifest(self.folder)
        manifest["repo"] = self.ref.repo_id
        manifest["tags"][self.ref.tag] = {"files": names, "path": path, "commit": self.commit}
        _write_manifest(self.folder, manifest)
        target = self.folder / path
        _say(f"{self.ref} is in {target}", self.quiet)
        return target

    def _fetch_one(self, name: str, meta: Any, headers: dict[str, str]) -> None:
        from huggingface_hub.file_download import http_get

        etag, size = meta.etag, meta.size
        target = self.folder / name
        manifest = _read_manifest(self.folder)
        known = manifest["files"].get(name)
        if target.is_file() and known and known.get("etag") == etag:
            return  # up to date
        partial_dir = self.folder / ".hexin" / "partial"
        partial_dir.mkdir(parents=True, exist_ok=True)
        partial = partial_dir / f"{name.replace('/', '--')}.{_safe(etag)}.part"
        for stale in partial_dir.glob(f"{name.replace('/', '--')}.*.part"):
            if stale != partial:
                stale.unlink(missing_ok=True)  # an older version of the file
        get_headers = dict(headers)
        if _host(meta.location) != _host(endpoint()):
            get_headers.pop("authorization", None)  # a signed CDN address: no token there
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as f:
            _lock(f, name)
            have = os.fstat(fd).st_size
            if size is not None and have > size:
                have = 0  # not a prefix of this file
            if have:
                _say(f"resuming {name} at {_mb(have)} of {_mb(size)}", self.quiet)
            f.seek(have)
            f.truncate()
            http_get(
                meta.location,
                f,
                resume_size=have,
                headers=get_headers,
                expected_size=size,
                displayed_filename=name,
                tqdm_class=_Silent if self.quiet else None,
            )
            f.flush()
            resumed_lfs = have and etag and re.fullmatch(r"[0-9a-f]{64}", etag)
            if resumed_lfs and _sha256(partial) != etag:  # an LFS file's ETag is its sha256
                partial.unlink()
                raise HubError(f"{name}: the resumed download failed its checksum; run again")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.replace(target)  # still locked: no other pull takes the part meanwhile
        with contextlib.suppress(OSError):
            partial_dir.rmdir()  # when no other download is under way
        manifest = _read_manifest(self.folder)
        manifest["repo"] = self.ref.repo_id
        manifest["files"][name] = {
            "etag": etag,
            "size": target.stat().st_size,
            "commit": self.commit,
        }
        _write_manifest(self.folder, manifest)


def _lock(f: Any, name: str) -> None:
    """Hold the partial file alone: two pulls appending to it would corrupt it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise HubError(f"another hexin pull is fetching {name}; wait for it") from None


class _Silent:
    """A progress bar that shows nothing (``quiet``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _safe(etag: str | None) -> str:
    return re.sub(r"[^\w.-]", "_", etag or "none")[:80]


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _hub_error(e: Exception, ref: HubRef, asked_as_model: bool) -> HubError:
    """huggingface_hub's and the network's exceptions as one line the user can act on."""
    from huggingface_hub import errors as hf

    where = endpoint()
    local = " (and no such file or folder here)" if asked_as_model else ""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError):
        return HubError(
            f"{ref.repo_id} is gated (HTTP {status}): accept its terms on the hub, then set "
            "HF_TOKEN to a token of that account"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubError(
            f"no model repository {ref.repo_id} on the hub at {where}{local} "
            "(a private one needs HF_TOKEN)"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"{ref.repo_id} has no branch 'main' on the hub at {where}")
    remote_missing = getattr(hf, "RemoteEntryNotFoundError", hf.EntryNotFoundError)
    if isinstance(e, remote_missing):
        return HubError(f"{ref.repo_id}: a file it lists is missing on the hub ({_one_line(e)})")
    if isinstance(e, hf.OfflineModeIsEnabled):
        return HubError(f"{ref} is not in the cache and HF_HUB_OFFLINE forbids fetching it")
    if isinstance(e, hf.HfHubHTTPError) and status in (401, 403):
        return HubError(
            f"the hub at {where} refused access to {ref.repo_id} (HTTP {status}): "
            "set HF_TOKEN to a token that may read it"
        )
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(f"the hub at {where} answered HTTP {status} for {ref.repo_id}")
    if isinstance(e, hf.HFValidationError):
        return HubError(f"{str(ref)!r} is not a valid repository name: {_one_line(e)}")
    if _is_network_error(e):
        reason = _one_line(e) or type(e).__name__
        return HubError(f"cannot reach the hub at {where} for {ref} ({reason})")
    if isinstance(e, OSError):
        return HubError(f"pulling {ref} failed: {_one_line(e)}; run it again to resume")
    return HubError(f"pulling {ref} failed: {type(e).__name__}: {_one_line(e)}")


def _is_network_error(e: BaseException) -> bool:
    """A connection that failed, timed out or broke, whichever HTTP library huggingface_hub
    uses (requests, httpx or httpx2 across its versions)."""
    names = {c.__name__ for c in type(e).__mro__}
    network = {
        "ConnectError",
        "ConnectionError",
        "TimeoutException",
        "Timeout",
        "NetworkError",
        "TransportError",
        "RemoteProtocolError",
        "ProxyError",
    }
    return bool(names & network) or isinstance(e, (ConnectionError, TimeoutError))


# --- the cache listing -------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModel:
    name: str  # ORG/NAME or ORG/NAME:QUANT
    path: Path
    size: int  # bytes on disk
    format: str  # "HF folder" or "GGUF Q4_K_M"
    family: str  # "llama (LlamaForCausalLM)", "qwen2", "?"
    complete: bool


def cached_models() -> list[CachedModel]:
    """Every pull recorded under the hub folder, with its size and family (read from
    ``config.json`` or the GGUF header; nothing is loaded). A GGUF file is listed once, as
    ``ORG/NAME:QUANT``, however it was asked for."""
    found: dict[Path, CachedModel] = {}
    for manifest_path in sorted(hub_dir().glob("*/*/.hexin/pull.json")):
        folder = manifest_path.parent.parent
        manifest = _read_manifest(folder)
        repo = manifest.get("repo") or f"{folder.parent.name}/{folder.name}"
        for tag, entry in sorted(manifest["tags"].items()):
            files = [folder / f for f in entry["files"]]
            size = sum(f.stat().st_size for f in files if f.is_file())
            complete = all(f.is_file() for f in files)
            path = folder / entry["path"]
            if path.suffix.lower() == ".gguf":
                quant = quant_of(path.name) or tag
                fmt, family = f"GGUF {quant or '?'}", gguf_architecture(path) or "?"
                name = f"{repo}:{quant}" if quant else repo
            else:
                fmt, family, name = "HF folder", hf_family(folder / "config.json"), repo
            found[path] = CachedModel(name, path, size, fmt, family, complete)
    return sorted(found.values(), key=lambda m: m.name.lower())


def hf_family(config: Path) -> str:
    """``model_type (Architecture)`` from a ``config.json``."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?"
    kind = data.get("model_type") or "?"
    arch = ", ".join(data.get("architectures") or [])
    return f"{kind} ({arch})" if arch else kind


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_GGUF_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path, wanted: set[str]) -> dict[str, Any]:
    """The ``wanted`` keys of a GGUF file's header, read until all are found (the
    ``general.*`` keys come first, so the vocabulary is never read); no tensor data."""
    found: dict[str, Any] = {}
    errors = (OSError, struct.error, UnicodeDecodeError, ValueError)
    with contextlib.suppress(*errors), path.open("rb") as f:

        def take(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(take("<Q")).decode("utf-8")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                inner, count = take("<I"), take("<Q")
                if inner in _GGUF_SCALARS:  # skipped, never needed here
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), os.SEEK_CUR)
                    return None
                for _ in range(count):
                    value(inner)
                return None
            raise ValueError(f"GGUF value type {kind}")

        if f.read(4) != b"GGUF" or take("<I") < 2:
            return found
        take("<Q")  # tensor count
        for _ in range(take("<Q")):
            key = string()
            v = value(take("<I"))
            if key in wanted:
                found[key] = v
                if len(found) == len(wanted):
                    break
    return found


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file (``llama``, ``qwen2``, ``gemma3``)."""
    arch = gguf_metadata(path, {"general.architecture"}).get("general.architecture")
    return arch if isinstance(arch, str) else None
