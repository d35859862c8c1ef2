"""offload_optimizer on the small GPT: step time with and without, and the bytes each step moves.

Two engines, one with ``zero_optimization.offload_optimizer: {device: cpu}``, step alternately in one
process so machine noise hits both; medians over the rounds. Bytes moved: the offload's device -> host
(gradients) and host -> device (parameters) copies per step. On a CPU-only machine "device" and host
are the same memory, so the ratio is the cost of the extra copies and of the chunked host update;
with CUDA (``--device cuda``, the default when one is present) the model is on the GPU, the host
buffers are pinned and the copies run on side streams. With ``--params`` (offload_param) the bytes
printed are still the update's; the stage-3 gathers also copy each unit's shard to the device (twice
per block and micro-batch) and each shard gradient back, which the counter does not include.

    python benchmarks/offload.py
    python benchmarks/offload.py --stage 3 --chunk 1000000 --compile
    python benchmarks/offload.py --stage 3 --params
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from zerostep.core import Config, initialize
from zerostep.core.corpus import stdlib_corpus, window_batch
from zerostep.core.gpt import GPT, GPTConfig


def build(cfg: GPTConfig, args: argparse.Namespace, offload: bool):
    torch.manual_seed(0)
    zero: dict = {"stage": args.stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
        if args.chunk:
            zero["sub_group_size"] = args.chunk
        if args.params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
    d = {
        "train_micro_batch_size_per_gpu": args.batch,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "wall_clock_breakdown": True,  # the update phase's own time ("step")
    }
    if args.bf16:
        d["bf16"] = {"enabled": True}
    engine = initialize(GPT(cfg).to(args.device), Config.from_dict(d), compile=args.compile)
    return engine, engine.init()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument(
        "--chunk", type=int, default=0, help="sub_group_size (elements per chunk); 0: per unit"
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--params", action="store_true", help="offload_param too (needs --stage 3)")
    parser.add_argument("--compile", action="store_true", help="compiled engines (default: eager)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.embd)
    data = stdlib_corpus()
    batches = [window_batch(data, args.batch, cfg.block_size, seed=0, step=i) for i in range(4)]
    engines = [build(cfg, args, offload) for offload in (False, True)]
    states = [s for _, s in engines]
    times: list[list[float]] = [[], []]
    update_ms: list[list[float]] = [[], []]
    offload = engines[1][0]._offload
    moved_before = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            moved_before = offload.moved_bytes()
        batch = batches[i % len(batches)]
        for k, (engine, _) in enumerate(engines):
            sync(args.device)
            start = time.perf_counter()
            states[k] = engine.step(states[k], batch)
            states[k].block_until_ready()
            sync(args.device)
            phases = engine.wall_clock_timers()  # this step's, in ms
            if i >= args.warmup:
                times[k].append(time.perf_counter() - start)
                update_ms[k].append(phases["step"])
    moved = {k: (v - moved_before[k]) / args.steps for k, v in offload.moved_bytes().items()}
    plain_ms, off_ms = (statistics.median(t) * 1e3 for t in times)
    plain_up, off_up = (statistics.median(t) for t in update_ms)
    report = engines[1][0].memory_report(states[1])
    params = sum(e.numel for lay in engines[0][0].plan.layouts.values() for e in lay.entries)
    mode = "compiled" if args.compile else "eager"
    print(
        f"small GPT {cfg.n_layer}x{cfg.n_embd} ({params / 1e6:.2f}M params), "
        f"batch {args.batch}x{cfg.block_size}, "
        f"stage {args.stage}{' + offload_param' if args.params else ''}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {mode}, device {args.device}, "
        f"{len(offload.update.chunks)} chunks"
    )
    print(f"{'':26}{'plain':>10}{'offload':>10}{'ratio':>8}")
    print(f"{'step time (ms, median)':26}{plain_ms:10.2f}{off_ms:10.2f}{off_ms / plain_ms:8.2f}x")
    print(f"{'update phase (ms, median)':26}{plain_up:10.2f}{off_up:10.2f}{off_up / plain_up:8.2f}x")
    print(
        f"moved per step: {moved['to_host'] / 2**20:.2f} MiB to host, "
        f"{moved['to_device'] / 2**20:.2f} MiB to device; host state {report['host'] / 2**20:.2f} MiB, "
        f"device state {report['device'] / 2**20:.2f} MiB"
    )
    result = dict(
        device=args.device,
        stage=args.stage,
        mode=mode,
        bf16=args.bf16,
        offload_param=args.params,
        chunks=len(offload.update.chunks),
        step_ms_plain=plain_ms,
        step_ms_offload=off_ms,
        ratio=off_ms / plain_ms,
        update_ms_plain=plain_up,
        update_ms_offload=off_up,
        bytes_to_host_per_step=moved["to_host"],
        bytes_to_device_per_step=moved["to_device"],
        host_bytes=report["host"],
        device_bytes=report["device"],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
