"""A FIFO for tests of readers that must refuse it: a reader that blocks on it anyway is released."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fifo_released_after(path: Path, seconds: float = 5.0) -> Iterator[Path]:
    """Make a FIFO at ``path``. A reader still blocked in ``open()`` after ``seconds`` (the defect under
    test) is released by a writer that opens and closes the other end, so the test fails instead of
    hanging; the helper thread ends when the block exits."""
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader is waiting
            except OSError:
                pass
            done.wait(0.05)

    helper = threading.Thread(target=release, daemon=True)
    helper.start()
    try:
        yield path
    finally:
        done.set()
        helper.join(10.0)
