"""DeepSpeed's Mixture-of-Experts checkpoint layout, read without DeepSpeed.

An MoE model's ``save_checkpoint`` (DeepSpeed's ``_save_moe_checkpoint``) writes, under the tag folder:

- ``mp_rank_00_model_states.pt``: the usual model states, whose ``module`` holds the non-expert
  parameters only (keys containing ``experts`` are dropped), plus ``num_experts``;
- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: one file per MoE layer ``L`` (numbered in
  ``named_modules`` order) and *global* expert ``E``: that expert's state dict under its global name,
  ``<layer path>.deepspeed_moe.experts.deepspeed_experts.<E>.<param>``, written by expert-data-parallel
  rank 0 of the expert-parallel rank holding it;
- the optimizer state: at stage 0 one ``expp_rank_{P}_mp_rank_00_optim_states.pt`` per expert-parallel
  rank, at stages 1-2 ZeRO's ``zero_pp_rank_*`` files over per-group partitions (expert groups partitioned
  over their expert-data-parallel group).

The parameters are read here: the module's and every expert file's, by global name. The optimizer state
is not (its expert partitions follow each rank's expert groups, which the files do not describe);
``moments_note`` says so, and a load asked for optimizer states refuses with that note.
"""

from __future__ import annotations

import os
import re

import torch

from zerostep.io.errors import CheckpointError

EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY = re.compile(r"\.deepspeed_experts\.(\d+)\.")
NOTE = (
    "DeepSpeed's MoE checkpoint layout (layer_L_expert_E files): the parameters are read, its optimizer "
    "state (partitioned per expert group) is not"
)


def expert_files(ckpt_dir: str) -> dict[tuple[int, int], str]:
    """(layer, global expert) -> path of DeepSpeed's per-expert files for model-parallel rank 0."""
    found = {}
    for entry in sorted(os.listdir(ckpt_dir)):
        m = EXPERT_FILE.match(entry)
        if m is None:
            continue
        if int(m.group(3)) != 0:
            raise CheckpointError(
                os.path.join(ckpt_dir, entry), "model-parallel DeepSpeed MoE checkpoints are not supported"
            )
        found[(int(m.group(1)), int(m.group(2)))] = os.path.join(ckpt_dir, entry)
    return found


def read_expert_params(files: dict[tuple[int, int], str], num_experts: int | None) -> dict[str, torch.Tensor]:
    """Every expert's parameters by global name (fp32 copies), checked: each file holds only its own
    expert, every layer has experts ``0 .. n - 1`` with one count for all layers (``num_experts`` when
    the model states record it)."""
    from zerostep.io.deepspeed_format import load_deepspeed_file

    by_layer: dict[int, set[int]] = {}
    for layer, expert in files:
        by_layer.setdefault(layer, set()).add(expert)
    counts = {len(experts) for experts in by_layer.values()}
    for layer, experts in sorted(by_layer.items()):
        if experts != set(range(len(experts))):
            missing = sorted(set(range(max(experts) + 1)) - experts)
            raise CheckpointError(
                files[(layer, max(experts))], f"MoE layer {layer}: expert files {missing} missing"
            )
    if len(counts) > 1 or (num_experts is not None and counts and counts != {num_experts}):
        have = {layer: len(e) for layer, e in by_layer.items()}
        raise CheckpointError(
            os.path.dirname(next(iter(files.values()))),
            f"expert files per MoE layer {have} do not match the checkpoint's num_experts={num_experts}",
        )
    params: dict[str, torch.Tensor] = {}
    for (_layer, expert), path in sorted(files.items()):
        state = load_deepspeed_file(path)
        for name, value in state.items():
            m = _EXPERT_KEY.search(name)
            if m is None or int(m.group(1)) != expert or not isinstance(value, torch.Tensor):
                raise CheckpointError(path, f"{name!r} is not a parameter of expert {expert}")
            if name in params:
                raise CheckpointError(path, f"{name!r} is in two expert files")
            params[name] = value.detach().float().clone()
    return params


def num_experts_of(model: dict) -> int | None:
    """The model states' ``num_experts`` (DeepSpeed writes a list, one per MoE layer), if one count."""
    value = model.get("num_experts")
    if isinstance(value, (list, tuple)) and value:
        counts = {int(v) for v in value}
        return counts.pop() if len(counts) == 1 else None
    return int(value) if isinstance(value, int) else None
