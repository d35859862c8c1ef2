"""data_efficiency.data_sampling: the metric-based curriculum. Schedules against hand-computed values and
the legacy curriculum's formulas, the DataAnalyzer's files (DeepSpeed's mmap format), the sampler drawing
only samples within the difficulty (value, percentile, two metrics, single cluster), determinism, resume
(also at another data-parallel size), the data-parallel split, the facade and the functional API end to
end with a post-process function, and bad input. Single process."""

from __future__ import annotations

import os
import struct
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import zerostep
from zerostep.core import Config, ConfigError, initialize
from zerostep.core.config.schedules import CurriculumConfig, curriculum_difficulty
from zerostep.core.curriculum_loader import curriculum_loader
from zerostep.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler
from zerostep.runtime.data_pipeline.data_sampling.data_analyzer import DataAnalyzer
from zerostep.runtime.data_pipeline.data_sampling.data_sampler import DeepSpeedDataSampler
from zerostep.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

N = 64


def length_of(i: int) -> int:  # 1..8, eight samples each
    return i % 8 + 1


def rarity_of(i: int) -> int:  # 0..15, four samples each
    return (i * 5) % 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Index files of two metrics over N samples, written by two analyzer workers of two parts each."""
    root = tmp_path_factory.mktemp("analysis")
    ds = torch.utils.data.TensorDataset(
        torch.arange(N),
        torch.tensor([length_of(i) for i in range(N)]),
        torch.tensor([rarity_of(i) for i in range(N)]),
    )
    common = dict(
        num_workers=2,
        num_threads=2,
        batch_size=5,
        metric_names=["len", "rare", "hist"],
        metric_functions=[lambda b: b[1], lambda b: b[2], lambda b: torch.bincount(b[1], minlength=9)],
        metric_types=["single_value_per_sample", "single_value_per_sample", "accumulate_value_over_samples"],
        metric_dtypes=[torch.int64, torch.int64, torch.int64],
        save_path=str(root),
    )
    worker0 = DataAnalyzer(ds, worker_id=0, **common)
    worker0.run_map()
    with pytest.raises(FileNotFoundError, match="worker 1 part 0 did not finish"):
        worker0.run_reduce()
    DataAnalyzer(ds, worker_id=1, **common).run_map()
    worker0.run_reduce()
    return root


def metric(files, name, kind="value", **schedule) -> dict:
    out = {
        "index_to_sample_path": str(files / name / f"{name}_index_to_sample"),
        "difficulty_type": kind,
        "clustering_type": "schedule_based",
    }
    if kind == "value":
        out["index_to_metric_path"] = str(files / name / f"{name}_index_to_metric")
    out.update(schedule)
    return out


def linear(low, high, total, step=1) -> dict:
    return {
        "min_difficulty": low,
        "max_difficulty": high,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": total, "difficulty_step": step},
    }


def efficiency(cluster_dir, metrics: dict, seed=7, **sampling) -> dict:
    return {
        "enabled": True,
        "seed": seed,
        "data_sampling": {
            "enabled": True,
            **sampling,
            "curriculum_learning": {
                "enabled": True,
                "data_cluster_path": str(cluster_dir),
                "curriculum_metrics": metrics,
            },
        },
    }


def global_batches(sampler, count):
    """(difficulties, sample indices) of ``count`` global batches of a one-rank sampler."""
    it, out = iter(sampler), []
    for _ in range(count):
        rounds = [next(it) for _ in range(sampler.gradient_accumulation_steps)]
        out.append((dict(sampler.current_difficulties), [i for r in rounds for i in r]))
    return out


# ---------------------------------------------------------------------------------------- schedules


def test_schedules_against_hand_computed_values():
    def run(config, steps):
        s = CurriculumScheduler(config)
        return [s.update_difficulty(t) for t in range(1, steps + 1)]

    # DeepSpeed's own ground truths (tests/unit/runtime/test_data_efficiency.py)
    assert run(linear(2, 10, 8, 2), 10) == [2, 4, 4, 6, 6, 8, 8, 10, 10, 10]
    discrete = {"difficulty": [1, 2, 3, 4, 5], "max_step": [2, 4, 6, 8]}
    d = {
        "min_difficulty": 1,
        "max_difficulty": 5,
        "schedule_type": "fixed_discrete",
        "schedule_config": discrete,
    }
    assert run(d, 9) == [1, 1, 2, 2, 3, 3, 4, 4, 5]
    # fixed_root: floor(sqrt(t / 100) * 99 + 1): t = 1 -> 10.9, 4 -> 20.8, 25 -> 50.5, 100 -> 100
    root = {**linear(1, 100, 100), "schedule_type": "fixed_root"}
    root["schedule_config"] = {"total_curriculum_step": 100, "difficulty_step": 1, "root_degree": 2}
    s = CurriculumScheduler(root)
    assert [s.get_difficulty(t) for t in (1, 4, 25, 100, 200)] == [10, 20, 50, 100, 100]
    # once at max_difficulty it stays there, though the discrete schedule comes back down (DeepSpeed's rule)
    down = {**d, "schedule_config": {"difficulty": [1, 5, 2], "max_step": [2, 4]}}
    assert run(down, 6) == [1, 1, 5, 5, 5, 5]


def test_scheduler_equals_the_legacy_curriculum_formulas():
    configs = [
        CurriculumConfig(True, "seqlen", 8, 64, "fixed_linear", total_curriculum_step=10, difficulty_step=8),
        CurriculumConfig(True, "seqlen", 8, 64, "fixed_root", 10, 8, 3),
        CurriculumConfig(True, "seqlen", 1, 5, "fixed_discrete", difficulty=(1, 5, 2), max_step=(2, 4)),
    ]
    for c in configs:
        s = CurriculumScheduler(c)
        assert [s.update_difficulty(t) for t in range(1, 16)] == [
            curriculum_difficulty(c, t - 1) for t in range(1, 16)
        ]


def test_custom_schedule_and_its_errors():
    s = CurriculumScheduler({"min_difficulty": 1, "max_difficulty": 10, "schedule_type": "custom"}, "m")
    with pytest.raises(RuntimeError, match="schedule_type custom but no function"):
        s.update_difficulty(1)
    s.set_custom_get_difficulty(lambda t: 3 * t)
    assert [s.update_difficulty(t) for t in (1, 2, 3)] == [3, 6, 9]
    with pytest.raises(ValueError, match="difficulty 12, beyond max_difficulty 10"):
        s.update_difficulty(4)


# ---------------------------------------------------------------------------------------- analyzer


def test_analyzer_files(files):
    rows = MMapIndexedDataset(files / "len" / "len_index_to_sample")
    values = MMapIndexedDataset(files / "len" / "len_index_to_metric")
    assert [v.tolist() for v in values[:]] == [[v] for v in range(1, 9)]
    assert [r.tolist() for r in rows[:]] == [[i for i in range(N) if length_of(i) == v] for v in range(1, 9)]
    per_sample = MMapIndexedDataset(files / "len" / "len_sample_to_metric")
    assert torch.cat(per_sample[:]).tolist() == [length_of(i) for i in range(N)]
    merged = MMapIndexedDataset(files / "rare" / "rare_index_to_sample_percentile_merged")
    assert len(merged) == 16 and torch.cat(merged[:]).tolist() == sorted(range(N), key=rarity_of)
    hist = MMapIndexedDataset(files / "hist" / "hist_metric_value")
    assert hist[0].tolist() == [0] + [8] * 8  # the sum over every batch
    # DeepSpeed's layout: magic, version 1, dtype code 1 (uint8: values fit), 8 items, 2 document bounds
    with open(files / "len" / "len_index_to_metric.idx", "rb") as f:
        assert struct.unpack("<9sQBQQ", f.read(34)) == (b"MMIDIDX\x00\x00", 1, 1, 8, 2)
    assert os.path.getsize(files / "len" / "len_index_to_metric.bin") == 8


def test_index_files_from_their_layout(tmp_path):
    """A pair built byte by byte from the format (uint16 items out of order in .bin), and damaged ones."""
    data = struct.pack("<5H", 7, 8, 9, 1, 2)  # item 0 = [1, 2] stored after item 1 = [7, 8, 9]
    header = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 6, 2, 2)
    index = header + struct.pack("<2i", 2, 3) + struct.pack("<2q", 6, 0) + struct.pack("<2q", 0, 2)
    (tmp_path / "x.bin").write_bytes(data)
    (tmp_path / "x.idx").write_bytes(index)
    x = MMapIndexedDataset(tmp_path / "x")
    assert x.dtype == torch.uint16 and [t.tolist() for t in x[:]] == [[1, 2], [7, 8, 9]]
    values, offsets = x.flat()
    assert values.tolist() == [1, 2, 7, 8, 9] and offsets.tolist() == [0, 2, 5]
    (tmp_path / "x.bin").write_bytes(data[:6])
    with pytest.raises(ValueError, match="x.bin: 6 bytes, the index needs 10"):
        MMapIndexedDataset(tmp_path / "x")
    (tmp_path / "x.idx").write_bytes(b"TNTIDX\x00\x00" + index[8:])
    with pytest.raises(ValueError, match="not a memory-mapped index file"):
        MMapIndexedDataset(tmp_path / "x")


def test_analyzer_sample_indices_and_index_field(tmp_path):
    """A dataset read in another order: ``sample_indices`` (or a dict batch's ``index``) names the samples."""
    order = [(i * 3) % 10 for i in range(10)]  # a permutation of 0..9
    value = lambda i: i % 3  # noqa: E731
    permuted = torch.utils.data.TensorDataset(torch.tensor([value(i) for i in order]))
    args = dict(metric_names=["m"], metric_types=["single_value_per_sample"], metric_dtypes=[torch.int64])
    DataAnalyzer(
        permuted,
        batch_size=4,
        metric_functions=[lambda b: b[0]],
        save_path=tmp_path / "a",
        sample_indices=order,
        **args,
    ).run_map_reduce()
    dicts = [{"index": torch.tensor([j]), "v": torch.tensor(value(j))} for j in order]
    DataAnalyzer(
        dicts, batch_size=3, metric_functions=[lambda b: b["v"]], save_path=tmp_path / "b", **args
    ).run_map_reduce()
    for root in ("a", "b"):
        per_sample = MMapIndexedDataset(tmp_path / root / "m" / "m_sample_to_metric")
        assert torch.cat(per_sample[:]).tolist() == [value(i) for i in range(10)]
        rows = MMapIndexedDataset(tmp_path / root / "m" / "m_index_to_sample")
        assert [sorted(r.tolist()) for r in rows[:]] == [
            [i for i in range(10) if value(i) == v] for v in range(3)
        ]
    with pytest.raises(TypeError, match="returned torch.int32, metric_dtypes says torch.int64"):
        DataAnalyzer(
            permuted, metric_functions=[lambda b: b[0].int()], save_path=tmp_path / "c", **args
        ).run_map()


# ---------------------------------------------------------------------------------------- sampler


def make(tmp_path, metrics, micro=2, dp=1, rank=0, gas=2, **kw) -> DeepSpeedDataSampler:
    return DeepSpeedDataSampler(
        efficiency(tmp_path / "clusters", metrics, **kw), N, micro, rank, dp, None, gas
    )


def test_value_metric_draws_only_samples_within_the_difficulty(files, tmp_path):
    sampler = make(tmp_path, {"len": metric(files, "len", **linear(2, 8, 6))})
    seen = global_batches(sampler, 12)
    # floor(t / 6 * 6 + 2) capped at 8
    assert [d["len"] for d, _ in seen] == [3, 4, 5, 6, 7, 8] + [8] * 6
    for d, batch in seen:
        assert len(batch) == 4 and all(length_of(i) <= d["len"] for i in batch)
    assert max(length_of(i) for _, b in seen[5:] for i in b) == 8  # the newest cluster is drawn from
    assert sampler.data_cluster_paths == [f"cluster_len{v}" for v in range(3, 9)]
    first = MMapIndexedDataset(tmp_path / "clusters" / "cluster_len3")  # rank 0 wrote it, shuffled
    assert sorted(first[0].tolist()) == [i for i in range(N) if length_of(i) <= 3]


def test_percentile_metric_and_two_metrics(files, tmp_path):
    quartiles = {
        "min_difficulty": 1,
        "max_difficulty": 4,
        "schedule_type": "fixed_discrete",
        "schedule_config": {"difficulty": [1, 2, 4], "max_step": [2, 4]},
    }
    sampler = make(tmp_path, {"rare": metric(files, "rare", "percentile", **quartiles)})
    for d, batch in global_batches(sampler, 6):
        limit = {1: 3, 2: 7, 4: 15}[d["rare"]]  # the easiest 16 x d samples: rarity <= 4d - 1
        assert all(rarity_of(i) <= limit for i in batch)
    both = make(
        tmp_path,
        {
            "len": metric(files, "len", **linear(2, 8, 6)),
            "rare": metric(files, "rare", "percentile", **quartiles),
        },
    )
    for d, batch in global_batches(both, 6):
        assert all(length_of(i) <= d["len"] and rarity_of(i) < 4 * d["rare"] for i in batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = make(
            tmp_path,
            {
                "seqlen": {
                    "difficulty_type": "value",
                    "clustering_type": "single_cluster",
                    **linear(4, 12, 4, 4),
                }
            },
        )
    seen = global_batches(single, 4)
    assert [d["seqlen"] for d, _ in seen] == [4, 8, 8, 12]  # reported only: every sample is drawn from
    assert len(single.data_cluster_paths) == 1 and single.data_cluster_sizes == [N]


def test_deterministic_resumable_and_split_over_ranks(files, tmp_path):
    metrics = {"len": metric(files, "len", **linear(3, 8, 10))}
    one = make(tmp_path, metrics, micro=4, gas=2)
    again = make(tmp_path, metrics, micro=4, gas=2)
    assert global_batches(one, 6) == global_batches(again, 6)
    it = iter(one)
    next(it)  # mid global batch: the state holds the batch's remainder
    state = one.state_dict()
    expected = [next(it) for _ in range(9)]  # 4.5 global batches on
    resumed = make(tmp_path, metrics, micro=4, gas=2)
    resumed.load_state_dict(state)
    assert [b for _, b in zip(range(9), resumed)] == expected
    # at two ranks, micro 2: the same rounds, rank 0 the first half, rank 1 the second
    ranks = [make(tmp_path, metrics, micro=2, dp=2, rank=r, gas=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    halves = [[b for _, b in zip(range(9), r)] for r in ranks]
    assert [a + b for a, b in zip(*halves)] == expected
    assert len(one) == N * 1000 // 8 * 2  # num_epochs x N samples, in micro-batches of this rank
    epoch = make(tmp_path, metrics, micro=4, gas=2, num_epochs=1)
    assert len(list(epoch)) == len(epoch) == N // 8 * 2 and epoch.consumed_samples == N
    with pytest.raises(ValueError, match="saved curriculum metrics"):
        make(tmp_path, {"rare": metric(files, "rare", "percentile", **linear(1, 4, 4))}).load_state_dict(
            state
        )


@given(st.integers(1, 40), st.integers(1, 8))
def test_every_round_is_split_over_the_ranks_completely(n, dp):
    bounds = [DeepSpeedDataSampler.get_start_end_idx(_Split(r, dp), n) for r in range(dp)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(bounds, bounds[1:] + [(n, n)]))


class _Split:  # the two attributes get_start_end_idx reads
    def __init__(self, rank, dp):
        self.data_parallel_rank, self.data_parallel_size = rank, dp
        self.micro_batch_times_data_parallel_size = dp


# ---------------------------------------------------------------------------------------- end to end


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):
        return self.head(self.embed(ids)).pow(2).mean()


def seq_dataset():
    return torch.utils.data.TensorDataset(torch.arange(N * 12).reshape(N, 12) % 16, torch.arange(N))


def truncate(batch, state):
    """Megatron-DeepSpeed's seqlen_truncate post-process: the sequences cut to the current difficulty."""
    ids, index = batch
    return [ids[:, : state["current_difficulties"]["seqlen_truncate"]], index]


def seqlen_config(tmp_path, files) -> dict:
    metrics = {
        "seqlen_truncate": {
            "difficulty_type": "value",
            "clustering_type": "single_cluster",
            **linear(4, 12, 4, 4),
        },
        "len": metric(files, "len", **linear(4, 8, 4)),
    }
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "data_efficiency": efficiency(tmp_path / "clusters", metrics),
    }


def test_facade_end_to_end_with_post_process_and_checkpoint(files, tmp_path):
    config = seqlen_config(tmp_path, files)
    engine, _, loader, _ = zerostep.initialize(
        model=SeqModel(), config=config, training_data=seq_dataset(), compile=False
    )
    assert engine.curriculum_learning_enabled() and loader.curriculum_learning_enabled
    engine.set_data_post_process_func(truncate)
    it, lengths = iter(loader), []
    for _ in range(6):  # three optimizer steps of two micro-batches
        ids, index = next(it)
        assert all(
            length_of(i) <= engine.curriculum_data_sampler().current_difficulties["len"]
            for i in index.tolist()
        )
        lengths.append(ids.shape[1])
        engine.backward(engine(ids))
        engine.step()
    assert lengths == [4, 4, 8, 8, 8, 8] and engine.global_steps == 3
    engine.save_checkpoint(tmp_path / "ckpt")
    expected = [next(it)[1].tolist() for _ in range(4)]
    other, _, loader2, _ = zerostep.initialize(
        model=SeqModel(), config=config, training_data=seq_dataset(), compile=False
    )
    other.load_checkpoint(tmp_path / "ckpt")
    assert other.curriculum_data_sampler().current_difficulties == {"seqlen_truncate": 8, "len": 7}
    assert [b[1].tolist() for _, b in zip(range(4), loader2)] == expected
    with pytest.raises(KeyError, match="unknown curriculum metric 'nope'"):
        other.set_custom_curriculum_learning_schedule({"nope": lambda t: 1})


def test_functional_api_loader(files, tmp_path):
    config = Config.from_dict(seqlen_config(tmp_path, files), world_size=1)
    engine = initialize(SeqModel(), config, loss_fn=lambda model, batch: model(batch[0]), compile=False)
    loader = curriculum_loader(seq_dataset(), engine, post_process_func=truncate)
    state, shapes = engine.init(seed=0), []
    for _, batch in zip(range(2), loader):
        shapes.append(tuple(batch[0].shape))  # micro x gas samples per step
        state = engine.step(state, batch)
    assert shapes == [(4, 4), (4, 8)] and int(state.step) == 2
    saved = loader.state_dict()
    after = next(iter(loader))[1].tolist()
    fresh = curriculum_loader(seq_dataset(), engine)
    fresh.load_state_dict(saved)
    assert next(iter(fresh))[1].tolist() == after


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            {"schedule_type": "fixed_discrete", "schedule_config": {"difficulty": [2, 9], "max_step": [3]}},
            r"difficulty\[1\] = 9: must be within .* = \[2, 8\]",
        ),
        (
            {"index_to_metric_path": None},
            "index_to_metric_path = null: is required for a schedule_based value",
        ),
        ({"difficulty_type": "rank"}, "must be one of value, percentile"),
        ({"clustering": "single_cluster"}, "did you mean 'clustering_type'"),
        ({"max_difficulty": 1}, "must be >= min_difficulty"),
        ({"schedule_type": "fixed_root"}, "root_degree = null: is required"),
    ],
)
def test_bad_metric_configs(files, tmp_path, change, needle):
    m = {**metric(files, "len", **linear(2, 8, 6)), **change}
    m = {k: v for k, v in m.items() if v is not None}
    with pytest.raises(ConfigError, match=needle):
        Config.from_dict(
            {"train_micro_batch_size_per_gpu": 1, "data_efficiency": efficiency(tmp_path, {"len": m})}
        )


