"""The one error type of ``zerostep.io``.

``CheckpointError`` subclasses ``RuntimeError``: it reports a damaged or inconsistent file on disk, or a
write that the operating system refused (disk full), not a bad argument; callers catch it to fall back to
an older checkpoint. Bad *inputs* (a tree holding an unsupported type) raise ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import os


class CheckpointError(RuntimeError):
    """A checkpoint or pytree file is missing, damaged, inconsistent, or could not be written.

    The message always starts with the file (or directory) concerned, then the reason.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
