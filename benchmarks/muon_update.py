"""The optimizer update of the small GPT (core/gpt.py, 0.84M params): AdamW vs Muon's two distributed
strategies (``optim.muon_shards``: "owner", "allgather"), on 1, 2 and 4 gloo ranks.

Each rank builds a real engine (ZeRO stage 1, fp32) for the optimizer, then times the update alone as
the engine runs it: ``torch.compile(fullgraph=True)`` of ``optimizer.update_`` on the engine's own
master shards and optimizer state, with random gradients, lr and grad_scale as 0-d tensors; Muon's
collectives run inside that graph. Bytes moved per step are the engine's own count of the update's
collectives (``core.accounting.optimizer_comm_plan``, the CommCounter convention: an all-gather counts
its result, an all-to-all what the rank sends), the most of any rank. Times: per rank the median over
interleaved repeats, then the slowest rank.

    python benchmarks/muon_update.py [--repeats 30] [--ns-dtype float32] [--ns-method gram] [--ranks 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zerostep.core import Config, initialize
from zerostep.core.accounting import optimizer_comm_plan
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.optim.muon import uses_muon
from zerostep.parallel.launch import spawn_ranks


def blocks(args) -> dict[str, dict]:
    muon = {
        "lr": 0.02,
        "adam_lr": 3e-4,
        "weight_decay": 0.01,
        "ns_dtype": args.ns_dtype,
        "ns_method": args.ns_method,
    }
    return {
        "adamw": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01}},
        "muon owner": {"type": "Muon", "params": {**muon, "distributed": "owner"}},
        "muon allgather": {"type": "Muon", "params": {**muon, "distributed": "allgather"}},
    }


def bench_rank(rank: int, world_size: int, args) -> dict:
    torch.set_num_threads(1)  # one thread per rank, the single process too (OMP_NUM_THREADS came too late)
    torch.manual_seed(0)
    runs, out = {}, {}
    for name, block in blocks(args).items():
        cfg = Config.from_dict(
            {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "optimizer": block},
            world_size=world_size,
        )
        engine = initialize(GPT(GPTConfig()), cfg, loss_fn=lambda m, b: m(b), compile=False)
        state = engine.init()
        grads = {g: torch.randn_like(t) for g, t in state.master.items()}
        opt = engine.optimizer

        def update(grads, opt_state, master, lr, scale, opt=opt):
            opt.update_(grads, opt_state, master, lr, grad_scale=scale)

        step = torch.compile(update, fullgraph=True, dynamic=False)
        lr, scale = torch.tensor(1e-4), torch.tensor(1.0)
        for _ in range(3):  # compile and warm up
            step(grads, state.opt_state, state.master, lr, scale)
        runs[name] = (step, grads, state, lr, scale)
        out[name] = {"bytes_per_step": optimizer_comm_plan(engine.plan, opt).total_bytes}
        if name == "muon owner":
            entries = [e for lay in engine.plan.layouts.values() for e in lay.entries]
            out[name]["muon_params"] = sum(e.numel for e in entries if uses_muon(e.name, e.shape))
            out[name]["adam_params"] = sum(e.numel for e in entries if not uses_muon(e.name, e.shape))
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (step, grads, state, lr, scale) in runs.items():
            if world_size > 1:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            step(grads, state.opt_state, state.master, lr, scale)
            times[name].append(time.perf_counter() - t0)
    for name in runs:
        out[name]["median_ms"] = 1e3 * statistics.median(times[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ns-dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--ns-method", default="gram", choices=["gram", "standard"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for world in args.ranks:
        if world == 1:
            results[world] = [bench_rank(0, 1, args)]
        else:
            results[world] = spawn_ranks(bench_rank, world, args, timeout=1800)
    params = results[args.ranks[0]][0]["muon owner"]
    print(f"Muon params {params['muon_params']}, AdamW (auxiliary) params {params['adam_params']}")
    print(f"{'optimizer':16s} {'ranks':>5s} {'ms/update':>10s} {'MB moved/step':>14s}")
    for world, ranks in results.items():
        for name in ranks[0]:
            ms = max(r[name]["median_ms"] for r in ranks)
            mb = max(r[name]["bytes_per_step"] for r in ranks) / 1e6
            print(f"{name:16s} {world:5d} {ms:10.2f} {mb:14.3f}")


if __name__ == "__main__":
    main()
