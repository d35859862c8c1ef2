"""optim/model_parallel.py: LAMB, 1-bit LAMB and Muon over tensor-parallel shards update like one process.

Two "tensor-parallel ranks" are two threads, each running its own optimizer on its shard of a split
parameter ``w`` (rows split, as a column-parallel weight) and its copy of a replicated one ``b``; their
reductions meet in an in-memory two-rank group. The reassembled result must equal one optimizer run on
the whole tensors, and without the model-parallel hooks it must not (so each hook is needed).
"""

from __future__ import annotations

import threading

import pytest
import torch

from zerostep import optim
from zerostep.optim.lamb import TrustSegments
from zerostep.optim.model_parallel import (
    MatrixSplit,
    SplitSegments,
    complete_maxima,
    complete_sums,
    full_sizes,
)
from zerostep.optim.phase_schedule import phase_schedule, with_variant

TP, STEPS = 2, 3


class ThreadGroup:
    """An all-reduce and an all-gather between ``n`` threads (rank = the caller's index)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * n

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        seen = list(self.slots)
        self.barrier.wait()  # everyone has read before the next exchange writes
        return seen

    def all_reduce(self, rank: int):
        return lambda t: torch.stack(self._exchange(rank, t)).sum(0)

    def all_gather(self, rank: int):
        return lambda t: torch.cat(self._exchange(rank, t))


def full_problem(seed: int = 0):
    """Whole params {w [6, 4], b [4]} and STEPS gradients of each."""
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def flat(t: dict) -> dict:
    return {k: v.reshape(-1) for k, v in t.items()}  # w's first half is still rank 0's rows


def shard(t: dict, rank: int) -> dict:
    return {"w": t["w"].chunk(TP, 0)[rank].clone(), "b": t["b"].clone()}


def run_optimizer(make, params: dict, grads: list[dict]) -> dict:
    """``make()``'s optimizer over the steps, with a 1-bit optimizer's variant per step."""
    opt = make()
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    schedule = phase_schedule(opt)
    for k, g in enumerate(grads, start=1):
        step = opt if schedule is None else with_variant(opt, schedule.variant_at(k))
        step.update_(g, state, params)
    return params


def run_tp(make_for_rank, params: dict, grads: list[dict]) -> dict:
    """Both ranks in threads; the full result (w's shards concatenated, b from rank 0, checked equal)."""
    group, out, errors = ThreadGroup(TP), [None] * TP, []

    def rank_main(rank: int) -> None:
        try:
            out[rank] = run_optimizer(
                lambda: make_for_rank(rank, group), shard(params, rank), [shard(g, rank) for g in grads]
            )
        except BaseException as e:  # surfaced below; the barrier's timeout frees the other thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(TP)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    torch.testing.assert_close(out[0]["b"], out[1]["b"], rtol=0, atol=0)
    return {"w": torch.cat([o["w"] for o in out]), "b": out[0]["b"]}


def segments(rank: int, group: ThreadGroup, split_b: bool = False) -> dict:
    return {
        "w": SplitSegments((True,), TP, group.all_reduce(rank), group.all_gather(rank)),
        "b": SplitSegments((split_b,), TP, group.all_reduce(rank), group.all_gather(rank)),
    }


def assert_matches(got: dict, want: dict, atol: float = 1e-6) -> None:
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


def differs(got: dict, want: dict) -> bool:
    return any((got[k] - want[k]).abs().max() > 1e-4 for k in want)


LAMB_SEGMENTS = {"w": TrustSegments(((0, 12, 0),), 1), "b": TrustSegments(((0, 4, 0),), 1)}


def test_lamb_trust_ratio_of_a_split_parameter_is_the_whole_ones():
    params, grads = full_problem()
    # weight decay: the update's norm and the weight's scale differently, so the ratio is not shard-free
    hyper = dict(lr=1e-2, weight_decay=0.3, min_coeff=0.0, max_coeff=100.0)
    whole = {"w": TrustSegments(((0, 24, 0),), 1), "b": TrustSegments(((0, 4, 0),), 1)}
    want = run_optimizer(lambda: optim.lamb(**hyper, trust_segments=whole), params, grads)
    got = run_tp(
        lambda r, g: optim.lamb(**hyper, trust_segments=LAMB_SEGMENTS, model_parallel=segments(r, g)),
        params,
        grads,
    )
    assert_matches(got, want)
    alone = run_tp(lambda r, g: optim.lamb(**hyper, trust_segments=LAMB_SEGMENTS), params, grads)
    assert differs(alone, want)  # each shard's own ratio is not the parameter's
    with pytest.raises(ValueError, match="needs trust_segments"):
        run_tp(lambda r, g: optim.lamb(**hyper, model_parallel=segments(r, g)), params, grads)


def test_one_bit_lamb_warm_up_and_compressed_phases_see_whole_parameters():
    params, grads = full_problem(1)
    params, grads = flat(params), [flat(g) for g in grads]  # 1-bit LAMB works on flat leaves (the engine's)
    hyper = dict(lr=1e-2, freeze_step=1, weight_decay=0.3, min_coeff=0.0, max_coeff=100.0)
    want = run_optimizer(lambda: optim.onebit_lamb(**hyper), params, grads)  # steps 2, 3: compressed
    got = run_tp(lambda r, g: optim.onebit_lamb(**hyper, model_parallel=segments(r, g)), params, grads)
    assert_matches(got, want)
    assert differs(run_tp(lambda r, g: optim.onebit_lamb(**hyper), params, grads), want)


def test_muon_orthogonalizes_the_whole_split_matrix():
    params, grads = full_problem(2)
    hyper = dict(lr=2e-2, weight_decay=0.1, ns_dtype="float32", eps=1e-6)
    want = run_optimizer(lambda: optim.muon(**hyper), params, grads)

    def split(rank: int, group: ThreadGroup) -> dict:
        gather = group.all_gather(rank)
        return {
            "w": MatrixSplit(
                (6, 4),
                lambda local: gather(local.reshape(-1)).view(6, 4),  # shards rank-major along dim 0
                lambda full: full.chunk(TP, 0)[rank],
            )
        }

    got = run_tp(lambda r, g: optim.muon(**hyper, split_matrices=split(r, g)), params, grads)
    assert_matches(got, want)
    assert differs(run_tp(lambda r, g: optim.muon(**hyper), params, grads), want)


def test_completions_leave_replicated_segments_alone():
    mp = SplitSegments((True, False), 2, lambda t: t * 2, lambda t: torch.cat([t, t + 1]))
    sums = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(complete_sums(sums, mp), torch.tensor([[2.0, 2.0], [6.0, 4.0]]))
    assert torch.equal(complete_maxima(torch.tensor([1.0, 5.0]), mp), torch.tensor([2.0, 6.0]))
    assert torch.equal(full_sizes(torch.tensor([3.0, 3.0]), mp), torch.tensor([6.0, 3.0]))
    assert complete_sums(sums, None) is sums
