"""1-bit Adam, 0/1 Adam and 1-bit LAMB on 2 gloo ranks: measured bytes per step before and after the
freeze (``freeze_step``; 0/1 Adam's ``var_freeze_step``), step time against AdamW, and the small GPT's
loss after the same steps against AdamW.

0/1 Adam's phases each mix variants (full-precision and 1-bit gradient steps before the freeze, local
steps and syncs after), so its figures are means over each phase's steps (``--var-update-scaler``,
``--local-step-scaler`` and ``--local-step-clipper`` shorten DeepSpeed's defaults, 16 / 32678 / 16, to
this run's length); the others' are medians.

Bytes are measured, not planned: every tensor handed to a collective during ``engine.step`` is
counted (``all_reduce_into``, which both the TCP and the shared-memory paths go through, and the
process group's ``all_to_all_single`` / ``all_gather`` that the compressed all-reduce calls). Both
engines run eagerly (``compile=False``: the compressed phase's graph B is eager anyway), on the same
model, initial weights and batches. ``--shm 0`` sends the warm-up's all-reduce over loopback TCP
instead of the shared-memory channel (the compressed exchange always uses the group).

    python benchmarks/onebit.py                      # GPT, 60 steps, freeze_step 15
    python benchmarks/onebit.py --steps 100 --freeze-step 20 --shm 0
    python benchmarks/onebit.py --only adamw,zerooneadam   # a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from zerostep.core import Config, initialize
from zerostep.core.corpus import stdlib_corpus, window_batch
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.parallel import collectives
from zerostep.parallel.launch import spawn_ranks


class ByteMeter:
    """Wraps the collectives the step can call; counts the bytes of the tensors passed to them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.by_kind: dict[str, int] = {}

    def _count(self, kind: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.bytes += n
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n

    def install(self) -> None:
        all_reduce_into = collectives.all_reduce_into
        all_to_all = dist.all_to_all_single
        gathers = {
            name: getattr(dist, name)
            for name in ("all_gather_single", "all_gather_into_tensor")
            if hasattr(dist, name)
        }

        def counted_all_reduce(flat, group=None, async_op=False):
            self._count("all_reduce", flat)
            return all_reduce_into(flat, group, async_op)

        def counted_all_to_all(out, inp, *args, **kwargs):
            self._count("all_to_all", inp)
            return all_to_all(out, inp, *args, **kwargs)

        def counted_gather(fn):
            def run(out, inp, *args, **kwargs):
                self._count("all_gather", inp)
                return fn(out, inp, *args, **kwargs)

            return run

        collectives.all_reduce_into = counted_all_reduce
        dist.all_to_all_single = counted_all_to_all
        for name, fn in gathers.items():
            setattr(dist, name, counted_gather(fn))


def config(optimizer: dict, batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_clipping": 1.0,
        "optimizer": optimizer,
    }


def run_rank(rank: int, world: int, args: dict) -> dict:
    meter = ByteMeter()
    meter.install()
    data = stdlib_corpus(1_000_000)
    gpt = GPTConfig()
    lr, betas = args["lr"], [0.9, args["beta2"]]
    optimizers = {
        "adamw": {"type": "AdamW", "params": {"lr": lr, "betas": betas, "weight_decay": 0.01}},
        # full-precision LAMB as DeepSpeed's 1-bit LAMB warms up (no bias correction): 1-bit LAMB's
        # loss is also reported against it, separating the compression from LAMB itself
        "lamb": {
            "type": "Lamb",
            "params": {"lr": lr, "betas": betas, "weight_decay": 0.01, "bias_correction": False},
        },
        "onebitadam": {
            "type": "OneBitAdam",
            "params": {
                "lr": lr,
                "betas": betas,
                "weight_decay": 0.01,
                "freeze_step": args["freeze_step"],
                "comm_backend_name": "nccl",
            },
        },
        "zerooneadam": {
            "type": "ZeroOneAdam",
            "params": {
                "lr": lr,
                "betas": betas,
                "weight_decay": 0.01,
                "var_freeze_step": args["freeze_step"] - 1,  # frozen from step freeze_step + 1
                "var_update_scaler": args["var_update_scaler"],
                "local_step_scaler": args["local_step_scaler"],
                "local_step_clipper": args["local_step_clipper"],
                "comm_backend_name": "nccl",
            },
        },
        "onebitlamb": {
            "type": "OneBitLamb",
            "params": {
                "lr": lr,
                "betas": betas,
                "weight_decay": 0.01,
                "freeze_step": args["freeze_step"],
                "comm_backend_name": "nccl",
            },
        },
    }
    optimizers = {name: optimizers[name] for name in args["only"]}
    out = {}
    for name, block in optimizers.items():
        torch.manual_seed(0)
        engine = initialize(
            GPT(gpt),
            Config.from_dict(config(block, args["batch"]), world_size=world),
            loss_fn=lambda m, b: m(b["idx"], b["targets"]),
            compile=False,
        )
        state = engine.init()
        times, sent, losses = [], [], []
        for step in range(args["steps"]):
            batch = window_batch(data, args["batch"], gpt.block_size, 1 + rank, step)
            before = meter.bytes
            dist.barrier()
            start = time.perf_counter()
            state = engine.step(state, batch)
            times.append(time.perf_counter() - start)
            sent.append(meter.bytes - before)
            losses.append(float(state.metrics.loss))
        f = args["freeze_step"]
        mean_or_median = statistics.mean if name == "zerooneadam" else statistics.median
        out[name] = {
            "warm_bytes": mean_or_median(sent[1:f]),
            "compressed_bytes": mean_or_median(sent[f + 1 :]),
            "warm_ms": 1e3 * mean_or_median(times[2:f]),
            "compressed_ms": 1e3 * mean_or_median(times[f + 2 :]),
            "final_loss": statistics.mean(losses[-5:]),
            "params": sum(lay.padded_numel for lay in engine.plan.layouts.values()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--freeze-step", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--shm", default="1", help="ZEROSTEP_SHM for the ranks (0: loopback TCP)")
    parser.add_argument("--var-update-scaler", type=int, default=2)
    parser.add_argument("--local-step-scaler", type=int, default=8)
    parser.add_argument("--local-step-clipper", type=int, default=4)
    parser.add_argument("--only", default="adamw,onebitadam,zerooneadam,lamb,onebitlamb")
    a = parser.parse_args()
    only = a.only.split(",")
    if "adamw" not in only:
        only.insert(0, "adamw")  # the baseline every ratio is against
    args = {
        "steps": a.steps,
        "freeze_step": a.freeze_step,
        "batch": a.batch,
        "lr": a.lr,
        "beta2": a.beta2,
        "var_update_scaler": a.var_update_scaler,
        "local_step_scaler": a.local_step_scaler,
        "local_step_clipper": a.local_step_clipper,
        "only": only,
    }
    results = spawn_ranks(run_rank, 2, args, timeout=3600, env={"ZEROSTEP_SHM": a.shm})
    r = results[0]
    base = r["adamw"]
    report = {
        "params": base["params"],
        "shm": a.shm,
        "steps": a.steps,
        "freeze_step": a.freeze_step,
        "beta2": a.beta2,
        "adamw_bytes_per_step": base["compressed_bytes"],
        "adamw_step_ms": base["compressed_ms"],
        "adamw_final_loss": base["final_loss"],
    }
    for name in only[1:]:
        one = r[name]
        report[name] = {
            "warmup_bytes_per_step": one["warm_bytes"],
            "compressed_bytes_per_step": one["compressed_bytes"],
            "compressed_over_fp32": one["compressed_bytes"] / base["compressed_bytes"],
            "warmup_step_ms": one["warm_ms"],
            "compressed_step_ms": one["compressed_ms"],
            "compressed_over_adamw_time": one["compressed_ms"] / base["compressed_ms"],
            "final_loss": one["final_loss"],
            "loss_over_adamw": one["final_loss"] / base["final_loss"],
        }
    if "lamb" in r and "onebitlamb" in r:
        report["onebitlamb"]["loss_over_lamb"] = r["onebitlamb"]["final_loss"] / r["lamb"]["final_loss"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
