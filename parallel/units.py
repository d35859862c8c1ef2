"""Parameter groups ("units"): which parameters share one flat buffer.

Like FSDP's per-block wrapping: every child of the outermost ``nn.ModuleList`` / ``nn.Sequential``
containers is a unit (a transformer block, an MLP layer), and the root unit owns every other
parameter (embeddings, final norm, head). A parameter reachable from two units (tied weights) belongs
to the root. Units are the granularity of stage-3 gathering and of gradient buckets; every stage uses
the same groups, so checkpoints reshard across stages by world size alone.
"""

from __future__ import annotations

from torch import nn

ROOT = "<root>"


def _block_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(path, module) of each child of the outermost ModuleList/Sequential containers, in order."""
    blocks = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks.extend((f"{path}.{n}", c) for n, c in child.named_children())
        else:
            blocks.extend(_block_modules(child, path + "."))
    return blocks


def plan_groups(model: nn.Module, trainable: list[str]) -> dict[str, list[str]]:
    """Group name -> trainable parameter names (in ``named_parameters`` order); empty groups dropped.

    ``trainable`` are names as ``model.named_parameters()`` reports them (tied duplicates removed).
    """
    id_of = {id(p): n for n, p in model.named_parameters()}
    wanted = set(trainable)
    owners: dict[int, set[str]] = {}
    if isinstance(model, (nn.ModuleList, nn.Sequential)):
        blocks = list(model.named_children())
    else:
        blocks = _block_modules(model)
    for path, block in blocks:
        for p in block.parameters():
            owners.setdefault(id(p), set()).add(path)
    groups: dict[str, list[str]] = {path: [] for path, _ in blocks}
    groups[ROOT] = []
    for n, p in model.named_parameters():
        if n not in wanted or id_of[id(p)] != n:
            continue
        paths = owners.get(id(p), set())
        groups[next(iter(paths)) if len(paths) == 1 else ROOT].append(n)
    return {g: names for g, names in groups.items() if names}
