"""Parameter groups over flat shards: per-group learning rate and weight decay.

torch optimizers take parameter groups (``[{"params": decay, "weight_decay": 0.01}, {"params":
no_decay, "weight_decay": 0.0}]``); zerostep's parameters live in flat buffers cut by ZeRO unit, not by
group, so a unit's shard mixes groups. The optimizers already accept per-leaf options that are tensors
broadcastable to a leaf (``weight_decay_mask``, ``lr_multipliers``, optim/base.py): here each group's
value becomes a factor written over its parameters' ranges of every shard, relative to a base (the
largest value over groups). One fp32 vector per option that differs between groups, sharded like the
master (4 bytes per parameter / N); options equal in every group cost nothing.

Options other than ``lr`` and ``weight_decay`` (betas, eps, momentum, ...) must agree across groups: the
update is one fused pass per shard with one set of them.

``GroupOptions`` keeps the factors as tensors that the compiled update reads each call, so changing a
group's learning rate between steps (as torch schedulers and 13 of 26 surveyed scripts do) writes the
new ratios in place, without recompiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zerostep.parallel.flat import FlatLayout

PER_GROUP = ("lr", "weight_decay")


@dataclass(frozen=True)
class ParamGroup:
    """A set of parameters (by name) and the optimizer options that apply to them."""

    names: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


def check_groups(groups: Sequence[ParamGroup], trainable: Sequence[str]) -> None:
    """Every trainable parameter in exactly one group; options other than lr/weight_decay agree."""
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        for name in group.names:
            if name in seen:
                raise ValueError(f"parameter {name!r} is in param groups {seen[name]} and {index}")
            seen[name] = index
    unknown = sorted(set(seen) - set(trainable))
    if unknown:
        raise ValueError(
            f"param groups name parameters that are not trainable parameters of the model: {unknown[:5]}"
        )
    missing = [n for n in trainable if n not in seen]
    if missing:
        raise ValueError(
            f"trainable parameters missing from every param group: {missing[:5]}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            + "; give them a group, or set requires_grad=False"
        )
    first = groups[0].options
    for index, group in enumerate(groups[1:], start=1):
        for key in sorted(set(first) | set(group.options)):
            if key in PER_GROUP or key == "params":
                continue
            a, b = first.get(key), group.options.get(key)
            if _norm(a) != _norm(b):
                raise ValueError(
                    f"param group {index} has {key}={b!r} but group 0 has {key}={a!r}; zerostep runs one "
                    f"update per shard and supports per-group {' and '.join(PER_GROUP)} only"
                )


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


class GroupOptions:
    """Per-group ``lr`` / ``weight_decay`` factors over one engine's shards.

    ``master_ranges[g]``: the range ``[lo, hi)`` of group ``g``'s padded flat buffer that this rank's
    master holds (the shard at stages 1-3 on several ranks, the whole buffer otherwise).
    """

    def __init__(
        self,
        groups: Sequence[ParamGroup],
        layouts: Mapping[str, FlatLayout],
        master_ranges: Mapping[str, tuple[int, int]],
        device: torch.device,
    ) -> None:
        self.groups = list(groups)
        self.layouts = dict(layouts)
        self.ranges = dict(master_ranges)
        self.device = device
        self._group_of = {n: i for i, g in enumerate(groups) for n in g.names}
        self.lr_factors: dict[str, torch.Tensor] | None = None
        self.wd_factors: dict[str, torch.Tensor] | None = None
        self.weight_decay = 0.0  # the base weight decay the optimizer is built with
        self._lr_values = [float(g.options.get("lr", float("nan"))) for g in groups]
        self._wd_values = [float(g.options.get("weight_decay", 0.0)) for g in groups]

    # ---------------------------------------------------------------- building

    def _factors(self, values: Sequence[float]) -> tuple[float, dict[str, torch.Tensor] | None]:
        """(base, factor vectors or None when every group has the same value)."""
        base = max(values) if values else 0.0
        if len(set(values)) <= 1 or base == 0.0:
            return base, None
        out = {}
        for g, layout in self.layouts.items():
            lo, hi = self.ranges[g]
            vec = torch.ones(hi - lo, dtype=torch.float32, device=self.device)
            self._fill(vec, layout, lo, hi, [v / base for v in values])
            out[g] = vec
        return base, out

    def _fill(self, vec: torch.Tensor, layout: FlatLayout, lo: int, hi: int, ratios: Sequence[float]) -> None:
        for entry in layout.entries:
            start, stop = max(lo, entry.offset), min(hi, entry.offset + entry.numel)
            if start < stop:
                vec[start - lo : stop - lo] = ratios[self._group_of[entry.name]]

    def optimizer_options(self, lrs: Sequence[float] | None = None) -> dict[str, Any]:
        """``weight_decay`` (the base) and the per-leaf options for ``optim.from_config``; also keeps the
        vectors so later lr changes can be written into them."""
        self.weight_decay, self.wd_factors = self._factors(self._wd_values)
        if lrs is not None:
            self._lr_values = [float(v) for v in lrs]
        _, self.lr_factors = self._factors(self._lr_values)
        options: dict[str, Any] = {}
        if self.wd_factors is not None:
            options["weight_decay_mask"] = self.wd_factors
        if self.lr_factors is not None:
            options["lr_multipliers"] = self.lr_factors
        return options

    # ---------------------------------------------------------------- per step

    def base_lr(self, lrs: Sequence[float]) -> float:
        return max(lrs) if lrs else 0.0

    def update_lrs(self, lrs: Sequence[float]) -> bool:
        """Write new per-group learning rates; False when the optimizer must be rebuilt (groups that
        had one lr now differ, so there is no factor vector to write into yet)."""
        lrs = [float(v) for v in lrs]
        if lrs == self._lr_values:
            return True
        base = self.base_lr(lrs)
        if base == 0.0:  # every group at lr 0 (a warmup's start): the factors do not matter
            return True
        if len(set(lrs)) <= 1:
            if self.lr_factors is not None:
                for vec in self.lr_factors.values():
                    vec.fill_(1.0)
            self._lr_values = lrs
            return True
        if self.lr_factors is None:
            self._lr_values = lrs
            return False
        ratios = [v / base for v in lrs]
        for g, layout in self.layouts.items():
            lo, hi = self.ranges[g]
            self._fill(self.lr_factors[g], layout, lo, hi, ratios)
        self._lr_values = lrs
        return True

    def weight_decays_changed(self, wds: Sequence[float]) -> bool:
        wds = [float(v) for v in wds]
        if wds == self._wd_values:
            return False
        self._wd_values = wds
        return True
