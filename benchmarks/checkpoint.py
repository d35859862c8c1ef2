"""Checkpoint throughput: zerostep.io vs torch.save, safetensors and torch.distributed.checkpoint (DCP).

    python benchmarks/checkpoint.py                 # ~1 GiB state, 7 repeats
    python benchmarks/checkpoint.py --gib 0.25 --repeats 5 --skip-dcp

Part 1, one process: save (without and with fsync) and load of a dict of fp32 tensors. Loads are from
the page cache (every file was just written) and *materialized*: the tensors own their memory, and
"touch" rows additionally read every element of a zero-copy (mmap) load. DCP loads into preallocated
tensors (its only mode); their allocation is inside the timing of "load" and outside it in "load in
place", where every method fills tensors that already exist, as ``load_state_dict`` does.

Part 2, resharding: flat fp32 leaves (master, exp_avg, exp_avg_sq) sharded over 2 gloo ranks, saved
with ``save_checkpoint`` and with DCP (DTensor, Shard(0)); then loaded at 1 rank (in this process) and at
3 ranks (every rank loads its new shard; the time is the slowest rank's). Medians over repeats, which
go round-robin over the methods of each row group (the machine may be shared).

Part 3, resume memory: how much memory ``engine.load`` adds while it loads, into new buffers or into an
existing state's (``into=``).

``--device cuda`` (a GPU machine): the state lives on the GPU; saves (device-to-host copy included) and
loads in place into GPU tensors (``load_pytree(out=)`` against ``torch.load(map_location=)`` +
``copy_``), absolute seconds and GiB/s; parts 2-3 are CPU-only and are skipped.

    python benchmarks/checkpoint.py --device cuda --gib 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time

import torch
import torch.distributed as dist

import zerostep.io as zio
from zerostep.parallel.launch import spawn_ranks

LEAVES = ("master", "exp_avg", "exp_avg_sq")


def timed(cases: list, repeats: int) -> list[float]:
    """Median seconds of each ``(fn, before)`` case. Repeats go round-robin over the cases, so a burst of
    load from other processes (this machine is shared) slows one repeat of several methods rather than
    every repeat of one; ``before`` runs untimed before each call. Each round runs the cases in a new
    (seeded) random order: a case inherits the memory state the one before it left, and on this VM that
    matters (free memory handed back to the host through virtio-balloon free page reporting costs a
    host fault on first touch; a fixed order made the same load 0.14 s or 0.70 s by position alone)."""
    times: list[list[float]] = [[] for _ in cases]
    order = random.Random(0)
    for round_ in range(repeats + 1):  # round 0 is untimed: first touches of memory, lazy imports
        for i in order.sample(range(len(cases)), len(cases)):
            (fn, before), out = cases[i], times[i]
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            if round_:
                out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def clean(path: str):
    def run():
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        os.sync()  # start every save with no dirty pages (the disk here is slow and shared)

    return run


def single_process(args, root: str, rows: list) -> None:
    from safetensors.torch import load_file, save_file

    n = int(args.gib * 2**30 / 4 / args.tensors)
    state = {f"layer{i}.weight": torch.randn(n) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    paths = {k: os.path.join(root, f"state.{k}") for k in ("zs", "pt", "st", "dcp")}
    r = args.repeats

    def dcp_save(fsync):
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=dcp.FileSystemWriter(paths["dcp"], sync_files=fsync))

    def saves(fsync: bool) -> list:
        sync = lambda path: fsync and fsync_file(path)  # the other writers have no fsync option
        return [
            ("zerostep save_pytree", lambda: zio.save_pytree(paths["zs"], state, fsync=fsync), paths["zs"]),
            (
                "safetensors save_file",
                lambda: (save_file(state, paths["st"]), sync(paths["st"])),
                paths["st"],
            ),
            ("torch.save", lambda: (torch.save(state, paths["pt"]), sync(paths["pt"])), paths["pt"]),
        ] + ([] if args.skip_dcp else [("DCP save", lambda: dcp_save(fsync), paths["dcp"])])

    for fsync in (False, True):
        cases = saves(fsync)
        medians = timed([(fn, clean(path)) for _, fn, path in cases], r)
        for (name, _, _), seconds in zip(cases, medians):
            rows.append((f"save ({'fsync' if fsync else 'no fsync'})", name, nbytes, seconds))

    import torch.distributed.checkpoint as dcp

    def dcp_load():
        into = {k: torch.empty_like(v) for k, v in state.items()}
        dcp.load(into, checkpoint_id=paths["dcp"])

    # In place, as ``model.load_state_dict`` loads: into tensors that already exist (touched, so no page
    # faults), allocated once outside the timing.
    existing = {k: torch.ones_like(v) for k, v in state.items()}

    def copy_into(tree):
        for k, t in tree.items():
            existing[k].copy_(t)

    touch = lambda tree: [t.sum() for t in tree.values()]
    loads = [
        ("zerostep load_pytree (verify)", lambda: zio.load_pytree(paths["zs"])),
        ("zerostep load_pytree (no verify)", lambda: zio.load_pytree(paths["zs"], verify=False)),
        ("safetensors load_file + clone", lambda: [t.clone() for t in load_file(paths["st"]).values()]),
        ("torch.load", lambda: torch.load(paths["pt"])),
        ("zerostep mmap + touch (verify)", lambda: touch(zio.load_pytree(paths["zs"], mmap=True))),
        (
            "zerostep mmap + touch (no verify)",
            lambda: touch(zio.load_pytree(paths["zs"], mmap=True, verify=False)),
        ),
        ("safetensors load_file + touch", lambda: touch(load_file(paths["st"]))),
        ("torch.load(mmap) + touch", lambda: touch(torch.load(paths["pt"], mmap=True))),
    ]
    if not args.skip_dcp:
        loads.append(("DCP load (into preallocated)", dcp_load))
    for (name, _), seconds in zip(loads, timed([(fn, None) for _, fn in loads], r)):
        rows.append(("load (page cache)", name, nbytes, seconds))

    in_place = [
        ("zerostep load_pytree(out=) (verify)", lambda: zio.load_pytree(paths["zs"], out=existing)),
        (
            "zerostep load_pytree(out=) (no verify)",
            lambda: zio.load_pytree(paths["zs"], out=existing, verify=False),
        ),
        ("safetensors load_file + copy_", lambda: copy_into(load_file(paths["st"]))),
        ("torch.load(mmap) + copy_", lambda: copy_into(torch.load(paths["pt"], mmap=True))),
    ]
    if not args.skip_dcp:
        in_place.append(("DCP load", lambda: dcp.load(existing, checkpoint_id=paths["dcp"])))
    for (name, _), seconds in zip(in_place, timed([(fn, None) for _, fn in in_place], r)):
        rows.append(("load in place", name, nbytes, seconds))


def flat_shards(rank: int, world_size: int, numel: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    length = zio.shard_numel(numel, world_size)
    return {k: torch.randn(length, generator=gen) for k in LEAVES}


def _dist_save(rank, world_size, root, numel, repeats, skip_dcp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    shards = flat_shards(rank, world_size, numel)
    mesh = init_device_mesh("cpu", (world_size,))
    flat_numel = {k: numel for k in LEAVES}

    def ours(path, fsync):
        zio.save_checkpoint(path, "t", shards, flat_numel=flat_numel, fsync=fsync)

    def theirs(path, fsync):
        state = {k: DTensor.from_local(v, mesh, [Shard(0)]) for k, v in shards.items()}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=fsync))

    cases = [(name, fn) for name, fn in (("zs", ours), ("dcp", theirs)) if not (name == "dcp" and skip_dcp)]
    times: dict = {}
    for fsync in (False, True):
        for _ in range(repeats):  # round-robin over the methods, as in ``timed``
            for name, fn in cases:
                path = os.path.join(root, f"{name}{int(fsync)}")
                if rank == 0:
                    clean(path)()
                dist.barrier()
                t0 = time.perf_counter()
                fn(path, fsync)
                dist.barrier()
                times.setdefault((name, fsync), []).append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def _dist_load(rank, world_size, root, numel, repeats, skip_dcp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,)) if world_size > 1 else None
    length = zio.shard_numel(numel, world_size)

    def ours():
        return zio.load_checkpoint(os.path.join(root, "zs0"), rank=rank, world_size=world_size)[0]

    def theirs():
        if mesh is None:
            state = {k: torch.empty(numel) for k in LEAVES}
        else:
            state = {k: DTensor.from_local(torch.empty(length), mesh, [Shard(0)]) for k in LEAVES}
        dcp.load(state, checkpoint_id=os.path.join(root, "dcp0"))
        return state

    cases = [(name, fn) for name, fn in (("zs", ours), ("dcp", theirs)) if not (name == "dcp" and skip_dcp)]
    for _, fn in cases:
        fn()  # warm
    times: dict = {}
    for _ in range(repeats):  # round-robin over the methods, as in ``timed``
        for name, fn in cases:
            if mesh is not None:
                dist.barrier()
            t0 = time.perf_counter()
            fn()
            if mesh is not None:
                dist.barrier()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def resharding(args, root: str, rows: list) -> None:
    numel = int(args.gib * 2**30 / 4 / len(LEAVES)) // 6 * 6  # DTensor Shard(0) shards evenly at 2 and 3
    nbytes = numel * 4 * len(LEAVES)
    saved = spawn_ranks(_dist_save, 2, root, numel, args.repeats, args.skip_dcp, timeout=1200)
    for (name, fsync), seconds in sorted(saved[0].items(), key=lambda kv: (kv[0][1], kv[0][0] != "zs")):
        label = "zerostep save_checkpoint" if name == "zs" else "DCP save (DTensor)"
        rows.append((f"save 2 ranks ({'fsync' if fsync else 'no fsync'})", label, nbytes, seconds))
    for world_size in (1, 3):
        if world_size == 1:
            got = _dist_load(0, 1, root, numel, args.repeats, args.skip_dcp)
        else:
            got = spawn_ranks(_dist_load, world_size, root, numel, args.repeats, args.skip_dcp, timeout=1200)
            got = {k: max(g[k] for g in got) for k in got[0]}
        for name, seconds in got.items():
            label = "zerostep load_checkpoint" if name == "zs" else "DCP load (DTensor)"
            rows.append((f"load 2 -> {world_size} ranks", label, nbytes, seconds))


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def _sample_peak(peak: list[float], done) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], _anon_mib())
        time.sleep(0.0005)


def resume_memory(args, root: str) -> list[str]:
    """Part 3: the extra memory a resume takes, ``engine.load(dir)`` against ``engine.load(dir,
    into=state)``: the peak growth of this process's anonymous memory (sampled every 0.5 ms) while it
    loads an AdamW state (master + two moments, ``--gib`` in all) over a state of the same engine."""
    import threading

    from torch import nn

    from zerostep.core import Config, initialize

    width = 2048
    layers = max(1, round(args.gib * 2**30 / 12 / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}
    loss = lambda out, y: ((out - y) ** 2).mean()
    engine = initialize(model, Config.from_dict(config, world_size=1), loss_fn=loss, compile=False)
    path = os.path.join(root, "resume")
    engine.save(engine.init(), path, fsync=False)
    lines = []
    for label, in_place in (("engine.load(dir)", False), ("engine.load(dir, into=state)", True)):
        state = engine.init()
        peak, done = [0.0], threading.Event()
        base = _anon_mib()
        sampler = threading.Thread(target=_sample_peak, args=(peak, done))
        sampler.start()
        state = engine.load(path, into=state if in_place else None)
        done.set()
        sampler.join()
        lines.append(f"{label:<30} anonymous memory grew by {peak[0] - base:7.0f} MiB at the peak")
        del state
    state_mib = layers * (width * width + width) * 12 / 2**20
    return [f"resume of a {state_mib:.0f} MiB AdamW state (ZeRO-2, one rank):"] + lines


def gpu_resident(args, root: str, rows: list, device: str = "cuda") -> None:
    """Part 1 for a state on the GPU: save from it and load in place into it."""
    n = int(args.gib * 2**30 / 4 / args.tensors)
    state = {f"layer{i}.weight": torch.randn(n, device=device) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    paths = {k: os.path.join(root, f"gpu.{k}") for k in ("zs", "pt")}
    existing = {k: torch.empty_like(v) for k, v in state.items()}

    def synced(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        return run

    for fsync in (False, True):
        cases = [
            (
                "zerostep save_pytree",
                lambda f=fsync: zio.save_pytree(paths["zs"], state, fsync=f),
                paths["zs"],
            ),
            (
                "torch.save",
                lambda f=fsync: (torch.save(state, paths["pt"]), f and fsync_file(paths["pt"])),
                paths["pt"],
            ),
        ]
        medians = timed([(synced(fn), clean(path)) for _, fn, path in cases], args.repeats)
        for (name, _, _), seconds in zip(cases, medians):
            rows.append((f"GPU save ({'fsync' if fsync else 'no fsync'})", name, nbytes, seconds))

    def torch_into():
        for k, t in torch.load(paths["pt"], map_location=device).items():
            existing[k].copy_(t)

    loads = [
        ("zerostep load_pytree(out=) (verify)", lambda: zio.load_pytree(paths["zs"], out=existing)),
        (
            "zerostep load_pytree(out=) (no verify)",
            lambda: zio.load_pytree(paths["zs"], out=existing, verify=False),
        ),
        ("torch.load(map_location) + copy_", torch_into),
    ]
    for (name, _), seconds in zip(loads, timed([(synced(fn), None) for _, fn in loads], args.repeats)):
        rows.append(("GPU load in place", name, nbytes, seconds))
    assert all(torch.equal(existing[k], state[k]) for k in state)


def report(rows: list) -> None:
    print(f"\n{'operation':<26} {'method':<40} {'GiB':>6} {'seconds':>8} {'GiB/s':>7} {'vs zerostep':>12}")
    ours = {}
    for op, method, _, seconds in rows:
        if method.startswith("zerostep") and op not in ours:
            ours[op] = seconds
    for op, method, nbytes, seconds in rows:
        ratio = seconds / ours[op] if op in ours else float("nan")
        print(
            f"{op:<26} {method:<40} {nbytes / 2**30:>6.2f} {seconds:>8.3f} {nbytes / 2**30 / seconds:>7.2f} "
            f"{ratio:>11.2f}x"
        )
    print("\n'vs zerostep': that method's time / zerostep's first row of the operation (>1: zerostep faster)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB (default 1)")
    parser.add_argument("--tensors", type=int, default=32, help="tensors in the single-process state")
    # on this shared machine about one save or load in five stalls for 1-2 s, whatever the method
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default="/tmp/zerostep-bench-checkpoint")
    parser.add_argument("--skip-dcp", action="store_true")
    parser.add_argument("--skip-reshard", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "checkpoint.py: --device cuda, but CUDA is not available on this machine\n")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    rows: list = []
    memory: list[str] = []
    try:
        if args.device == "cuda":
            gpu_resident(args, args.dir, rows)
            args.skip_reshard = True
        else:
            single_process(args, args.dir, rows)
        if not args.skip_reshard:
            resharding(args, os.path.join(args.dir, "reshard"), rows)
        if args.device == "cpu":
            memory = resume_memory(args, args.dir)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    from zerostep.io.native import CRC32_IMPL

    cpus = os.cpu_count()
    print(f"torch {torch.__version__}, {cpus} CPUs, median of {args.repeats}, crc32 by {CRC32_IMPL}")
    report(rows)
    print("\n" + "\n".join(memory))


if __name__ == "__main__":
    main()
