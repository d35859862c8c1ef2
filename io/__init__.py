"""zerostep.io: msgpack pytree files, sharded checkpoints that reshard on load, export.

- ``save_pytree``/``load_pytree``: one pytree per file (format in ``zerostep.io.codec``).
- ``save_checkpoint``/``load_checkpoint``: one file per rank plus a manifest, committed atomically;
  flat-sharded leaves load at any world size (``zerostep.io.checkpoint``, ``zerostep.io.reshard``).
- ``export_consolidated``: full named weights to .safetensors/.pt (``zerostep.io.export``).

Every damaged, missing or inconsistent file raises ``CheckpointError`` (a ``RuntimeError``) naming the
file and the reason.
"""

from zerostep.io.checkpoint import (
    SaveHandle,
    inspect_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_checkpoint,
    wait_for_pending_save,
)
from zerostep.io.errors import CheckpointError
from zerostep.io.export import consolidated_state_dict, export_consolidated
from zerostep.io.manifest import shard_numel
from zerostep.io.reader import PytreeReader, load_pytree
from zerostep.io.reshard import read_flat
from zerostep.io.writer import save_pytree, write_pytree

__all__ = [
    "CheckpointError",
    "PytreeReader",
    "SaveHandle",
    "consolidated_state_dict",
    "export_consolidated",
    "inspect_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_pytree",
    "prune",
    "read_flat",
    "save_checkpoint",
    "save_pytree",
    "shard_numel",
    "wait_for_pending_save",
    "write_pytree",
]
