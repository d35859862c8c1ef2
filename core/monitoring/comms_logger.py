"""DeepSpeed's comms logger: per collective kind and message size, the count, latency and algorithmic and
bus bandwidth of what this rank actually sent, printed as DeepSpeed's ``log_summary``.

Recording points (each a single ``is None`` check when the logger is off, no synchronisation):

- ``parallel/collectives.py``'s eager primitives (``all_reduce_into``, ``reduce_scatter_into``,
  ``all_gather_rows``, ``all_to_all_flat``), which every engine collective goes through (reducers, stage-2
  gradient sharding, stage-3 gathers, the step's parameter all-gather, the failure vote), over gloo, NCCL
  or the shared-memory channel alike;
- ``zerostep.comm``'s collectives, the ones a DeepSpeed script calls itself.

While the logger records, each collective is waited for where it is issued, so its latency is its own
(an ``async_op`` caller gets a completed handle; overlap with compute is lost while logging). Collectives
inside a ``torch.compile`` graph (a compiled engine step's functional collectives) cannot be timed from the
host without graph breaks, so an engine built with the config's ``comms_logger`` on runs eagerly
(``eager_for_comms_logger``: ``zerostep.initialize`` and ``zerostep train``) and every row is measured.
A compiled engine's graphs (the logger switched on by ``zerostep.comm.configure`` after it was built)
stay unrecorded; the summary then says so (their planned bytes are in ``engine.comm``).

Message size, as DeepSpeed counts it: the tensor given to the collective, i.e. for all_gather and
reduce_scatter one rank's shard. Bandwidths (Gbps), n ranks in the group, size in bytes, t in seconds:
all_reduce algbw = 2 size / t, busbw = size / t * 2 (n - 1) / n; all_gather / reduce_scatter algbw =
n size / t, busbw = algbw (n - 1) / n; all_to_all algbw = size / t, busbw = algbw (n - 1) / n; broadcast,
reduce, gather, scatter, send, recv, barrier busbw = algbw = size / t.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

ALL_REDUCE_KINDS = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce")
SHARDED_KINDS = ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor")
ALL_TO_ALL_KINDS = ("all_to_all", "all_to_all_single")


def bandwidths(kind: str, size: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in Gbps of one collective (DeepSpeed's ``calc_bw_log`` semantics)."""
    if seconds <= 0:
        return 0.0, 0.0
    if kind in ALL_REDUCE_KINDS:
        alg, bus = 2 * size / seconds, size / seconds * (2 * (n - 1) / n)
    elif kind in SHARDED_KINDS:
        alg = size * n / seconds
        bus = alg * (n - 1) / n
    elif kind in ALL_TO_ALL_KINDS:
        alg = size / seconds
        bus = alg * (n - 1) / n
    else:  # point-to-point, broadcast, reduce, gather, scatter, barrier
        alg = bus = size / seconds
    return alg * 8 / 1e9, bus * 8 / 1e9


def convert_size(size: int) -> str:
    """DeepSpeed's message-size text: powers of 1024 ("1.5 MB")."""
    if size == 0:
        return "0B"
    names = ("B", "KB", "MB", "GB", "TB", "PB")
    i = min(int(math.floor(math.log(size, 1024))), len(names) - 1)
    return f"{round(size / 1024**i, 2)} {names[i]}"


