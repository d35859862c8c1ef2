"""``DeepSpeedEngine``: DeepSpeed's imperative engine as a thin facade over ``zerostep.core``.

A DeepSpeed script drives ``engine(x)``, ``engine.backward(loss)``, ``engine.step()``; here those run the
functional engine's own phases a call at a time (``core/micro_steps.py``) over one held ``TrainState``, so
both APIs give the same results for the same inputs. The weights users see are live: the module's
parameters are views of the state's buffers (``core/module_binding.py``; at stage 3, DeepSpeed's
placeholders plus ``zerostep.zero.GatheredParameters``).

Counters follow DeepSpeed: ``micro_steps`` counts ``step()`` calls, ``global_steps`` optimizer steps
(skipped ones included), ``skipped_steps`` fp16 overflows, ``global_samples`` += ``train_batch_size`` at
each boundary. The LR of each parameter group is read from ``optimizer.param_groups`` at the boundary, so
a config scheduler, a client scheduler or a script writing ``group["lr"]`` all take effect at the next
update; schedulers step after applied updates only, as DeepSpeed's do.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from torch import nn

from zerostep.core.autocast import facade_autocast
from zerostep.core.batching import to_device
from zerostep.core.hybrid_engine import HybridEngine
from zerostep.core.micro_steps import MicroSteps
from zerostep.core.monitoring import EngineTimers, MonitorMaster, ThroughputTimer, log_rank0, progress_line
from zerostep.core.monitoring.comms_logger import note_comms_logger
from zerostep.core.monitoring.events import step_events, timer_events
from zerostep.core.monitoring.memory import memory_line
from zerostep.core.monitoring.profile_step import StepProfile
from zerostep.core.monitoring.timed_reducer import TimedReducer
from zerostep.core.monitoring.timers import format_timers
from zerostep.core.param_groups import ParamGroup
from zerostep.core.random_ltd import SchedulerView
from zerostep.core.state import TrainState
from zerostep.runtime.data_pipeline.data_sampling.engine_api import DataSamplingMethods


class DeepSpeedEngine(DataSamplingMethods, nn.Module):
    """``engine(*args, **kwargs)``, ``backward(loss)``, ``step()`` and DeepSpeed's engine surface."""

    def __init__(
        self,
        core: Any,
        state: TrainState,
        optimizer: Any,
        lr_scheduler: Any,
        training_dataloader: Any,
        frozen_group: int | None,
    ) -> None:
        super().__init__()
        self.module = core.model
        self._core = core
        self._stepper = MicroSteps(core, state)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_dataloader = training_dataloader
        self._frozen_group = frozen_group  # index of the lr-0 group of parameters no group named
        self._betas0 = _betas(optimizer.param_groups[0])
        self._warned_betas = False
        self.micro_steps = 0
        self.global_samples = 0
        self._boundary_override: bool | None = None
        self._step_applied = False
        self._gas = int(core.plan.accumulation_steps)
        self._init_monitoring()
        self._hybrid = HybridEngine.of(core, self._generation_state)  # hybrid_engine.enabled, else None

    def _init_monitoring(self) -> None:
        """DeepSpeed's ``tput_timer``, ``timers`` (None unless ``wall_clock_breakdown``: then no timer
        exists and no phase touches one) and ``monitor`` (``engine.monitor.write_events``)."""
        core, breakdown = self._core, bool(self._core.config.wall_clock_breakdown)
        self.tput_timer = ThroughputTimer(
            self.train_batch_size(),
            steps_per_output=self.steps_per_print(),
            logging_fn=lambda line: log_rank0(line, core.mesh.world_rank),
            synchronize=breakdown,
            device=core.device,
        )
        self.timers = EngineTimers(core.device) if breakdown else None
        if self.timers is not None:
            core._reducer = TimedReducer(core._reducer, self.timers)
        self.monitor = MonitorMaster(core.config, core.mesh.world_rank)
        flops = core.config.flops_profiler  # DeepSpeed's engine.flops_profiler; None when off
        self._profile = StepProfile(flops, self.module, self, core.rank) if flops.enabled else None
        self.flops_profiler = None if self._profile is None else self._profile.profiler
        note_comms_logger(core.config, bool(core.compile))  # DeepSpeed's engine configures deepspeed.comm

    def get_wall_clock_timers(self) -> dict[str, float]:
        """The last micro-step's and accumulation window's timers, ms by DeepSpeed's names ({} when
        ``wall_clock_breakdown`` is off)."""
        return {} if self.timers is None else self.timers.as_dict()

    # ------------------------------------------------------------------ module pass-through

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        module = self.__dict__.get("_modules", {}).get("module")
        if module is not None and name != "module":
            try:
                return getattr(module, name)
            except AttributeError:
                pass
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # ------------------------------------------------------------------ identity

    @property
    def config(self) -> Any:
        """The model's own ``config`` where it has one (Hugging Face), else zerostep's Config."""
        module_config = getattr(self.module, "config", None)
        return module_config if module_config is not None else self._core.config

    @property
    def device(self) -> torch.device:
        return self._core.device

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def global_rank(self) -> int:
        return self._core.mesh.world_rank

    @property
    def world_size(self) -> int:
        """Every rank, as DeepSpeed's; ``dp_world_size`` counts the data-parallel ones."""
        return self._core.mesh.world_size

    @property
    def dp_world_size(self) -> int:
        """Ranks reading different samples: the world over ``sequence_parallel_size``."""
        return self._core.config.data_parallel_size

    @property
    def sequence_parallel_size(self) -> int:
        return self._core.config.sequence_parallel_size

    @property
    def seq_parallel_group(self) -> Any:
        """This rank's sequence-parallel group (None without sequence parallelism)."""
        return None if self._core.sequence is None else self._core.sequence.sp_group

    def get_sequence_parallel_group(self) -> Any:
        return self.seq_parallel_group

    @property
    def seq_dp_world_size(self) -> int:
        """The sequence-and-data-parallel group gradients are reduced over: every rank, or under AutoTP the
        ranks of this tensor-parallel rank (parallel/mesh.sequence_tensor_layout)."""
        return self._core.world_size

    @property
    def _dp_rank(self) -> int:
        # the engine's rank counts data-parallel replicas under AutoTP / mpu, every rank otherwise
        return self._core.rank // self.sequence_parallel_size

    @property
    def state(self) -> TrainState:
        """The live functional state (``zerostep.core``'s ``TrainState``)."""
        return self._stepper.state

    @property
    def global_steps(self) -> int:
        return int(self._stepper.state.step)

    @property
    def skipped_steps(self) -> int:
        return int(self._stepper.state.skipped_steps)

    def train_batch_size(self) -> int:
        return self.train_micro_batch_size_per_gpu() * self._gas * self.dp_world_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self._core.plan.micro_batch_size)

    def gradient_accumulation_steps(self) -> int:
        return self._gas

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """Change the global batch by changing gradient accumulation (micro-batch stays), as DeepSpeed."""
        per_step = self.train_micro_batch_size_per_gpu() * self.dp_world_size
        if train_batch_size % per_step != 0 or train_batch_size <= 0:
            raise ValueError(
                f"train_batch_size {train_batch_size} is not a positive multiple of "
                f"micro_batch x data-parallel world size = {per_step}"
            )
        if self._stepper.pending_backwards:
            raise RuntimeError("set_train_batch_size() inside an accumulation window; call it after step()")
        self._gas = self._stepper.gas = train_batch_size // per_step

    def zero_optimization_stage(self) -> int:
        return int(self._core.plan.stage)

    def zero_optimization(self) -> bool:
        return self.zero_optimization_stage() > 0

    def fp16_enabled(self) -> bool:
        return bool(self._core.config.fp16.enabled)

    def bfloat16_enabled(self) -> bool:
        return bool(self._core.config.bf16.enabled)

    def steps_per_print(self) -> int:
        return int(self._core.config.steps_per_print)

    def gradient_clipping(self) -> float:
        return float(self._core.config.gradient_clipping)

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_mom(self) -> list[Any]:
        return [g.get("betas", g.get("momentum")) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        norm = self._stepper.state.metrics.grad_norm
        return None if torch.isnan(norm) else float(norm)

    def get_pld_theta(self) -> float | None:
        """Progressive layer drop's keep probability for the next forward (None when PLD is off)."""
        schedules = self._core.schedules
        return None if schedules is None else schedules.theta(self.global_steps)

    def random_ltd_enabled(self) -> bool:
        return self._core.random_ltd is not None

    @property
    def random_ltd_scheduler(self) -> SchedulerView | None:
        """DeepSpeed's scheduler read-outs (current kept-token count, consumed layer tokens)."""
        ltd = self._core.random_ltd
        return None if ltd is None else SchedulerView(ltd, self._random_ltd_steps)

    def _random_ltd_steps(self) -> tuple[int, bool]:
        """(global_steps, whether a forward of that step has run), for the scheduler's read-outs."""
        stepper = self._stepper
        return self.global_steps, bool(stepper.forward_pending or stepper.pending_backwards)

    def random_ltd_initialize(self) -> None:
        """Bind the converted layers of ``self.module`` (``convert_to_random_ltd(engine, ...)`` calls it)."""
        if self._core.random_ltd is None:
            raise RuntimeError(
                "random_ltd_initialize: data_efficiency.data_routing.random_ltd is not enabled in the config"
            )
        self._core.random_ltd.bind(self.module)

    def was_step_applied(self) -> bool:
        return self._step_applied

    # ------------------------------------------------------------------ the loop

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        # an autocast the caller entered: DeepSpeed's rule (core/autocast.py)
        outer = facade_autocast(self._core.autocast, self._core.device)
        with outer if outer is not None else contextlib.nullcontext():
            if self._profile is None:
                return self._forward(inputs, kwargs)
            with self._profile.phase("forward", self.global_steps):
                return self._forward(inputs, kwargs)

    def _forward(self, inputs: tuple, kwargs: dict) -> Any:
        core = self._core
        inputs = to_device(inputs, core.device, core.compute_dtype)
        kwargs = to_device(kwargs, core.device, core.compute_dtype)
        if self.training_dataloader is None:
            self.tput_timer.start()
        timers = self.timers
        if timers is None:
            return self._stepper.forward(inputs, kwargs)
        timers.start(timers.FORWARD)
        try:
            return self._stepper.forward(inputs, kwargs)
        finally:
            timers.stop(timers.FORWARD)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``generate`` on the engine's current weights, in eval mode under no_grad, with
        ZeRO-3 shards gathered for the call (``hybrid_engine``, core/hybrid_engine.py); without the
        hybrid engine, the module's own ``generate`` as it is."""
        if self._hybrid is None:
            return self.module.generate(*args, **kwargs)
        return self._hybrid.generate(*args, **kwargs)

    def _generation_state(self) -> TrainState:
        if self.zero_optimization_stage() == 3 and self._stepper.forward_pending:
            raise RuntimeError(
                "generate() between engine(x) and engine.backward(loss) at ZeRO stage 3: the forward's "
                "gathered parameters are still in use; generate before the forward or after the backward"
            )
        return self._stepper.state

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self._gas == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self._boundary_override = bool(is_boundary)

    def backward(
        self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True
    ) -> torch.Tensor:
        """Scaled backward of ``loss`` (fp16 scale, 1/GAS), gradients accumulated and reduced by the
        engine; returns ``loss / GAS`` as DeepSpeed does."""
        timers = self.timers
        if timers is not None:
            timers.start(timers.BACKWARD)
            timers.start(timers.BACKWARD_INNER)
        boundary = self.is_gradient_accumulation_boundary()
        try:
            if self._profile is None:
                self._stepper.backward(loss, boundary, scale_wrt_gas=scale_wrt_gas, retain_graph=retain_graph)
            else:
                with self._profile.phase("backward", self.global_steps):
                    self._stepper.backward(
                        loss, boundary, scale_wrt_gas=scale_wrt_gas, retain_graph=retain_graph
                    )
        finally:
            if timers is not None:
                timers.stop_if_running(timers.BACKWARD_INNER)
                timers.stop(timers.BACKWARD)
        return loss.detach() / self._gas if scale_wrt_gas else loss.detach()

    def step(self, lr_kwargs: dict | None = None) -> None:
        """The update at the accumulation boundary; elsewhere only counts the micro-step."""
        boundary = self.is_gradient_accumulation_boundary()
        timers = self.timers
        if timers is not None:
            timers.start(timers.STEP)
        try:
            if self._profile is None:
                self._step(boundary, lr_kwargs)
            else:
                with self._profile.phase("step", self.global_steps):
                    self._step(boundary, lr_kwargs)
        finally:
            if timers is not None:
                timers.stop(timers.STEP)
        self.tput_timer.stop(global_step=boundary, report_speed=timers is not None)
        if boundary and self.monitor.enabled:
            self._write_step_events()
        if timers is not None:
            self._report_timers(boundary)
        if boundary and self._profile is not None:
            self._profile.finish()  # at the profiled step's boundary: print and end the profile
        self.micro_steps += 1

    def _step(self, boundary: bool, lr_kwargs: dict | None) -> None:
        if boundary:
            self._take_model_step(lr_kwargs)
        elif not self._stepper.pending_backwards:
            raise RuntimeError("engine.step() without engine.backward(loss) since the last step()")

    def _write_step_events(self) -> None:
        """DeepSpeed's Train/Samples/{train_loss, lr, loss_scale} at ``global_samples``."""
        state = self._stepper.state
        scale = float(state.scaler.scale) if self.fp16_enabled() else None
        self.monitor.write_events(
            step_events(self.global_samples, float(state.metrics.loss), self.get_lr()[0], scale)
        )

    def _report_timers(self, boundary: bool) -> None:
        """Read the timers after each ``step()``; on rank 0 every ``steps_per_print`` optimizer steps,
        DeepSpeed's micro-step and global ``time (ms) | ...`` lines; timer events to the monitors."""
        timers = self.timers
        timers.end_micro_step(boundary)
        if not boundary:
            return
        if self.monitor.enabled:
            self.monitor.write_events(timer_events(timers.window, self.global_samples))
        if self.global_rank == 0 and self.global_steps % self.steps_per_print() == 0:
            print(format_timers(timers.micro), flush=True)
            print(format_timers(timers.window), flush=True)

    def _take_model_step(self, lr_kwargs: dict | None) -> None:
        groups = self.optimizer.param_groups
        lrs = [float(g["lr"]) for g in groups]
        if self._frozen_group is not None:
            lrs.append(0.0)
        core = self._core
        options = core.group_options
        if options is not None:
            wds = [float(g.get("weight_decay", 0.0)) for g in groups]
            if self._frozen_group is not None:
                wds.append(0.0)
            if options.weight_decays_changed(wds) or not options.update_lrs(lrs):
                core.rebuild_optimizer(lrs)
        result = self._stepper.apply(max(lrs) if options is not None else lrs[0], self._beta1(groups[0]))
        self._step_applied = bool(result.applied)
        if self._step_applied and self.lr_scheduler is not None:
            torch_opt = getattr(self.lr_scheduler, "optimizer", None)
            if torch_opt is not None:
                torch_opt._opt_called = True  # torch's schedulers check that optimizer.step() ran
            try:
                self.lr_scheduler.step(**(lr_kwargs or {}))
            except TypeError:
                self.lr_scheduler.step(self.train_batch_size())  # DeepSpeed's fallback for Megatron's
        self.global_samples += self.train_batch_size()
        if self.global_steps % self.steps_per_print() == 0:
            line = progress_line(self.global_steps, self.skipped_steps, self.get_lr(), self.get_mom())
            log_rank0(line, self.global_rank)
            if core.config.memory_breakdown:
                print(memory_line(self.global_rank, self.global_steps, core.device), flush=True)

    def _beta1(self, group: dict[str, Any]) -> float | None:
        """A scheduler that cycles momentum (OneCycle) writes (beta1, 0.99) into betas: pass beta1."""
        betas = _betas(group)
        if betas is None or betas == self._betas0:
            return None
        if abs(betas[1] - 0.99) < 1e-12:
            return betas[0]
        if not self._warned_betas:
            warnings.warn(
                f"param_groups[0]['betas'] changed to {betas} at runtime; zerostep applies a runtime "
                "beta1 only with beta2 = 0.99 (DeepSpeed's OneCycle); this change has no effect",
                stacklevel=3,
            )
            self._warned_betas = True
        return None

    def deepspeed_io(
        self,
        dataset: Any,
        batch_size: int | None = None,
        route: str = "train",
        pin_memory: bool | None = None,
        data_sampler: Any = None,
        collate_fn: Any = None,
        num_local_io_workers: int | None = None,
    ) -> Any:
        """DeepSpeed's loader over ``dataset``: a sampler over the data-parallel ranks, micro-batches."""
        from zerostep.runtime.dataloader import make_dataloader

        config = self._core.config
        # the ranks of one sequence-parallel group read the same samples (each keeps its part of the sequence)
        if route != "train" and data_sampler is None and self.dp_world_size > 1:
            # evaluation and prediction read in order, as DeepSpeed's loader does off the train route
            data_sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.dp_world_size, rank=self._dp_rank, shuffle=False
            )
        if batch_size is not None and batch_size != config.train_micro_batch_size_per_gpu:
            raise ValueError(
                f"deepspeed_io(batch_size={batch_size}): zerostep's loader yields micro-batches of "
                f"train_micro_batch_size_per_gpu = {config.train_micro_batch_size_per_gpu}"
            )
        loader = make_dataloader(
            dataset,
            config,
            collate_fn,
            rank=self._dp_rank,
            world_size=self.dp_world_size,
            local_rank=self.local_rank,
            pin_memory=pin_memory,
            num_local_io_workers=num_local_io_workers,
            data_sampler=data_sampler,
            tput_timer=self.tput_timer,
            curriculum=route == "train",
        )
        if route == "train":
            self.training_dataloader = loader
        return loader

    def zero_grad(self) -> None:
        """DeepSpeed's ``zero_grad`` clears the module's ``.grad`` (the engine's own gradients are cleared
        after every update)."""
        for p in self.module.parameters():
            p.grad = None

    def destroy(self) -> None:
        """Release the engine's state and compiled functions (the module keeps its parameters); close
        the monitors (TensorBoard writer, wandb run)."""
        self._stepper.discard()
        self.monitor.close()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike,
        tag: str | None = None,
        client_state: dict | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
    ) -> bool:
        from zerostep.runtime.checkpoint import save_checkpoint

        return save_checkpoint(
            self, save_dir, tag, client_state or {}, save_latest, exclude_frozen_parameters
        )

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        custom_load_fn: Any = None,
    ) -> tuple[str | None, dict | None]:
        from zerostep.runtime.checkpoint import load_checkpoint

        return load_checkpoint(
            self,
            load_dir,
            tag,
            load_module_strict,
            load_optimizer_states,
            load_lr_scheduler_states,
            load_module_only,
            custom_load_fn,
        )

    def module_state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The module's live weights (stage 3: gathered, in compute dtype, on every rank)."""
        if self.zero_optimization_stage() == 3:
            from zerostep.zero import GatheredParameters

            with GatheredParameters(list(self.module.parameters())):
                return {k: v.clone() for k, v in self.module.state_dict(prefix=prefix).items()}
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _counters(self) -> dict[str, Any]:
        return {
            "global_samples": self.global_samples,
            "micro_steps": self.micro_steps,
            "gradient_accumulation_steps": self._gas,
            "optimizer": self.optimizer.state_dict()["param_groups"],
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }


def _betas(group: dict[str, Any]) -> tuple[float, float] | None:
    betas = group.get("betas")
    return None if betas is None else (float(betas[0]), float(betas[1]))


def frozen_group_spec(names: list[str]) -> ParamGroup:
    """Trainable parameters no optimizer group names: kept at lr 0, weight decay 0 (never updated), as
    DeepSpeed leaves parameters outside its optimizer untouched."""
    return ParamGroup(tuple(names), {"lr": 0.0, "weight_decay": 0.0})
