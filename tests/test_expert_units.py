"""core/expert_units.py without processes: the expert units' layouts (split out of their block, padded for
the expert-data-parallel size; the one-process layout under global names) and the name mapping between a
rank's local experts and the global ones. The multi-rank training, reduction and checkpoint checks are in
tests/test_moe_engine.py."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from zerostep.core.expert_units import ExpertUnit, ExpertUnits, UnitGroup
from zerostep.parallel.expert import expert_index, global_expert_name, local_expert_name
from zerostep.parallel.flat import FlatLayout

UNIT = "blocks.0.deepspeed_moe.experts"


@given(st.integers(0, 64), st.integers(1, 16), st.integers(0, 15), st.sampled_from(["a.weight", "w", ""]))
def test_local_and_global_names_are_inverse(first, num_local, i, rest):
    i = i % num_local
    local = f"{UNIT}.deepspeed_experts.{i}" + (f".{rest}" if rest else "")
    name = global_expert_name(local, first)
    assert expert_index(name)[1] == first + i
    assert local_expert_name(name, first, num_local) == local
    assert local_expert_name(name, first + num_local, num_local) is None  # another rank's expert
    assert global_expert_name("blocks.0.gate.wg.weight", first) == "blocks.0.gate.wg.weight"


def units(ep_size: int, rank: int, world: int, num_experts: int = 4) -> ExpertUnits:
    local = num_experts // ep_size
    edp = UnitGroup(None, world // ep_size, rank // ep_size)
    unit = ExpertUnit(UNIT, num_experts, local, (rank % ep_size) * local, ep_size, None, edp)
    return ExpertUnits({UNIT: unit}, world, rank)


def block_layout(num_local: int, world: int) -> dict[str, FlatLayout]:
    shapes = [("blocks.0.deepspeed_moe.gate.wg.weight", (4, 8))]
    for i in range(num_local):
        shapes += [
            (f"{UNIT}.deepspeed_experts.{i}.a.weight", (3, 8)),
            (f"{UNIT}.deepspeed_experts.{i}.a.bias", (3,)),
        ]
    return {"<root>": FlatLayout.build([("inp.weight", (8, 5))], torch.float32, world),
            "blocks.0": FlatLayout.build(shapes, torch.float32, world)}  # fmt: skip


def test_experts_become_a_unit_over_their_group_and_checkpoint_in_global_order():
    experts = units(ep_size=2, rank=3, world=4)  # ep rank 1 (experts 2, 3), edp rank 1 of 2
    layouts = experts.split_layouts(block_layout(2, 4), torch.float32)
    assert list(layouts) == ["<root>", "blocks.0", UNIT]
    assert layouts["blocks.0"].names == ("blocks.0.deepspeed_moe.gate.wg.weight",)
    assert layouts[UNIT].world_size == 2 and len(layouts[UNIT].names) == 4
    assert experts.unit_groups() == {UNIT: experts[UNIT].edp}
    glob = experts.global_layouts(layouts)
    assert glob[UNIT].world_size == 4 and glob["blocks.0"] is layouts["blocks.0"]
    indices = [expert_index(n)[1] for n in glob[UNIT].names]
    assert indices == [0, 0, 1, 1, 2, 2, 3, 3]  # every expert, in global order: one process's layout
    one_process = units(ep_size=1, rank=0, world=1).split_layouts(block_layout(4, 1), torch.float32)
    assert [e.name for e in one_process[UNIT].entries] == list(glob[UNIT].names)
    values = {
        n: torch.full(e.shape, float(expert_index(n)[1]))
        for n, e in ((e.name, e) for e in glob[UNIT].entries)
    }
    values["blocks.0.deepspeed_moe.gate.wg.weight"] = torch.zeros(4, 8)
    values["inp.weight"] = torch.zeros(8, 5)
    local = experts.local_values(layouts, values)  # this rank's experts 2 and 3, under local names 0 and 1
    assert torch.equal(local[f"{UNIT}.deepspeed_experts.1.a.bias"], torch.full((3,), 3.0))


def test_a_checkpoint_of_another_num_experts_is_named():
    saved = {UNIT: {"entries": [[f"{UNIT}.deepspeed_experts.{e}.a.bias", [3], 16 * e] for e in range(8)]}}
    message = units(ep_size=2, rank=0, world=2).check_saved(saved, "ckpt")
    assert "has 8 experts, this model's has 4" in message
    saved[UNIT]["entries"] = saved[UNIT]["entries"][:4]
    assert units(ep_size=2, rank=0, world=2).check_saved(saved, "ckpt") is None
