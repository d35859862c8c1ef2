"""Process-group start-up from torchrun's environment, and the one-rank fallbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zerostep.parallel.groups import (
    TORCHRUN_ENV,
    Mesh,
    default_timeout_s,
    dp_group,
    dp_rank,
    dp_world_size,
    maybe_init_distributed,
)
from zerostep.parallel.launch import free_port

WORKER = textwrap.dedent(
    """
    import json, os
    import torch, torch.distributed as dist
    from zerostep.parallel.groups import Mesh, maybe_init_distributed, dp_rank, dp_world_size

    seen = {}
    real_init = dist.init_process_group

    def spy_init(*args, **kwargs):  # records the timeout maybe_init_distributed passes
        seen["timeout"] = kwargs["timeout"].total_seconds()
        return real_init(*args, **kwargs)

    dist.init_process_group = spy_init
    assert not dist.is_initialized()
    active = maybe_init_distributed()
    again = maybe_init_distributed()  # idempotent
    mesh = Mesh.current()
    total = torch.tensor([float(dp_rank() + 1)])
    dist.all_reduce(total, group=mesh.dp_group)
    report_path = os.path.join(os.environ["REPORT_DIR"], f"rank{dp_rank()}.json")
    with open(report_path, "w") as f:  # one file per rank: torchrun interleaves the ranks' stdout
        f.write(json.dumps(dict(
            active=active, again=again, rank=dp_rank(), world_size=dp_world_size(),
            backend=dist.get_backend(), device=str(mesh.device), total=total.item(),
            timeout=seen["timeout"], local_rank=int(os.environ["LOCAL_RANK"]),
        )))
    dist.barrier()  # leave together: a rank tearing down gloo while its peer still runs can abort
    dist.destroy_process_group()
    """
)


def test_torchrun_two_ranks_initialize_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(ZEROSTEP_DIST_TIMEOUT="42", OMP_NUM_THREADS="1", REPORT_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    written = [tmp_path / f"rank{r}.json" for r in range(2)]
    if done.returncode != 0:
        # Seen once in ~30 runs under heavy load: both workers aborted ("terminate called without an
        # active exception", SIGABRT) while exiting. Tolerated only when the work itself completed.
        exit_abort = "terminate called without an active exception" in done.stdout + done.stderr
        assert exit_abort and all(p.exists() for p in written), done.stdout + done.stderr
    reports = [json.loads(p.read_text()) for p in written]
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["active"] and r["again"] and r["world_size"] == 2 and r["local_rank"] == r["rank"]
        assert r["backend"] == "gloo" and r["device"] == "cpu"
        assert r["total"] == 3.0 and r["timeout"] == 42.0


def test_without_torchrun_env_runs_alone(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert maybe_init_distributed() is False
    assert (dp_group(), dp_rank(), dp_world_size()) == (None, 0, 1)
    mesh = Mesh.current()
    assert mesh.is_single and mesh.dp_group is None
    assert Mesh.single() == Mesh(None, 0, 1, torch.device("cpu"))


def test_timeout_from_env(monkeypatch):
    monkeypatch.delenv("ZEROSTEP_DIST_TIMEOUT", raising=False)
    assert default_timeout_s() == 300.0
    monkeypatch.setenv("ZEROSTEP_DIST_TIMEOUT", "12.5")
    assert default_timeout_s() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("ZEROSTEP_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="ZEROSTEP_DIST_TIMEOUT"):
            default_timeout_s()
