"""The benchmarks that take ``--device cuda`` refuse it clearly on a machine without CUDA."""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["train_step.py", "optimizer_update.py", "checkpoint.py", "zero_step.py"])
def test_device_cuda_without_cuda_is_a_clear_error(script, monkeypatch, capsys):
    path = os.path.join(BENCHMARKS, script)
    monkeypatch.setattr(sys, "argv", [path, "--device", "cuda"])
    monkeypatch.syspath_prepend(BENCHMARKS)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert "CUDA is not available" in out.out + out.err or "needs 1 GPU(s)" in out.err
