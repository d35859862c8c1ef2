"""Consolidated weights from a sharded checkpoint: DeepSpeed's ``zero_to_fp32``, without an offline step.

The engine saves each parameter group's fp32 master weights as a flat leaf ``master/<group>`` and
describes the packing in ``meta["layouts"]``::

    {group: {"dtype": "bfloat16", "entries": [[name, shape, offset], ...]}}

(``offset`` in elements of the flat tensor). Each group's flat tensor is assembled from every rank's file
(``read_flat``) and cut into named tensors, written as ``.safetensors`` (Hugging Face loads it) or as a
``torch.save`` state dict (``.pt``/``.bin``), chosen by the output's extension.
"""

from __future__ import annotations

import math
import os

import torch

from zerostep.io.codec import dtype_from_name
from zerostep.io.errors import CheckpointError
from zerostep.io.manifest import CheckpointDir
from zerostep.io.reshard import read_flat_range

DTYPE_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_state_dict(
    ckpt_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    leaf_prefix: str = "master",
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """name -> full tensor (``dtype``) for every entry of every layout in the checkpoint's meta."""
    with CheckpointDir.open(ckpt_dir, tag, verify=verify) as ckpt:
        layouts = ckpt.manifest["meta"].get("layouts")
        if not isinstance(layouts, dict) or not layouts:
            raise CheckpointError(ckpt.path, "the manifest's meta has no 'layouts': nothing to consolidate")
        out: dict[str, torch.Tensor] = {}
        for group, layout in layouts.items():
            path = f"{leaf_prefix}/{group}"
            entry = ckpt.leaves.get(path)
            if entry is None or entry["kind"] != "flat":
                raise CheckpointError(ckpt.path, f"layout group {group!r} has no flat leaf {path!r}")
            for name, shape, offset in layout["entries"]:
                numel = math.prod(shape)
                if offset + numel > entry["numel"]:
                    raise CheckpointError(
                        ckpt.path, f"{name}: layout reaches past the {entry['numel']} elements of {path!r}"
                    )
                if name in out:
                    raise CheckpointError(ckpt.path, f"parameter {name!r} appears in two layout groups")
                piece = torch.empty(numel, dtype=dtype_from_name(entry["dtype"]))
                read_flat_range(ckpt, path, offset, offset + numel, piece, verify)
                out[name] = piece.to(dtype).reshape(shape)
        return out


def export_consolidated(
    ckpt_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    tag: str | None = None,
    dtype: torch.dtype = torch.float32,
    leaf_prefix: str = "master",
) -> dict[str, tuple[int, ...]]:
    """Write the consolidated weights to ``out_path`` (.safetensors, .pt or .bin); returns name -> shape."""
    out_path = os.fspath(out_path)
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in (".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"{out_path}: output must end in .safetensors, .pt, .pth or .bin")
    state = consolidated_state_dict(ckpt_dir, tag, dtype=dtype, leaf_prefix=leaf_prefix)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if ext == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out_path)
    except Exception as e:  # OSError, or safetensors' SafetensorError (which wraps the OS's error)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(out_path, f"export failed: {type(e).__name__}: {e}") from e
    return {k: tuple(v.shape) for k, v in state.items()}