def trim_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean without the lowest and highest ``fraction`` of values (DeepSpeed averages so)."""
    ordered = sorted(values)
    cut = int(len(ordered) * fraction)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


@dataclass
class Record:
    count: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    algbw: list[float] = field(default_factory=list)
    busbw: list[float] = field(default_factory=list)


def _group_size(group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class CommsLogger:
    """The records of one process: {name: {message bytes: Record}}."""

    def __init__(self) -> None:
        self.enabled = False
        self.verbose = False
        self.prof_all = True
        self.prof_ops: list[str] = []
        self.debug = False
        self.records: dict[str, dict[int, Record]] = {}
        self.compiled_engines = (
            0  # compiled engines built while logging: their graphs' collectives are unseen
        )

    def configure(
        self,
        enabled: bool | None = None,
        prof_all: bool | None = None,
        prof_ops: list[str] | None = None,
        verbose: bool | None = None,
        debug: bool | None = None,
    ) -> None:
        if enabled is not None:
            self.enabled = bool(enabled)
        if prof_all is not None:
            self.prof_all = bool(prof_all)
        if prof_ops is not None:
            self.prof_ops = list(prof_ops)
        if verbose is not None:
            self.verbose = bool(verbose)
        if debug is not None:
            self.debug = bool(debug)

    def wants(self, kind: str) -> bool:
        return self.enabled and (self.prof_all or kind in self.prof_ops)

    def time(
        self, kind: str, size: int, group: Any, run: Callable[[], Any], device: torch.device | None
    ) -> Any:
        """Run ``run`` (a collective) and record it; an async handle it returns is waited for first."""
        if not self.wants(kind):
            return run()
        name = f"{kind} | [Caller Func: {sys._getframe(2).f_code.co_name}]" if self.debug else kind
        _sync(device)
        start = time.perf_counter()
        result = run()
        if result is not None and hasattr(result, "wait"):
            result.wait()
        _sync(device)
        self.append(kind, name, (time.perf_counter() - start) * 1e3, size, _group_size(group))
        return result

    def append(self, kind: str, name: str, latency_ms: float, size: int, n: int) -> None:
        alg, bus = bandwidths(kind, size, latency_ms / 1e3, n)
        record = self.records.setdefault(name, {}).setdefault(size, Record())
        record.count += 1
        record.latencies_ms.append(latency_ms)
        record.algbw.append(alg)
        record.busbw.append(bus)
        if self.verbose:
            print(
                f"comm op: {name} | time (ms): {latency_ms:.2f} | msg size: {convert_size(size)} | "
                f"algbw (Gbps): {alg:.2f} | busbw (Gbps): {bus:.2f}",
                flush=True,
            )

    def reset(self) -> None:
        self.records.clear()

    def total_operations(self) -> int:
        return sum(r.count for sizes in self.records.values() for r in sizes.values())

    def total_bytes(self, name: str | None = None) -> int:
        """Message bytes recorded (for ``name`` only when given)."""
        return sum(
            size * r.count
            for n, sizes in self.records.items()
            if name is None or n == name
            for size, r in sizes.items()
        )

    def summary(self) -> dict[str, dict[int, dict[str, Any]]]:
        """DeepSpeed's ``log_summary(return_dict=True)["summary"]`` layout."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for name, sizes in self.records.items():
            out[name] = {
                size: {
                    "count": r.count,
                    "total_latency_ms": sum(r.latencies_ms),
                    "avg_latency_ms": trim_mean(r.latencies_ms),
                    "tput_avg_gbps": trim_mean(r.algbw),
                    "busbw_avg_gbps": trim_mean(r.busbw),
                    "msg_size_bytes": size,
                    "msg_size_str": convert_size(size),
                }
                for size, r in sorted(sizes.items())
            }
        return out

    def summary_text(self) -> str:
        columns = ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)")
        columns += ("tput_avg (Gbps)", "busbw_avg (Gbps)")
        lines = ["".join(f"{c:<20}" for c in columns)]
        for name, sizes in self.summary().items():
            lines.append(name)
            for row in sizes.values():
                values = (
                    "",
                    row["msg_size_str"],
                    row["count"],
                    f"{row['total_latency_ms']:.2f}",
                    f"{row['avg_latency_ms']:.2f}",
                    f"{row['tput_avg_gbps']:.2f}",
                    f"{row['busbw_avg_gbps']:.2f}",
                )
                lines.append("".join(f"{str(v):<20}" for v in values))
        if self.compiled_engines:
            lines.append(
                "note: every row above is measured; collectives inside compiled engine steps "
                "(torch.compile graphs) are not, their planned bytes are in engine.comm"
            )
        return "\n".join(lines)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


COMMS_LOGGER = CommsLogger()  # the process's logger (DeepSpeed's deepspeed.comm.comms_logger)


def active() -> CommsLogger | None:
    """The logger when it records, else None (what the recording points check)."""
    return COMMS_LOGGER if COMMS_LOGGER.enabled else None


def note_comms_logger(config: Any, compiled: bool) -> None:
    """An engine was built: with the config's ``comms_logger`` on, configure the process logger from the
    block (``zerostep.comm.configure``); remember a compiled engine, whose graphs' collectives go
    unrecorded (the summary says so)."""
    if compiled:
        COMMS_LOGGER.compiled_engines += 1
    if config.comms_logger.enabled:
        from zerostep.comm.comms_logging import configure

        configure(deepspeed_config=config)


def eager_for_comms_logger(config: Any, compile: bool) -> bool:
    """The ``compile`` an engine should get: False while the config's comms logger is on, with a warning,
    so that every collective of the step is issued eagerly and measured (inside a torch.compile graph
    there is no host point to time one at without graph breaks)."""
    if compile and config.comms_logger.enabled:
        warnings.warn(
            "comms_logger.enabled = true: the engine runs eagerly (compile=False) so that every collective "
            "is measured; collectives inside torch.compile graphs cannot be timed",
            stacklevel=3,
        )
        return False
    return compile