def test_bad_blocks_and_files(files, tmp_path):
    base = {"train_micro_batch_size_per_gpu": 1}
    dynamic = {"data_sampling": {"dynamic_batching": {"enabled": True, "max_tokens": 8}}}
    with pytest.raises(ConfigError, match="dynamic batching is not implemented"):
        Config.from_dict({**base, "data_efficiency": dynamic})
    bad = efficiency(tmp_path, {"len": metric(files, "len", **linear(2, 8, 6))})
    del bad["data_sampling"]["curriculum_learning"]["data_cluster_path"]
    with pytest.raises(ConfigError, match="data_cluster_path = null: is required"):
        Config.from_dict({**base, "data_efficiency": bad})
    missing = metric(files, "len", **linear(2, 8, 6))
    missing["index_to_sample_path"] = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="curriculum metric 'len': index_to_sample_path = .*absent"):
        make(tmp_path, {"len": missing})
    with pytest.raises(ValueError, match="the dataset has 10 samples: the index files belong to another"):
        DeepSpeedDataSampler(
            efficiency(tmp_path, {"len": metric(files, "len", **linear(2, 8, 6))}), 10, 1, 0, 1
        )
    empty = make(tmp_path, {"len": metric(files, "len", **linear(-3, 0, 6))})
    with pytest.raises(ValueError, match="no sample is within the difficulties"):
        next(iter(empty))
    custom = make(
        tmp_path, {"len": metric(files, "len", min_difficulty=1, max_difficulty=8, schedule_type="custom")}
    )
    with pytest.raises(ValueError, match="applies to schedule_type custom only"):
        make(
            tmp_path, {"len": metric(files, "len", **linear(2, 8, 6))}
        ).set_custom_curriculum_learning_schedule({"len": len})
    custom.set_custom_curriculum_learning_schedule({"len": lambda t: min(t, 8)})
    for d, batch in global_batches(custom, 3):
        assert all(length_of(i) <= d["len"] for i in batch)
    assert custom.current_difficulties == {"len": 3}
    custom = make(
        tmp_path, {"len": metric(files, "len", min_difficulty=1, max_difficulty=8, schedule_type="custom")}
    )
    custom.set_custom_curriculum_learning_schedule({"len": lambda t: 9})
    with pytest.raises(ValueError, match="difficulty 9, beyond max_difficulty 8"):
        next(iter(custom))


