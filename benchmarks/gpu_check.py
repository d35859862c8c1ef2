"""The GPU checks that need no benchmark of their own, each printing one ``CHECK <name> ok|FAIL ...`` line.

    python benchmarks/gpu_check.py             # every check (needs CUDA)
    python benchmarks/gpu_check.py --list      # the check names

- ``matmul``: dense bf16 matmul TFLOP/s (the MFU denominator; an H200 measures about 790).
- ``copy``: device-to-device copy GB/s (about 4300 on an H200's HBM).
- ``triton_adam`` / ``triton_lamb``: zerostep's fused optimizer kernels for real (not the interpreter)
  against their torch path on CUDA tensors.
- ``triton_signs``: 1-bit optimizers' sign packing kernel against the torch ops.
- ``nccl``: ``torch.distributed`` over NCCL at world size 1 (init, all-reduce, reduce-scatter,
  all-gather through zerostep's flat collectives) in a spawned rank.
- ``engine``: a compiled bf16 GPT step at stages 0 and 3 on the GPU, loss finite and falling, step time.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

import torch

DEVICE = "cuda"  # --dry-run: "cpu" (Triton under TRITON_INTERPRET=1, gloo for "nccl"), to test this script


def _size(gpu: int, cpu: int) -> int:
    return gpu if DEVICE == "cuda" else cpu


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], repeats: int = 10) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def check_matmul() -> str:
    n = _size(8192, 256)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    seconds = _timed(lambda: a @ b)
    return f"{2 * n**3 / seconds / 1e12:.0f} TFLOP/s bf16 ({n}^3)"


def check_copy() -> str:
    x = torch.empty(_size(2**28, 2**20), device=DEVICE, dtype=torch.float32)  # 1 GiB on GPU
    y = torch.empty_like(x)
    seconds = _timed(lambda: y.copy_(x))
    return f"{2 * x.numel() * 4 / seconds / 1e9:.0f} GB/s (read + write)"


def _optimizer_pair(make: Callable[[bool], object]) -> str:
    torch.manual_seed(0)
    params = {"a": torch.randn(_size(3_000_001, 3001), device=DEVICE), "b": torch.randn(7, device=DEVICE)}
    fused, plain = make(True), make(False)
    pf = {k: v.clone() for k, v in params.items()}
    pp = {k: v.clone() for k, v in params.items()}
    sf, sp = fused.init(pf), plain.init(pp)
    for t in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        lr = torch.tensor(1e-2 / (t + 1), device=DEVICE)
        fused.update_(grads, sf, pf, lr)
        plain.update_(grads, sp, pp, lr)
    for k in params:
        torch.testing.assert_close(pf[k], pp[k], rtol=1e-5, atol=1e-6)
    ones = {k: torch.ones_like(v) for k, v in pf.items()}
    seconds = _timed(lambda: fused.update_(ones, sf, pf, lr), repeats=20)
    return f"kernel = torch path over 3 steps; {seconds * 1e6:.0f} us per update of {pf['a'].numel()} params"


def check_triton_adam() -> str:
    from zerostep.optim import adam

    return _optimizer_pair(lambda u: adam(lr=1e-2, weight_decay=0.1, adam_w_mode=True, use_triton=u))


def check_triton_lamb() -> str:
    from zerostep.optim import lamb

    return _optimizer_pair(lambda u: lamb(lr=1e-2, weight_decay=0.1, use_triton=u))


def check_triton_signs() -> str:
    from zerostep.parallel import compressed, sign_kernels

    if DEVICE == "cuda" and not sign_kernels.usable(torch.zeros(8, device=DEVICE)):
        raise RuntimeError("the sign kernel is not usable on this CUDA tensor")
    x = torch.randn(8 * _size(1_000_003, 1003), device=DEVICE)
    packed = sign_kernels.pack_signs(x)
    assert torch.equal(packed, compressed.pack_signs_torch(x))
    assert torch.equal(sign_kernels.unpack_signs(packed), compressed.unpack_signs_torch(packed))
    seconds = _timed(lambda: sign_kernels.pack_signs(x))
    return f"pack/unpack = torch ops; pack {x.numel() * 4 / seconds / 1e9:.0f} GB/s of fp32 input"


def _nccl_rank(rank: int, world_size: int, device: str) -> str:
    import torch.distributed as dist

    global DEVICE
    DEVICE = device  # a spawned rank imports this module afresh

    from zerostep.parallel.collectives import all_gather_flat, all_reduce_flat, reduce_scatter_flat

    x = torch.arange(1024.0, device=DEVICE)
    assert dist.get_backend() == ("nccl" if DEVICE == "cuda" else "gloo")
    assert torch.equal(all_reduce_flat(x, None, None), x * world_size)
    shard = reduce_scatter_flat(x, None, 256)
    assert torch.equal(all_gather_flat(shard, None, 256), x * world_size)
    return "ok"


def check_nccl() -> str:
    from zerostep.parallel.launch import spawn_ranks

    backend = "nccl" if DEVICE == "cuda" else "gloo"
    results = spawn_ranks(_nccl_rank, 1, DEVICE, backend=backend, timeout=120)
    return f"world size 1 over {backend}: {results[0]}"


def check_engine() -> str:
    from zerostep.core import initialize
    from zerostep.core.gpt import GPT, GPTConfig

    out = []
    for stage in (0, 3):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=_size(4, 2), n_head=4, n_embd=_size(256, 64))).to(DEVICE)
        config = {
            "train_micro_batch_size_per_gpu": 8,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        }
        engine = initialize(model, config, loss_fn=lambda m, b: m(b[0], b[1]))
        state = engine.init(seed=0)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        x = torch.randint(0, 256, (8, 129), device=DEVICE, generator=gen)
        batch = (x[:, :-1], x[:, 1:])
        losses = []
        for _ in range(4):
            state = engine.step(state, batch)
            losses.append(float(state.metrics.loss))
        _sync()
        start = time.perf_counter()
        for _ in range(10):
            state = engine.step(state, batch)
        float(state.metrics.loss)
        ms = (time.perf_counter() - start) / 10 * 1e3
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
        out.append(f"stage {stage}: {ms:.1f} ms/step, loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    return "; ".join(out)


def _small_gpt_engine(config_extra: dict):
    from zerostep.core import initialize
    from zerostep.core.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=_size(4, 2), n_head=4, n_embd=_size(256, 64))).to(DEVICE)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        **config_extra,
    }
    engine = initialize(model, config, loss_fn=lambda m, b: m(b[0], b[1]))
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randint(0, 256, (8, 129), device=DEVICE, generator=gen)
    return engine, (x[:, :-1], x[:, 1:])


def check_host_syncs() -> str:
    """Device synchronisations per step of the one-region step (core/one_region.py): none at a constant
    lr, one (the last step's skip flag) under a schedule; counted by torch.cuda.set_sync_debug_mode."""
    schedule = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    out = []
    for name, extra, most in (("constant lr", {}, 0), ("WarmupLR", schedule, 1)):
        engine, batch = _small_gpt_engine(extra)
        state = engine.init(seed=0)
        for _ in range(3):
            state = engine.step(state, batch)
        _sync()
        if DEVICE != "cuda":
            out.append(f"{name}: one region {engine._one_region is not None} (syncs counted on CUDA only)")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(5):
                    state = engine.step(state, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        per_step = len(syncs) / 5
        assert per_step <= most, f"{name}: {per_step} syncs per step (at most {most}): {syncs[:3]}"
        out.append(f"{name}: {per_step:g} syncs/step")
    return "; ".join(out)


def check_cuda_graphs() -> str:
    """The one region as one CUDA graph (one_region.use_cuda_graphs) against the plain one region."""
    from zerostep.core.one_region import use_cuda_graphs

    times = {}
    for graphs in (False, True):
        engine, batch = _small_gpt_engine({})
        if graphs:
            if DEVICE != "cuda":
                return "needs CUDA (skipped in the dry run)"
            use_cuda_graphs(engine)
        state = engine.init(seed=0)
        for _ in range(4):
            state = engine.step(state, batch)
        _sync()
        start = time.perf_counter()
        for _ in range(20):
            state = engine.step(state, batch)
        float(state.metrics.loss)
        times[graphs] = (time.perf_counter() - start) / 20 * 1e3
    return f"one region {times[False]:.2f} ms/step, as a CUDA graph {times[True]:.2f} ms/step"


CHECKS = {
    "matmul": check_matmul,
    "copy": check_copy,
    "triton_adam": check_triton_adam,
    "triton_lamb": check_triton_lamb,
    "triton_signs": check_triton_signs,
    "nccl": check_nccl,
    "engine": check_engine,
    "host_syncs": check_host_syncs,
    "cuda_graphs": check_cuda_graphs,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="run on CPU, small sizes")
    parser.add_argument("names", nargs="*", help=f"checks to run (default all): {', '.join(CHECKS)}")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CHECKS))
        return 0
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check.py: CUDA is not available on this machine (torch.cuda.is_available() is False)")
        return 2
    unknown = [n for n in args.names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    failed = 0
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run"
    print(f"torch {torch.__version__}, {where}")
    for name in args.names or CHECKS:
        try:
            print(f"CHECK {name} ok: {CHECKS[name]()}", flush=True)
        except Exception as error:  # noqa: BLE001 - every check reports, one failure stops none
            failed += 1
            print(f"CHECK {name} FAIL: {type(error).__name__}: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
