"""Progress of a bench run: lines on stderr, so stdout carries only the final table."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the final table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
