"""``zerostep config check FILE [--world-size N]``."""

from __future__ import annotations

import argparse
import json

from blocking_files import fifo_released_after

from zerostep.core.config.cli import EXIT_CONFIG_ERROR, EXIT_OK, main, register

CONFIG = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "fp16": {"enabled": True, "loss_scale_window": 500},
    "zero_optimization": {"stage": 2, "cpu_offload": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "cuda_visible_devices": 0,
}


def lines_by_key(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        if " = " in line:
            rows[line.split(" = ", 1)[0]] = line
    return rows


def test_check_prints_values_and_sources(tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(CONFIG))
    assert main(["config", "check", str(path), "--world-size", "2"]) == EXIT_OK
    captured = capsys.readouterr()
    rows = lines_by_key(captured.out)
    assert rows["world_size"].endswith("(argument)") and " 2 " in rows["world_size"]
    assert rows["train_batch_size"].endswith("(file)")
    assert (
        rows["gradient_accumulation_steps"].endswith("(derived)")
        and "= 4 " in rows["gradient_accumulation_steps"]
    )
    assert rows["fp16.loss_scale_window"].endswith("(file)") and "500" in rows["fp16.loss_scale_window"]
    assert rows["fp16.hysteresis"].endswith("(default)")
    assert rows["zero_optimization.overlap_comm"].endswith("(default)")
    assert rows["zero_optimization.offload_optimizer.device"].endswith("(file)")
    assert rows["optimizer.type"].endswith("(file)") and '"adamw"' in rows["optimizer.type"]
    assert rows["optimizer.params.lr"].endswith("(file)")
    assert "warning: zero_optimization.cpu_offload is deprecated" in captured.err
    assert "warning: cuda_visible_devices" in captured.err


def test_check_reports_config_errors_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}))
    assert main(["config", "check", str(path), "--world-size", "4"]) == EXIT_CONFIG_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: train_batch_size = 30")
    assert main(["config", "check", str(tmp_path / "missing.json")]) == EXIT_CONFIG_ERROR
    assert "missing.json" in capsys.readouterr().err


def test_register_into_another_parser(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text("{train_micro_batch_size_per_gpu: 2, // hjson\n}")
    parser = argparse.ArgumentParser(prog="zerostep")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train")
    register(sub)
    args = parser.parse_args(["config", "check", str(path)])
    assert args.func(args) == EXIT_OK
    assert "train_micro_batch_size_per_gpu = 2" in capsys.readouterr().out


BASE = '"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}'
# Inputs that raised KeyError, OverflowError, RecursionError, TypeError, ValueError or blocked (issue 22):
# each must be one "error:" line naming the key path or the file, exit code 2, no traceback.
BAD_FILES = {
    "scheduler_auto.json": ("{" + BASE + ', "scheduler": {"type": "auto"}}', "scheduler.type"),
    "huge_int.json": ("{" + BASE + ', "gradient_clipping": 1' + "0" * 400 + "}", "gradient_clipping"),
    "huger_int.json": ("{" + BASE + ', "gradient_clipping": 1' + "0" * 5000 + "}", "huger_int.json"),
    "deep.json": ("{" + BASE + ', "wandb": ' + "[" * 500 + "]" * 500 + "}", "wandb"),
    "deeper.json": ("{" + BASE + ', "wandb": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeper.json"),
    "betas_null.json": (
        '{"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"betas": [0.5, null]}}}',
        "optimizer.params.betas[1]",
    ),
    "betas_auto.json": (
        '{"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"betas": ["auto", 0.9]}}}',
        "optimizer.params.betas[0]",
    ),
    "window.json": (
        "{" + BASE + ', "fp16": {"enabled": true, "loss_scale_window": 1e30}}',
        "fp16.loss_scale_window",
    ),
    "hysteresis.json": ("{" + BASE + ', "fp16": {"enabled": true, "hysteresis": 1e30}}', "fp16.hysteresis"),
    "adagrad.json": (
        '{"train_batch_size": 2, "optimizer": {"type": "Adagrad", '
        '"params": {"initial_accumulator_value": 1e308}}}',
        "initial_accumulator_value",
    ),
    "empty.json": ("", "empty.json' is empty"),
}


def check_fails_cleanly(path, needle, capsys):
    assert main(["config", "check", str(path)]) == EXIT_CONFIG_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and needle in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1


def test_check_reports_every_bad_input_as_one_error_line(tmp_path, capsys):
    for name, (content, needle) in BAD_FILES.items():
        path = tmp_path / name
        path.write_text(content)
        check_fails_cleanly(path, needle, capsys)
    check_fails_cleanly("ds\x00.json", "embedded null byte", capsys)
    with fifo_released_after(tmp_path / "fifo.json") as fifo:  # it blocked forever before
        check_fails_cleanly(fifo, "fifo.json' is not a regular file (a FIFO)", capsys)
