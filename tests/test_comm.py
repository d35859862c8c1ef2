"""zerostep.comm: DeepSpeed's deepspeed.comm names over torch.distributed, and init_distributed."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import zerostep.comm as comm
from zerostep.comm.init import _as_timedelta
from zerostep.comm.launcher_env import MPI_FLAVOURS, SINGLE, TORCHRUN, LaunchEnv, discover
from zerostep.comm.reduce_op import torch_reduce_op
from zerostep.parallel.groups import TORCHRUN_ENV
from zerostep.parallel.launch import free_port, spawn_ranks

LAUNCH_VARS = set(TORCHRUN_ENV) | {"LOCAL_RANK", "DEEPSPEED_TIMEOUT", "ZEROSTEP_DIST_TIMEOUT"}
LAUNCH_VARS |= {name for flavour in MPI_FLAVOURS for name in flavour[1:]}


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- without a process group ----------------------------------------------------------------------------


def test_reduce_op_translates_deepspeed_and_passes_torch_ops():
    assert [op.name for op in comm.ReduceOp] == [
        "SUM",
        "PRODUCT",
        "MIN",
        "MAX",
        "BAND",
        "BOR",
        "BXOR",
        "AVG",
        "UNUSED",
    ]
    assert comm.ReduceOp.AVG.value == 7  # DeepSpeed's values
    for op in comm.ReduceOp:
        if op is not comm.ReduceOp.UNUSED:
            assert torch_reduce_op(op) == getattr(dist.ReduceOp, op.name)
    assert torch_reduce_op(dist.ReduceOp.MAX) == dist.ReduceOp.MAX
    with pytest.raises(ValueError, match="UNUSED"):
        torch_reduce_op(comm.ReduceOp.UNUSED)
    with pytest.raises(TypeError, match="not a reduction"):
        torch_reduce_op("sum")


def test_queries_without_a_group_answer_one_process_and_collectives_say_what_to_do(clean_env):
    assert not comm.is_initialized() and comm.is_available()
    assert (comm.get_rank(), comm.get_world_size(), comm.get_local_rank()) == (0, 1, 0)
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert comm.get_local_rank() == 3  # DeepSpeed's fallback after LOCAL_RANK
    clean_env.setenv("LOCAL_RANK", "1")
    assert comm.get_local_rank() == 1
    with pytest.raises(
        RuntimeError, match=r"all_reduce: torch.distributed is not initialized.*init_distributed"
    ):
        comm.all_reduce(torch.ones(2))
    with pytest.raises(RuntimeError, match="barrier"):
        comm.barrier()
    with pytest.raises(RuntimeError, match="dist_init_required"):
        comm.init_distributed(dist_init_required=False)
    assert not dist.is_initialized()


def test_discover_reads_torchrun_and_mpi_launchers(clean_env):
    assert discover().source == SINGLE
    env = dict(RANK="1", WORLD_SIZE="4", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234", LOCAL_RANK="1")
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert discover() == LaunchEnv(TORCHRUN, 1, 4, 1, "10.0.0.1", 1234)
    for name in env:
        clean_env.delenv(name)

    clean_env.setenv("OMPI_COMM_WORLD_RANK", "2")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "3")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3")
    found = discover(distributed_port=4321)
    assert (found.source, found.rank, found.world_size, found.local_rank) == ("Open MPI", 2, 3, 2)
    assert (found.master_addr, found.master_port) == ("127.0.0.1", 4321)  # one host: loopback
    assert discover(auto_mpi_discovery=False).source == SINGLE

    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")  # three hosts, no MASTER_ADDR, no mpi4py
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        discover()
    clean_env.setenv("MASTER_ADDR", "node0")
    assert discover().master_addr == "node0"
    for name in (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MASTER_ADDR",
    ):
        clean_env.delenv(name)

    clean_env.setenv("PMI_RANK", "0")
    clean_env.setenv("PMI_SIZE", "1")
    assert discover().source == "MPICH / Intel MPI"
    clean_env.setenv("PMI_RANK", "5")
    with pytest.raises(ValueError, match="PMI_RANK=5 must be < PMI_SIZE=1"):
        discover()
    clean_env.delenv("PMI_RANK")
    clean_env.delenv("PMI_SIZE")

    clean_env.setenv("WORLD_SIZE", "2")  # half a torchrun environment
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        discover()
    clean_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        discover()


def test_timeouts(clean_env):
    assert comm.default_pg_timeout() == datetime.timedelta(seconds=300)
    clean_env.setenv("ZEROSTEP_DIST_TIMEOUT", "42")
    assert comm.default_pg_timeout() == datetime.timedelta(seconds=42)
    clean_env.setenv("DEEPSPEED_TIMEOUT", "3")  # DeepSpeed's variable, in minutes, wins
    assert comm.default_pg_timeout() == datetime.timedelta(minutes=3)
    assert _as_timedelta(datetime.timedelta(seconds=7)) == datetime.timedelta(seconds=7)
    assert _as_timedelta(2.5) == datetime.timedelta(seconds=2.5)
    with pytest.raises(TypeError, match="timedelta"):
        _as_timedelta("10m")
    with pytest.raises(ValueError, match="positive"):
        _as_timedelta(0)
    clean_env.setenv("DEEPSPEED_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DEEPSPEED_TIMEOUT"):
        comm.default_pg_timeout()


def test_comms_logging_switches_follow_the_config():
    from zerostep.parallel import collectives

    try:
        comm.configure(deepspeed_config={"comms_logger": {"enabled": True, "prof_all": False}})
        assert collectives.comms_log is not None and not collectives.comms_log.prof_all
        comm.configure(deepspeed_config={"comms_logger": {"enabled": False}})
        assert collectives.comms_log is None
        assert comm.log_summary(return_dict=True)["summary"] == {}
        assert not comm.has_comm_data() and comm.get_comm_operation_count() == 0
    finally:
        comm.configure(enabled=False, prof_all=True)


# -- init_distributed in fresh processes: no launcher, and an MPI launch without mpi4py ---------------

INIT_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import zerostep.comm as comm

    comm.init_distributed(verbose=False)
    comm.init_distributed(dist_init_required=True, verbose=False)  # idempotent
    t = torch.tensor([float(comm.get_rank() + 1)])
    comm.all_reduce(t)
    comm.barrier()
    report = dict(rank=dist.get_rank(), world=dist.get_world_size(), backend=dist.get_backend(),
                  total=t.item(), env=[os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")],
                  local_rank=comm.get_local_rank(), timeout=dist.distributed_c10d._get_default_timeout(
                      dist.Backend.GLOO).total_seconds())
    with open(sys.argv[1], "w") as f:
        f.write(json.dumps(report))
    comm.destroy_process_group()
    """
)


