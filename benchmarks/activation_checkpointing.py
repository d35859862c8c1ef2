"""Activation checkpointing on the small GPT: bytes autograd keeps for backward, and step time.

Saved bytes: one forward of the model (``torch.func.functional_call``, as the engine runs it) counted by
``SavedTensorBytes`` (unique storages kept for backward, parameters left out), with and without every
block checkpointed. Step time: ``engine.step`` of two engines, one with ``"checkpoint_units": true``,
alternating step by step in one process so machine noise hits both; medians over the rounds.

    python benchmarks/activation_checkpointing.py
    python benchmarks/activation_checkpointing.py --compile --steps 20 --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from zerostep.core import Config, initialize
from zerostep.core import activation_checkpointing as ac
from zerostep.core.corpus import stdlib_corpus, window_batch
from zerostep.core.gpt import GPT, GPTConfig
from zerostep.parallel.zero3 import unit_module_paths


def saved_bytes(cfg: GPTConfig, batch: dict[str, torch.Tensor], checkpoint: bool) -> int:
    torch.manual_seed(0)
    model = GPT(cfg)
    if checkpoint:
        ac.install_unit_checkpointing(model, ac.ActivationCheckpointingConfig(), unit_module_paths(model))
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    with ac.SavedTensorBytes(exclude=list(params.values())) as saved:
        loss = torch.func.functional_call(model, params, (), batch)
    loss.backward()
    return saved.nbytes


def step_times(cfg: GPTConfig, batches, steps: int, warmup: int, compile: bool, stage: int):
    engines, states = [], []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        d = {
            "train_micro_batch_size_per_gpu": batches[0]["idx"].shape[0],
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        }
        if checkpoint:
            d["activation_checkpointing"] = {"checkpoint_units": True}
        engine = initialize(GPT(cfg), Config.from_dict(d), compile=compile)
        engines.append(engine)
        states.append(engine.init())
    times: list[list[float]] = [[], []]
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for k, engine in enumerate(engines):
            start = time.perf_counter()
            states[k] = engine.step(states[k], batch)
            states[k].block_until_ready()
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compiled engines (default: eager)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = GPTConfig(dropout=0.1)
    data = stdlib_corpus()
    batches = [window_batch(data, args.batch, cfg.block_size, seed=0, step=i) for i in range(4)]
    plain_bytes, ckpt_bytes = (saved_bytes(cfg, batches[0], c) for c in (False, True))
    plain_ms, ckpt_ms = step_times(cfg, batches, args.steps, args.warmup, args.compile, args.stage)
    mode = "compiled" if args.compile else "eager"
    print(
        f"small GPT {cfg.n_layer}x{cfg.n_embd}, batch {args.batch}x{cfg.block_size}, "
        f"stage {args.stage}, {mode}"
    )
    # the bytes come from an eager forward (a compiled graph saves what its partitioner chooses)
    print(f"{'':24}{'plain':>12}{'checkpointed':>14}{'ratio':>8}")
    print(
        f"{'saved acts, eager (MiB)':24}{plain_bytes / 2**20:12.2f}{ckpt_bytes / 2**20:14.2f}"
        f"{plain_bytes / ckpt_bytes:8.2f}x"
    )
    print(f"{'step time (ms, median)':24}{plain_ms:12.1f}{ckpt_ms:14.1f}{ckpt_ms / plain_ms:8.2f}x")
    result = dict(
        batch=args.batch,
        stage=args.stage,
        mode=mode,
        saved_bytes_plain=plain_bytes,
        saved_bytes_checkpointed=ckpt_bytes,
        step_ms_plain=plain_ms,
        step_ms_checkpointed=ckpt_ms,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
