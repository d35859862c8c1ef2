"""zerostep.io: msgpack pytree files, sharded checkpoints, resharding on load, export.

``save_pytree``/``load_pytree`` store one pytree per file (format in ``zerostep.io.codec``).
Every damaged or inconsistent file raises ``CheckpointError`` naming the file and the reason.
"""

from zerostep.io.errors import CheckpointError
from zerostep.io.reader import PytreeReader, load_pytree
from zerostep.io.writer import save_pytree, write_pytree

__all__ = ["CheckpointError", "PytreeReader", "load_pytree", "save_pytree", "write_pytree"]
