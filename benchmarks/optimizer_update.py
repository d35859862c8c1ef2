"""AdamW over one flat fp32 shard: zerostep's compiled in-place update vs torch.optim, vs bandwidth.

    python benchmarks/optimizer_update.py [--numel 33554432] [--repeats 15]

Contenders (interleaved every repeat; medians reported):
  zerostep   ``torch.compile(fullgraph=True)`` of ``adamw.update_`` with lr and grad_scale as 0-d
             tensors, as the engine calls it
  fused      ``torch.optim.AdamW(fused=True)``
  foreach    ``torch.optim.AdamW(foreach=True)``
  bandwidth  ``x.mul_(a)`` over the same number of fp32 elements: 8 bytes/element moved. AdamW must
             read g, p, m, v and write p, m, v (28 bytes/element), so its bound is 28 * n / bandwidth.
On CUDA the same script also times the fused Triton kernel (``triton_kernels.adam_step_``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import zerostep.optim as zo
from zerostep.optim import triton_kernels

ADAMW_BYTES_PER_ELEMENT = 28  # read g, p, m, v; write p, m, v (fp32)
SCALE_BYTES_PER_ELEMENT = 8  # read x, write x
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    return run


def contenders(n: int, device: torch.device) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one call, bytes it must move)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    grad = torch.randn(n, generator=gen).to(device)
    out: dict[str, tuple[Callable[[], None], int]] = {}

    opt = zo.adamw(**HYPER, use_triton=False)
    params = {"flat": torch.randn(n, generator=gen).to(device)}
    state = opt.init(params)
    grads = {"flat": grad}
    lr = torch.tensor(HYPER["lr"], device=device)
    scale = torch.tensor(1.0, device=device)
    compiled = torch.compile(lambda g, s, p, lr, c: opt.update_(g, s, p, lr, grad_scale=c), fullgraph=True)
    out["zerostep"] = (lambda: compiled(grads, state, params, lr, scale), ADAMW_BYTES_PER_ELEMENT * n)

    if device.type == "cuda" and triton_kernels.available():
        p, m, v = torch.randn(n, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device)
        scalars = triton_kernels.adam_scalars(HYPER["lr"], None, 0.9, 0.999, 0.1, 0.03, device)

        def fused_kernel() -> None:
            triton_kernels.adam_step_(p, grad, m, v, scalars, eps=1e-8, weight_decay=0.01, adam_w_mode=True)

        out["triton"] = (fused_kernel, ADAMW_BYTES_PER_ELEMENT * n)

    for flavour in ("fused", "foreach"):
        param = torch.nn.Parameter(torch.randn(n, generator=gen).to(device))
        param.grad = grad
        torch_opt = torch.optim.AdamW([param], **HYPER, **{flavour: True})
        out[flavour] = (torch_opt.step, ADAMW_BYTES_PER_ELEMENT * n)

    x = torch.ones(n, device=device)
    out["bandwidth"] = (lambda: x.mul_(1.0000001), SCALE_BYTES_PER_ELEMENT * n)
    return out


def bench(n: int, repeats: int, warmup: int, device: torch.device) -> None:
    run = timer(device)
    cases = contenders(n, device)
    for fn, _ in cases.values():  # compile / autotune / first-touch
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, _) in cases.items():
            times[name].append(run(fn))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    gbps = {name: cases[name][1] / median[name] / 1e9 for name in cases}
    bound = ADAMW_BYTES_PER_ELEMENT * n / (gbps["bandwidth"] * 1e9)

    print(f"\n{device.type}: AdamW over a flat fp32 shard of {n:,} elements "
          f"({n * 4 / 2**20:.0f} MiB per tensor), {repeats} interleaved repeats, medians")
    print(f"{'contender':<11} {'ms':>9} {'GB/s':>8} {'% of bound':>11}")
    for name in cases:
        share = f"{100 * bound / median[name]:.0f}%" if name != "bandwidth" else ""
        print(f"{name:<11} {median[name] * 1e3:9.2f} {gbps[name]:8.1f} {share:>11}")
    print(f"AdamW bandwidth bound: {bound * 1e3:.2f} ms (28 bytes/element at {gbps['bandwidth']:.1f} GB/s)")
    for ours in ("zerostep", "triton"):
        if ours in median:
            print(f"{ours} vs torch fused: {median['fused'] / median[ours]:.2f}x throughput; "
                  f"vs foreach: {median['foreach'] / median[ours]:.2f}x; "
                  f"{100 * bound / median[ours]:.0f}% of the bandwidth bound")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=2**25)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "optimizer_update.py: --device cuda, but CUDA is not available on this machine\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        bench(args.numel, args.repeats, args.warmup, device)


if __name__ == "__main__":
    main()
