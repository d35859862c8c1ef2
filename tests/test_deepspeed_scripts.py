"""A DeepSpeed-style training script (tests/scripts/deepspeed_style_train.py) runs on zerostep with only
its imports changed, in one process and on two torchrun ranks."""

import json
import os
import subprocess
import sys

import pytest

from zerostep.parallel.launch import free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "deepspeed_style_train.py")


def run_script(tmp_path, config: dict, nproc: int, *extra: str) -> dict:
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps(config))
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd = [
        *launch,
        SCRIPT,
        "--deepspeed",
        "--deepspeed_config",
        str(cfg),
        "--out",
        str(tmp_path / "ckpt"),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_client_optimizer_script_on_two_ranks(tmp_path):
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2},
    }
    out = run_script(tmp_path, config, 2)
    # 64 samples / (4 x 2 x 2) = 4 updates per epoch, 2 epochs
    assert (out["world_size"], out["global_steps"], out["global_samples"]) == (2, 8, 128)
    assert out["last_loss"] < out["first_loss"] and out["client_state"] == {"epoch": 1}
    assert out["epochs"] == 2 and out["lr"] == [0.01, 0.01]


@pytest.mark.parametrize("stage", [3])  # stage 0 in one process is the facade tests' own ground
def test_config_optimizer_script_in_one_process(tmp_path, stage):
    config = {
        "train_batch_size": 8,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
        "zero_optimization": {"stage": stage},
    }
    out = run_script(tmp_path, config, 1, "--config-optimizer")
    assert (out["world_size"], out["global_steps"], out["global_samples"]) == (1, 16, 128)
    assert out["last_loss"] < out["first_loss"] and out["lr"] == [0.01, 0.01]
    assert out["head_norm"] > 0  # stage 3: the module's state_dict after load_checkpoint
