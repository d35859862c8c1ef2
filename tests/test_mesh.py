"""parallel/mesh: the DP x TP layout (Megatron's: TP ranks consecutive), the default world mesh, and the
checks of tensor-parallel sizes and of an mpu's methods. One process; the groups themselves run in
tests/test_model_parallel.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostep.parallel import ulysses
from zerostep.parallel.mesh import (
    MPU_METHODS,
    check_mpu,
    check_tp_size,
    layout,
    mesh_from_mpu,
    sequence_tensor_layout,
    world_mesh,
)


@given(st.integers(1, 8), st.integers(1, 6))
def test_layout_partitions_the_world_into_consecutive_tp_groups_and_strided_dp_groups(tp, dp):
    world = tp * dp
    tp_groups, dp_groups = layout(tp, world)
    assert len(tp_groups) == dp and len(dp_groups) == tp
    for groups in (tp_groups, dp_groups):
        assert sorted(r for g in groups for r in g) == list(range(world))  # each rank once
    for g in tp_groups:
        assert g == list(range(g[0], g[0] + tp))  # consecutive
    for t, g in enumerate(dp_groups):
        assert g == [t + tp * d for d in range(dp)]  # TP rank t of every replica, in DP-rank order
    for a in tp_groups:
        for b in dp_groups:
            assert len(set(a) & set(b)) == 1  # one rank per (replica, TP rank)


def test_tp_sizes_that_do_not_divide_the_world_or_are_not_positive_are_named():
    with pytest.raises(ValueError, match=r"autotp_size = 3 does not divide the world size 4"):
        check_tp_size(3, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            check_tp_size(bad, 4)


def test_an_mpu_missing_methods_is_refused_naming_them():
    class Half:
        def get_model_parallel_rank(self):
            return 0

        def get_model_parallel_world_size(self):
            return 1

        get_data_parallel_group = None  # present but not callable: missing too

    with pytest.raises(TypeError) as info:
        check_mpu(Half())
    message = str(info.value)
    for name in MPU_METHODS[2:]:
        assert name in message.split("lacks")[1].split(";")[0]
    assert "get_model_parallel_rank," not in message.split("lacks")[1].split(";")[0]


def test_one_process_is_a_world_mesh_of_one_data_parallel_rank():
    mesh = world_mesh()
    assert (mesh.dp_group, mesh.dp_rank, mesh.dp_size, mesh.tp_size, mesh.tp_group) == (None, 0, 1, 1, None)
    assert mesh.is_world and mesh.counts_replicated


class OneRankMPU:
    """Megatron-core's spelling of the model-parallel methods, for one process."""

    def __init__(self, dp: int = 1, mp: int = 1):
        self.dp, self.mp = dp, mp

    def get_tensor_model_parallel_rank(self):
        return 0

    def get_tensor_model_parallel_world_size(self):
        return self.mp

    def get_tensor_model_parallel_group(self):
        return None

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return self.dp


def test_an_mpu_may_spell_its_model_parallel_methods_tensor_model_parallel():
    mesh = mesh_from_mpu(OneRankMPU())
    assert (mesh.dp_size, mesh.tp_size, mesh.source, mesh.counts_replicated) == (1, 1, "mpu", True)
    assert mesh.is_world


def test_an_mpu_whose_sizes_do_not_cover_the_world_is_refused():
    with pytest.raises(ValueError, match=r"data-parallel size 2 x model-parallel size 1 != world size 1"):
        mesh_from_mpu(OneRankMPU(dp=2))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_sequence_tensor_layout_is_megatrons_tp_sp_dp_order(tp, sp, dp):
    world = tp * sp * dp
    groups = sequence_tensor_layout(world, tp, sp)
    sizes = {"tensor": tp, "sequence": sp, "data": dp, "sequence_data": sp * dp}
    for name, size in sizes.items():
        kind = getattr(groups, name)
        assert len(kind) == world // size and all(len(g) == size for g in kind), name
        assert sorted(r for g in kind for r in g) == list(range(world)), name  # each rank once

    def coords(r):  # (dp, sp, tp) position of rank r: tp fastest
        return r // (tp * sp), (r // tp) % sp, r % tp

    for name, varying in {"tensor": 2, "sequence": 1, "data": 0}.items():
        for g in getattr(groups, name):  # only the named coordinate changes inside a group, in order
            fixed = {tuple(c for i, c in enumerate(coords(r)) if i != varying) for r in g}
            assert len(fixed) == 1 and [coords(r)[varying] for r in g] == list(range(len(g)))
    # gradients of a shard reduce over its TP rank's ranks: the TP mesh's data-parallel group
    assert groups.sequence_data == layout(tp, world)[1]
    assert sequence_tensor_layout(world, 1, sp).sequence == ulysses.sequence_rank_layout(world, sp)


def test_sequence_tensor_layout_example_and_sizes_that_do_not_divide():
    groups = sequence_tensor_layout(8, 2, 2)
    assert groups.tensor == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups.sequence == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups.data == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups.sequence_data == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match=r"autotp_size x sequence_parallel_size = 2 x 3 does not divide"):
        sequence_tensor_layout(8, 2, 3)
    with pytest.raises(ValueError, match="autotp_size = 3 does not divide the world size 8"):
        sequence_tensor_layout(8, 3, 1)
    with pytest.raises(ValueError, match="sequence_parallel_size = 0: must be a positive integer"):
        sequence_tensor_layout(8, 2, 0)
