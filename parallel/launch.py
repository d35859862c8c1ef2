"""Run a function on N local ranks with real ``torch.distributed`` (gloo on 127.0.0.1).

For tests and benchmarks: ``spawn_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes,
initializes a gloo process group in each on a free port, calls ``fn(rank, world_size, *args)`` and returns
the per-rank results in rank order. Every wait is bounded by ``timeout``; on any failure or timeout all
ranks are killed and ``RankFailure`` carries each failing rank's traceback. No process is left behind.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """One or more ranks raised or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, timeout, fn, args, results, env, backend="gloo"):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        if backend == "nccl":
            from zerostep.parallel.groups import local_rank_device

            torch.cuda.set_device(local_rank_device())  # one GPU per rank, as torchrun's LOCAL_RANK
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        out = fn(rank, world_size, *args)
        # Leave together: a rank tearing down gloo while a peer still works can abort in C++.
        dist.barrier()
        # Plain pickle, not torch.multiprocessing's shared-memory tensor handles, which die with
        # this process before the parent reads them.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    collective_timeout: float | None = None,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo; ``backend="nccl"`` puts rank
    ``r`` on GPU ``r``); return results by rank.

    ``fn`` and its results must be picklable (define ``fn`` at module level). ``collective_timeout``
    bounds each collective (default: ``timeout``), so a rank that dies makes the others fail instead of
    hanging.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    ctimeout = collective_timeout if collective_timeout is not None else timeout
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, port, ctimeout, fn, args, results, dict(env or {}), backend),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
                outcomes[rank] = (ok, out)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes]
                if dead:
                    # A rank died without reporting (e.g. killed): give the queue a moment, then stop.
                    try:
                        rank, ok, out = results.get(timeout=2.0)
                        outcomes[rank] = (ok, out)
                        continue
                    except queue.Empty:
                        for r in dead:
                            outcomes[r] = (False, f"rank {r} exited with code {procs[r].exitcode}")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        killed = set()
        for r, p in enumerate(procs):
            if p.is_alive():
                killed.add(r)
                p.kill()
                p.join(timeout=5)
        results.close()
    for r, p in enumerate(procs):
        # a rank that reported and then died on the way out (e.g. "terminate called ..." aborting at
        # interpreter exit) fails the run too: scripts see its exit code
        if r not in killed and outcomes.get(r, (False,))[0] and p.exitcode not in (0, None):
            outcomes[r] = (False, f"rank {r} returned its result, then exited with code {p.exitcode}")
    failures = {r: out for r, (ok, out) in outcomes.items() if not ok}
    missing = [r for r in range(world_size) if r not in outcomes]
    if failures or missing:
        parts = [f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items())]
        if missing:
            parts.append(f"ranks {missing} did not finish within {timeout:.0f} s")
        raise RankFailure("distributed run failed:\n" + "\n".join(parts))
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
