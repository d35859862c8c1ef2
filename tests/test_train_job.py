"""``zerostep train``: the main job end to end (eager, few steps), on one and on two ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from zerostep.core.cli import main
from zerostep.core.corpus import stdlib_corpus, window_batch


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_plot_and_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--out", str(out), "--no-compile", "--sample-bytes", "20"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "loss_scale"} <= set(r)
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "sample:" in printed and "step 4/4" in printed


def test_train_on_two_ranks_through_torchrun(tmp_path):
    out = tmp_path / "run2"
    cmd = [
        sys.executable,
        "-m",
        "zerostep.core.cli",
        "train",
        "--nproc",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
        "--no-compile",
        "--sample-bytes",
        "5",
        "--experts",  # the MoE GPT, experts split over both ranks (the dense GPT runs in the test above)
        "4",
        "--ep-size",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(4 experts per block, ep_size 2), 2 rank(s), ZeRO stage 2" in res.stdout
    assert len(read_metrics(out)) == 2


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--steps", "0"]) == 2
    assert main(["train", "--experts", "3", "--ep-size", "2", "--nproc", "2"]) == 2
    assert "not divisible by --ep-size 2" in capsys.readouterr().err
    assert main(["train", "--experts", "4", "--ep-size", "2"]) == 2
    assert "--ep-size 2 must divide --nproc 1" in capsys.readouterr().err
    assert main(["train", "--ep-size", "2", "--nproc", "2"]) == 2
    assert "needs --experts" in capsys.readouterr().err


def test_corpus_is_deterministic_and_batches_are_shifted_by_one():
    data = stdlib_corpus(50_000)
    assert len(data) == 50_000 and bool((stdlib_corpus(50_000) == data).all())
    b = window_batch(data, 3, 16, seed=1, step=2)
    assert b["idx"].shape == (3, 16)
    assert bool((b["idx"][:, 1:] == b["targets"][:, :-1]).all())


def test_more_ranks_than_gpus_is_refused_before_launching(monkeypatch, capsys):
    import torch

    from zerostep.core import train_job

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        train_job, "launch_ranks", lambda *a: (_ for _ in ()).throw(AssertionError("launched"))
    )
    assert main(["train", "--nproc", "2", "--steps", "1"]) == 2
    assert "--nproc 2 but this machine has 1 visible GPU(s)" in capsys.readouterr().err
