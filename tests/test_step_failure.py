"""A step that raises on one rank raises on every rank, leaves every state valid and pairs no steps."""

from __future__ import annotations

import os

import torch
from models import Net, mse

from zerostep.core import Config, initialize
from zerostep.core.step_failure import RemoteStepError
from zerostep.parallel.collectives import detach_shared_memory, shared_memory_channel
from zerostep.parallel.launch import spawn_ranks

MB, GAS = 2, 2
FAIL = {"now": False}  # set on the failing rank around the failing step


def boom(module, args):
    if FAIL["now"]:
        raise RuntimeError("block failed on purpose")


def make_config(world_size: int, stage: int, overlap: bool | None) -> Config:
    zero = {"stage": stage} if overlap is None else {"stage": stage, "overlap_comm": overlap}
    return Config.from_dict(
        {
            "train_micro_batch_size_per_gpu": MB,
            "gradient_accumulation_steps": GAS,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        },
        world_size=world_size,
    )


def batches(rank: int) -> list:
    gen = torch.Generator().manual_seed(10 + rank)
    return [
        (torch.randn(MB * GAS, 5, generator=gen), torch.randn(MB * GAS, 1, generator=gen)) for _ in range(3)
    ]


def train(rank: int, world_size: int, case: tuple, fail: str | None):
    """Steps on batches 0, (1 failing), 1, 2; returns how the failing step ended and the parameters."""
    stage, overlap, compile = case
    model = Net()
    model.blocks[1].register_forward_pre_hook(boom)  # raises inside a unit's forward (mid-forward at stage 3)
    engine = initialize(model, make_config(world_size, stage, overlap), loss_fn=mse, compile=compile)
    data = batches(rank)
    state = engine.step(engine.init(), data[0])
    ended = "-"
    if fail is not None:
        bad = data[1]
        if rank == 1 and fail == "batch":
            bad = (bad[0][:-1], bad[1][:-1])  # wrong number of rows: refused before the step
        FAIL["now"] = rank == 1 and fail == "forward"
        try:
            engine.step(state, bad)
            ended = "no error"
        except RemoteStepError as e:
            ended = "remote" if "failed on rank 1" in str(e) else f"remote? {e}"
        except (ValueError, RuntimeError) as e:
            ended = "own" if ("on purpose" in str(e) or "leading dimension" in str(e)) else f"own? {e}"
        finally:
            FAIL["now"] = False
    for b in data[1:]:
        state = engine.step(state, b)  # the failed step left the state valid: go on together
    return ended, engine.full_params(state)


# (stage, overlap_comm, compile): reducer after backward (graph A carries the failure), hooks in
# backward (vote), stage 2's in-backward reduce-scatter (vote), stage 3 (gathers in forward, vote)
CASES = [(0, None, False), (1, None, True), (0, True, False), (2, None, False), (3, None, False)]
OVER_GLOO = [(0, True, False), (3, None, False)]


def failing_steps(rank: int, world_size: int) -> dict:
    out = {}
    for transport, cases in (("shared-memory", CASES), ("gloo", OVER_GLOO)):
        for case in cases:
            clean = train(rank, world_size, case, None)[1]
            for fail in ("batch", "forward"):
                ended, params = train(rank, world_size, case, fail)
                # compiled: the failure's recompile may round differently; eager: bitwise equal
                tol = {"rtol": 1e-5, "atol": 1e-6} if case[2] else {"rtol": 0.0, "atol": 0.0}
                same = all(torch.allclose(params[n], clean[n], **tol) for n in clean)
                out[(transport, case, fail)] = (ended, same)
            out[(transport, "channel")] = shared_memory_channel(None) is not None
        detach_shared_memory(None)
        os.environ["ZEROSTEP_SHM"] = "0"  # the next engines keep gloo's transport
    return out


def test_a_step_failing_on_one_rank_fails_on_all_and_pairs_no_steps():
    results = spawn_ranks(failing_steps, 2, timeout=300, collective_timeout=30)
    assert results[0][("shared-memory", "channel")] and not results[0][("gloo", "channel")]
    for key in results[0]:
        if key[1] == "channel":
            continue
        (ended0, same0), (ended1, same1) = results[0][key], results[1][key]
        assert (ended0, ended1) == ("remote", "own"), key
        assert same0 and same1, key  # equal to a run without the failed step: nothing was applied
