"""``PipelineEngine``: zerostep's functional step over a ``PipelineModule``'s stages.

``state = engine.step(state, batch)`` is one optimizer step, as in ``core.engine.Engine``, with phases 1-2
(forward and scaled backward over the ``GAS`` micro-batches) run by a ``torch.distributed.pipelining``
schedule across the stages (``parallel.pipeline_schedule``), and phases 3-4 by zerostep's own pieces over
each stage's parameters:

1. the schedule runs forward and backward; the engine's loss function on the last stage returns
   ``loss * scale / GAS``, so the parameters' ``.grad`` hold the scaled, summed micro-batch gradients;
2. each group's gradient is packed into its flat buffer (``FlatLayout.concat``); a tied module's copies
   (``TiedLayerSpec``) sum theirs over the stages holding them;
3. ``core.reducers``: all-reduce (ZeRO stage 0) or reduce-scatter (stage 1) over the stage's
   data-parallel group;
4. ``core.step``'s graph A gives the squared norm over the data-parallel group; one more all-reduce over
   the pipe group sums it over the stages (a tied module counted once, by its lowest stage) together with
   the loss, which only the last stage has. Every stage then decides finite-or-skip and the clip factor
   from the same global norm, and runs graph B (unscale, clip, optimizer update in place, parameter
   all-gather at stage 1).

Parameters are grouped by layer (``"3"``) and tied module (``"tied_modules.<key>"``): a group has the
same name and layout at every stage count, so states and checkpoints move between pipeline layouts by
group. The module's parameters are views of the state's compute-dtype buffers (as ``core.module_binding``
does for the plain engine), so the schedule's forward reads the live weights.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import optree
import torch
import torch.distributed as dist

from zerostep import optim
from zerostep.core.batching import to_device
from zerostep.core.config import Config
from zerostep.core.pipeline_module import PipelineModule
from zerostep.core.precision import (
    LossScaleError,
    compute_dtype_of,
    loss_scale_init,
    loss_scale_update,
)
from zerostep.core.reducers import make_reduce_scatter
from zerostep.core.state import (
    FlatParams,
    Metrics,
    TrainState,
    check_not_consumed,
    empty_metrics,
    mark_consumed,
)
from zerostep.core.step import (
    gather_params,
    make_apply_update,
    make_norm_and_loss,
    param_rows,
    plan_of_config,
)
from zerostep.parallel import pipeline_schedule as schedules
from zerostep.parallel.flat import FlatLayout
from zerostep.parallel.groups import device_for_backend
from zerostep.parallel.pipeline import all_reduce_over_pipe

# optimizers that need more than flat shards (per-parameter trust ratios, whole matrices, compression)
_UNSUPPORTED_OPTIMIZERS = ("lamb", *optim.PER_PARAMETER_TYPES, *optim.COMPRESSED_OPTIMIZER_TYPES)


def check_pipeline_features(cfg: Config) -> None:
    """Config features the plain engine has and the pipeline engine does not: an error where they would
    change the training, a warning where they only observe it."""
    zero = cfg.zero_optimization
    changes = {
        "zero_optimization.offload_optimizer / offload_param": (
            zero.offload_optimizer is not None or zero.offload_param is not None
        ),
        "torch_autocast": cfg.torch_autocast.enabled,
        "progressive_layer_drop": cfg.progressive_layer_drop.enabled,
        "curriculum_learning": cfg.curriculum_learning.enabled,
        "sequence_parallel_size > 1": cfg.sequence_parallel_size > 1,
    }
    on = [name for name, enabled in changes.items() if enabled]
    if on:
        raise NotImplementedError(f"{', '.join(on)} with pipeline parallelism: not implemented by zerostep")
    observers = {
        "activation_checkpointing.checkpoint_units (use activation_checkpoint_interval)": (
            cfg.activation_checkpointing.checkpoint_units
        ),
        "wall_clock_breakdown": cfg.wall_clock_breakdown,
        "memory_breakdown": cfg.memory_breakdown,
        **{name: getattr(getattr(cfg, name), "enabled", False) for name in _MONITORS},
    }
    for name, enabled in observers.items():
        if enabled:
            warnings.warn(f"{name} has no effect with pipeline parallelism in zerostep", stacklevel=4)


_MONITORS = ("tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler", "comms_logger")


def group_of(name: str) -> str:
    """A parameter's flat group: its layer (``"3.weight"`` -> ``"3"``) or tied module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "tied_modules" else parts[0]


