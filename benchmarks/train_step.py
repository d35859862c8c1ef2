"""One-process step time: compiled zerostep step vs an eager PyTorch loop with fused AdamW.

Same model, same initial weights, same batches. The contenders alternate step by step in one process
(interleaved), so machine noise hits all; the figure is the median of per-round ratios (zerostep time /
PyTorch time; < 1 means zerostep is faster). Two zerostep engines run: the one-region step
(core/one_region.py, what a one-process engine uses where it qualifies) and the split step
(three graphs and a host read, core/step.py). On the tiny model compute is negligible, so its step
time is the fixed per-step host cost, printed in microseconds. Compile time is measured in fresh
subprocesses: cold (empty inductor cache) and warm (the cache the cold run left).

    python benchmarks/train_step.py                  # tiny, mlp1m, mlp (4x1024), gpt
    python benchmarks/train_step.py --model gpt --steps 30
    python benchmarks/train_step.py --device cuda    # absolute times and MFU against the H200's bf16 peak
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.core import Config, initialize
from zerostep.core.corpus import stdlib_corpus, window_batch
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.core.one_region import use_split_step

H200_BF16_FLOPS = 790e12  # measured dense bf16 matmul peak (benchmarks/gpu_check.py)
# name -> (width, depth, default batch): 4 x Linear(512, 512) + GELU is the 1M-parameter MLP;
# "tiny" (2 x Linear(32, 32)) is host-bound, its compute negligible
MLPS = {"tiny": (32, 2, 8), "mlp1m": (512, 4, 64), "mlp": (1024, 4, 32)}


def mlp(width: int = 1024, depth: int = 4, head: bool = True) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, *([nn.Linear(width, 1)] if head else []))


def make_case(name: str, batch: int, seed: int = 0, device: str = "cpu"):
    """(model factory, loss_fn, batch maker) for a named model."""
    if name == "gpt":
        data = stdlib_corpus(1_000_000)
        cfg = GPTConfig()

        def factory():
            torch.manual_seed(seed)
            return GPT(cfg).to(device)

        def loss_fn(model, b):
            return model(b["idx"], b["targets"])

        def gpt_batch(i):
            return {k: v.to(device) for k, v in window_batch(data, batch, cfg.block_size, seed, i).items()}

        return factory, loss_fn, gpt_batch

    width, depth, _ = MLPS[name]
    head = name == "mlp"  # the 4x1024 MLP has kept its scalar head since the first benchmark

    def factory():
        torch.manual_seed(seed)
        return mlp(width, depth, head).to(device)

    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(8, batch, width, generator=gen).to(device)
    ys = torch.randn(8, batch, 1 if head else width, generator=gen).to(device)

    def loss_fn(model, b):
        return F.mse_loss(model(b[0]), b[1])

    return factory, loss_fn, lambda i: (xs[i % 8], ys[i % 8])


def ds_config(batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    }


def step_flops(name: str, model: nn.Module, batch: int) -> float:
    """Forward + backward matmul FLOPs of one step: 6 x parameters x rows (x tokens for the GPT)."""
    params = sum(p.numel() for p in model.parameters())
    rows = batch * (GPTConfig().block_size if name == "gpt" else 1)
    return 6.0 * params * rows


def measure_ratio(name: str, batch: int, steps: int, warmup: int, device: str = "cpu") -> dict:
    factory, loss_fn, batches = make_case(name, batch, device=device)
    # on the GPU both train in bf16 (the eager loop under autocast), for an MFU against the bf16 peak
    bf16 = {"bf16": {"enabled": True}} if device == "cuda" else {}
    config = Config.from_dict({**ds_config(batch), **bf16})
    engine = initialize(factory(), config, loss_fn=loss_fn, compile=True)
    split = use_split_step(initialize(factory(), config, loss_fn=loss_fn, compile=True))
    states = {"z": engine.init(), "s": split.init()}
    ref = factory()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def torch_step(b):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(ref, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return loss.detach()

    def run(who: str, b) -> None:
        if who == "t":
            float(torch_step(b))  # the loss read: the eager loop's one host sync
            return
        stepper = engine if who == "z" else split
        states[who] = stepper.step(states[who], b)
        float(states[who].metrics.loss)

    for i in range(warmup):
        for who in "zst":
            run(who, batches(i))
    times: dict[str, list[float]] = {"z": [], "s": [], "t": []}
    for i in range(steps):
        b = batches(warmup + i)
        order = "zst"[i % 3 :] + "zst"[: i % 3]  # rotate which contender goes first
        for who in order:
            sync()
            t0 = time.perf_counter()
            run(who, b)
            sync()
            times[who].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "model": name,
        "params_M": round(sum(p.numel() for p in ref.parameters()) / 1e6, 3),
        "batch": batch,
        "device": device,
        "one_region": engine._one_region is not None,
        "ratio_median": statistics.median(z / t for z, t in zip(times["z"], times["t"])),
        "split_ratio_median": statistics.median(s / t for s, t in zip(times["s"], times["t"])),
        "zerostep_ms_median": 1e3 * med["z"],
        "split_ms_median": 1e3 * med["s"],
        "torch_ms_median": 1e3 * med["t"],
    }
    if name == "tiny":  # compute is negligible: the step is the fixed host cost
        row.update(host_us_zerostep=1e6 * med["z"], host_us_split=1e6 * med["s"])
        row.update(host_us_eager=1e6 * med["t"])
    if device == "cuda":
        flops = step_flops(name, ref, batch)
        row.update(mfu_zerostep=flops / med["z"] / H200_BF16_FLOPS)
        row.update(mfu_eager=flops / med["t"] / H200_BF16_FLOPS)
    return row


def compile_time(name: str, batch: int) -> float:
    """Seconds from initialize to the end of the first step (this process; caches as they are)."""
    factory, loss_fn, batches = make_case(name, batch)
    t0 = time.perf_counter()
    engine = initialize(factory(), Config.from_dict(ds_config(batch)), loss_fn=loss_fn, compile=True)
    state = engine.step(engine.init(), batches(0))
    float(state.metrics.loss)
    return time.perf_counter() - t0


def compile_times(name: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        cmd = [sys.executable, __file__, "--compile-only", "--model", name, "--batch", str(batch)]
        out = {}
        for kind in ("cold", "warm"):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"compile-time subprocess failed:\n{res.stderr[-3000:]}")
            out[kind + "_compile_s"] = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    names_all = ["tiny", "mlp1m", "mlp", "gpt"]
    parser.add_argument("--model", choices=[*names_all, "all"], default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: 16 for gpt, the MLPS table's")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-compile-time", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step.py: --device cuda, but CUDA is not available on this machine", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(os.cpu_count() or 1)
    names = names_all if args.model == "all" else [args.model]

    def batch_of(name: str) -> int:
        return args.batch or (16 if name == "gpt" else MLPS[name][2])

    if args.compile_only:
        print(json.dumps({"seconds": compile_time(names[0], batch_of(names[0]))}))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; ratio = zerostep / "
        "eager torch (fused AdamW), median of interleaved steps; < 1 is faster; split = the three-graph step"
    )
    for name in names:
        row = measure_ratio(name, batch_of(name), args.steps, args.warmup, args.device)
        if not args.no_compile_time and args.device == "cpu":
            row.update(compile_times(name, batch_of(name)))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
