"""Greedy generation: eager baselines vs ``zerostep.init_inference`` engines, same prompts, same tokens.

Two sections, each decoding the same prompts greedily (argmax):

- zerostep's GPT (core/gpt.py): the eager fp32 module without a KV cache (the whole window re-run each
  token, as its own ``generate`` does) against the engine's ``generate``: a static KV cache, eager or
  with the decode step compiled once (``replace_with_kernel_inject``), in fp32, bf16 (fp16 on CUDA) and
  with int8 weights; on CUDA also ``enable_cuda_graph`` (reduce-overhead).
- a random-init Hugging Face GPT-2 (``transformers.GPT2LMHeadModel``, no download): its own eager
  ``generate`` (dynamic cache) against the engine (forward compiled, ``cache_implementation="static"``).

Reported per variant: tokens/s over the decode (batch x new tokens / wall time of ``generate``), the
first-token latency (``generate`` of one new token: the prompt's forward and one pick), medians over the
repeats (variants alternating within each repeat) after one warm-up each (which holds the compiles), and
the share of tokens equal to the section's eager baseline.

    python benchmarks/inference.py
    python benchmarks/inference.py --n-layer 6 --n-embd 384 --batch 8 --new 64 --repeats 5
    python benchmarks/inference.py --threads 1   # a shared CPU: see below
    python benchmarks/inference.py --skip-hf     # without transformers
    python benchmarks/inference.py --skip-gpt --hf-vocab 2048   # HF only, a head that dominates less

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
from collections.abc import Callable

import torch

import zerostep
from zerostep.core.gpt import GPT, GPTConfig

Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt [B, T], new tokens) -> [B, T + new]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(generate: Generate, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    sync(prompt.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(prompt, new)
    sync(prompt.device)
    return out, time.perf_counter() - start


def uncached_greedy(model: torch.nn.Module, block: int) -> Generate:
    def generate(idx: torch.Tensor, new: int) -> torch.Tensor:
        for _ in range(new):
            logits = model(idx[:, -block:])[:, -1, :]  # [B, vocab]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return idx

    return generate


def run(title: str, variants: dict[str, Generate], prompt: torch.Tensor, new: int, repeats: int) -> None:
    """Warm up, then time every variant ``repeats`` times, alternating; print one line per variant."""
    print(title)
    warm = {name: timed(gen, prompt, new)[1] for name, gen in variants.items()}  # every compile here
    for gen in variants.values():
        timed(gen, prompt, 1)  # one-token generate: the prefill shapes warmed too
    firsts: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    tokens = {}
    for _ in range(repeats):  # variants alternate within a repeat, so machine noise hits them all
        for name, gen in variants.items():
            tokens[name], total = timed(gen, prompt, new)
            rates[name].append(prompt.shape[0] * new / total)
            firsts[name].append(timed(gen, prompt, 1)[1])
    base = next(iter(variants))
    base_rate = statistics.median(rates[base])
    for name in variants:
        rate = statistics.median(rates[name])
        same = (tokens[name] == tokens[base]).float().mean().item()
        print(
            f"  {name:34s} {rate:9.1f} tok/s ({rate / base_rate:5.2f}x)  first token "
            f"{statistics.median(firsts[name]) * 1e3:7.2f} ms  warm-up {warm[name]:6.2f} s  "
            f"tokens equal to {base.split(' (')[0]} {same:6.1%}"
        )


def engine(model: torch.nn.Module, **kw) -> zerostep.core.inference.InferenceEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compiled with torch.compile instead": that is the point here
        return zerostep.init_inference(copy.deepcopy(model), **kw)


def gpt_section(args: argparse.Namespace, device: torch.device) -> None:
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=128)
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    prompt = torch.randint(0, 256, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    half = "fp16" if device.type == "cuda" else "bf16"

    def greedy(e) -> Generate:
        return lambda idx, new: e.generate(idx, new, do_sample=False)

    variants = {
        "eager fp32 (no KV cache)": uncached_greedy(copy.deepcopy(base).to(device), cfg.block_size),
        "engine fp32 static cache, eager": greedy(engine(base, dtype="fp32")),
        "engine fp32 static cache, compiled": greedy(engine(base, dtype="fp32", kernel_inject=True)),
        f"engine {half} static cache, compiled": greedy(engine(base, dtype=half, kernel_inject=True)),
        "engine int8 static cache, compiled": greedy(engine(base, dtype="int8", kernel_inject=True)),
    }
    if device.type == "cuda":
        variants["engine fp16 cuda graph"] = greedy(engine(base, dtype="fp16", enable_cuda_graph=True))
    title = (
        f"zerostep GPT {args.n_layer}x{args.n_embd}, batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens"
    )
    run(title, variants, prompt, args.new, args.repeats)


def hf_section(args: argparse.Namespace, device: torch.device) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=128,
        vocab_size=args.hf_vocab,
    )  # fmt: skip
    base = transformers.GPT2LMHeadModel(cfg).eval()
    prompt = torch.randint(
        0, args.hf_vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    ).to(device)
    mask = torch.ones_like(prompt)
    pad = {"pad_token_id": 0, "attention_mask": mask, "do_sample": False}

    def hf(model, **extra) -> Generate:
        # min_new_tokens: a random model may pick GPT-2's eos (50256); every variant decodes all tokens
        return lambda idx, new: model.generate(idx, max_new_tokens=new, min_new_tokens=new, **pad, **extra)

    eager = copy.deepcopy(base).to(device)
    variants = {
        "HF eager generate (dynamic cache)": hf(eager),
        "HF eager generate, static cache": hf(eager, cache_implementation="static"),
    }
    served = engine(base, dtype="fp32", kernel_inject=True)
    variants["engine fp32 compiled, static cache"] = lambda idx, new: served.generate(
        idx, max_new_tokens=new, min_new_tokens=new, **pad
    )
    title = (
        f"Hugging Face GPT-2 {args.n_layer}x{args.n_embd}, vocab {args.hf_vocab}, batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens (transformers {transformers.__version__})"
    )
    run(title, variants, prompt, args.new, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-vocab", type=int, default=50257)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, medians of {args.repeats}"
    )
    if not args.skip_gpt:
        gpt_section(args, device)
    if not args.skip_hf:
        hf_section(args, device)


if __name__ == "__main__":
    main()
