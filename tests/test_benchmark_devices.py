"""The benchmarks that take ``--device cuda`` refuse it clearly on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "train_step": [sys.executable, "benchmarks/train_step.py", "--device", "cuda"],
    "optimizer_update": [sys.executable, "benchmarks/optimizer_update.py", "--device", "cuda"],
    "checkpoint": [sys.executable, "benchmarks/checkpoint.py", "--device", "cuda"],
}  # zero_step.py and gpu_check.sh refuse it too (argparse; a torch.cuda check): not paid for here


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error():
    runs = {
        name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in COMMANDS.items()
    }
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, proc.returncode, out[-2000:])
        assert "CUDA is not available" in out, (name, out[-2000:])
