"""Batch checks, micro-batch splits and batch specs."""

from __future__ import annotations

import pytest
import torch

from zerostep.core.batching import BatchSpec, check_batch, micro_batches


def test_spec_tells_structure_rank_and_dtype_from_sizes():
    first = BatchSpec.of({"ids": torch.zeros(4, 16, dtype=torch.long), "mask": torch.ones(4, 16), "tag": "a"})
    longer = BatchSpec.of(
        {"ids": torch.zeros(4, 20, dtype=torch.long), "mask": torch.ones(4, 20), "tag": "a"}
    )
    assert first.mismatch(longer) is None  # sequence lengths may vary
    assert first.sizes_differ(longer) == "leaf 'ids' has shape (4, 20); the first step's had (4, 16)"
    assert first.sizes_differ(first) is None
    as_int32 = BatchSpec.of(
        {"ids": torch.zeros(4, 16, dtype=torch.int), "mask": torch.ones(4, 16), "tag": "a"}
    )
    assert (
        "leaf 'ids' has shape (4, 16) and dtype int32; the first step's had shape (4, 16) and dtype int64"
        == (first.mismatch(as_int32))
    )
    flat = BatchSpec.of({"ids": torch.zeros(64, dtype=torch.long), "mask": torch.ones(4, 16), "tag": "a"})
    assert "shape (64,)" in first.mismatch(flat)
    missing = BatchSpec.of({"ids": torch.zeros(4, 16, dtype=torch.long), "tag": "a"})
    assert first.mismatch(missing).startswith("its structure is")
    tensor_tag = BatchSpec.of(
        {"ids": torch.zeros(4, 16, dtype=torch.long), "mask": torch.ones(4, 16), "tag": torch.ones(4)}
    )
    assert first.mismatch(tensor_tag) == "leaf 'tag' is a tensor now, unlike in the first step's batch"


def test_micro_batches_are_row_views_and_bad_leading_sizes_are_named():
    x = torch.arange(12.0).reshape(6, 2)
    pieces = micro_batches({"x": x}, 2, 3)
    assert [p["x"].data_ptr() for p in pieces] == [x[i * 2].data_ptr() for i in range(3)]
    with pytest.raises(ValueError, match=r"batch leaf 'y' has shape \(5,\).* 2 x 3 = 6"):
        check_batch({"x": x, "y": torch.zeros(5)}, 2, 3)
