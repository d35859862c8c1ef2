"""What ``wall_clock_breakdown`` costs per step: the DeepSpeed facade and the functional step (with
``TrainMonitoring``'s whole-step timer) with the timers off and on, run round-robin in blocks so machine
noise hits both alike. Off, the engine holds no timer object and takes no timestamp; the "off" and "on"
medians show what the timers (and, on CUDA, their events and the synchronising reads) add.

    python benchmarks/monitoring_overhead.py                 # MLP, CPU or the local GPU
    python benchmarks/monitoring_overhead.py --model tiny --no-compile --steps 40   # overhead visible
    python benchmarks/monitoring_overhead.py --model gpt --no-compile
    python benchmarks/monitoring_overhead.py --model tiny --no-compile --baseline 41286dc  # vs a facade
                                             # from before the monitoring (git show REV:...engine.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import zerostep
from zerostep.core import Config, initialize
from zerostep.core.monitoring.train_loop import TrainMonitoring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import make_case  # noqa: E402


def tiny_case(batch: int):
    """A model whose step takes about a millisecond, so a per-step overhead in microseconds shows."""

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(8, batch, 16, generator=gen), torch.randn(8, batch, 1, generator=gen)
    return factory, lambda m, b: F.mse_loss(m(b[0]), b[1]), lambda i: (xs[i % 8], ys[i % 8])


def config(mb: int, breakdown: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,  # measure the timing, not the printing
        "wall_clock_breakdown": breakdown,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }


class Facade:
    def __init__(self, make_model, loss_fn, cfg, compile):
        self.engine, *_ = zerostep.initialize(model=make_model(), config=cfg, compile=compile)
        self.loss_fn = loss_fn

    def step(self, batch):
        self.engine.backward(self.loss_fn(self.engine, batch))
        self.engine.step()

    def sync(self):
        self.engine.state.block_until_ready()


def facade_at(rev: str) -> type:
    """``DeepSpeedEngine`` as ``zerostep/runtime/engine.py`` was at git revision ``rev`` (today's core)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    show = ["git", "show", f"{rev}:zerostep/runtime/engine.py"]
    source = subprocess.run(show, cwd=root, check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"facade_at_{rev}")
    exec(compile(source, f"{rev}:zerostep/runtime/engine.py", "exec"), module.__dict__)
    return module.DeepSpeedEngine


class Baseline(Facade):
    """The facade class from ``--baseline REV`` (built by today's ``zerostep.initialize``)."""

    engine_class: type | None = None

    def __init__(self, make_model, loss_fn, cfg, compile):
        import zerostep.runtime.initialize as init

        current, init.DeepSpeedEngine = init.DeepSpeedEngine, self.engine_class
        try:
            super().__init__(make_model, loss_fn, cfg, compile)
        finally:
            init.DeepSpeedEngine = current


class Functional:
    def __init__(self, make_model, loss_fn, cfg, compile):
        config = Config.from_dict(cfg)
        self.engine = initialize(make_model(), config, loss_fn=loss_fn, compile=compile)
        self.state = self.engine.init()
        self.watch = TrainMonitoring(config, 0, self.engine.device)
        self.samples = 0

    def step(self, batch):
        with self.watch.timing():
            self.state = self.engine.step(self.state, batch)
        self.samples += 1
        self.watch.after_step(self.state, self.samples)

    def sync(self):
        self.state.block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "mlp", "gpt"], default="mlp")
    parser.add_argument("--steps", type=int, default=20, help="blocks per contender")
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--baseline", help="also time the facade of this git revision (timers off)")
    args = parser.parse_args()
    mb = 32 if args.model == "mlp" else 8
    make_case_ = tiny_case if args.model == "tiny" else lambda b: make_case(args.model, b)
    make_model, loss_fn, global_batch = make_case_(mb)
    compile = not args.no_compile
    contenders = {
        f"{kind.__name__.lower()}-{'on' if on else 'off'}": kind(make_model, loss_fn, config(mb, on), compile)
        for kind in (Facade, Functional)
        for on in (False, True)
    }
    if args.baseline:
        Baseline.engine_class = facade_at(args.baseline)
        contenders["baseline-off"] = Baseline(make_model, loss_fn, config(mb, False), compile)
    for i in range(args.warmup):
        for c in contenders.values():
            c.step(global_batch(i))
    names = list(contenders)
    times = {k: [] for k in names}
    for i in range(args.steps):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            contenders[k].sync()
            t0 = time.perf_counter()
            for j in range(args.block):
                contenders[k].step(global_batch(args.warmup + i * args.block + j))
            contenders[k].sync()
            times[k].append((time.perf_counter() - t0) / args.block)
    med = {k: statistics.median(v) for k, v in times.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.model} on {device}, median step time, wall_clock_breakdown off vs on")
    for kind in ("facade", "functional"):
        off, on = med[f"{kind}-off"], med[f"{kind}-on"]
        print(
            f"  {kind:10s} off {1e3 * off:8.3f} ms   on {1e3 * on:8.3f} ms   "
            f"on - off {1e6 * (on - off):+8.1f} us ({100 * (on / off - 1):+.1f}%)"
        )
    if args.baseline:
        base, off = med["baseline-off"], med["facade-off"]
        print(
            f"  facade at {args.baseline} {1e3 * base:8.3f} ms; today's, off, minus it "
            f"{1e6 * (off - base):+8.1f} us ({100 * (off / base - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
