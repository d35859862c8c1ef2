"""DeepSpeed's imperative loop over the functional engine: forward, backward per micro-batch, apply.

``engine.step(state, batch)`` runs a whole optimizer step; DeepSpeed's scripts instead interleave their
own code between ``engine(x)``, ``engine.backward(loss)`` and ``engine.step()``. ``MicroSteps`` holds one
``TrainState`` and runs the same four phases as ``core/step.py``, one call at a time:

1. ``forward(args, kwargs)``: the user's module through ``torch.func.functional_call`` on views of
   autograd leaves that share storage with the state's flat buffers (stages 0-2), so the outputs are
   connected to autograd and the gradient of a group arrives as one flat buffer; stage 3 runs the module
   under ``parallel.zero3``'s gather/free hooks. Under ``no_grad`` (evaluation) no leaves are made.
2. ``backward(loss, boundary)``: gradients of ``loss * scale / GAS`` w.r.t. those leaves, handed to the
   engine's ``Reducer`` exactly as ``compose`` hands them (``add(grads, last=boundary)``), so the
   collectives, their overlap hooks and the accumulation are the functional step's own.
3. ``apply(lr, beta1)`` at the boundary: the engine's ``sharded_update`` and ``next_state``, as
   ``engine.step`` ends.

Because the phases are the engine's, N micro-steps here equal one ``engine.step`` on the concatenated
batch (tests/test_runtime_engine.py checks it at stages 0-3).
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from zerostep.core.autocast import under_autocast
from zerostep.core.compiling import compile_private
from zerostep.core.state import TrainState, check_not_consumed
from zerostep.core.step import UpdateResult


class MicroSteps:
    """One engine, one live state, stepped a micro-batch at a time (see the module docstring)."""

    def __init__(self, engine: Any, state: TrainState) -> None:
        self.engine = engine
        self.state = state
        self._leaves: dict[str, Any] | None = None  # this micro-step's autograd leaves
        self._zero3 = None  # stage 3: the runner's session of this micro-step
        self._losses: list[torch.Tensor] = []  # detached fp32 losses since the last update
        self.gas = int(engine.plan.accumulation_steps)  # backward divides by it (DeepSpeed's 1/GAS)
        engine._reducer.reset()
        plan = engine.plan
        call = under_autocast(_call_module, engine.autocast)  # torch_autocast (core/autocast.py)
        self._call_module = call
        if plan.stage < 3:
            # a private code object per engine: many engines in one process never share dynamo's cache
            self._call = compile_private(call, dynamic=None) if engine.compile_forward else call

    # ------------------------------------------------------------------ state

    def replace_state(self, state: TrainState) -> None:
        """Adopt ``state`` (e.g. after a load); pending micro-steps are dropped."""
        self.state = state
        self.discard()

    def discard(self) -> None:
        """Drop accumulated gradients and an unfinished forward (nothing was applied)."""
        self._leaves = None
        if self._zero3 is not None:
            self._zero3.close()
            self._zero3 = None
        self._losses.clear()
        self.engine._reducer.reset()

    @property
    def pending_backwards(self) -> int:
        """Backward passes accumulated since the last update."""
        return len(self._losses)

    @property
    def forward_pending(self) -> bool:
        return self._leaves is not None or self._zero3 is not None

    # ------------------------------------------------------------------ phases

    def forward(self, args: tuple, kwargs: dict) -> Any:
        check_not_consumed(self.state, "engine.forward")
        schedules = self.engine.schedules  # progressive layer drop, legacy curriculum
        if schedules is None and self.engine.random_ltd is None:
            return self._forward(args, kwargs)
        step = int(self.state.step)
        if schedules is not None:
            args, kwargs = schedules.cut(step, (args, kwargs))
        with self.engine._forward_kwargs(step):  # and random-LTD's kept-token count
            return self._forward(args, kwargs)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        engine = self.engine
        if engine.plan.stage == 3:
            return self._forward_zero3(args, kwargs)
        flats = self.state.params.flats  # waits for parameter gathers still in flight
        if not torch.is_grad_enabled():
            views = _views(engine.plan.layouts, flats)
            return self._call(engine.model, {**engine._constants, **views}, args, kwargs)
        if self._leaves is None:
            plan = engine.plan
            if plan.per_param_grads:
                self._leaves = {
                    g: [v.detach().requires_grad_(True) for v in plan.layouts[g].split(f)]
                    for g, f in flats.items()
                }
            else:
                self._leaves = {g: f.detach().requires_grad_(True) for g, f in flats.items()}
        views = _views(engine.plan.layouts, self._leaves)
        return self._call(engine.model, {**engine._constants, **views}, args, kwargs)

    def _forward_zero3(self, args: tuple, kwargs: dict) -> Any:
        engine = self.engine
        if not torch.is_grad_enabled():
            with engine._runner.session(self.state.params.flats, track_grads=False) as session:
                return session.run(lambda module: self._call_module(module, engine._constants, args, kwargs))
        if self._zero3 is None:
            self._zero3 = engine._runner.session(self.state.params.flats)
            self._zero3.__enter__()
        return self._zero3.run(lambda module: self._call_module(module, engine._constants, args, kwargs))

    def backward(
        self, loss: torch.Tensor, boundary: bool, *, scale_wrt_gas: bool = True, retain_graph: bool = False
    ) -> None:
        engine = self.engine
        if not self.forward_pending:
            raise RuntimeError(
                "engine.backward(loss) called without a forward since the last backward: run engine(x) "
                "(the engine's forward) for every micro-batch before its backward"
            )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"engine.backward: the loss must be a scalar tensor, got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                "engine.backward: the loss does not require grad; it must be computed from the outputs "
                "of the engine's forward (engine(x)) with gradients enabled"
            )
        scale = self.state.scaler.scale.to(engine.device)
        factor = scale / self.gas if scale_wrt_gas else scale
        scaled = loss.float().reshape(()) * factor
        if self._zero3 is not None:
            session, self._zero3 = self._zero3, None
            try:
                grads = session.grads(scaled, retain_graph=retain_graph)
            finally:
                session.close()
        else:
            leaves, self._leaves = self._leaves, None
            for g, hook in (engine._reducer.grad_hooks(boundary) or {}).items():
                if isinstance(leaves[g], torch.Tensor):
                    leaves[g].register_hook(hook)
            inputs = optree.tree_leaves(leaves)
            found = torch.autograd.grad(scaled, inputs, allow_unused=True, retain_graph=retain_graph)
            if all(d is None for d in found):
                raise ValueError(
                    "engine.backward: the loss does not depend on the model's parameters as the engine's "
                    "forward produced them; compute it from the outputs of engine(x)"
                )
            found = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, found)]
            grads = optree.tree_unflatten(optree.tree_structure(leaves), found)
        engine._reducer.add(grads, boundary)
        self._losses.append(loss.detach().float().reshape(()))

    def apply(self, lr: float | torch.Tensor, beta1: float | torch.Tensor | None = None) -> UpdateResult:
        """The update at the accumulation boundary; ``self.state`` becomes the next state."""
        engine, plan = self.engine, self.engine.plan
        if not self._losses:
            raise RuntimeError(
                "engine.step() at the gradient accumulation boundary without a backward since the last "
                "update: call engine.backward(loss) for each micro-batch first"
            )
        if self.forward_pending:
            self.discard_forward()
        state = self.state
        device = engine.device
        lr_t = torch.as_tensor(lr, dtype=torch.float32, device=device)
        beta1_t = None if beta1 is None else torch.as_tensor(beta1, dtype=torch.float32, device=device)
        # the update divides the summed loss by GAS: rescale when the caller ran another number
        loss_sum = torch.stack(self._losses).sum() * (plan.accumulation_steps / len(self._losses))
        self._losses.clear()
        scale = state.scaler.scale.to(device)
        flats = state.params.flats
        outcome: dict[str, Any] = {}  # the engine's loss-scale update runs before the first write
        try:
            result = engine._sharded_update(
                engine._reducer.result(),
                loss_sum,
                scale=scale,
                master=state.master,
                opt_state=state.opt_state,
                params=flats,
                lr=lr_t,
                beta1=beta1_t,
                before_write=engine._before_write(state, outcome),
            )
        except BaseException as error:
            engine._consume_if_written(state, outcome, error)
            raise
        finally:
            engine._reducer.reset()
        self.state = engine.next_state(state, result, lr_t, outcome["scaler"])
        return result

    def discard_forward(self) -> None:
        """A forward whose loss never went through backward (e.g. an evaluation with grad enabled)."""
        self._leaves = None
        if self._zero3 is not None:
            self._zero3.close()
            self._zero3 = None


def _views(layouts: dict, leaves: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor: views of each group's flat leaf, or its per-parameter leaves."""
    out = {}
    for g, leaf in leaves.items():
        pieces = layouts[g].split(leaf) if isinstance(leaf, torch.Tensor) else leaf
        out.update(zip(layouts[g].names, pieces))
    return out


def _call_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    return torch.func.functional_call(module, tensors, args, kwargs, strict=False)
