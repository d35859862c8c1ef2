"""Opening what a checkpoint folder holds without raw OS errors and without blocking.

Every path here comes from a user or from a folder on disk that another program may have changed: a
FIFO where a file should be would block a plain ``open`` forever, a directory or a symlink loop raises
``IsADirectoryError`` or ``OSError``. These helpers refuse anything but a regular file (or a directory)
with a ``CheckpointError`` naming the path.
"""

from __future__ import annotations

import os
import stat

from zerostep.io.errors import CheckpointError


def check_save_dir(save_dir: str | os.PathLike) -> str:
    """``save_dir`` as a str if it is a directory, else a ``CheckpointError`` saying what it is."""
    save_dir = os.fspath(save_dir)
    try:
        st = os.stat(save_dir)
    except FileNotFoundError:
        raise CheckpointError(save_dir, "checkpoint folder not found") from None
    except OSError as e:
        raise CheckpointError(save_dir, f"cannot open the checkpoint folder: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(save_dir, "not a directory (a checkpoint folder or a save folder is expected)")
    return save_dir


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: a FIFO, device or directory is
    refused before anything blocks on it (the open itself never blocks: ``O_NONBLOCK``, cleared after).
    ``FileNotFoundError`` passes through; every other failure is a ``CheckpointError`` naming ``path``."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(path, f"cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a file"
            raise CheckpointError(path, f"{kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
