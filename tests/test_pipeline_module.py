"""PipelineModule in one process: DeepSpeed's partition methods, building only owned layers, bad input."""

import ast
import glob
import random

import pytest
import torch
from torch import nn

from zerostep.core import pipeline_module
from zerostep.parallel import pipeline as pp
from zerostep.pipe import LayerSpec, PipeDataParallelTopology, PipelineModule, ProcessTopology, TiedLayerSpec


def _deepspeed_partitions():
    """DeepSpeed's partition_uniform / partition_balanced, read from its source (importing deepspeed
    takes seconds); None when DeepSpeed is not installed."""
    paths = glob.glob("/work/dsvenv/lib/python3*/site-packages/deepspeed/runtime/utils.py")
    if not paths:
        return None
    tree = ast.parse(open(paths[0]).read())
    wanted = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("partition_uniform", "partition_balanced")
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), paths[0], "exec"), namespace)
    return namespace["partition_uniform"], namespace["partition_balanced"]


def test_partitions_equal_deepspeeds():
    found = _deepspeed_partitions()
    if found is None:
        pytest.skip("DeepSpeed is not installed in /work/dsvenv")
    ds_uniform, ds_balanced = found
    rng = random.Random(0)
    for _ in range(300):
        n, m = rng.randint(1, 14), rng.randint(1, 6)
        weights = [rng.choice([0, 0, 1, 3, 7, 100, rng.randint(0, 50)]) for _ in range(n)]
        assert pp.partition_uniform(n, m) == [int(x) for x in ds_uniform(n, m)], (n, m)
        assert pp.partition_balanced(weights, m) == [int(x) for x in ds_balanced(weights, m)], (weights, m)


def test_partition_methods():
    counts, names = [10, 0, 10, 10, 0, 10], ["Embed", "relu", "Block", "Block", "relu", "Head"]
    assert pp.partition("uniform", counts, names, 4) == [0, 2, 4, 5, 6]
    assert pp.partition("parameters", counts, names, 2) == pp.partition_balanced(counts, 2)
    # type:block balances the two Block layers only
    parts = pp.partition("type:block", counts, names, 2)
    assert parts[0] == 0 and parts[-1] == 6 and 2 < parts[1] <= 3 or parts[1] == 3
    with pytest.raises(ValueError, match="matches no layer"):
        pp.partition("type:Conv", counts, names, 2)
    with pytest.raises(ValueError, match="unknown"):
        pp.partition("best", counts, names, 2)
    with pytest.raises(NotImplementedError):
        pp.partition("profile", counts, names, 2)
    assert pp.virtual_stage_indices(1, 4, 2, "loop") == [1, 5]
    assert pp.virtual_stage_indices(1, 4, 2, "v") == [1, 6]


def test_topology_is_row_major():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=3)
    assert topo.get_rank(pipe=1, data=0) == 3
    assert topo.get_coord(4) == topo.ProcessCoord(pipe=1, data=1)
    assert topo.get_axis_comm_lists("pipe") == [[0, 3], [1, 4], [2, 5]]
    assert topo.get_axis_comm_lists("data") == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(NotImplementedError, match="model"):
        pp.check_topology(ProcessTopology(["pipe", "model", "data"], [1, 2, 1]), 2)


class Counted(nn.Linear):
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.weight.is_meta:
            Counted.built += 1


def _as_rank(monkeypatch, rank: int, num_stages: int, dp: int = 1) -> None:
    """Build PipelineModules as global rank ``rank`` of ``num_stages * dp`` would, without processes."""

    def mesh(topology):
        coord = topology.get_coord(rank)
        return pp.PipeMesh(topology, rank, coord.pipe, num_stages, coord.data, dp, [], [], None, None)

    monkeypatch.setattr(pp, "build_mesh", mesh)
    monkeypatch.setattr(pp, "check_topology", lambda topology, world: None)


def test_builds_only_owned_layers_under_global_names(monkeypatch):
    specs = [
        TiedLayerSpec("emb", nn.Linear, 4, 4, bias=False),
        *[LayerSpec(Counted, 4, 4) for _ in range(4)],
        nn.ReLU(),
        TiedLayerSpec("emb", nn.Linear, 4, 4, bias=False, forward_fn=lambda m, x: x @ m.weight),
    ]
    built = []
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        Counted.built = 0
        topo = PipeDataParallelTopology(2, 1)
        module = PipelineModule(specs, topology=topo, partition_method="uniform", seed_layers=True)
        built.append(Counted.built)
        names = [n for n, _ in module.named_parameters()]
        assert module.parts == [0, 4, 7]
        if rank == 0:
            assert "1.weight" in names and "1.bias" in names and "4.weight" not in names
        else:
            assert "4.weight" in names and "1.weight" not in names
        assert "tied_modules.emb.weight" in names  # on both stages
        assert module.stage_owner(4) == 1 and module.stage_owner(0) == 0
    assert built == [3, 1]  # each Counted built once, on its own stage; parameters counts use meta
    # seed_layers: a layer's initial values do not depend on the stage count
    _as_rank(monkeypatch, 1, 2)
    two = PipelineModule(
        specs, topology=PipeDataParallelTopology(2, 1), partition_method="uniform", seed_layers=True
    )
    _as_rank(monkeypatch, 0, 1)
    one = PipelineModule(specs, num_stages=1, seed_layers=True)
    torch.testing.assert_close(
        dict(two.named_parameters())["4.weight"], dict(one.named_parameters())["4.weight"]
    )
    x = torch.randn(3, 4)
    # one stage: the module computes the whole stack; a lambda layer and the tied head included
    ref = x
    for f in [one.tied_modules["emb"], *[getattr(one, str(i)) for i in range(1, 5)], torch.relu]:
        ref = f(ref)
    torch.testing.assert_close(one(x), ref @ one.tied_modules["emb"].weight)


def test_activation_checkpointing_and_chunks(monkeypatch):
    _as_rank(monkeypatch, 0, 1)
    specs = [LayerSpec(nn.Linear, 3, 3), nn.Tanh(), LayerSpec(nn.Linear, 3, 3)]
    torch.manual_seed(0)
    plain = PipelineModule(specs, num_stages=1, seed_layers=True)
    checked = PipelineModule(specs, num_stages=1, seed_layers=True, activation_checkpoint_interval=1)
    x = torch.randn(2, 3)
    plain(x).sum().backward()
    checked(x).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    # stages_per_rank: layers partitioned over 2 virtual stages on the one rank, chunk by chunk
    looped = PipelineModule(
        specs, num_stages=1, stages_per_rank=2, partition_method="uniform", seed_layers=True
    )
    chunks = looped.chunks()
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 3)]
    assert sum(p.numel() for c in chunks for p in c.parameters()) == sum(
        p.numel() for p in looped.parameters()
    )
    torch.testing.assert_close(chunks[1](chunks[0](x)), plain(x))


def test_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="num_stages or topology"):
        PipelineModule([nn.ReLU()])
    with pytest.raises(ValueError, match="must divide the world size"):
        PipelineModule([nn.ReLU(), nn.ReLU()], num_stages=2)
    _as_rank(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="only 2 layers"):
        PipelineModule([nn.ReLU(), nn.ReLU()], topology=PipeDataParallelTopology(3, 1))
    with pytest.raises(TypeError, match="nn.Module subclass"):
        LayerSpec(len)
    assert pipeline_module._count_params(LayerSpec(nn.Linear, 2, 3)) == 9
