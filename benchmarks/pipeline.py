"""Pipeline parallelism on CPU (gloo): step time at pp=2 against pp=1, and the measured bubble against
the ideal ``(p - 1) / (m + p - 1)`` as the micro-batch count ``m`` (gradient_accumulation_steps) grows.

The model is ``--layers`` Linear+ReLU layers of ``--width``, partitioned uniformly. pp=1 runs it in one
process; pp=2 on 2 ranks, one thread each (pp=1 gets the same thread count as one pp=2 rank, so the
speed-up of pp=2 is what the pipeline buys from a second worker). For every GAS the engine's step
(schedule + update) is timed over ``--steps`` steps after a warm-up; the median is reported. The bubble
of a pp=2 rank is ``1 - busy / schedule time``, ``busy`` being the wall time spent inside its stage's
forward and backward (hooks on the stage module), so communication waits count as bubble.

    python benchmarks/pipeline.py                       # gpipe and 1f1b, GAS 1 2 4 8
    python benchmarks/pipeline.py --schedules 1f1b --gas 1 2 4 8 16 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.core.pipeline_engine import PipelineEngine
from zerostep.parallel.launch import spawn_ranks
from zerostep.pipe import LayerSpec, PipelineModule


def config(schedule: str, gas: int, mb: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "pipeline": {"schedule": schedule},
    }


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


class Busy:
    """Wall time inside a module's forward and backward (pre/post hooks)."""

    def __init__(self, module: nn.Module) -> None:
        self.total, self._start = 0.0, 0.0
        module.register_forward_pre_hook(lambda m, a: self._begin())
        module.register_forward_hook(lambda m, a, o: self._end())
        module.register_full_backward_pre_hook(lambda m, g: self._begin())
        module.register_full_backward_hook(lambda m, gi, go: self._end())

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.total += time.perf_counter() - self._start


def measure(num_stages: int, args: argparse.Namespace, schedule: str, gas: int) -> dict:
    torch.set_num_threads(1)
    specs = [s for _ in range(args.layers) for s in (LayerSpec(nn.Linear, args.width, args.width), nn.ReLU())]
    module = PipelineModule(
        specs, num_stages=num_stages, loss_fn=mse, seed_layers=True, partition_method="uniform"
    )
    engine = PipelineEngine(module, config(schedule, gas, args.mb))
    state = engine.init()
    g = torch.Generator().manual_seed(0)
    rows = args.mb * gas
    # inputs that require grad, so the first stage's full backward hooks time its whole backward
    inputs = torch.randn(rows, args.width, generator=g).requires_grad_(True)
    batch = (inputs, torch.randn(rows, args.width, generator=g))
    busy = Busy(engine._chunks[0])
    run = engine._run_schedule
    schedule_time = [0.0]

    def timed_schedule(inputs, labels):
        start = time.perf_counter()
        run(inputs, labels)
        schedule_time[0] += time.perf_counter() - start

    engine._run_schedule = timed_schedule
    steps, bubbles = [], []
    for i in range(args.warmup + args.steps):
        busy.total, schedule_time[0] = 0.0, 0.0
        start = time.perf_counter()
        state = engine.step(state, batch)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            steps.append(elapsed)
            bubbles.append(1.0 - busy.total / schedule_time[0])
    return {"step": statistics.median(steps), "bubble": statistics.median(bubbles)}


def pipelined(rank: int, world: int, args: argparse.Namespace) -> dict:
    out = {}
    for schedule in args.schedules:
        for gas in args.gas:
            if schedule != "gpipe" and gas < world:
                continue  # torch's 1F1B schedules need at least one micro-batch per stage
            out[(schedule, gas)] = measure(world, args, schedule, gas)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--gas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    single = {gas: measure(1, args, "1f1b", gas) for gas in args.gas}
    ranks = spawn_ranks(pipelined, 2, args, timeout=1800)
    p = 2
    print(
        f"{args.layers} x Linear({args.width}) + ReLU, micro-batch {args.mb}, 1 thread per rank, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'schedule':<10}{'GAS':>4}{'pp=1 ms':>10}{'pp=2 ms':>10}{'pp1/pp2':>9}"
        f"{'bubble r0':>11}{'bubble r1':>11}{'(p-1)/(m+p-1)':>15}"
    )
    for schedule in args.schedules:
        for gas in args.gas:
            if (schedule, gas) not in ranks[0]:
                continue
            one, r0, r1 = single[gas], ranks[0][(schedule, gas)], ranks[1][(schedule, gas)]
            two = max(r0["step"], r1["step"])
            ideal = (p - 1) / (gas + p - 1)
            print(
                f"{schedule:<10}{gas:>4}{one['step'] * 1e3:>10.1f}{two * 1e3:>10.1f}{one['step'] / two:>9.2f}"
                f"{r0['bubble']:>11.2f}{r1['bubble']:>11.2f}{ideal:>15.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