def test_deepspeed_docs_example_parses_and_round_trips():
    """The data_sampling block of DeepSpeed's config docs (percentile vocabulary rarity, fixed_root)."""
    rarity = {
        "index_to_sample_path": "/path/to/index_to_sample",
        "index_to_metric_path": "/path/to/index_to_metric",
        "difficulty_type": "percentile",
        "clustering_type": "schedule_based",
        "min_difficulty": 1,
        "max_difficulty": 100,
        "schedule_type": "fixed_root",
        "schedule_config": {"total_curriculum_step": 110000, "difficulty_step": 1, "root_degree": 2},
    }
    block = efficiency("/path/to/data_clusters", {"vocabularyrarity": rarity}, seed=1234, num_epochs=1)
    block["data_sampling"]["num_workers"] = 0
    with pytest.warns(UserWarning, match="index_to_metric_path has no effect: a schedule_based percentile"):
        c = Config.from_dict({"train_micro_batch_size_per_gpu": 1, "data_efficiency": block}, world_size=1)
    sampling = c.data_efficiency.data_sampling
    m = sampling.curriculum_learning.curriculum_metrics["vocabularyrarity"]
    assert (
        sampling.num_epochs == 1
        and m.schedule.root_degree == 2
        and m.schedule.total_curriculum_step == 110000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Config.from_dict(c.to_dict(), world_size=1) == c
