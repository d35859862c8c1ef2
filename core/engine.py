"""``initialize`` and ``Engine``: build the step's plan and phases once, then run them over states.

The engine holds only what is fixed for its lifetime (the model's code, the config, the layouts, the
compiled phases); everything that changes lives in ``TrainState``. ``engine.step`` donates its input:
buffers are updated in place, the old state object is marked consumed, and passing it again raises
``ConsumedStateError``. (A copy made with ``optree.tree_map`` before the step is not protected: its
tensors share storage with the donated state.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import nn

from zerostep import optim
from zerostep.core import (
    activation_checkpointing,
    agreement,
    deferred_init,
    expert_units,
    model_parallel,
    model_parallel_optim,
    sequence_parallel,
)
from zerostep.core import offload as offloading
from zerostep.core.accounting import memory_report, step_comm_plan
from zerostep.core.autocast import autocast_plan_of, check_autocast_model, loss_scaling_of, under_autocast
from zerostep.core.batching import BatchSpec, check_batch, micro_batches, to_device
from zerostep.core.compiling import compile_private
from zerostep.core.compressed_phase import (
    build_compressed_phases,
    check_compressed_optimizer,
    compressed_allreduce_over,
    local_update_for,
    padding_ranges,
    parameter_ranges,
)
from zerostep.core.config import Config
from zerostep.core.module_binding import bind_module, current_values
from zerostep.core.monitoring.timers import WallClockTimers
from zerostep.core.one_region import OneRegionStep
from zerostep.core.param_groups import GroupOptions, ParamGroup, check_groups
from zerostep.core.precision import (
    LossScaleError,
    ScalerState,
    compute_dtype_of,
    is_dynamic,
    loss_scale_init,
    loss_scale_update,
    optimizer_state_dtype_of,
)
from zerostep.core.random_ltd import RandomLTD
from zerostep.core.reducers import make_reduce_scatter
from zerostep.core.sparse_gradients import SparseGradients
from zerostep.core.state import (
    FlatParams,
    Metrics,
    TrainState,
    check_not_consumed,
    empty_metrics,
    mark_consumed,
)
from zerostep.core.step import (
    ParamGathers,
    StepPlan,
    UpdateResult,
    compose,
    make_forward,
    make_module_forward,
    make_scaled_backward,
    make_sharded_update,
    make_zero3_backward,
    plan_of_config,
    step_seed,
)
from zerostep.core.step_failure import RanksOutOfStepError, RemoteStepError, StepVote
from zerostep.core.training_schedules import TrainingSchedules
from zerostep.parallel import groups as dist_groups
from zerostep.parallel.collectives import (
    CommCounter,
    all_gather_flat,
    all_reduce_flat,
    all_to_all_flat,
    attach_shared_memory,
)
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.mesh import ParallelMesh
from zerostep.parallel.zero3 import ROOT_UNIT, Unit, Zero3Runner, plan_units, unit_module_paths

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def initialize(
    model: nn.Module,
    config: Config | dict | str | os.PathLike,
    *,
    loss_fn: LossFn | None = None,
    compile: bool = True,
    param_groups: list[ParamGroup] | None = None,
    mpu: Any = None,
    mesh: ParallelMesh | None = None,
) -> Engine | Any:
    """Build an ``Engine`` for ``model`` from a ``Config``, a DeepSpeed config dict or a JSON path.

    Initializes ``torch.distributed`` from torchrun's environment when it is set and no process group
    exists yet; otherwise runs as one process. ``param_groups``: torch-style parameter groups with their
    own ``lr`` / ``weight_decay`` (core/param_groups.py); every trainable parameter in one group.
    A ``zerostep.pipe.PipelineModule`` gets a ``core.pipeline_engine.PipelineEngine`` instead.
    ``mpu``: a Megatron model-parallel unit, or ``mesh``: a ``parallel.mesh.ParallelMesh``, whose
    data-parallel group the engine trains over (core/model_parallel.py); the config's
    ``tensor_parallel.autotp_size`` builds such a mesh itself.
    """
    dist_groups.maybe_init_distributed()
    from zerostep.core.pipeline_module import PipelineModule

    if isinstance(model, PipelineModule):  # its own engine: core/pipeline_engine.py
        from zerostep.core.pipeline_engine import PipelineEngine

        if mpu is not None or mesh is not None:
            raise ValueError("a PipelineModule builds its own mesh (PipelineModule(num_stages=...)); no mpu")
        if loss_fn is not None or param_groups is not None:
            raise ValueError(
                "a PipelineModule has its own loss (PipelineModule(loss_fn=...)) and no param_groups"
            )
        return PipelineEngine(model, config, compile=compile)
    if mpu is not None:  # the batch triple needs the mpu's data-parallel size
        mesh, mpu = model_parallel.mesh_for(None, mpu, mesh), None
    dp_size = mesh.dp_size if mesh is not None else None
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = Config.from_dict(config, world_size=dp_size)
    elif isinstance(config, (str, os.PathLike)):
        cfg = Config.from_file(config, world_size=dp_size)
    else:
        raise TypeError(f"config must be a Config, a dict or a path, got {type(config).__name__}")
    mesh = model_parallel.mesh_for(cfg, None, mesh)
    return Engine(model, cfg, loss_fn=loss_fn, compile=compile, param_groups=param_groups, mesh=mesh)


class Engine:
    _phases = None  # CompressedPhases for 1-bit Adam (core/compressed_phase.py), else None
    _split_only = False  # True once the one-region step failed to compile (core/one_region.py)

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        *,
        loss_fn: LossFn | None = None,
        compile: bool = True,
        param_groups: list[ParamGroup] | None = None,
        mesh: ParallelMesh | None = None,
    ):
        self.model = model
        self.config = config
        self.loss_fn = loss_fn
        self.compile = compile
        # data-parallel group, rank and size: the world, or one axis of a model-parallel mesh
        self.mesh = mesh if mesh is not None else model_parallel.mesh_for(config)
        self.group = self.mesh.dp_group
        self.world_size, self.rank = self.mesh.dp_size, self.mesh.dp_rank
        self.tp_specs = None
        self._batch_unchecked = True  # AutoTP: the first step checks that the TP ranks got the same batch
        self._batch_spec: BatchSpec | None = None  # the first step's batch (compiled engines)
        self._out_of_step: str | None = None  # why a failed step left the ranks out of step, if it did
        # Everything up to the vote is local: a rank that fails here still votes (with its error), so
        # the others raise at once instead of waiting for it in a collective (core/agreement.py).
        agree_over = model_parallel.agreement_group(self.mesh)  # AutoTP: every rank alike
        try:
            # tensor_parallel.autotp_size: the planned weights sharded in place (core/model_parallel.py)
            self.tp_specs = model_parallel.shard_model(model, config, self.mesh)
            self._plan_locally(model, config, param_groups)
        except Exception as error:
            agreement.agree_after_failure(error, agree_over)
            raise
        agreement.agree(self._facts(param_groups), agree_over)
        self.sequence = sequence_parallel.setup(config)  # Ulysses groups (core/sequence_parallel.py)
        # Gloo ranks on one host exchange through /dev/shm instead of loopback TCP (parallel/shm.py).
        self.shared_memory = self.world_size > 1 and attach_shared_memory(self.group)  # False for one rank
        self._build_phases()

    def _plan_locally(self, model: nn.Module, config: Config, param_groups: list[ParamGroup] | None) -> None:
        """Checks, layouts, plan, optimizer and schedule: no collective, may raise."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config.world_size != self.world_size:
            raise ValueError(
                f"config was resolved for world size {config.world_size} but the process group has "
                f"{self.world_size} ranks; build the Config with world_size={self.world_size}"
            )
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
        backend = dist.get_backend(self.group) if dist.is_initialized() else None
        devices = {n: p.device for n, p in trainable.items()}
        if any(d.type == "meta" for d in devices.values()):
            # built under zerostep.zero.Init: materialized here, a unit at a time (core/deferred_init.py)
            deferred = _deferred_device(backend)
            devices = {n: deferred if d.type == "meta" else d for n, d in devices.items()}
            missing = [
                n for n, p in model.named_parameters() if p.is_meta and not deferred_init.is_deferred(p)
            ]
            if missing:
                raise ValueError(
                    f"parameter {missing[0]!r} is on the meta device without a zerostep.zero.Init record "
                    "of its values; build the model inside zerostep.zero.Init(), or on a real device"
                )
            deferred_init.materialize_module_constants(model, deferred)
        self.device = dist_groups.check_model_devices(devices, backend)
        # per-phase timers of engine.step (wall_clock_breakdown), read by wall_clock_timers()
        self.timers = WallClockTimers(self.device) if config.wall_clock_breakdown else None
        self.compute_dtype = compute_dtype_of(config)
        self.autocast = autocast_plan_of(config, self.device)  # torch_autocast (core/autocast.py)
        check_autocast_model(config, self.autocast, model, self.compute_dtype)
        self.loss_scaling = loss_scaling_of(config)
        # progressive layer drop / legacy curriculum: forward kwargs and batch cuts per step
        self.schedules = TrainingSchedules.of(config, model)
        self.random_ltd = RandomLTD.of(config, model)  # data_efficiency.data_routing.random_ltd
        eager_forward = self.schedules is not None and self.schedules.eager_forward
        self.compile_forward = self.compile and not eager_forward and self.random_ltd is None
        if self.compile and not self.compile_forward:
            (self.schedules if eager_forward else self.random_ltd).warn_eager()
        zero = config.zero_optimization
        stage = int(zero.stage)
        # offload_optimizer: master and optimizer state in host memory (core/offload.py)
        self.offload_settings = offloading.settings_of(config, self.device, stage)
        self.master_device = torch.device("cpu") if self.offload_settings else self.device
        if stage == 3 and float(config.gradient_predivide_factor) != 1.0:
            warnings.warn(
                "gradient_predivide_factor is ignored at ZeRO stage 3 (gradients are reduce-scattered "
                "unit by unit inside backward, as sums)",
                stacklevel=4,
            )
        layouts = _trainable_layouts(model, set(trainable), self.compute_dtype, self.world_size)
        # MoE: each layer's experts a unit of their own, over their expert-data-parallel group
        self.expert_units = expert_units.find_expert_units(
            model, self.world_size, self.rank, self.mesh.is_world
        )
        layouts = self.expert_units.split_layouts(layouts, self.compute_dtype)
        self.plan = plan_of_config(
            config,
            layouts,
            world_size=self.world_size,
            rank=self.rank,
            overlap_comm=False,  # decided in _build_phases, once the shared-memory channel is known
            offload_optimizer=self.offload_settings is not None,
            unit_groups=self.expert_units.unit_groups(),
            model_parallel=model_parallel.norm_share(self.mesh, model, layouts, self.tp_specs, stage),
        )
        self.optimizer_state_dtype = optimizer_state_dtype_of(config)
        if config.optimizer is None:
            raise ValueError(
                "config has no 'optimizer' block; add one, e.g. "
                '{"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}'
            )
        self.group_options = self._group_options(param_groups, set(trainable))
        self.optimizer = self._build_optimizer()
        model_parallel_optim.check_optimizer(self.mesh, self.optimizer.name, config.optimizer.type)
        expert_units.check_supported(
            self.expert_units, config, config.optimizer.type, self.offload_settings is not None
        )
        sequence_parallel.check(config, self.optimizer.name, self.mesh.is_world)
        if self.offload_settings is not None:  # before the ranks' first collective
            offloading.check_optimizer(self.optimizer.name)
        self.lr_at = optim.lr_schedule(config.scheduler, self.optimizer.lr)
        self.beta1_at = optim.momentum_schedule(config.scheduler, self.optimizer)
        # Buffers and frozen parameters enter the forward as constants, cast like the parameters.
        frozen = ((n, p.detach()) for n, p in model.named_parameters() if not p.requires_grad)
        self._constants = {
            n: t.to(self.compute_dtype) if t.is_floating_point() else t
            for n, t in [*model.named_buffers(), *frozen]
        }

    def _facts(self, param_groups: list[ParamGroup] | None) -> agreement.Facts:
        return agreement.engine_facts(
            self.config.to_dict(),
            self.plan.layouts,
            self._constants,
            compile=self.compile,
            device=self.device,
            param_groups=param_groups,
        )

    def _build_phases(self) -> None:
        """The step's phases, compiled or not; needs the shared-memory decision (overlap_comm)."""
        model, plan, zero = self.model, self.plan, self.config.zero_optimization
        user_set = self.config.source("zero_optimization.overlap_comm") != "default"
        backend = dist.get_backend(self.group) if self.group is not None else None
        by_default = default_overlap_comm(plan.stage, backend, self.shared_memory)
        overlap = bool(zero.overlap_comm if user_set else by_default)
        overlap = overlap and self.world_size > 1 and plan.stage < 3
        if zero.overlap_param_gather and not (overlap and plan.stage in (1, 2)):
            warnings.warn(
                "zero_optimization.overlap_param_gather has no effect here: it needs stage 1 or 2, "
                "several ranks and overlap_comm",
                stacklevel=4,
            )
        self.plan = plan = dataclasses.replace(plan, overlap_comm=overlap)
        self._checkpoint_activations(model, plan)
        self._forward = under_autocast(
            make_forward(model, self.loss_fn, plan.layouts, self._constants), self.autocast
        )
        self._runner = None
        if plan.stage == 3:
            units = [Unit(g, lay) for g, lay in plan.layouts.items()]
            # offload_param: host shards, gathered on the device (core/offload.py)
            offload_to = self.device if self.offload_settings and self.offload_settings.params else None
            own = {g: u.group for g, u in plan.unit_groups.items()}  # MoE experts: their edp group
            self._runner = Zero3Runner(model, units, self.group, offload_to=offload_to, unit_groups=own)
            self._scaled_backward = make_zero3_backward(self._runner, plan.accumulation_steps)
            step_forward = under_autocast(make_module_forward(self.loss_fn, self._constants), self.autocast)
        else:
            self._scaled_backward = make_scaled_backward(plan, self.compile_forward and not overlap)
            step_forward = self._forward
            if plan.defer_param_gather:
                step_forward = self._wait_gathers_around(model, step_forward)
        self._step_forward = step_forward
        self._reducer = make_reduce_scatter(plan, self.group, self.compile)
        self._sparse = SparseGradients.of(self.config, model, plan, self.group, self.compile)
        if self._sparse is not None:
            self._reducer = self._sparse.reducer()
        # 1-bit Adam: after freeze_step, local gradients and a compressed momentum (core/compressed_phase.py)
        self._phases = build_compressed_phases(plan, self.optimizer, self._reducer, self.group)
        if self._phases is not None:
            self._reducer = self._phases.reducer
        self._offload = None
        if self.offload_settings is not None:
            self._offload = offloading.Offload(self.offload_settings, plan, self.device)
        self._compose_update()
        self.comm = CommCounter()  # host-side byte totals, for benchmarks and monitors
        self._comm_applied = step_comm_plan(plan, applied=True, optimizer=self.optimizer)
        self._comm_skipped = step_comm_plan(plan, applied=False)
        if self._sparse is not None:  # the tables' rows are counted as they are gathered
            self._comm_applied, self._comm_skipped = self._sparse.comm_plans(self.optimizer, self.comm)
        self._eval_forward = compile_private(self._forward, dynamic=False) if self.compile else self._forward

    def _checkpoint_activations(self, model: nn.Module, plan: StepPlan) -> None:
        """The ``activation_checkpointing`` block (core/activation_checkpointing.py): it configures
        ``zerostep.checkpointing`` unless the script did, and ``checkpoint_units`` checkpoints the forward of
        every ZeRO unit (the blocks), on every path of the step and in the facade."""
        block = self.config.activation_checkpointing
        given = any(
            key.startswith("activation_checkpointing.") and origin != "default"
            for key, origin in self.config.sources.items()
        )
        if given:
            activation_checkpointing.adopt_config(block)
        self.checkpointed_units: list[str] = []
        if not block.checkpoint_units:
            return
        paths = unit_module_paths(model)
        if not paths:
            warnings.warn(
                "activation_checkpointing.checkpoint_units: the model has no ModuleList/Sequential of "
                "blocks (its ZeRO units), so nothing is checkpointed",
                stacklevel=5,
            )
        activation_checkpointing.install_unit_checkpointing(model, block, paths)
        self.checkpointed_units = paths
        eager_only = activation_checkpointing.eager_only_options(block)
        compiled = (
            self.compile and plan.stage < 3 and not plan.overlap_comm and not plan.shards_grads_in_backward
        )
        if compiled and eager_only:
            warnings.warn(
                f"activation_checkpointing.{', '.join(eager_only)} has no effect in this engine's compiled "
                "forward+backward (the recomputation is inside the compiled graph); it applies with "
                "compile=False, at stage 3, with overlap_comm and at stage 2 on several ranks",
                stacklevel=5,
            )

    def _wait_gathers_around(self, model: nn.Module, forward: Callable) -> Callable:
        """Stages 1-2 with ``defer_param_gather``: a forward pre-hook on each unit's module waits for
        that unit's parameter all-gather, started by the previous step's update, so the gathers of later
        units overlap the forward of earlier ones. ``engine.step`` waits for the root unit before the
        forward; units the forward never entered are waited for after it, before backward."""
        self._in_flight: ParamGathers | None = None
        engine = weakref.ref(self)  # the hooks live on the user's modules: they must not keep us alive

        def wait_unit(group: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:
                in_flight = getattr(engine(), "_in_flight", None)
                if in_flight is not None:
                    in_flight.wait(group)

            return hook

        self._hook_handles = [
            model.get_submodule(group).register_forward_pre_hook(wait_unit(group))
            for group in self.plan.layouts
            if group != ROOT_UNIT
        ]
        weakref.finalize(self, lambda handles: [h.remove() for h in handles], self._hook_handles)

        def forward_then_wait(flats: dict[str, torch.Tensor], micro_batch: Any) -> torch.Tensor:
            loss = forward(flats, micro_batch)
            if self._in_flight is not None:
                self._in_flight.wait_all()
            return loss

        return forward_then_wait

    def _compose_update(self) -> None:
        host = None  # offload_optimizer: graph B runs on the host (core/offload.py)
        if self._offload is not None:
            chunked = self.group_options is None  # per-group factor vectors are keyed by unit
            host = self._offload.host_update(self.plan, self.optimizer, self.group, self.compile, chunked)
        self._sharded_update = make_sharded_update(
            self.plan, self.optimizer, self.group, self.compile, apply_update=host
        )
        if getattr(self, "_phases", None) is not None:
            local = local_update_for(self.plan, self.optimizer, self.group)
            self._sharded_update = self._phases.wrap_update(self._sharded_update, local)
        self._step = compose(self._step_forward, self._scaled_backward, self._reducer, self._sharded_update)
        # one process: forward, backward and update as one compiled graph where that qualifies
        self._one_region = None if self._split_only else OneRegionStep.of(self)

    def _group_options(
        self, param_groups: list[ParamGroup] | None, trainable: set[str]
    ) -> GroupOptions | None:
        """Per-group lr / weight_decay factors over this rank's master ranges (core/param_groups.py)."""
        if not param_groups:
            return None
        check_groups(param_groups, [n for n, _ in self.model.named_parameters() if n in trainable])
        plan = self.plan
        ranges = {
            g: lay.shard_range(plan.unit_rank(g)) if plan.sharded_master else (0, lay.padded_numel)
            for g, lay in plan.layouts.items()
        }
        return GroupOptions(param_groups, plan.layouts, ranges, self.master_device)

    def _build_optimizer(self, lrs: list[float] | None = None) -> optim.Optimizer:
        options = {**self._lamb_options(), **self._per_parameter_options(), **self._compressed_options()}
        block = self.config.optimizer
        # LAMB's norms, Muon's matrices over the tensor-parallel group (core/model_parallel_optim.py)
        options.update(
            model_parallel_optim.optimizer_options(
                self.mesh, block.type, self.plan.layouts, self.tp_specs, self.model
            )
        )
        if self.group_options is not None:
            options.update(self.group_options.optimizer_options(lrs))
            params = dict(block.params or {})
            params["weight_decay"] = self.group_options.weight_decay
            block = {"type": block.type, "params": params}
        return optim.from_config(block, **options)

    def rebuild_optimizer(self, lrs: list[float] | None = None) -> None:
        """Rebuild the update after param-group options changed shape (groups whose lr or weight decay
        were equal now differ): the optimizer's state layout is unchanged, the update recompiles once."""
        self.optimizer = self._build_optimizer(lrs)
        self._compose_update()

    def _lamb_options(self) -> dict[str, Any]:
        """LAMB's trust ratio is per parameter: tell it where each parameter lies in the flat shards
        and, when shards are split over ranks, sum the partial norms with an all-reduce."""
        if self.config.optimizer is None or self.config.optimizer.type != "lamb":
            return {}
        plan, segments = self.plan, {}
        for g, lay in plan.layouts.items():
            lo, hi = lay.shard_range(plan.unit_rank(g)) if plan.sharded_master else (0, lay.padded_numel)
            pieces = []
            for index, e in enumerate(lay.entries):
                start, stop = max(lo, e.offset), min(hi, e.offset + e.numel)
                if start < stop:
                    pieces.append((start - lo, stop - lo, index))
            segments[g] = optim.TrustSegments(tuple(pieces), len(lay.entries))
        options: dict[str, Any] = {"trust_segments": segments}
        if plan.sharded_master:
            group = self.group
            options["norm_reduce"] = lambda sums: all_reduce_flat(sums.reshape(-1), group).reshape(sums.shape)
        return options

    def _compressed_options(self) -> dict[str, Any]:
        """1-bit Adam: ZeRO stage 0 only (as DeepSpeed); the momentum's compressed all-reduce over the
        engine's group (parallel/compressed.py), whatever backend the config's comm_backend_name names."""
        block = self.config.optimizer
        if block is None or block.type not in optim.COMPRESSED_OPTIMIZER_TYPES:
            return {}
        backend = dist.get_backend(self.group) if self.group is not None else None
        comm_backend = (block.params or {}).get("comm_backend_name", "nccl")
        note = check_compressed_optimizer(block.type, self.plan.stage, backend, comm_backend)
        if note:
            warnings.warn(note, stacklevel=5)
        group = self.group
        allreduce = compressed_allreduce_over(group) if self.world_size > 1 else None
        padding = {g: padding_ranges(lay) for g, lay in self.plan.layouts.items()}
        segments = {g: parameter_ranges(lay) for g, lay in self.plan.layouts.items()}
        return {
            "compressed_allreduce": allreduce,
            "world_size": self.world_size,
            "padding": padding,
            "segments": segments,
        }

    def _per_parameter_options(self) -> dict[str, Any]:
        """Muon, mup's and torch.optim's optimizers work per parameter (zerostep.optim.per_parameter):
        tell them which parameter pieces each flat shard holds, how to all-gather a shard (Muon's whole
        matrices), whether a config schedule sets the lr (DeepSpeed's set every param group's), and
        mup's width multipliers from the model's ``infshape``."""
        block = self.config.optimizer
        if block is None or block.type not in optim.PER_PARAMETER_TYPES:
            return {}
        plan, pieces = self.plan, {}
        for g, lay in plan.layouts.items():
            lo, hi = lay.shard_range(plan.unit_rank(g)) if plan.sharded_master else (0, lay.padded_numel)
            pieces[g] = optim.layout_pieces(
                lay.entries, lo, hi, sharded=plan.sharded_master, full_numel=lay.padded_numel
            )
        scheduled = self.config.scheduler is not None
        options: dict[str, Any] = {"param_pieces": pieces, "schedule_sets_lr": scheduled}
        if plan.sharded_master:
            group = self.group
            options["all_gather"] = lambda shard: all_gather_flat(shard, group)
            options["exchange"] = lambda send, sends, recvs: all_to_all_flat(send, sends, recvs, group)
        if block.type in optim.MUP_OPTIMIZER_TYPES:
            options["param_widths"] = optim.param_widths(self.model.named_parameters())
        return options

    # ------------------------------------------------------------------ state

    def init(self, seed: int = 0) -> TrainState:
        """A fresh state from the model's current parameter values (rank 0's values on every rank)."""
        named = current_values(self.model)  # stage-3 placeholders: gathered from their engine
        deferred = [t for t in named.values() if t.is_meta]
        if deferred:  # zerostep.zero.Init: each unit materialized when buffers_from reads it
            named = deferred_init.MaterializingValues(named)
        master, flats = self.buffers_from(named, broadcast=self.world_size > 1)
        state = self.bind_module(self.state_from(master, flats, seed=seed))
        deferred_init.forget(deferred)  # the module's parameters are real (or placeholders) now
        return state

    def buffers_from(
        self, values: Mapping[str, torch.Tensor], broadcast: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(master, compute-dtype params) for this rank, from full parameter values by name
        (``broadcast``: rank 0's values on every rank, a collective). The master is fp32, or the
        compute dtype with a low-precision master (``plan.master_dtype``)."""
        plan = self.plan
        master, flats = {}, {}
        for g, layout in plan.layouts.items():
            full = layout.flatten({n: values[n].detach() for n in layout.names}, dtype=plan.master_dtype)
            full = full.to(self.device)  # [padded_numel]
            if broadcast:  # a unit of its own group (MoE experts): that group's rank 0's values
                dist.broadcast(full, group_src=0, group=plan.group_of(g, self.group))
            shard = layout.shard(full, plan.unit_rank(g)).clone() if plan.sharded_master else full
            master[g] = shard if self._offload is None else self._offload.transfer.host_copy(shard)
            if plan.params_alias_master:
                flats[g] = shard
            else:
                flats[g] = (shard if plan.params_match_master else full).to(self.compute_dtype)
            if self._offload is not None and self._offload.settings.params:
                flats[g] = self._offload.transfer.host_copy(flats[g])  # offload_param
        return master, flats

    def bind_module(self, state: TrainState) -> TrainState:
        """Point the module's parameters at ``state``'s buffers (stages 0-2) or release them to
        placeholders (stage 3), so the module never holds a stale or duplicate copy of the weights
        (core/module_binding.py). ``init`` and ``load`` call it; returns ``state``."""
        bind_module(
            self, self.model, self.plan.layouts, state.params.flats, self._constants, self.plan.stage == 3
        )
        # weakly: the module's binding must not keep a dropped state's master alive
        self._bound_master = {g: weakref.ref(t) for g, t in state.master.items()}
        self._bound_params = {g: weakref.ref(t) for g, t in state.params.flats.items()}
        if self._phases is not None:
            self._phases.switch.set_from(state)
        return state

    @property
    def bound_params(self) -> dict[str, torch.Tensor] | None:
        """The compute-dtype buffers of the state the module is bound to, or None."""
        refs = getattr(self, "_bound_params", None)
        flats = {g: r() for g, r in (refs or {}).items()}
        return flats if refs and all(t is not None for t in flats.values()) else None

    @property
    def bound_master(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master of the state the module is bound to (steps update it in place), or None."""
        refs = getattr(self, "_bound_master", None)
        master = {g: r() for g, r in (refs or {}).items()}
        return master if refs and all(t is not None for t in master.values()) else None

    def state_from(
        self,
        master: dict[str, torch.Tensor],
        flats: dict[str, torch.Tensor],
        opt_state: Any = None,
        seed: int = 0,
    ) -> TrainState:
        """A step-0 state around given master and compute-dtype buffers (fresh optimizer state if None)."""
        return TrainState(
            step=torch.tensor(0, dtype=torch.int64),
            skipped_steps=torch.tensor(0, dtype=torch.int64),
            seed=torch.tensor(int(seed), dtype=torch.int64),
            params=FlatParams(flats, dict(self.plan.layouts), sharded=self.plan.stage == 3),
            master=master,
            opt_state=self.init_optimizer_state(master) if opt_state is None else opt_state,
            scaler=loss_scale_init(self.loss_scaling),
            metrics=empty_metrics(),
        )

    def init_optimizer_state(self, master: dict[str, torch.Tensor]) -> Any:
        """``optimizer.init(master)``; with ``bf16_optimizer_states`` the moments (the floating leaves
        shaped like a group's master) in bf16, step counters as they are."""
        state = self.optimizer.init(master)
        dtype = self.optimizer_state_dtype
        if dtype is None:
            return state
        shapes = {tuple(m.shape) for m in master.values()}

        def cast(t: Any) -> Any:
            moment = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 1
            return t.to(dtype) if moment and tuple(t.shape) in shapes else t

        return optree.tree_map(cast, state)

    # ------------------------------------------------------------------ checkpoints

    def save(
        self,
        state: TrainState,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
        *,
        keep_last: int | None = None,
        async_save: bool = False,
        fsync: bool = True,
        update_latest: bool = True,
    ):
        """Write ``<save_dir>/<tag>/`` (default tag ``global_step{N}``), one shard file per rank plus a
        manifest, atomically; ``latest`` is updated last (``update_latest=False``: left as it is). Every
        rank calls it. With ``async_save`` the tensors are snapshotted now and written by a thread: the
        returned handle's ``wait()`` joins it."""
        from zerostep.core import mp_checkpoint  # core/checkpointing.py for the world mesh

        check_not_consumed(state, "engine.save")
        return mp_checkpoint.save(
            self,
            state,
            save_dir,
            tag,
            client_state,
            keep_last=keep_last,
            async_save=async_save,
            fsync=fsync,
            update_latest=update_latest,
        )

    def load(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        *,
        load_optimizer_states: bool = True,
        return_client_state: bool = False,
        into: TrainState | None = None,
    ):
        """The state saved in ``<load_dir>/<tag>`` (default: ``latest``), resharded to this engine's world
        size and stage. ``load_optimizer_states=False`` loads only the parameters (fine-tuning).

        ``into``: a state of this engine (``engine.init()``, or one being trained) to load into, as
        DeepSpeed's and DCP's loads do: its parameter, master and optimizer buffers are overwritten and
        reused, so a resume holds one copy of the model state instead of two. It is donated as
        ``engine.step``'s input is (consumed once the load succeeds); a checkpoint that fails a check
        raises before any of its buffers is written."""
        from zerostep.core import mp_checkpoint

        state, client = mp_checkpoint.load(
            self, load_dir, tag, load_optimizer_states=load_optimizer_states, into=into
        )
        if self._offload is not None:  # read onto the device; master and optimizer state go to the host
            state = self._offload.placed(state)
        if self._phases is not None:
            # error feedback is rank-specific (the checkpoint holds rank 0's): restart it, as DeepSpeed does
            opt_state = optim.fresh_error_feedback(state.opt_state, state.master, self.world_size)
            if self._phases.switch.schedule.after_load is not None:  # 0/1 Adam checks its counters
                opt_state = self._phases.switch.schedule.after_load(opt_state)
            state = state.replace(opt_state=opt_state)
        self.bind_module(state)
        return (state, client) if return_client_state else state

    # ------------------------------------------------------------------ step

    def step(self, state: TrainState, batch: Any) -> TrainState:
        """One optimizer step over this rank's ``MB x GAS`` samples. Consumes ``state``.

        A step that raises before its first in-place write leaves ``state`` valid (retry it, or go on
        with another batch); on several ranks it raises on every rank (core/step_failure.py), so no
        rank's step pairs with another's next one. A failure after the first write consumes ``state``
        (its buffers are half updated), with a message saying why."""
        check_not_consumed(state, "engine.step")
        if self._out_of_step is not None:
            raise RanksOutOfStepError(
                f"engine.step: refused, an earlier step left the ranks out of step: {self._out_of_step}"
            )
        plan = self.plan
        failure, spec, pieces = None, None, [None] * plan.accumulation_steps
        try:
            if self.schedules is not None:
                batch = self.schedules.cut(int(state.step), batch)  # the curriculum's sequence length
            check_batch(batch, plan.micro_batch_size, plan.accumulation_steps)
            batch = to_device(batch, self.device, self.compute_dtype)
            spec = self._check_batch_spec(batch)
            pieces = micro_batches(batch, plan.micro_batch_size, plan.accumulation_steps)
            if self.tp_specs is not None and self._batch_unchecked:  # once: TP ranks share the batch
                model_parallel.check_same_batch(self.mesh, batch, self.device)
                self._batch_unchecked = False
        except Exception as error:
            if self.world_size == 1:
                raise
            failure = error  # the other ranks must hear of it: the step runs without this rank's work
        if self._one_region is not None and failure is None:
            try:
                successor = self._one_region.step(self, state, pieces)
            except Exception as error:  # raised before any write: ``state`` is still valid
                if spec is not None:
                    self._explain_batch_failure(spec, error)
                raise
            if successor is not None:
                if self._batch_spec is None:
                    self._batch_spec = spec
                return successor
            self._one_region, self._split_only = None, True  # it did not compile: the split step
        step, skipped, seed = int(state.step), int(state.skipped_steps), int(state.seed)
        applied_before = step - skipped
        if self._phases is not None:
            self._phases.switch.set_from(state)  # warm-up or compressed (1-bit Adam)
        # torch.full launches a fill: no blocking host-to-device copy
        lr = torch.full((), self.lr_at(applied_before - 1), dtype=torch.float32, device=self.device)
        beta1 = None
        if self.beta1_at is not None:
            beta1 = torch.full((), self.beta1_at(applied_before - 1), dtype=torch.float32, device=self.device)
        scale = state.scaler.scale.to(self.device)
        outcome: dict[str, Any] = {}  # set once graph A has decided, before the first write

        before_write = self._before_write(state, outcome)

        vote = StepVote(self.group, self.rank, self.device) if self.world_size > 1 else None
        # Randomness (dropout) comes from the state's seed and step, in a forked RNG so the caller's
        # global generator is left as it was.
        flats, in_flight = state.params.take_in_flight()
        try:
            try:
                if in_flight is not None:
                    in_flight.wait(ROOT_UNIT)  # the root unit's parameters may be used anywhere in forward
                self._in_flight = in_flight
                with torch.random.fork_rng(devices=self._rng_devices), self._forward_kwargs(step):
                    self._seed_rng(step_seed(seed, step, self.rank))
                    # The same flats are read by backward and written in place by the update (donation).
                    applied, loss, grad_norm, gathers = self._step(
                        flats,
                        pieces,
                        scale,
                        vote=vote,
                        failure=failure,
                        timers=self.timers,
                        master=state.master,
                        opt_state=state.opt_state,
                        params=flats,
                        lr=lr,
                        beta1=beta1,
                        before_write=before_write,
                    )
            finally:
                self._in_flight = None
                if in_flight is not None:
                    in_flight.wait_all()  # a step that raised leaves complete buffers (and aligned ranks)
        except RanksOutOfStepError as error:
            self._out_of_step = str(error)
            self._consume_if_written(state, outcome, error)
            raise
        except BaseException as error:
            self._consume_if_written(state, outcome, error)
            # forward or backward raised on this rank's batch (graph A never decided anything)
            if spec is not None and not outcome and isinstance(error, Exception) and failure is None:
                if not isinstance(error, RemoteStepError):
                    self._explain_batch_failure(spec, error)
            raise
        if self._batch_spec is None:
            self._batch_spec = spec
        return self.next_state(state, UpdateResult(applied, loss, grad_norm, gathers), lr, outcome["scaler"])

    def _forward_kwargs(self, global_steps: int) -> Any:
        """The schedules' keyword arguments for the model's forward (core/training_schedules.py) and
        random-LTD's kept-token count (core/random_ltd.py)."""
        stack = contextlib.ExitStack()
        if self.schedules is not None:
            stack.enter_context(self.schedules.forward_kwargs(global_steps))
        if self.random_ltd is not None:
            stack.enter_context(self.random_ltd.at(global_steps))
        return stack

    def _before_write(self, state: TrainState, outcome: dict[str, Any]) -> Callable[[bool], None]:
        """``sharded_update``'s ``before_write``: the loss-scale update and its checks, run once graph A
        has decided and before anything is written, so an error there (LossScaleError, or a config value
        that cannot be used) leaves ``state`` valid. Records ``scaler`` and ``writing`` in ``outcome``."""

        dynamic = is_dynamic(self.loss_scaling)  # a static scale never reaches min_loss_scale

        def before_write(applied: bool) -> None:
            scaler = loss_scale_update(state.scaler, not applied, self.loss_scaling)
            if dynamic and int(scaler.min_scale_overflows) > int(state.scaler.min_scale_overflows):
                raise LossScaleError(
                    f"step {int(state.step)}: fp16 gradients overflowed with the loss scale already at "
                    f"min_loss_scale={self.loss_scaling.min_loss_scale}; the state passed in is unchanged "
                    "and still valid (lower the learning rate, raise min_loss_scale's headroom, or use bf16)"
                )
            outcome.update(scaler=scaler, writing=applied)

        return before_write

    def next_state(
        self, state: TrainState, result: UpdateResult, lr: torch.Tensor, scaler: ScalerState
    ) -> TrainState:
        """After an update: byte counts, metrics, counters; consumes ``state`` and returns its successor
        (``engine.step`` and the DeepSpeed facade's ``step()`` both end here)."""
        applied, loss, grad_norm, gathers = result
        comm_applied = self._comm_applied
        if self._phases is not None and self._phases.switch.compressed:
            comm_applied = self._phases.comm_applied
        self.comm.record(comm_applied if applied else self._comm_skipped)
        # on the device: reading them is the caller's host sync, not the engine's
        metrics = Metrics(
            loss=loss.detach().float(),
            grad_norm=grad_norm.detach().float(),
            lr=lr.detach().float(),
            loss_scale=state.scaler.scale.clone(),
            skipped=torch.tensor(0 if applied else 1, dtype=torch.int64),
        )
        mark_consumed(state)
        if gathers is not None:
            state.params.set_in_flight(gathers)  # the returned state shares this FlatParams
        successor = state.replace(
            step=state.step + 1,
            skipped_steps=state.skipped_steps + (0 if applied else 1),
            scaler=scaler,
            metrics=metrics,
        )
        if self._phases is not None:
            self._phases.switch.set_from(successor)  # the DeepSpeed facade's next window
        return successor

    @staticmethod
    def _consume_if_written(state: TrainState, outcome: dict[str, Any], error: BaseException) -> None:
        if outcome.get("writing"):
            mark_consumed(
                state,
                f"engine.step raised ({type(error).__name__}: {error}) after it had begun updating this "
                "TrainState's buffers in place, so they may be half updated: it must not be used again "
                "(a retry would apply the update twice); resume from a checkpoint",
            )

    def _check_batch_spec(self, batch: Any) -> BatchSpec | None:
        """Under torch.compile: the batch's spec, refused with a one-line ValueError when its structure,
        a leaf's number of dimensions or its dtype differ from the first step's batch (core/batching.py)."""
        if not self.compile:
            return None
        spec = BatchSpec.of(batch)
        if self._batch_spec is not None:
            problem = self._batch_spec.mismatch(spec)
            if problem is not None:
                raise ValueError(f"engine.step: this batch is not like the first step's: {problem}")
        return spec

    def _explain_batch_failure(self, spec: BatchSpec, error: BaseException) -> None:
        """A compiled step failed on a batch whose sizes differ from the first step's: say so in one
        line, instead of dynamo's fake-tensor traceback of a hundred frames (kept as ``__context__``)."""
        first = self._batch_spec
        differs = first.sizes_differ(spec) if first is not None else None
        if differs is None:
            return
        summary = (str(error).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"engine.step failed on a batch unlike the first step's: {differs} "
            f"({type(error).__name__}: {summary})"
        ) from None

    @property
    def _rng_devices(self) -> list[int]:
        # the GPU whose generator the step seeds (self.device always has an index: check_model_devices)
        return [self.device.index] if self.device.type == "cuda" else []

    def _seed_rng(self, seed: int) -> None:
        # Only the generators this engine's device uses: torch.manual_seed also seeds every lazily
        # initialized accelerator backend, which records a Python stack each call (~0.3 ms a step).
        # torch.cuda.manual_seed would seed the *current* device's generator, which need not be the
        # model's (fork_rng protects only the model's): seed that one by index. fork_rng(devices=...)
        # has initialized CUDA, so the generators exist.
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index].manual_seed(seed)

    def eval_step(self, state: TrainState, batch: Any) -> torch.Tensor:
        """The mean loss on ``batch`` (any leading size) at ``state``'s parameters; no update."""
        check_not_consumed(state, "engine.eval_step")
        if self.plan.stage == 3:
            from zerostep.core.full_params import gathered_flats

            flats = {g: f.to(self.compute_dtype) for g, f in gathered_flats(self, state).items()}
        else:
            flats = state.params.flats
        was_training = self.model.training
        self.model.eval()  # dropout off, as in DeepSpeed's engine.eval()
        try:
            with torch.no_grad():
                loss = self._eval_forward(flats, to_device(batch, self.device, self.compute_dtype)).float()
        finally:
            self.model.train(was_training)
        if self.world_size > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.group)
            loss /= self.world_size
        return loss.detach()

    def wall_clock_timers(self, reset: bool = True) -> dict[str, float]:
        """Milliseconds per phase of the steps since the last read (``wall_clock_breakdown``; ``{}`` when
        off): ``fwd_bwd``, ``bwd_allreduce``, ``step`` (core/monitoring/timers.py)."""
        if self.timers is None:
            return {}
        return self.timers.elapsed(list(self.timers.timers), reset)

    def memory_report(self, state: TrainState) -> dict[str, int]:
        """Per-rank bytes of parameters, master, optimizer state and gradient buffer (see accounting.py)."""
        check_not_consumed(state, "engine.memory_report")
        offload = self._offload
        staging = offload.staging_bytes() if offload is not None else 0
        host_params = offload is not None and offload.settings.params
        return memory_report(
            self.plan, state, self._gather_high_water(), host_staging=staging, host_params=host_params
        )

    def _gather_high_water(self) -> int:
        return self._runner.peak_gathered_bytes if self._runner is not None else 0

    def full_params(self, state: TrainState) -> dict[str, torch.Tensor]:
        """fp32 parameters by name, gathered on every rank (new tensors)."""
        from zerostep.core.full_params import full_params

        check_not_consumed(state, "engine.full_params")
        return full_params(self, state)


def _deferred_device(backend: str | None) -> torch.device:
    """Where a model built under ``zero.Init`` goes: this rank's GPU when there is one (DeepSpeed puts
    it on the accelerator), else the CPU."""
    if backend == "nccl" or (backend is None and torch.cuda.is_available()):
        return dist_groups.local_rank_device()
    return torch.device("cpu")


def default_overlap_comm(stage: int, backend: str | None, shared_memory: bool) -> bool:
    """``zero_optimization.overlap_comm`` when the config leaves it unset, per backend.

    With overlap, each unit's collective starts from its gradient hook during backward; the hooks fire
    one by one only in an eager backward (a compiled one returns every gradient at once), so stages 0-2
    then run forward/backward eagerly. Results are identical either way; only speed differs.

    - gloo without the shared-memory channel: stage 0 overlaps (measured on 2 ranks, MLP: 0.86x DDP's
      step time against 0.97x compiled), stages 1-2 do not (0.95-0.96x compiled against 1.03-1.04x);
    - gloo over shared memory: off at every stage (its collectives run in the calling thread, so there
      is nothing to overlap, and the compiled backward is faster);
    - NCCL and any other backend: off, DeepSpeed's default at stages 0-2. The gloo exception was measured
      on CPU only; on GPUs the compiled backward is what ``torch.compile`` buys (fused kernels), and
      NCCL's own stream already runs the post-backward collectives asynchronously to the host.
      Set ``overlap_comm: true`` to overlap there (eager backward).

    Stage 3 always overlaps inside ``parallel.zero3`` (prefetched gathers, reduce-scatters in backward)
    whatever this says. One rank: nothing to overlap."""
    if stage >= 3 or backend is None:
        return False
    return backend == "gloo" and stage == 0 and not shared_memory


def _trainable_layouts(
    model: nn.Module, trainable: set[str], dtype: torch.dtype, world_size: int
) -> dict[str, FlatLayout]:
    """One flat layout per ZeRO unit (``parallel.zero3.plan_units``), trainable parameters only.

    Every stage uses the same units, so a checkpoint reshards across stages by world size alone."""
    out = {}
    for unit in plan_units(model, world_size, dtype):
        entries = [(e.name, e.shape) for e in unit.layout.entries if e.name in trainable]
        if entries:
            out[unit.name] = FlatLayout.build(entries, dtype, world_size)
    return out

