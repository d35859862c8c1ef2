"""Tensor parallelism against data parallelism on 2 ranks (gloo): step time and bytes moved per step for
zerostep's small GPT, at the same global batch.

- DP=2: each rank runs half the batch; the step's gradient collectives are what the engine counts
  (``engine.comm``, from its plan).
- TP=2 (``tensor_parallel.autotp_size = 2``): both ranks run the whole batch on half the weights; the
  bytes are the payloads of the Megatron collectives in forward and backward (counted by wrapping
  ``torch.distributed.all_reduce`` / ``all_gather`` during the timed steps, so each call is one payload
  of ``numel x element size``), plus the engine's own (none at DP=1, but the norm's 4-byte sum).

Medians over ``--steps`` steps after ``--warmup``; eager by default (``--compile`` compiles the step;
the TP collectives then run as functional collectives inside the graph and are not counted).

    python benchmarks/tensor_parallel.py
    python benchmarks/tensor_parallel.py --layers 4 --width 256 --batch 16 --seq 64 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from zerostep.core import initialize
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.parallel.launch import spawn_ranks


class PayloadCounter:
    """Bytes handed to ``dist.all_reduce`` / ``all_gather`` while counting (the TP forward/backward)."""

    def __init__(self) -> None:
        self.bytes, self.calls, self.on = 0, 0, False
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

        def reduce(tensor, *a, **kw):
            self._count(tensor)
            return self._reduce(tensor, *a, **kw)

        def gather(out, tensor, *a, **kw):
            self._count(tensor, len(out))
            return self._gather(out, tensor, *a, **kw)

        dist.all_reduce, dist.all_gather = reduce, gather

    def _count(self, t: torch.Tensor, copies: int = 1) -> None:
        if self.on:
            self.bytes += t.numel() * t.element_size() * copies
            self.calls += 1


def loss_fn(model, batch):
    return model(batch[:, :-1], batch[:, 1:])


def run(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    counter = PayloadCounter()
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, block_size=args.seq)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen) for _ in range(4)]
    out = {}
    for name, tp in (("DP=2", 0), ("TP=2", 2)):
        torch.manual_seed(0)
        config = {
            "train_batch_size": args.batch,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": args.stage},
        }
        if tp:
            config["tensor_parallel"] = {"autotp_size": tp}
        engine = initialize(GPT(cfg), config, loss_fn=loss_fn, compile=args.compile)
        per = args.batch // engine.world_size
        rows = slice(engine.rank * per, (engine.rank + 1) * per)
        state = engine.init()
        times = []
        for i in range(args.warmup + args.steps):
            timed = i >= args.warmup
            if i == args.warmup:
                engine.comm.reset()
                counter.bytes = counter.calls = 0
            counter.on = timed
            start = time.perf_counter()
            state = engine.step(state, batches[i % len(batches)][rows])
            float(state.metrics.loss)
            if timed:
                times.append(time.perf_counter() - start)
        counter.on = False
        out[name] = {
            "ms": statistics.median(times) * 1e3,
            "engine_mb": engine.comm.bytes_per_step / 1e6,
            "tp_mb": counter.bytes / args.steps / 1e6,
            "tp_calls": counter.calls / args.steps,
            "params_per_rank": sum(p.numel() for p in engine.model.parameters()),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch (DP=2: half per rank)")
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    results = spawn_ranks(run, 2, args, timeout=1800)[0]
    print(
        f"small GPT: {args.layers} layers x {args.width}, seq {args.seq}, global batch {args.batch}, "
        f"ZeRO {args.stage}, 2 ranks (gloo), {'compiled' if args.compile else 'eager'}"
    )
    print(
        f"{'':6} {'step ms':>9} {'params/rank':>12} {'grad MB/step':>13} {'TP MB/step':>11} {'TP calls':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:6} {r['ms']:9.1f} {r['params_per_rank']:12,d} {r['engine_mb']:13.2f} "
            f"{r['tp_mb']:11.2f} {r['tp_calls']:9.0f}"
        )


if __name__ == "__main__":
    main()
