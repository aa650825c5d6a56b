"""Where hexin keeps what it fetches or builds for this user."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The folder for ``kind`` ("models", "kernels"): $HEXIN_HOME/<kind>, else the XDG
    cache folder's hexin/<kind>. Everything there can be fetched or built again."""
    if home := os.environ.get("HEXIN_HOME"):
        return Path(home) / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hexin" / kind
