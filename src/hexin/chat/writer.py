"""The thread that saves finished replies, so the engine thread never waits on the database.

A reply ends on the engine thread, which also decodes every other sequence in the batch:
if it wrote to SQLite there, one slow search holding the store's lock, or a disk stall,
would pause every stream. The engine thread only hands the finished reply over; this one
thread saves replies in the order they ended.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("hexin.chat")


class Writer:
    """Runs jobs one at a time, in the order submitted, on its own thread (started on the
    first job). ``close()`` runs what is queued, then stops the thread."""

    def __init__(self, name: str = "hexin-writer") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; never blocks. A job reports its own outcome; one that raises is
        logged and does not stop the jobs after it."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("a queued write failed")

    def close(self) -> None:
        """Finish the queued jobs and stop; a later ``submit`` starts a new thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()
