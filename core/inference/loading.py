"""``init_inference(checkpoint=...)``: weights into the module from a zerostep checkpoint or a file.

A zerostep training checkpoint directory (a ``save_dir`` with ``latest``, any world size and ZeRO stage)
is consolidated by ``zerostep.io.consolidated_state_dict`` (each parameter read from the ranks' flat
shards); a ``.safetensors`` file or a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``) is read as is.
The names and shapes must be exactly the module's parameters (tied aliases accepted); anything else is a
``CheckpointError`` listing what differs.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from zerostep.io import CheckpointError, consolidated_state_dict

_FILE_EXTS = (".safetensors", ".pt", ".pth", ".bin")


def read_weights(path: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """name -> full fp32 (checkpoint) or stored-dtype (file) tensor."""
    if os.path.isdir(path):
        return consolidated_state_dict(path, tag)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise CheckpointError(path, "checkpoint not found")
    if ext == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if ext in _FILE_EXTS:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(path, "not a state dict of tensors")
        return state
    raise CheckpointError(path, f"not a checkpoint directory nor a {'/'.join(_FILE_EXTS)} file")


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_into(module: nn.Module, path: str, tag: str | None = None) -> int:
    """Copy the checkpoint's weights into ``module``'s parameters in place; returns how many were set."""
    weights = read_weights(path, tag)
    params = dict(module.named_parameters())  # tied weights once, under their first name
    aliases = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
    missing = sorted(
        n for n, p in params.items() if n not in weights and not _alias_given(p, aliases, weights)
    )
    unexpected = sorted(n for n in weights if n not in aliases)
    wrong = sorted(
        f"{n}: checkpoint {list(weights[n].shape)} vs model {list(aliases[n].shape)}"
        for n in weights
        if n in aliases and weights[n].shape != aliases[n].shape
    )
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shapes differ: {_listed(wrong)}")
    if problems:
        raise CheckpointError(path, "the checkpoint is of another model; " + "; ".join(problems))
    with torch.no_grad():
        for name, value in weights.items():
            aliases[name].copy_(value)
    return len(weights)


def _alias_given(p: torch.Tensor, aliases: dict[str, torch.Tensor], weights: dict) -> bool:
    return any(q is p and n in weights for n, q in aliases.items())
