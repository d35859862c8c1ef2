"""Reading checkpoints written by DeepSpeed's ``engine.save_checkpoint`` (ZeRO stages 0-3), without DeepSpeed.

A DeepSpeed checkpoint is ``<load_dir>/<tag>/`` (``tag`` defaults to the text of ``<load_dir>/latest``):

- stages 0-2: ``mp_rank_00_model_states.pt`` holds ``module`` (the model's state dict), ``param_shapes``
  (one ``OrderedDict`` name -> shape per optimizer param group, stages 1-2), ``optimizer`` (stage 0: the
  torch optimizer's state dict, keyed by trainable-parameter index; None at stages 1-2), the counters and
  the client's own keys at top level;
- stages 1-2: one ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per data-parallel rank whose
  ``optimizer_state_dict`` holds ``single_partition_of_fp32_groups`` (rank ``r``'s slice of each param
  group's flat fp32 buffer: the ranks' slices concatenated in rank order are the group's parameters one
  after another in ``param_shapes`` order, each followed by its ``param_alignment_paddings`` entry, with
  the padding at the end) and ``base_optimizer_state`` (the torch optimizer's state, moments shaped like
  the slices);
- stage 3: per rank ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (counters, ``param_shapes``) and
  ``..._optim_states.pt`` with ``fp32_flat_groups``: every parameter is split on its own into
  ``ceil(numel / world)`` elements per rank (zero-padded), and a rank's pieces lie one after another in
  ``param_shapes`` order across its sub-groups.

These are the rules of DeepSpeed 0.19's ``deepspeed/utils/zero_to_fp32.py``. The files pickle a few
DeepSpeed classes (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``); they are read with a restricted
unpickler that turns every ``deepspeed.*`` global into an inert stand-in and refuses any global outside
torch's tensor types, ``collections`` and plain builtins, so loading a checkpoint runs no code from it.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from zerostep.io import deepspeed_moe
from zerostep.io.errors import CheckpointError

# Top-level keys DeepSpeed itself writes into a model-states file; the rest is the client's
# ``client_state``. (DeepSpeed's own load returns bookkeeping such as ``ds_config`` and ``param_shapes``
# in client_state too; here only the client's keys come back.)
DEEPSPEED_KEYS = frozenset(
    {
        "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
        "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
        "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
        "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info", "param_families",
        "num_experts",
    }
)  # fmt: skip

_MODEL_STATES = "mp_rank_00_model_states.pt"
_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass
class DeepSpeedCheckpoint:
    """What a DeepSpeed checkpoint holds, consolidated to full fp32 tensors by parameter name.

    ``params`` are the trainable parameters (the fp32 master at stages 1-3, the module's own values at
    stage 0), ``frozen_params`` the non-trainable ones DeepSpeed saved; ``exp_avg`` / ``exp_avg_sq`` are
    None when the optimizer state holds no Adam moments. ``optimizer_step`` is the optimizer's own step
    count (torch's ``state[...]["step"]``), ``global_steps`` DeepSpeed's counter (skipped steps included).
    """

    path: str  # the tag directory
    tag: str
    stage: int
    dp_world_size: int
    params: dict[str, torch.Tensor]
    frozen_params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # as saved (dtype kept)
    exp_avg: dict[str, torch.Tensor] | None = None
    exp_avg_sq: dict[str, torch.Tensor] | None = None
    optimizer_step: int | None = None
    optimizer_type: str | None = None  # ds_config's optimizer.type, e.g. "AdamW"; None for a client one
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # hyperparameters, without "params"
    global_steps: int = 0
    skipped_steps: int = 0
    global_samples: int = 0
    lr_scheduler: Any = None
    client_state: dict[str, Any] = field(default_factory=dict)
    ds_config: dict[str, Any] | None = None
    ds_version: str | None = None
    loss_scale: float | None = None
    moments_note: str | None = None  # why exp_avg / exp_avg_sq are None, when the reader knows
    # stage 0, one param group: (exp_avg, exp_avg_sq) in the optimizer's order, which records no names;
    # a loader that knows the trainable parameters (module order) can assign them
    stage0_moments_by_index: list[tuple[torch.Tensor, torch.Tensor]] | None = None


# ---------------------------------------------------------------------------------- restricted unpickling


class DeepSpeedStandIn:
    """An inert object standing for an instance of a DeepSpeed class found in a checkpoint.

    ``deepspeed_class`` names the original; constructor arguments (an Enum's value) land in ``args`` and
    ``value``, pickled attributes in ``__dict__``. Nothing of DeepSpeed runs."""

    deepspeed_class = "deepspeed"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.value = args[0] if len(args) == 1 else None
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.__dict__.items() if k != "args"} or self.args
        return f"<{self.deepspeed_class} stand-in {shown!r}>"


_STAND_INS: dict[str, type] = {}

_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
     "bytearray", "slice", "range"}
)  # fmt: skip
_SAFE_COLLECTIONS = frozenset({"OrderedDict", "defaultdict", "deque", "Counter"})


def _stand_in(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    if qualified not in _STAND_INS:
        _STAND_INS[qualified] = type(name, (DeepSpeedStandIn,), {"deepspeed_class": qualified})
    return _STAND_INS[qualified]


def _torch_global_allowed(module: str, name: str, obj: Any) -> bool:
    """Tensor rebuilding and the types tensors are made of; no other torch function."""
    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return True
    if isinstance(obj, type):
        return issubclass(obj, (torch.Tensor, torch.Size, torch.device, torch.storage.TypedStorage)) or (
            obj is torch.UntypedStorage
        )
    return callable(obj) and module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "deepspeed" or module.startswith("deepspeed."):
            return _stand_in(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "collections" and name in _SAFE_COLLECTIONS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes
            return super().find_class(module, name)
        if module == "torch" or module.startswith("torch."):
            obj = super().find_class(module, name)
            if _torch_global_allowed(module, name, obj):
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a DeepSpeed checkpoint")


# torch.load(pickle_module=...) takes a module-like object with Unpickler and load.
restricted_pickle = types.ModuleType("zerostep_deepspeed_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler
restricted_pickle.load = lambda file, **kw: _RestrictedUnpickler(file, **kw).load()
restricted_pickle.__dict__.update({"UnpicklingError": pickle.UnpicklingError})


def load_deepspeed_file(path: str | os.PathLike) -> dict[str, Any]:
    """One DeepSpeed ``.pt`` file on CPU through the restricted unpickler; CheckpointError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "file is missing")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except Exception as error:  # truncated zip, bad pickle, refused global, ...
        raise CheckpointError(path, f"cannot read DeepSpeed file: {type(error).__name__}: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a dict at top level, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------- locating the files


def _resolve_tag(load_dir: str, tag: str | None) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(latest, "no 'latest' file; pass the checkpoint's tag")
    with open(latest) as f:
        text = f.read().strip()
    if not text:
        raise CheckpointError(latest, "'latest' is empty")
    return text


def _zero_files(ckpt_dir: str) -> dict[str, dict[int, str]]:
    """kind ('model' / 'optim') -> data-parallel rank -> path, for model-parallel rank 0."""
    found: dict[str, dict[int, str]] = {"model": {}, "optim": {}}
    for entry in sorted(os.listdir(ckpt_dir)):
        m = _ZERO_FILE.match(entry)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise CheckpointError(
                os.path.join(ckpt_dir, entry),
                "model-parallel (tensor/pipeline) DeepSpeed checkpoints are not supported",
            )
        found[m.group(3)][int(m.group(1))] = os.path.join(ckpt_dir, entry)
    return found


def is_deepspeed_checkpoint(load_dir: str | os.PathLike, tag: str | None = None) -> bool:
    """True when ``<load_dir>/<tag>`` (tag from ``latest`` if None) holds DeepSpeed's model-states files."""
    load_dir = os.fspath(load_dir)
    try:
        ckpt_dir = os.path.join(load_dir, _resolve_tag(load_dir, tag))
    except (CheckpointError, OSError):
        return False
    if not os.path.isdir(ckpt_dir):
        return False
    if os.path.isfile(os.path.join(ckpt_dir, _MODEL_STATES)):
        return True
    return any(_ZERO_FILE.match(e) and e.endswith("model_states.pt") for e in os.listdir(ckpt_dir))


# ---------------------------------------------------------------------------------- consolidation


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _stage_of(value: Any, path: str) -> int:
    raw = value.value if isinstance(value, DeepSpeedStandIn) else value
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise CheckpointError(path, f"unreadable zero_stage {value!r}") from None


def _moment(state: dict, index: Any, key: str, path: str) -> torch.Tensor | None:
    entry = state.get(index) if isinstance(state, dict) else None
    if entry is None or key not in entry:
        return None
    value = entry[key]
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(path, f"optimizer state {index!r}[{key!r}] is not a tensor")
    return value.detach().float()


def _step_of(state: dict) -> int | None:
    for entry in state.values() if isinstance(state, dict) else ():
        if isinstance(entry, dict) and "step" in entry:
            step = entry["step"]
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return None


def _hyperparameters(param_groups: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in param_groups or [] if isinstance(g, dict)]


def _walk(
    flat: torch.Tensor, shapes: OrderedDict, paddings: list | None, path: str
) -> dict[str, torch.Tensor]:
    """Stages 1-2: one group's full fp32 vector -> its parameters, one after another."""
    flat = flat.detach()  # DeepSpeed saves its fp32 partitions with requires_grad set
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = _numel(shape)
        if offset + n > flat.numel():
            raise CheckpointError(
                path, f"{name}: needs elements {offset}..{offset + n}, only {flat.numel()} saved"
            )
        out[name] = flat[offset : offset + n].view(tuple(shape)).clone()
        offset += n + (int(paddings[i]) if paddings else 0)
    return out


def _moments_by_index(
    state: dict, indices: list, path: str
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(exp_avg, exp_avg_sq) in the optimizer's parameter order, or None when some are missing."""
    out = []
    for index in indices:
        a, b = _moment(state, index, "exp_avg", path), _moment(state, index, "exp_avg_sq", path)
        if a is None or b is None:
            return None
        out.append((a, b))
    return out


def _read_stage_0(model: dict, path: str) -> tuple:
    """(params, exp_avg, exp_avg_sq, step, param groups, why the moments are absent, moments by index)."""
    module = model.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(path, "no 'module' state dict")
    buffers = set(model.get("buffer_names") or ())
    params = {
        n: t.detach().float().clone()
        for n, t in module.items()
        if n not in buffers and isinstance(t, torch.Tensor)
    }
    opt = model.get("optimizer")
    if not isinstance(opt, dict):
        return params, None, None, None, [], "the model states hold no optimizer state", None
    if "optimizer_state_dict" in opt and "state" not in opt:  # DeepSpeed's fp16/bf16 wrapper
        opt = opt["optimizer_state_dict"]
    state, groups = opt.get("state", {}), opt.get("param_groups", [])
    indices = [i for g in groups for i in g.get("params", [])]
    names = list(params)
    if len(groups) > 1:
        # torch numbers the parameters group after group, and stage 0 records no names: which moment
        # belongs to which parameter is not in the file. The weights are; the moments are left out.
        note = (
            f"stage-0 optimizer state over {len(groups)} param groups records no parameter names; "
            "its moments cannot be assigned"
        )
        return params, None, None, _step_of(state), _hyperparameters(groups), note, None
    by_index = _moments_by_index(state, indices, path)
    if len(indices) != len(names):
        note = (
            f"stage-0 optimizer covers {len(indices)} parameters but the module has {len(names)}; "
            "its moments cannot be assigned by the file alone"
        )
        return params, None, None, _step_of(state), _hyperparameters(groups), note, by_index
    avg, avg_sq = {}, {}
    for name, index in zip(names, indices):
        a, b = _moment(state, index, "exp_avg", path), _moment(state, index, "exp_avg_sq", path)
        if a is None or b is None:
            return params, None, None, _step_of(state), _hyperparameters(groups), None, None
        if tuple(a.shape) != tuple(params[name].shape):
            raise CheckpointError(
                path, f"{name}: exp_avg shape {tuple(a.shape)} != parameter {tuple(params[name].shape)}"
            )
        avg[name], avg_sq[name] = a, b
    return params, avg, avg_sq, _step_of(state), _hyperparameters(groups), None, by_index


def _base_state(osd: dict) -> dict:
    """Stage 1-2 optimizer state by group index: torch's ``state`` dict, or the elastic per-group list."""
    base = osd.get("base_optimizer_state", {})
    if isinstance(base, list):
        return dict(enumerate(base))
    return base.get("state", {}) if isinstance(base, dict) else {}


def _read_stage_1_2(model: dict, optims: list[dict], paths: list[str]) -> tuple:
    shapes = model.get("param_shapes")
    if not isinstance(shapes, list):
        raise CheckpointError(paths[0], "model states hold no 'param_shapes' list")
    osds = [o["optimizer_state_dict"] for o in optims]
    paddings = osds[0].get("param_alignment_paddings")
    params, avg, avg_sq = {}, {}, {}
    have_moments = True
    for gi, group_shapes in enumerate(shapes):
        try:
            parts = [osd["single_partition_of_fp32_groups"][gi] for osd in osds]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(paths[0], f"no fp32 partition of param group {gi}") from None
        group_pad = paddings[gi] if paddings else None
        params.update(_walk(torch.cat([p.float() for p in parts]), group_shapes, group_pad, paths[0]))
        for key, into in (("exp_avg", avg), ("exp_avg_sq", avg_sq)):
            pieces = [_moment(_base_state(osd), gi, key, p) for osd, p in zip(osds, paths)]
            if any(m is None for m in pieces):
                have_moments = False
                continue
            lean = []
            for m, part, p in zip(pieces, parts, paths):
                # the saved fp32 partition has its group padding cut off; a non-elastic moment keeps it
                if m.numel() < part.numel():
                    raise CheckpointError(
                        p, f"group {gi} {key} has {m.numel()} elements, its partition {part.numel()}"
                    )
                lean.append(m.reshape(-1)[: part.numel()])
            into.update(_walk(torch.cat(lean), group_shapes, group_pad, paths[0]))
    base = osds[0].get("base_optimizer_state", {})
    if isinstance(base, list):  # elastic: one lean state per group, the step stored beside it
        step = osds[0].get("base_optimizer_state_step")
        step = (
            int(step.item() if isinstance(step, torch.Tensor) else step)
            if step is not None
            else _step_of(_base_state(osds[0]))
        )
        groups = []
    else:
        step, groups = _step_of(base.get("state", {})), _hyperparameters(base.get("param_groups"))
    return params, (avg if have_moments else None), (avg_sq if have_moments else None), step, groups


def _read_stage_3(model: dict, optims: list[dict], paths: list[str]) -> tuple:
    world = len(optims)
    shapes = model.get("param_shapes")
    if not isinstance(shapes, list):
        raise CheckpointError(paths[0], "model states hold no 'param_shapes' list")
    merged = OrderedDict((n, s) for group in shapes for n, s in group.items())
    osds = [o["optimizer_state_dict"] for o in optims]

    def per_rank(get: Any, what: str) -> list[torch.Tensor] | None:
        flats = []
        for osd, p in zip(osds, paths):
            pieces = get(osd, p)
            if pieces is None or any(t is None for t in pieces):
                return None
            flats.append(torch.cat([t.float().reshape(-1) for t in pieces]))
        return flats

    def fp32(osd: dict, p: str) -> list:
        if "fp32_flat_groups" not in osd:
            raise CheckpointError(p, "stage-3 optimizer states hold no 'fp32_flat_groups'")
        return list(osd["fp32_flat_groups"])

    def moments(key: str) -> Any:
        def get(osd: dict, p: str) -> list | None:
            inner = osd.get("optimizer_state_dict", {}).get("state", {})
            return [_moment(inner, i, key, p) for i in range(len(osd["fp32_flat_groups"]))]

        return get

    def consolidate(flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        flats = [f.detach() for f in flats]  # saved with requires_grad set
        out, offset = {}, 0
        for name, shape in merged.items():
            n = _numel(shape)
            part = -(-n // world)  # every parameter split on its own, ceil(numel / world) per rank
            for flat, p in zip(flats, paths):
                if offset + part > flat.numel():
                    raise CheckpointError(
                        p, f"{name}: needs elements {offset}..{offset + part}, only {flat.numel()} saved"
                    )
            out[name] = torch.cat([f[offset : offset + part] for f in flats])[:n].view(tuple(shape)).clone()
            offset += part
        return out

    params = consolidate(per_rank(fp32, "fp32"))
    avg_flats, sq_flats = (
        per_rank(moments("exp_avg"), "exp_avg"),
        per_rank(moments("exp_avg_sq"), "exp_avg_sq"),
    )
    avg = consolidate(avg_flats) if avg_flats is not None and sq_flats is not None else None
    avg_sq = consolidate(sq_flats) if avg is not None else None
    inner = osds[0].get("optimizer_state_dict", {})
    return params, avg, avg_sq, _step_of(inner.get("state", {})), _hyperparameters(inner.get("param_groups"))


def _frozen(models: list[dict], stage: int, trainable: dict) -> dict[str, torch.Tensor]:
    first = models[0]
    shapes = first.get("frozen_param_shapes") or {}
    if stage == 3:
        out = {}
        for name, shape in shapes.items():
            frags = [m.get("frozen_param_fragments", {}).get(name) for m in models]
            if any(f is None for f in frags):
                continue
            out[name] = (
                torch.cat([f.detach().float().reshape(-1) for f in frags])[: _numel(shape)]
                .view(tuple(shape))
                .clone()
            )
        return out
    module = first.get("module") or {}
    if not shapes and stage > 0:  # stage 1 records no frozen_param_shapes; the module holds them whole
        buffers = set(first.get("buffer_names") or ())
        shapes = {n: None for n in module if n not in trainable and n not in buffers}
    return {n: module[n].detach().float().clone() for n in shapes if n in module and n not in trainable}


def _buffers(model: dict) -> dict[str, torch.Tensor]:
    module = model.get("module") or {}
    names = model.get("buffer_names") or ()
    return {n: module[n].detach().clone() for n in names if isinstance(module.get(n), torch.Tensor)}


def read_deepspeed_checkpoint(load_dir: str | os.PathLike, tag: str | None = None) -> DeepSpeedCheckpoint:
    """Consolidate the DeepSpeed checkpoint ``<load_dir>/<tag>`` (tag from ``latest`` if None) on CPU.

    Every missing, damaged or inconsistent file raises ``CheckpointError`` naming it."""
    load_dir = os.fspath(load_dir)
    tag = _resolve_tag(load_dir, tag)
    ckpt_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(ckpt_dir, "checkpoint directory is missing")
    zero = _zero_files(ckpt_dir)
    model_path = os.path.join(ckpt_dir, _MODEL_STATES)
    if os.path.isfile(model_path):
        model_paths = [model_path]
    elif zero["model"]:
        model_paths = [zero["model"][r] for r in sorted(zero["model"])]
    else:
        raise CheckpointError(
            ckpt_dir, f"no {_MODEL_STATES} nor zero_pp_rank_*_model_states.pt: not a DeepSpeed checkpoint"
        )
    models = [load_deepspeed_file(p) for p in model_paths]
    model = models[0]
    optim_paths = [zero["optim"][r] for r in sorted(zero["optim"])]
    if sorted(zero["optim"]) != list(range(len(optim_paths))):
        raise CheckpointError(
            ckpt_dir, f"optimizer-state files of ranks {sorted(zero['optim'])}: some rank is missing"
        )
    optims = [load_deepspeed_file(p) for p in optim_paths]
    for o, p in zip(optims, optim_paths):
        if not isinstance(o.get("optimizer_state_dict"), dict):
            raise CheckpointError(p, "no 'optimizer_state_dict'")
    moe_files = deepspeed_moe.expert_files(ckpt_dir)
    if moe_files:  # DeepSpeed's MoE layout (io/deepspeed_moe.py): parameters only
        if model_paths != [model_path]:
            raise CheckpointError(ckpt_dir, "DeepSpeed MoE checkpoints at ZeRO stage 3 are not supported")
        osd = optims[0]["optimizer_state_dict"] if optims else {}
        stage = _stage_of(osd["zero_stage"], optim_paths[0]) if "zero_stage" in osd else 0
        params = _read_stage_0(model, model_path)[0]  # the module's: its non-expert parameters
        params.update(deepspeed_moe.read_expert_params(moe_files, deepspeed_moe.num_experts_of(model)))
        avg = avg_sq = step = by_index = None
        groups, note = [], deepspeed_moe.NOTE
        world = int(model.get("dp_world_size") or 1)
    elif not optims:
        stage = 0
        params, avg, avg_sq, step, groups, note, by_index = _read_stage_0(model, model_paths[0])
        world = int(model.get("dp_world_size") or 1)
    else:
        note, by_index = None, None
        osd = optims[0]["optimizer_state_dict"]
        if "zero_stage" not in osd:
            raise CheckpointError(
                optim_paths[0],
                "no 'zero_stage' recorded (DeepSpeed's BF16_Optimizer, bf16 at stage 0-1, writes none); "
                "that layout is not supported",
            )
        stage = _stage_of(osd["zero_stage"], optim_paths[0])
        count = osd.get("partition_count")
        world = max(count) if isinstance(count, list) else int(count or 0)
        if world != len(optims):
            raise CheckpointError(
                ckpt_dir, f"partition_count {world} but {len(optims)} optimizer-state files"
            )
        if stage == 3 and len(models) != world:
            raise CheckpointError(
                ckpt_dir, f"stage 3 over {world} ranks but {len(models)} model-states files"
            )
        if stage in (1, 2):
            params, avg, avg_sq, step, groups = _read_stage_1_2(model, optims, optim_paths)
        elif stage == 3:
            params, avg, avg_sq, step, groups = _read_stage_3(model, optims, optim_paths)
        else:
            raise CheckpointError(optim_paths[0], f"unknown zero_stage {stage}")
    ds_config = model.get("ds_config") if isinstance(model.get("ds_config"), dict) else None
    opt_block = (ds_config or {}).get("optimizer")
    scaler = optims[0]["optimizer_state_dict"].get("loss_scaler") if optims else None
    scale = getattr(scaler, "cur_scale", None)
    return DeepSpeedCheckpoint(
        path=ckpt_dir,
        tag=tag,
        stage=stage,
        dp_world_size=world,
        params=params,
        frozen_params=_frozen(models, stage, params),
        buffers=_buffers(model),
        exp_avg=avg,
        exp_avg_sq=avg_sq,
        optimizer_step=step,
        optimizer_type=opt_block.get("type") if isinstance(opt_block, dict) else None,
        param_groups=groups,
        global_steps=int(model.get("global_steps") or 0),
        skipped_steps=int(model.get("skipped_steps") or 0),
        global_samples=int(model.get("global_samples") or 0),
        lr_scheduler=model.get("lr_scheduler"),
        client_state={k: v for k, v in model.items() if k not in DEEPSPEED_KEYS},
        ds_config=ds_config,
        ds_version=model.get("ds_version"),
        moments_note=note,
        stage0_moments_by_index=by_index,
        loss_scale=float(scale) if isinstance(scale, (int, float)) else None,
    )
