"""The DeepSpeed facade against the functional step, side by side: ``engine(x); backward; step()`` vs
``state = engine.step(state, batch)`` on the same model, config and batches, at ZeRO stages 0-3.

Both are built on every rank and run round-robin in blocks of ``--block`` steps, so machine noise hits
both alike; reported is the median facade / functional step-time ratio per stage (1.00 = equal; the
issue's goal is <= 1.05) and, when DeepSpeed is installed, DeepSpeed's step over the facade's.

    python benchmarks/facade_step.py                   # MLP 4x1024, 1 and 2 ranks (gloo)
    python benchmarks/facade_step.py --model gpt --world-sizes 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import zerostep
from zerostep.core import Config, initialize
from zerostep.parallel.launch import spawn_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import make_case  # noqa: E402
from zero_step import ds_config  # noqa: E402


class Functional:
    def __init__(self, engine):
        self.engine, self.state = engine, engine.init()

    def step(self, batch):
        self.state = self.engine.step(self.state, batch)

    def sync(self):
        self.state.block_until_ready()


class Facade:
    """The DeepSpeed loop: one micro-batch per step (GAS 1), the loss computed by the script."""

    def __init__(self, model, loss_fn, cfg: dict, compile: bool):
        self.engine, *_ = zerostep.initialize(model=model, config=cfg, compile=compile)
        self.loss_fn = loss_fn

    def step(self, batch):
        loss = self.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()

    def sync(self):
        self.engine.state.block_until_ready()


class DeepSpeed:
    def __init__(self, model, loss_fn, cfg: dict):
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        self.loss_fn = loss_fn

    def step(self, batch):
        loss = self.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()


def bench_rank(rank: int, world: int, name: str, mb: int, steps: int, warmup: int, block: int, compile: bool):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    make_model, loss_fn, global_batch = make_case(name, mb * world)
    contenders = {}
    for stage in (0, 1, 2, 3):
        cfg = ds_config(stage, mb)
        core = initialize(
            make_model(), Config.from_dict(cfg, world_size=world), loss_fn=loss_fn, compile=compile
        )
        contenders[f"functional-{stage}"] = Functional(core)
        contenders[f"facade-{stage}"] = Facade(make_model(), loss_fn, cfg, compile)
    try:
        import deepspeed  # noqa: F401

        for stage in (0, 1, 2, 3):
            contenders[f"deepspeed-{stage}"] = DeepSpeed(make_model(), loss_fn, ds_config(stage, mb))
    except ImportError:
        pass

    def local(i):
        b = global_batch(i)
        pick = lambda t: t[rank * mb : (rank + 1) * mb] if isinstance(t, torch.Tensor) else t  # noqa: E731
        return {k: pick(v) for k, v in b.items()} if isinstance(b, dict) else tuple(pick(t) for t in b)

    for i in range(warmup):
        for c in contenders.values():
            c.step(local(i))
    names = list(contenders)
    times = {k: [] for k in names}
    for i in range(steps):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            for j in range(block):
                contenders[k].step(local(warmup + i * block + j))
            getattr(contenders[k], "sync", lambda: None)()
            times[k].append((time.perf_counter() - t0) / block)
    if world > 1:
        stacked = {k: torch.tensor(v) for k, v in times.items()}
        for v in stacked.values():
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
        times = {k: v.tolist() for k, v in stacked.items()}
    return {k: statistics.median(v) for k, v in times.items()}


def run_one_process(name, mb, steps, warmup, block, compile):
    """World size 1 in this process (no process group), as a one-GPU or laptop script runs."""
    return bench_rank(0, 1, name, mb, steps, warmup, block, compile)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    mb = 32 if args.model == "mlp" else 8
    for world in args.world_sizes:
        run = (args.model, mb, args.steps, args.warmup, args.block, not args.no_compile)
        med = run_one_process(*run) if world == 1 else spawn_ranks(bench_rank, world, *run, timeout=1800)[0]
        print(f"\n{args.model}, {world} rank(s): median step time, facade / functional (goal <= 1.05)")
        for stage in (0, 1, 2, 3):
            f, g = med[f"facade-{stage}"], med[f"functional-{stage}"]
            line = f"  stage {stage}: functional {1e3 * g:7.1f} ms   facade {1e3 * f:7.1f} ms"
            line += f"   ratio {f / g:5.3f}"
            ds = med.get(f"deepspeed-{stage}")
            if ds:
                line += f"   DeepSpeed {1e3 * ds:7.1f} ms ({ds / f:4.2f}x the facade's)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
