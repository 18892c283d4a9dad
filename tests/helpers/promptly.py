"""Calls that must return promptly (not block on a FIFO named like a file): run in a thread joined with a timeout;
where it did not return, readers blocked on the given FIFOs are released, so that a failing test fails rather than
hangs the session."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def promptly(fn: Callable[[], Any], fifos: Sequence[Path] = (), timeout: float = 30.0) -> Any:
    """fn()'s result, or its exception re-raised; an AssertionError where it has not returned after `timeout` s."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    hung = worker.is_alive()
    if hung:
        for fifo in fifos:  # a writer that opens and closes: the blocked reader sees an empty file
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not hung, f"did not return within {timeout:.0f} s (blocked on {', '.join(map(str, fifos)) or 'something'})"
    if errors:
        raise errors[0]
    return result[0] if result else None
