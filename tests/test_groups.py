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
    check_model_devices,
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


def test_local_rank_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    import torch.distributed as dist

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def must_not_run(*args, **kwargs):
        raise AssertionError("called before the device was checked")

    monkeypatch.setattr(torch.cuda, "set_device", must_not_run)
    monkeypatch.setattr(dist, "init_process_group", must_not_run)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this process sees 1 GPU\(s\)"):
        maybe_init_distributed()
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match="LOCAL_RANK='-1' must be >= 0"):
        maybe_init_distributed()


def test_model_devices_must_be_one_and_this_ranks_gpu(monkeypatch):
    cuda = [torch.device("cuda", i) for i in range(3)]
    with pytest.raises(ValueError, match=r"several devices: cuda:0 \('a'"):
        check_model_devices({"a": cuda[0], "b": cuda[1]}, None)
    with pytest.raises(ValueError, match="NCCL but the model's parameters are on cpu"):
        check_model_devices({"a": torch.device("cpu")}, "nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"on cuda:0 but this rank's GPU is cuda:1 \(LOCAL_RANK=1\)"):
        check_model_devices({"a": cuda[0]}, "nccl")
    assert check_model_devices({"a": cuda[1], "b": cuda[1]}, "nccl") == cuda[1]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    with pytest.raises(ValueError, match=r"cuda:2 \(torch.cuda.current_device\(\)\)"):
        check_model_devices({"a": cuda[0]}, "nccl")
    # gloo and one process leave the choice of GPU to the user
    assert check_model_devices({"a": cuda[0]}, "gloo") == cuda[0]
    assert check_model_devices({"a": torch.device("cpu")}, None) == torch.device("cpu")