def split_config(
    config: Config | dict | str | os.PathLike, dp_size: int
) -> tuple[Config, schedules.PipelineOptions]:
    """zerostep's Config (batch triple resolved over the data-parallel ranks) and the pipeline block."""
    if isinstance(config, Config):
        return config, schedules.PipelineOptions()
    if isinstance(config, (str, os.PathLike)):
        from zerostep.core.config.load import read_config_file

        config = read_config_file(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a Config, a dict or a path, got {type(config).__name__}")
    raw = dict(config)
    options = schedules.parse_pipeline_block(raw.pop("pipeline", None))
    return Config.from_dict(raw, world_size=dp_size), options


class PipelineEngine:
    """The functional pipeline engine: ``init``, ``step``, ``eval_step``, ``full_params``, ``save``,
    ``load``."""

    def __init__(
        self, module: PipelineModule, config: Config | dict | str | os.PathLike, *, compile: bool = False
    ):
        if not isinstance(module, PipelineModule):
            raise TypeError(f"PipelineEngine needs a PipelineModule, got {type(module).__name__}")
        self.module, self.mesh = module, module.mesh
        self.config, self.options = split_config(config, self.mesh.dp_size)
        cfg, mesh = self.config, self.mesh
        if cfg.world_size != mesh.dp_size:
            raise ValueError(
                f"config was resolved for {cfg.world_size} data-parallel ranks but each stage has "
                f"{mesh.dp_size}"
            )
        if self.options.stages is not None and self.options.stages != module.num_stages:
            raise ValueError(
                f"pipeline.stages = {self.options.stages} but the PipelineModule has {module.num_stages}"
            )
        if self.options.activation_checkpoint_interval > 0:  # DeepSpeed: the config's overrides the module's
            module.set_checkpoint_interval(self.options.activation_checkpoint_interval)
        self.is_last = module.num_stages * module.stages_per_rank - 1 in module.virtual_stages
        self.is_first = 0 in module.virtual_stages
        if module.loss_fn is None:
            raise ValueError(
                "PipelineModule(loss_fn=...) is required to train: the last stage computes "
                "loss_fn(outputs, labels)"
            )
        check_pipeline_features(cfg)
        stage = int(cfg.zero_optimization.stage)
        if stage > 1:
            raise NotImplementedError(
                f"zero_optimization.stage = {stage} with pipeline parallelism: zerostep (like DeepSpeed) "
                "pipelines with ZeRO stages 0 and 1"
            )
        if cfg.data_efficiency.data_routing.random_ltd.enabled:
            raise NotImplementedError(
                "data_efficiency.data_routing.random_ltd is not implemented with pipeline parallelism"
            )
        if cfg.optimizer is None:
            raise ValueError(
                'config has no "optimizer" block; add one, e.g. {"type": "AdamW", "params": {"lr": 1e-3}}'
            )
        if cfg.optimizer.type in _UNSUPPORTED_OPTIMIZERS:
            raise NotImplementedError(
                f"optimizer {cfg.optimizer.type!r} is not implemented with pipeline parallelism"
            )
        schedules.check_layout(self.options.schedule, module.stages_per_rank, module.virtual_style)
        self.compile = compile
        self.device = device_for_backend()
        self.compute_dtype = compute_dtype_of(cfg)
        module.to(self.device)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"stage {mesh.stage_id} holds no trainable parameters")
        by_group: dict[str, list[tuple[str, torch.Size]]] = {}
        for name, p in trainable:
            by_group.setdefault(group_of(name), []).append((name, p.shape))
        self.layouts = {g: FlatLayout.build(e, self.compute_dtype, mesh.dp_size) for g, e in by_group.items()}
        self._params = dict(trainable)
        self.replicated_groups = {group_of(n) for n in module.replicated_names()}
        self.plan = plan_of_config(cfg, self.layouts, world_size=mesh.dp_size, rank=mesh.dp_rank)
        self.optimizer = optim.from_config(cfg.optimizer)
        self.lr_at = optim.lr_schedule(cfg.scheduler, self.optimizer.lr)
        self._reducer = make_reduce_scatter(self.plan, mesh.dp_group, False)
        self._norm_and_loss = make_norm_and_loss(self.plan, mesh.dp_group, compile)
        self._apply_update = make_apply_update(self.plan, self.optimizer, mesh.dp_group, compile)
        self._chunks = module.chunks()
        # torch's stages infer shapes at the first step; the schedule checks its arguments now
        self._schedule = self._build(self._loss) if module.num_stages * module.stages_per_rank > 1 else None
        self._eval_schedule = None
        self._scale: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ state

    def init(self, seed: int = 0) -> TrainState:
        """A fresh state from the module's current values (each stage's data-parallel rank 0's)."""
        values = {n: p.detach() for n, p in self._params.items()}
        master, flats = {}, {}
        for g, layout in self.layouts.items():
            full = layout.flatten({n: values[n] for n in layout.names}, dtype=self.plan.master_dtype).to(
                self.device
            )
            if self.mesh.dp_group is not None:
                dist.broadcast(full, src=self.mesh.dp_ranks[0], group=self.mesh.dp_group)
            master[g], flats[g] = self._buffers(layout, full)
        return self.bind(self.state_from(master, flats, seed=seed))

    def _buffers(self, layout: FlatLayout, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        shard = layout.shard(full, plan.rank).clone() if plan.sharded_master else full
        if plan.params_alias_master:
            return shard, shard
        return shard, (shard if plan.params_match_master else full).to(self.compute_dtype)

    def state_from(self, master: dict, flats: dict, opt_state: Any = None, seed: int = 0) -> TrainState:
        return TrainState(
            step=torch.tensor(0, dtype=torch.int64),
            skipped_steps=torch.tensor(0, dtype=torch.int64),
            seed=torch.tensor(int(seed), dtype=torch.int64),
            params=FlatParams(flats, dict(self.layouts), sharded=False),
            master=master,
            opt_state=self.optimizer.init(master) if opt_state is None else opt_state,
            scaler=loss_scale_init(self.config.fp16),
            metrics=empty_metrics(),
        )

    def bind(self, state: TrainState) -> TrainState:
        """Point the module's parameters at ``state``'s compute-dtype buffers (views; steps update them)."""
        for g, flat in state.params.flats.items():
            layout = self.layouts[g]
            for name, view in zip(layout.names, layout.split(flat)):
                self._params[name].data = view
        self._bound = {g: weakref.ref(t) for g, t in state.params.flats.items()}
        return state

    # ------------------------------------------------------------------ step

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        # the schedule's loss: runs on the last stage once per micro-batch, before its backward
        loss = self.module.loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"PipelineModule.loss_fn must return a scalar tensor, got {type(loss).__name__}")
        self._losses.append(loss.detach().float())
        return loss.float() * (self._scale / self.plan.accumulation_steps)

    def _build(self, loss_fn: Any) -> Any:
        module = self.module
        total = module.num_stages * module.stages_per_rank
        name = self.options.schedule if loss_fn is not None else self._eval_schedule_name()
        n = self.plan.accumulation_steps
        return schedules.build_schedule(
            name, self._chunks, module.virtual_stages, total, self.device, self.mesh.pipe_group, n, loss_fn
        )

    def _eval_schedule_name(self) -> str:
        """A forward-only schedule for this layout: GPipe, or interleaved 1F1B for looped stages (torch's
        zero-bubble schedules cannot run without backward)."""
        if self.module.stages_per_rank == 1:
            return "gpipe"
        if self.module.virtual_style == "v":
            raise NotImplementedError(
                "eval on a V-shaped pipeline (virtual_style='v'): torch.distributed.pipelining has no "
                "forward-only schedule for it; evaluate with a looped layout"
            )
        return "interleaved_1f1b"

    def check_batch(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, labels)`` with ``MB x GAS`` rows each; the first stage needs the inputs, the last the
        labels (a middle stage may pass ``None``)."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("a pipeline batch is (inputs, labels); inputs a tensor or a tuple of tensors")
        want = self.plan.micro_batch_size * self.plan.accumulation_steps
        inputs, labels = batch
        for what, part, needed in (("inputs", inputs, self.is_first), ("labels", labels, self.is_last)):
            if part is None:
                if needed:
                    raise ValueError(
                        f"this rank runs the {'first' if what == 'inputs' else 'last'} stage: "
                        f"its batch needs {what}"
                    )
                continue
            for leaf in optree.tree_leaves(part):
                if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != want):
                    raise ValueError(
                        f"batch {what} have shape {tuple(leaf.shape)}; the leading dimension must be "
                        f"train_micro_batch_size_per_gpu x gradient_accumulation_steps = "
                        f"{self.plan.micro_batch_size} x {self.plan.accumulation_steps} = {want}"
                    )
        return to_device(inputs, self.device, self.compute_dtype), to_device(
            labels, self.device, self.compute_dtype
        )

    def _run_schedule(self, inputs: Any, labels: Any) -> None:
        """Forward and backward of every micro-batch; leaves the scaled summed gradients in ``.grad``."""
        if self.module.num_stages * self.module.stages_per_rank == 1:
            n = self.plan.accumulation_steps
            xs = (
                inputs.tensor_split(n)
                if isinstance(inputs, torch.Tensor)
                else list(zip(*(t.tensor_split(n) for t in inputs)))
            )
            for x, y in zip(xs, _split(labels, n)):
                self._loss(self._chunks[0](*(x if isinstance(x, tuple) else (x,))), y).backward()
            return
        args = () if not self.is_first else (inputs if isinstance(inputs, tuple) else (inputs,))
        kwargs = {"target": labels, "losses": []} if self.is_last else {}
        self._schedule.step(*args, **kwargs)

    def step(self, state: TrainState, batch: Any) -> TrainState:
        """One optimizer step over ``GAS`` micro-batches of ``(inputs, labels)``. Consumes ``state``."""
        check_not_consumed(state, "engine.step")
        self._check_not_aborted()
        inputs, labels = self.check_batch(batch)
        plan, mesh = self.plan, self.mesh
        step, skipped = int(state.step), int(state.skipped_steps)
        lr = torch.as_tensor(self.lr_at(step - skipped - 1), dtype=torch.float32, device=self.device)
        self._scale = state.scaler.scale.to(self.device)
        self._losses = []
        for p in self._params.values():
            p.grad = None
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((int(state.seed) * 1_000_003 + step * 7_919 + mesh.rank) % (2**63 - 1))
                self._run_schedule(inputs, labels)
        except BaseException as error:
            self._abort(error)
            raise
        grads = {g: lay.concat([self._grad(n) for n in lay.names]) for g, lay in self.layouts.items()}
        for p in self._params.values():
            p.grad = None
        for key, (_, group) in mesh.tie_groups.items():  # a tied module's copies sum their gradients
            if group is not None:
                dist.all_reduce(grads[f"tied_modules.{key}"], group=group)
        self._reducer.reset()
        self._reducer.add(grads, True)
        reduced = self._reducer.result()
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        # the last GAS values: a schedule's first step may also run the loss in its shape inference
        losses = self._losses[-plan.accumulation_steps :] if self.is_last else []
        loss_sum = torch.stack(losses).sum() if losses else zero
        counted = {g: t for g, t in reduced.items() if g not in self.replicated_groups}
        if counted:
            sumsq, loss, _ = self._norm_and_loss(counted, loss_sum)
        else:  # only copies of tied modules a lower stage counts
            sumsq, loss = zero, self._mean_loss(loss_sum)
        totals = all_reduce_over_pipe(torch.stack([sumsq, loss]), mesh)
        sumsq, loss = totals[0], totals[1]
        applied = bool(torch.isfinite(sumsq).item())
        scaler = loss_scale_update(state.scaler, not applied, self.config.fp16)
        if int(scaler.min_scale_overflows) > int(state.scaler.min_scale_overflows):
            raise LossScaleError(
                f"step {step}: fp16 gradients overflowed at min_loss_scale; the state is unchanged"
            )
        if applied:
            flats = state.params.flats
            rows = None if plan.params_match_master else param_rows(plan, flats)
            self._apply_update(
                reduced, state.master, state.opt_state, flats, sumsq, self._scale, lr, None, rows
            )
            if rows is not None:
                gather_params(plan, flats, mesh.dp_group)
        metrics = Metrics(
            loss=loss.detach().float().cpu(),
            grad_norm=(torch.sqrt(sumsq) * plan.unscale(self._scale)).float().cpu(),
            lr=lr.cpu(),
            loss_scale=state.scaler.scale.clone(),
            skipped=torch.tensor(0 if applied else 1, dtype=torch.int64),
        )
        mark_consumed(state)
        return state.replace(
            step=state.step + 1,
            skipped_steps=state.skipped_steps + (0 if applied else 1),
            scaler=scaler,
            metrics=metrics,
        )

    def _abort(self, error: BaseException) -> None:
        """A step failed inside the schedule on this rank: its peers wait for activations or gradients
        that will not come, and fail at the pipeline groups' timeout (the default group's: see
        ``parallel.pipeline``) or at once when this process exits. The ranks are out of step for good, so
        this engine refuses further steps."""
        self._aborted = f"{type(error).__name__}: {error}"

    def _check_not_aborted(self) -> None:
        reason = getattr(self, "_aborted", None)
        if reason is not None:
            raise RuntimeError(
                f"this pipeline engine stopped when a step failed mid-schedule ({reason}); the ranks are "
                "out of step: resume from a checkpoint with a new engine"
            )

    def _mean_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        loss = loss_sum / self.plan.accumulation_steps
        if self.mesh.dp_group is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.mesh.dp_group)
        return loss / self.mesh.dp_size

    def _grad(self, name: str) -> torch.Tensor:
        p = self._params[name]
        return torch.zeros_like(p) if p.grad is None else p.grad

    # ------------------------------------------------------------------ evaluation

    def eval_step(self, state: TrainState, batch: Any, return_logits: bool = False) -> Any:
        """Mean loss over the ``GAS`` micro-batches of ``batch`` (on every rank), and with
        ``return_logits`` the last stage's outputs (``None`` elsewhere). No update."""
        check_not_consumed(state, "engine.eval_step")
        self._check_not_aborted()
        inputs, labels = self.check_batch(batch)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                outputs = self._forward_only(inputs)
        finally:
            self.module.train(was_training)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.is_last:
            n = self.plan.accumulation_steps
            parts = [self.module.loss_fn(o, y).float() for o, y in zip(_split(outputs, n), _split(labels, n))]
            loss = torch.stack(parts).sum()
        loss = all_reduce_over_pipe(self._mean_loss(loss).reshape(1), self.mesh)[0]
        return (loss, outputs if self.is_last else None) if return_logits else loss

    def _forward_only(self, inputs: Any) -> Any:
        if self.module.num_stages * self.module.stages_per_rank == 1:
            return self._chunks[0](*(inputs if isinstance(inputs, tuple) else (inputs,)))
        if self._eval_schedule is None:
            self._eval_chunks = self.module.chunks()
            chunks, self._chunks = self._chunks, self._eval_chunks
            try:
                self._eval_schedule = self._build(None)
            finally:
                self._chunks = chunks
        args = () if not self.is_first else (inputs if isinstance(inputs, tuple) else (inputs,))
        return self._eval_schedule.step(*args)

    # ------------------------------------------------------------------ checkpoints

    def save(
        self,
        state: TrainState,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
    ) -> str:
        """Every rank calls it: ``<save_dir>/<tag>/``, one file per stage (core/pipeline_checkpoint.py)."""
        from zerostep.core import pipeline_checkpoint

        check_not_consumed(state, "engine.save")
        return pipeline_checkpoint.save(self, state, save_dir, tag, client_state)

    def load(
        self, load_dir: str | os.PathLike, tag: str | None = None, *, load_optimizer_states: bool = True
    ) -> tuple[TrainState, dict, str]:
        """(state, client_state, folder) from a pipeline checkpoint saved at any stage count or data-parallel
        size with the same layers (default tag: ``latest``)."""
        from zerostep.core import pipeline_checkpoint

        return pipeline_checkpoint.load(self, load_dir, tag, load_optimizer_states)

    # ------------------------------------------------------------------ parameters

    def full_params(self, state: TrainState) -> dict[str, torch.Tensor]:
        """This stage's fp32 parameters by name (gathered over its data-parallel group at stage 1)."""
        check_not_consumed(state, "engine.full_params")
        out = {}
        for g, layout in self.layouts.items():
            master = state.master[g].float()
            if self.plan.sharded_master:
                from zerostep.parallel.collectives import all_gather_flat

                master = all_gather_flat(master, self.mesh.dp_group)
            out.update(layout.unflatten(master))
        return {n: t.clone() for n, t in out.items()}


def _split(value: Any, n: int) -> list[Any]:
    """``value`` (a tensor or tuple of tensors) as ``n`` micro-batches along dim 0."""
    if isinstance(value, torch.Tensor):
        return list(value.tensor_split(n))
    if isinstance(value, (tuple, list)):
        return [tuple(p) for p in zip(*(_split(v, n) for v in value))]
    return [value] * n