def test_init_distributed_alone_and_from_open_mpi_variables(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(INIT_WORKER)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(OMP_NUM_THREADS="1")
    runs = {"alone": dict(base)}
    port = str(free_port())
    for r in range(2):  # what mpirun -np 2 exports on one host
        runs[f"mpi{r}"] = dict(
            base,
            OMPI_COMM_WORLD_RANK=str(r),
            OMPI_COMM_WORLD_SIZE="2",
            OMPI_COMM_WORLD_LOCAL_RANK=str(r),
            OMPI_COMM_WORLD_LOCAL_SIZE="2",
            MASTER_PORT=port,
        )
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"{name}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, env in runs.items()
    }
    try:
        outputs = {name: p.communicate(timeout=120)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outputs[name]}"
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone == dict(
        rank=0,
        world=1,
        backend="gloo",
        total=1.0,
        env=["0", "1", "0"],
        local_rank=0,
        timeout=alone["timeout"],
    )
    for r in range(2):
        got = json.loads((tmp_path / f"mpi{r}.json").read_text())
        assert (got["rank"], got["world"], got["total"], got["local_rank"]) == (r, 2, 3.0, r)
        assert got["env"] == [str(r), "2", str(r)]  # exported as torchrun's variables


# -- two gloo ranks: every wrapper in one spawn -----------------------------------------------------------


