"""``zerostep train``: train the small byte-level GPT on the standard library's sources.

Runs out of the box: a built-in DeepSpeed config (overridable with ``--config``), a progress bar with
step, loss and tokens/s, ``DIR/metrics.jsonl`` (one JSON object per step), ``DIR/loss.png`` and a
generated sample at the end. ``--nproc N`` re-launches itself on N ranks through
``torch.distributed.run`` (gloo on CPU, NCCL on CUDA); the built-in config then uses ZeRO stage 2.
``--experts N [--ep-size K]`` trains the Mixture-of-Experts variant of the GPT (core/gpt.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zerostep.core.config import Config
from zerostep.core.corpus import split_corpus, stdlib_corpus, window_batch
from zerostep.core.engine import initialize
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.core.monitoring.comms_logger import eager_for_comms_logger
from zerostep.core.monitoring.train_loop import TrainMonitoring

DEFAULT_STEPS = 300


def default_config(steps: int, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": max(1, 16 // world_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10,
        "zero_optimization": {"stage": 2 if world_size > 1 else 0},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1.5e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": max(1, steps // 10),
                "warmup_type": "linear",
            },
        },
    }


def nproc_problem(nproc: int) -> str | None:
    """Why ``--nproc nproc`` cannot run here, or None. On a machine with GPUs every rank takes its own
    (NCCL, ``cuda:LOCAL_RANK``), so more ranks than visible GPUs would fail inside each rank's start-up."""
    if nproc > 1 and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if nproc > visible:
            return (
                f"--nproc {nproc} but this machine has {visible} visible GPU(s), and each rank needs its "
                f"own: use --nproc {visible} or fewer (or hide the GPUs with CUDA_VISIBLE_DEVICES= to "
                "train on CPU ranks)"
            )
    return None


def launch_ranks(argv: list[str], nproc: int) -> int:
    """Re-run ``zerostep train`` (minus ``--nproc``) on ``nproc`` local ranks via torch.distributed.run."""
    from zerostep.parallel.launch import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "zerostep.core.cli",
        "train",
        *argv,
    ]
    return subprocess.call(cmd)


def train(
    config_path: str | None,
    steps: int,
    out: str,
    seed: int = 0,
    sample_bytes: int = 200,
    compile: bool = True,
    experts: int = 0,
    ep_size: int = 1,
) -> dict:
    """The training job on this process's rank; returns the last metrics (rank 0 writes the files)."""
    torch.manual_seed(seed)
    from zerostep.parallel.groups import maybe_init_distributed

    started_here = not dist.is_initialized() and maybe_init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if config_path:
        config = Config.from_file(config_path)  # the group's size, over tensor_parallel.autotp_size
    else:
        config = Config.from_dict(default_config(steps, world), world_size=world)
    model_cfg = GPTConfig(n_experts=experts, ep_size=ep_size)
    from zerostep.parallel.groups import local_rank_device

    device = local_rank_device() if torch.cuda.is_available() else torch.device("cpu")
    model = GPT(model_cfg).to(device)
    compile = eager_for_comms_logger(config, compile)  # the comms logger measures eager collectives only
    engine = initialize(model, config, compile=compile)
    state = engine.init(seed=seed)
    train_data, val_data = split_corpus(stdlib_corpus())
    per_rank = config.train_micro_batch_size_per_gpu * config.gradient_accumulation_steps
    out_dir = Path(out)
    watch = TrainMonitoring(config, rank, device, out_dir / "tensorboard")  # config's monitors, timers
    watch.watch_model(model, compiled=compile)  # the config's flops_profiler and comms_logger
    watch.watch_engine(engine)  # the step's phase timers beside train_batch
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = (out_dir / "metrics.jsonl").open("w")
        print(
            f"zerostep train: GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"
            f"{f' ({experts} experts per block, ep_size {ep_size})' if experts else ''}, "
            f"{world} rank(s), ZeRO stage {config.zero_optimization.stage}, "
            f"{str(engine.compute_dtype).removeprefix('torch.')}, batch {config.train_batch_size} x "
            f"{model_cfg.block_size} bytes, {steps} steps, "
            f"corpus {len(train_data) / 1e6:.1f} MB of stdlib sources",
            flush=True,
        )
    bar = _progress(steps, rank == 0)
    history = []
    start = time.perf_counter()
    for i in range(steps):
        batch = window_batch(train_data, config.train_batch_size, model_cfg.block_size, seed, i)
        # by data-parallel rank: a tensor-parallel group's ranks share their replica's rows
        batch = {k: v[engine.rank * per_rank : (engine.rank + 1) * per_rank] for k, v in batch.items()}
        t0 = time.perf_counter()
        with watch.timing(i):
            state = engine.step(state, batch)
        m = state.metrics
        record = {
            "step": int(state.step),
            "loss": float(m.loss),
            "lr": float(m.lr),
            "grad_norm": float(m.grad_norm),
            "loss_scale": float(m.loss_scale),
            "skipped": int(m.skipped),
            "step_time_s": time.perf_counter() - t0,
        }
        history.append(record)
        watch.after_step(state, (i + 1) * config.train_batch_size)
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            tokens_per_s = config.train_batch_size * model_cfg.block_size / record["step_time_s"]
            bar(i + 1, f"loss {record['loss']:.4f} lr {record['lr']:.2e} {tokens_per_s:,.0f} tok/s")
    elapsed = time.perf_counter() - start
    val = window_batch(val_data, 32, model_cfg.block_size, seed + 1, 0)
    val_loss = float(engine.eval_step(state, val))
    params = engine.full_params(state)
    watch.close()
    if rank == 0:
        log.close()
        print(
            f"\ndone in {elapsed:.1f} s; final train loss {history[-1]['loss']:.4f}, val loss {val_loss:.4f}"
        )
        _plot(history, out_dir / "loss.png")
        print(f"wrote {out_dir / 'metrics.jsonl'} and {out_dir / 'loss.png'}")
        if watch.tensorboard_dir is not None:
            print(f"TensorBoard events: tensorboard --logdir {watch.tensorboard_dir}")
    if rank == 0 or ep_size > 1:  # expert-parallel layers sample on every rank together (all-to-all)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        model.eval()
        prompt = torch.tensor(list(b"def "), dtype=torch.long, device=device)
        text = bytes(model.generate(prompt, sample_bytes, seed=seed).tolist()).decode("utf-8", "replace")
        if rank == 0:
            print("sample:\n" + text)
    if started_here:
        # Every rank leaves together and tears the group down: a rank exiting with live gloo threads
        # while another still works can abort in C++ ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "val_loss": val_loss}


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda i, text: None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        bar = tqdm(total=total, unit="step")

        def update(i: int, text: str) -> None:
            bar.update(i - bar.n)
            bar.set_postfix_str(text)
            if i == total:
                bar.close()

        return update

    def plain(i: int, text: str) -> None:
        if i == 1 or i % 10 == 0 or i == total:
            width = 30
            done = width * i // total
            print(f"[{'#' * done}{'.' * (width - done)}] step {i}/{total} {text}", flush=True)

    return plain


def _plot(history: list[dict], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install 'zerostep[train]')")
        return
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("zerostep train: byte-level GPT on stdlib sources")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in history], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
