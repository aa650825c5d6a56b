"""Keeping torch's CPU work on one OpenMP thread team.

GNU OpenMP keeps a thread team alive for every thread that has ever run a parallel region.
Once a process holds more OpenMP threads than there are cores, the runtime stops
spin-waiting at barriers and every parallel region pays for futex wake-ups: on 2 cores,
loading a model on the main thread and then decoding on the engine thread halves decode
speed. Work done on a thread that then exits takes its team along, so model loading and
engine construction run through :func:`run_isolated`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_isolated(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread of its own that ends with it; return its result or raise
    its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, name="hexin-isolated")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
