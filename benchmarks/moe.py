"""Mixture of Experts on 2 gloo ranks: tokens/s of the MoE GPT at ep_size 1 and 2 against the dense GPT
of equal active parameters (top-1: each token runs one expert of the dense MLP's size), the bytes each
rank moves per step by all-to-all and by the gradient/parameter collectives, and the bytes each rank holds
(``memory_report``: the parameters it holds, its gradient accumulator, fp32 master and optimizer moments):
at ep_size 2 a rank holds half of every layer's experts.

The three engines step in turn on every rank, so machine noise hits all of them; medians over the rounds
of the slowest rank. All-to-all bytes: what this rank sends in every MoE layer's two forward all-to-alls
(the part that leaves the rank, ``(P - 1) / P`` of each buffer), times two for their adjoints in backward.

    python benchmarks/moe.py
    python benchmarks/moe.py --experts 4 --stage 2 --steps 20 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from zerostep.parallel.launch import spawn_ranks


def rank_main(rank: int, world: int, args: dict) -> dict:
    from zerostep.core import Config, initialize
    from zerostep.core.corpus import stdlib_corpus, window_batch
    from zerostep.core.gpt import GPT, GPTConfig
    from zerostep.parallel.expert import MOELayer

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    mb = args["batch"]
    d = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args["stage"]},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    variants = {"dense": GPTConfig(), "moe ep1": GPTConfig(n_experts=args["experts"], ep_size=1)}
    variants["moe ep2"] = GPTConfig(n_experts=args["experts"], ep_size=2)
    engines, states, models = {}, {}, {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        models[name] = GPT(cfg)
        engines[name] = initialize(
            models[name], Config.from_dict(d, world_size=world), compile=args["compile"]
        )
        states[name] = engines[name].init()
    data = stdlib_corpus()
    block = GPTConfig().block_size
    times = {n: [] for n in variants}
    a2a = dict.fromkeys(variants, 0)
    for i in range(args["warmup"] + args["steps"]):
        full = window_batch(data, mb * world, block, seed=0, step=i)
        batch = {k: v[rank * mb : (rank + 1) * mb] for k, v in full.items()}
        for name, engine in engines.items():
            start = time.perf_counter()
            states[name] = engine.step(states[name], batch)
            states[name].block_until_ready()
            times[name].append(time.perf_counter() - start)
            layers = [m for m in models[name].modules() if isinstance(m, MOELayer)]
            a2a[name] = 2 * sum(m.last_all_to_all_bytes for m in layers)  # forward + its adjoint
    params = {n: sum(p.numel() for p in models[n].parameters()) for n in variants}  # this rank's
    memory = {n: engines[n].memory_report(states[n]) for n in variants}
    return {
        "memory": memory,
        "times": {n: t[args["warmup"] :] for n, t in times.items()},
        "a2a_bytes": a2a,
        "comm_bytes": {n: engines[n].comm.bytes_per_step for n in variants},
        "params": params,
        "tokens_per_step": mb * world * block,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compiled engines (default: eager)")
    args = vars(parser.parse_args())
    results = spawn_ranks(rank_main, 2, args, timeout=1800)
    names = list(results[0]["times"])
    slowest = {n: [max(r["times"][n][i] for r in results) for i in range(args["steps"])] for n in names}
    median = {n: statistics.median(slowest[n]) for n in names}
    tokens = results[0]["tokens_per_step"]
    rows = {}
    print(
        f"2 ranks, ZeRO stage {args['stage']}, {args['experts']} experts per block (top-1), "
        f"{tokens} tokens per step, {'compiled' if args['compile'] else 'eager'}"
    )
    print(
        f"{'model':10} {'params/rk':>9} {'ms/step':>9} {'tok/s':>9} {'x dense':>8} {'a2a MB':>8} "
        f"{'coll MB':>8} {'grad MB':>8} {'master MB':>9} {'optim MB':>8}"
    )
    for n in names:
        r0 = results[0]
        row = {
            "params": r0["params"][n],
            "ms_per_step": median[n] * 1e3,
            "tokens_per_s": tokens / median[n],
            "time_vs_dense": median[n] / median["dense"],
            "all_to_all_bytes_per_step": max(r["a2a_bytes"][n] for r in results),
            "collective_bytes_per_step": r0["comm_bytes"][n],
            # per-rank bytes (rank 0's; both ranks hold alike): gradient accumulator, fp32 master, moments
            "grad_bytes_per_rank": r0["memory"][n]["gradients"],
            "master_bytes_per_rank": r0["memory"][n]["master"],
            "optimizer_bytes_per_rank": r0["memory"][n]["optimizer_state"],
        }
        rows[n] = row
        print(
            f"{n:10} {row['params'] / 1e6:8.2f}M {row['ms_per_step']:9.1f} {row['tokens_per_s']:9.0f} "
            f"{row['time_vs_dense']:8.2f} {row['all_to_all_bytes_per_step'] / 1e6:8.2f} "
            f"{row['collective_bytes_per_step'] / 1e6:8.2f} {row['grad_bytes_per_rank'] / 1e6:8.2f} "
            f"{row['master_bytes_per_rank'] / 1e6:9.2f} {row['optimizer_bytes_per_rank'] / 1e6:8.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
