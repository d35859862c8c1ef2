"""ZeRO stages on 2 ranks (gloo, CPU): zerostep vs DDP + AdamW, FSDP2 and DeepSpeed, side by side.

Every rank builds all contenders for one model (zerostep at stages 0-3, DDP + torch AdamW, FSDP2
``fully_shard`` + AdamW, and DeepSpeed at stages 0-3 when it is installed) and then runs them
round-robin, a block of ``--block`` consecutive steps each, so machine noise hits all of them alike.
A block is timed until its last step's communication has finished (zerostep at stages 1-2 leaves its
parameter all-gathers running into the next step's forward). Reported: median step time (block time /
block) relative to DDP (< 1 is faster), zerostep vs DeepSpeed per stage, bytes moved per step (in
units of Ψ = parameter bytes in the compute dtype) and per-rank model-state memory vs the ZeRO formula.

    python benchmarks/zero_step.py                      # MLP 4x1024 and the small GPT, 2 ranks
    python benchmarks/zero_step.py --model mlp --steps 20 --no-compile
    python benchmarks/zero_step.py --overlap-param-gather   # stages 1-2 gather into the next forward
    python benchmarks/zero_step.py --transport gloo         # zerostep over gloo's TCP, not /dev/shm
    python benchmarks/zero_step.py --device cuda            # NCCL, one GPU per rank (default 1 rank)
    python benchmarks/zero_step.py --facade --world-size 1  # + the DeepSpeed facade's loop per stage

``--facade`` adds ``facade-<stage>`` rows: ``zerostep.initialize``'s engine driven as DeepSpeed scripts
drive it (``loss = f(engine(x)); engine.backward(loss); engine.step()``), reported against the
functional step of the same stage (the goal: within 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from zerostep.core import Config, initialize
from zerostep.parallel.launch import spawn_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import make_case  # noqa: E402  (same models and batches as the one-process benchmark)

LR = 1e-4


OVERLAP = {"default": None, "on": True, "off": False}


def ds_config(stage: int, mb: int, overlap: bool | None = None) -> dict:
    zero = {"stage": stage} if overlap is None else {"stage": stage, "overlap_comm": overlap}
    return {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
    }


class TorchContender:
    """A plain torch training step around an already-wrapped module (DDP or FSDP2)."""

    def __init__(self, module, loss_fn):
        self.module, self.loss_fn = module, loss_fn
        self.opt = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=0.01)

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.module, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())


class ZerostepContender:
    def __init__(self, engine):
        self.engine, self.state = engine, engine.init()

    def step(self, batch):
        self.state = self.engine.step(self.state, batch)
        return float(self.state.metrics.loss)

    def sync(self):
        # stages 1-2 with overlap leave the parameter all-gathers running into the next step's forward
        self.state.block_until_ready()


class DeepSpeedContender:
    def __init__(self, module, loss_fn, stage, mb):
        import deepspeed

        self.loss_fn = loss_fn
        cfg = ds_config(stage, mb)
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=cfg)

    def step(self, batch):
        loss = self.loss_fn(self.engine, batch)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())


def model_state_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def bench_rank(
    rank: int,
    world: int,
    name: str,
    mb: int,
    steps: int,
    warmup: int,
    compile: bool,
    overlap: bool | None,
    block_steps: int,
    param_gather: bool,
    device: str,
    only: frozenset[str] | None = None,
    facade: bool = False,
):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    make_model, loss_fn, global_batch = make_case(name, mb * world)

    def factory():
        return make_model().to(dev)

    def sync():  # host waits for the device, so a block's time covers its work
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    contenders = {}
    engines = {}
    for stage in (0, 1, 2, 3):
        if only is not None and f"zerostep-{stage}" not in only:
            continue
        d = ds_config(stage, mb, overlap if stage < 3 else None)
        if param_gather and stage in (1, 2):
            d["zero_optimization"]["overlap_param_gather"] = True  # zerostep's own key, which needs
            d["zero_optimization"]["overlap_comm"] = True  # overlap_comm (off at 1-2 when unset)
        cfg = Config.from_dict(d, world_size=world)
        engine = initialize(factory(), cfg, loss_fn=loss_fn, compile=compile)
        engines[stage] = engine
        contenders[f"zerostep-{stage}"] = ZerostepContender(engine)
        if facade:
            from facade_step import Facade

            contenders[f"facade-{stage}"] = Facade(factory(), loss_fn, d, compile)
    ddp = torch.nn.parallel.DistributedDataParallel(
        factory(), device_ids=[rank] if dev.type == "cuda" else None
    )
    contenders["ddp"] = TorchContender(ddp, loss_fn)
    if only is None or "fsdp2" in only:
        try:
            from torch.distributed.fsdp import fully_shard

            fsdp_model = factory()
            blocks = [m for m in fsdp_model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
            for block in blocks[:1]:
                for child in block.children():
                    if any(p.requires_grad for p in child.parameters()):
                        fully_shard(child)
            fully_shard(fsdp_model)
            contenders["fsdp2"] = TorchContender(fsdp_model, loss_fn)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            if rank == 0:
                print(f"FSDP2 unavailable: {type(e).__name__}: {e}", flush=True)
    try:
        import deepspeed  # noqa: F401

        for stage in (0, 1, 2, 3):
            if only is not None and f"deepspeed-{stage}" not in only:
                continue
            contenders[f"deepspeed-{stage}"] = DeepSpeedContender(factory(), loss_fn, stage, mb)
    except ImportError:
        if rank == 0:
            print(
                "DeepSpeed not installed: skipping it (DS_BUILD_OPS=0 pip install --no-build-isolation "
                "deepspeed)",
                flush=True,
            )

    def local(i):
        b = global_batch(i)
        pick = lambda t: t[rank * mb : (rank + 1) * mb].to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return {k: pick(v) for k, v in b.items()} if isinstance(b, dict) else tuple(pick(t) for t in b)

    for i in range(warmup):
        for c in contenders.values():
            c.step(local(i))
    for e in engines.values():
        e.comm.reset()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for i in range(steps):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for k in order:
            # a block of consecutive steps, timed up to the end of its last one's communication: what
            # overlaps the next step counts, and nothing runs on into another contender's time
            dist.barrier()
            t0 = time.perf_counter()
            for j in range(block_steps):
                contenders[k].step(local(warmup + i * block_steps + j))
            getattr(contenders[k], "sync", lambda: None)()
            sync()
            times[k].append((time.perf_counter() - t0) / block_steps)
    # rank-max per step: a step is as slow as its slowest rank
    stacked = {k: torch.tensor(v, device=dev) for k, v in times.items()}  # NCCL reduces device tensors
    for v in stacked.values():
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
    medians = {k: statistics.median(v.cpu().tolist()) for k, v in stacked.items()}
    psi_bytes = sum(lay.numel for lay in next(iter(engines.values())).plan.layouts.values()) * 4
    extra = {
        f"zerostep-{s}": {
            "comm_psi_per_step": round(e.comm.bytes_per_step / psi_bytes, 3),
            "memory_bytes": e.memory_report(contenders[f"zerostep-{s}"].state),
        }
        for s, e in engines.items()
    }
    transport = "shared memory" if next(iter(engines.values())).shared_memory else dist.get_backend()
    return {"medians": medians, "extra": extra, "psi": psi_bytes // 4, "transport": transport}


def report(name: str, out: dict, world: int, transport: str) -> None:
    med, psi = out["medians"], out["psi"]
    base = med["ddp"]
    print(
        f"\n{name}: {psi / 1e6:.2f}M params, {world} ranks, zerostep over {transport}; median step time "
        f"relative to DDP (< 1 is faster)"
    )
    for k, v in med.items():
        line = f"  {k:12s} {1e3 * v:8.1f} ms   x DDP {v / base:5.2f}"
        if k.startswith("zerostep-"):
            stage = int(k[-1])
            ex = out["extra"][k]
            formula = {0: 16, 1: 4 + 12 / world, 2: 2 + 14 / world, 3: 16 / world}[stage]
            line += (
                f"   comm {ex['comm_psi_per_step']:.2f} Ψ/step (fp32 Ψ)   "
                f"model state {ex['memory_bytes']['total'] / psi:5.2f} B/param (mixed-precision formula "
                f"{formula:.1f}; fp32 here)"
            )
            ds = med.get(f"deepspeed-{stage}")
            if ds:
                line += f"   {ds / v:4.2f}x faster than DeepSpeed"
        elif k.startswith("facade-"):
            line += f"   x functional {v / med[f'zerostep-{k[-1]}']:5.3f} (goal <= 1.05)"
        print(line)
    print(json.dumps({"model": name, **{k: round(v / base, 3) for k, v in med.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "gpt", "both"], default="both")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: one GPU per rank over NCCL (on a one-GPU machine, world size 1: absolute step times)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="consecutive steps per timed block")
    parser.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="zerostep stages 1-2: overlap_comm and overlap_param_gather (gather into the next forward)",
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--facade", action="store_true", help="add the DeepSpeed facade's loop per stage (facade-<stage>)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated contenders to run (e.g. zerostep-2,ddp; ddp is always kept as the baseline)",
    )
    parser.add_argument(
        "--transport",
        choices=["shm", "gloo"],
        default="shm",
        help="zerostep's collectives between CPU ranks: through /dev/shm (default) or gloo's TCP "
        "(ZEROSTEP_SHM=0); the other contenders always use gloo",
    )
    parser.add_argument(
        "--overlap-comm",
        choices=list(OVERLAP),
        default="default",
        help="zero_optimization.overlap_comm for zerostep stages 0-2 (default: unset, which overlaps at "
        "stage 0 and not at stages 1-2)",
    )
    args = parser.parse_args()
    names = ["mlp", "gpt"] if args.model == "both" else [args.model]
    world_size = args.world_size or (1 if args.device == "cuda" else 2)
    if args.device == "cuda" and torch.cuda.device_count() < world_size:
        parser.error(f"--device cuda needs {world_size} GPU(s), this machine has {torch.cuda.device_count()}")
    for name in names:
        mb = 32 if name == "mlp" else 8
        outs = spawn_ranks(
            bench_rank,
            world_size,
            name,
            mb,
            args.steps,
            args.warmup,
            not args.no_compile,
            OVERLAP[args.overlap_comm],
            args.block,
            args.overlap_param_gather,
            args.device,
            None if args.only is None else frozenset(args.only.split(",")) | {"ddp"},
            args.facade,
            timeout=1800,
            backend="nccl" if args.device == "cuda" else "gloo",
            env={"ZEROSTEP_SHM": "1" if args.transport == "shm" else "0"},
        )
        report(name, outs[0], world_size, outs[0]["transport"])


if __name__ == "__main__":
    main()