def _exercise(rank: int, world_size: int) -> dict:
    out: dict = {}
    comm.init_distributed(verbose=False)  # the group spawn_ranks made is kept
    out["ranks"] = (comm.get_rank(), comm.get_world_size(), comm.get_local_rank(), comm.get_backend())
    out["global"] = (comm.get_global_rank(None, 1), comm.get_all_ranks_from_group())
    assert comm.get_world_group() is dist.group.WORLD

    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    comm.all_reduce(x)  # DeepSpeed's SUM
    y = torch.tensor([float(rank + 1)])
    comm.all_reduce(y, op=comm.ReduceOp.MAX, prof=False, log_name="x", debug="y")
    z = torch.tensor([float(rank + 1)])
    comm.all_reduce(z, op=dist.ReduceOp.PRODUCT, async_op=True).wait()
    out["all_reduce"] = (x.tolist(), y.item(), z.item())
    w = torch.tensor([float(rank)])
    assert comm.inference_all_reduce(w) is w
    a, b = torch.full((2,), float(rank + 1)), torch.full((3,), float(rank + 10))
    comm.all_reduce_coalesced([a, b])
    c = torch.full((1,), float(rank + 1))
    handle = comm.all_reduce_coalesced([c], async_op=True)
    handle.wait()
    out["coalesced"] = (a.tolist(), b.tolist(), c.item(), handle.is_completed())

    b0 = torch.tensor([float(rank + 5)])
    comm.broadcast(b0, src=1)
    objects = [{"from": rank}]
    comm.broadcast_object_list(objects, src=0)
    out["broadcast"] = (b0.item(), objects[0])

    parts = [torch.empty(2) for _ in range(world_size)]
    comm.all_gather(parts, torch.full((2,), float(rank)))
    gathered = torch.empty(2 * world_size)
    comm.all_gather_into_tensor(gathered, torch.full((2,), float(rank)))
    via_fn = torch.empty(2 * world_size)
    comm.allgather_fn(via_fn, torch.full((2,), float(rank)), async_op=True).wait()
    names: list = [None] * world_size
    comm.all_gather_object(names, f"r{rank}")
    outs = [torch.empty(2), torch.empty(4)]
    comm.all_gather_coalesced(outs, [torch.full((1,), float(rank)), torch.full((2,), float(rank))])
    out["all_gather"] = (
        [p.tolist() for p in parts],
        gathered.tolist(),
        via_fn.tolist(),
        names,
        [o.tolist() for o in outs],
    )

    full = torch.arange(4.0) + 10 * rank  # [N * 2]
    shard = torch.empty(2)
    comm.reduce_scatter_tensor(shard, full)
    shard_avg = torch.empty(2)
    comm.reduce_scatter_fn(shard_avg, full, op=comm.ReduceOp.AVG)
    listed = torch.empty(2)
    comm.reduce_scatter(listed, list(full.chunk(world_size)))
    r = torch.tensor([float(rank + 1)])
    comm.reduce(r, dst=0)
    out["reduce"] = (shard.tolist(), shard_avg.tolist(), listed.tolist(), r.item())

    received = torch.empty(4)
    comm.all_to_all_single(received, torch.arange(4.0) + 100 * rank)
    lists = [torch.empty(1) for _ in range(world_size)]
    comm.all_to_all(lists, [torch.tensor([float(10 * rank + j)]) for j in range(world_size)])
    out["all_to_all"] = (received.tolist(), [t.item() for t in lists])

    g_list = [torch.empty(1) for _ in range(world_size)] if rank == 0 else None
    comm.gather(torch.tensor([float(rank * 3)]), gather_list=g_list, dst=0)
    s = torch.empty(1)
    comm.scatter(s, [torch.tensor([7.0]), torch.tensor([8.0])] if rank == 1 else None, src=1)
    out["gather_scatter"] = (None if g_list is None else [t.item() for t in g_list], s.item())

    peer = 1 - rank
    if rank == 0:
        comm.send(torch.tensor([42.0]), dst=peer)
        got = torch.empty(1)
        work = comm.irecv(got, src=peer)
        assert work is not None  # DeepSpeed returns None here
        work.wait()
    else:
        got = torch.empty(1)
        sender = comm.recv(got)
        assert sender == 0
        comm.isend(got + 1, dst=peer).wait()
    out["p2p"] = got.item()

    comm.barrier()
    comm.barrier(async_op=True).wait()
    comm.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    sub = comm.new_group([0, 1])
    t = torch.tensor([1.0])
    comm.all_reduce(t, group=sub)
    out["group"] = (comm.get_rank(sub), comm.get_world_size(sub), t.item())
    comm.destroy_process_group(sub)
    return out


def test_wrappers_on_two_gloo_ranks():
    results = spawn_ranks(_exercise, 2, timeout=180)
    for rank, got in enumerate(results):
        assert got["ranks"] == (rank, 2, rank, "gloo")
        assert got["global"] == (1, [0, 1])
        assert got["all_reduce"] == ([3.0, 6.0], 2.0, 2.0)
        assert got["coalesced"] == ([3.0, 3.0], [21.0, 21.0, 21.0], 3.0, True)
        assert got["broadcast"] == (6.0, {"from": 0})
        assert got["all_gather"] == (
            [[0.0, 0.0], [1.0, 1.0]],
            [0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 1.0],
            ["r0", "r1"],
            [[0.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
        )
        # sum of arange(4) + 0 and arange(4) + 10 is [10, 12, 14, 16]; rank r keeps elements 2r, 2r + 1
        assert got["reduce"][:3] == (
            [[10.0, 12.0], [14.0, 16.0]][rank],
            [[5.0, 6.0], [7.0, 8.0]][rank],
            [[10.0, 12.0], [14.0, 16.0]][rank],
        )
        assert got["all_to_all"][0] == [[0.0, 1.0, 100.0, 101.0], [2.0, 3.0, 102.0, 103.0]][rank]
        assert got["all_to_all"][1] == [[0.0, 10.0], [1.0, 11.0]][rank]
        assert got["gather_scatter"] == ([0.0, 3.0] if rank == 0 else None, [7.0, 8.0][rank])
        assert got["p2p"] == [43.0, 42.0][rank]
        assert got["group"] == (rank, 2, 2.0)
    assert results[0]["reduce"][3] == 3.0  # the reduction lands on dst
