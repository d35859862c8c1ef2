"""Greedy generation on the small GPT: the eager module vs ``zerostep.init_inference`` engines.

Each variant decodes the same prompts greedily (argmax, no KV cache: core/gpt.py's model re-runs the
whole window each token, as its own ``generate`` does). Reported per variant: tokens/s over the decode
(batch x new tokens / wall time) and the first-token latency (the prompt's forward), medians over the
repeats (variants alternating within each repeat) after one warm-up decode each (which holds the
compiles), and whether the greedy tokens equal the eager fp32 module's. Variants: eager fp32; the engine
compiled (``replace_with_kernel_inject``) in fp32, in bf16 (fp16 on CUDA) and with int8 weights; on CUDA
also ``enable_cuda_graph`` (reduce-overhead).

    python benchmarks/inference.py
    python benchmarks/inference.py --n-layer 6 --n-embd 384 --batch 8 --new 64 --repeats 5
    python benchmarks/inference.py --threads 1   # a shared CPU: see below

On a CPU shared with other processes, inductor's OpenMP kernels with more threads than free cores wait at
every barrier (measured here, 2 cores under load 4-6: a compiled 1-layer GPT forward 120 ms at 2 threads,
0.4 ms at 1 thread, eager 1 ms), so compare with ``--threads`` at most the free cores.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import zerostep
from zerostep.core.gpt import GPT, GPTConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy(forward, prompt: torch.Tensor, new: int, block: int) -> tuple[torch.Tensor, float, float]:
    """(tokens [B, T + new], first-token seconds, total seconds)."""
    device = prompt.device
    sync(device)
    start = time.perf_counter()
    idx, first = prompt, 0.0
    for i in range(new):
        logits = forward(idx[:, -block:])[:, -1, :]  # [B, vocab]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        if i == 0:
            sync(device)
            first = time.perf_counter() - start
    sync(device)
    return idx, first, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=128)
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    prompt = torch.randint(
        0, cfg.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    prompt = prompt.to(device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16

    eager = copy.deepcopy(base).to(device)
    variants = {"eager fp32": eager}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compiled with torch.compile instead": that is the point here
        variants["engine fp32 compiled"] = zerostep.init_inference(
            copy.deepcopy(base), dtype="fp32", kernel_inject=True
        )
        variants[f"engine {str(half)[6:]} compiled"] = zerostep.init_inference(
            copy.deepcopy(base), dtype=half, kernel_inject=True
        )
        variants["engine int8 compiled"] = zerostep.init_inference(
            copy.deepcopy(base), dtype="int8", kernel_inject=True
        )
        if device.type == "cuda":
            variants["engine fp16 cuda graph"] = zerostep.init_inference(
                copy.deepcopy(base), dtype="fp16", enable_cuda_graph=True
            )

    print(
        f"GPT {args.n_layer}x{args.n_embd}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, medians of {args.repeats}"
    )
    warm = {}
    for name, forward in variants.items():  # warm-up decodes: every compile happens here
        start = time.perf_counter()
        greedy(forward, prompt, args.new, cfg.block_size)
        warm[name] = time.perf_counter() - start
    firsts: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    tokens = {}
    for _ in range(args.repeats):  # variants alternate within a repeat, so machine noise hits them all
        for name, forward in variants.items():
            tokens[name], first, total = greedy(forward, prompt, args.new, cfg.block_size)
            firsts[name].append(first)
            rates[name].append(args.batch * args.new / total)
    base_rate = statistics.median(rates["eager fp32"])
    for name in variants:
        rate = statistics.median(rates[name])
        same = (tokens[name] == tokens["eager fp32"]).float().mean().item()
        print(
            f"  {name:24s} {rate:9.1f} tok/s ({rate / base_rate:5.2f}x)  first token "
            f"{statistics.median(firsts[name]) * 1e3:7.2f} ms  warm-up {warm[name]:6.2f} s  "
            f"tokens equal to eager {same:6.1%}"
        )


if __name__ == "__main__":
    main()
