"""One-process step time: compiled zerostep step vs an eager PyTorch loop with fused AdamW.

Same model, same initial weights, same batches. The two contenders alternate step by step in one
process (interleaved), so machine noise hits both; the figure is the median of per-round ratios
(zerostep time / PyTorch time; < 1 means zerostep is faster). Compile time is measured in fresh
subprocesses: cold (empty inductor cache) and warm (the cache the cold run left).

    python benchmarks/train_step.py                # small GPT and 4x1024 MLP
    python benchmarks/train_step.py --model gpt --steps 30
"""

from __future__ import annotations

import argparse
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


def mlp(width: int = 1024, depth: int = 4) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def make_case(name: str, batch: int, seed: int = 0):
    """(model factory, loss_fn, batch maker) for a named model."""
    if name == "gpt":
        data = stdlib_corpus(1_000_000)
        cfg = GPTConfig()

        def factory():
            torch.manual_seed(seed)
            return GPT(cfg)

        def loss_fn(model, b):
            return model(b["idx"], b["targets"])

        return factory, loss_fn, lambda i: window_batch(data, batch, cfg.block_size, seed, i)

    def factory():
        torch.manual_seed(seed)
        return mlp()

    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(8, batch, 1024, generator=gen)
    ys = torch.randn(8, batch, 1, generator=gen)

    def loss_fn(model, b):
        return F.mse_loss(model(b[0]), b[1])

    return factory, loss_fn, lambda i: (xs[i % 8], ys[i % 8])


def ds_config(batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    }


def measure_ratio(name: str, batch: int, steps: int, warmup: int) -> dict:
    factory, loss_fn, batches = make_case(name, batch)
    engine = initialize(factory(), Config.from_dict(ds_config(batch)), loss_fn=loss_fn, compile=True)
    state = engine.init()
    ref = factory()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def torch_step(b):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ref, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        return loss.detach()

    for i in range(warmup):
        state = engine.step(state, batches(i))
        torch_step(batches(i))
    ratios, zs, ts = [], [], []
    for i in range(steps):
        b = batches(warmup + i)
        first_z = i % 2 == 0  # alternate which contender goes first
        for who in ("z", "t") if first_z else ("t", "z"):
            t0 = time.perf_counter()
            if who == "z":
                state = engine.step(state, b)
                float(state.metrics.loss)
                zs.append(time.perf_counter() - t0)
            else:
                float(torch_step(b))
                ts.append(time.perf_counter() - t0)
        ratios.append(zs[-1] / ts[-1])
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in ref.parameters()) / 1e6, 2),
        "batch": batch,
        "ratio_median": statistics.median(ratios),
        "zerostep_ms_median": 1e3 * statistics.median(zs),
        "torch_ms_median": 1e3 * statistics.median(ts),
    }


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
    parser.add_argument("--model", choices=["gpt", "mlp", "both"], default="both")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: 16 for gpt, 32 for mlp")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-compile-time", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    names = ["gpt", "mlp"] if args.model == "both" else [args.model]
    if args.compile_only:
        name = names[0]
        print(json.dumps({"seconds": compile_time(name, args.batch or (16 if name == "gpt" else 32))}))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = zerostep / eager torch "
        "(fused AdamW), median of interleaved steps; < 1 is faster"
    )
    for name in names:
        batch = args.batch or (16 if name == "gpt" else 32)
        row = measure_ratio(name, batch, args.steps, args.warmup)
        if not args.no_compile_time:
            row.update(compile_times(name, batch))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
