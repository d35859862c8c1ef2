"""parallel/compressed.py: sign packing and the 1-bit compressed all-reduce with error feedback, on 2
gloo ranks against a one-process reference written here from the paper's equations (no bit packing)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from zerostep.parallel import compressed as C
from zerostep.parallel.launch import spawn_ranks


def test_pack_signs_is_numpy_packbits_of_the_sign_bits():
    x = torch.tensor([1.0, -2.0, 0.0, -0.5, 3.0, 3.0, -1.0, -1.0, -4.0, 0.25, -0.0, 9.0, -1, -1, -1, 2])
    packed = C.pack_signs(x)
    # bits (x >= 0), most significant first: 1010 1100 | 0111 0001
    assert packed.tolist() == [0b10101100, 0b01110001]
    assert packed.dtype == torch.uint8
    assert torch.equal(C.unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0))
    with pytest.raises(ValueError, match="multiple of 8"):
        C.pack_signs(torch.ones(5))


def test_padding_divides_into_whole_bytes_per_rank():
    assert C.compressed_numel(10, 1) == 16
    assert C.compressed_numel(16, 2) == 16 and C.compressed_numel(17, 2) == 32
    assert C.compressed_numel(5, 3) == 72  # 3 * lcm(3, 8)
    worker, server = C.error_buffers(17, 2)
    assert worker.shape == (2, 16) and server.shape == (1, 16)
    assert C.error_buffers(17, 1)[0].numel() == 0


def reference(inputs: list[torch.Tensor], worker: list[torch.Tensor], server: list[torch.Tensor]):
    """The two-phase scheme for W simulated ranks in fp64; errors are updated in place (flat [T] and
    [C] per rank)."""
    world, n = len(inputs), inputs[0].numel()
    total = worker[0].numel()
    chunk = total // world
    sent = []
    for r in range(world):
        x = torch.zeros(total, dtype=torch.float64)
        x[:n] = inputs[r]
        x += worker[r]
        s = x.norm() / math.sqrt(total)
        q = s * torch.where(x >= 0, 1.0, -1.0).double()
        worker[r].copy_(x - q)
        sent.append(q)
    out = torch.zeros(total, dtype=torch.float64)
    for r in range(world):
        y = sum(q[r * chunk : (r + 1) * chunk] for q in sent) / world + server[r]
        t = y.norm() / math.sqrt(chunk)
        q = t * torch.where(y >= 0, 1.0, -1.0).double()
        server[r].copy_(y - q)
        out[r * chunk : (r + 1) * chunk] = q
    return out[:n]


def run_rank(rank: int, world: int, n: int, steps: int) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    torch.manual_seed(0)
    inputs = [[torch.randn(n) for _ in range(world)] for _ in range(steps)]
    worker, server = C.error_buffers(n, world)
    wire = C.WireBytes()
    outs = [C.compressed_allreduce(step[rank], worker, server, group, wire) for step in inputs]
    # equal ±1 inputs: scales are 1 and every error stays 0, the output is the input exactly
    same = torch.tensor([1.0, -1.0] * 8)
    w2, s2 = C.error_buffers(16, world)
    exact = C.compressed_allreduce(same, w2, s2, group)
    return {
        "outs": outs,
        "worker": worker,
        "server": server,
        "exact": exact,
        "same": same,
        "wire": wire.by_kind,
        "inputs": inputs,
    }


def test_two_ranks_equal_the_reference_over_steps():
    n, steps, world = 37, 4, 2
    results = spawn_ranks(run_rank, world, n, steps, timeout=120)
    inputs = results[0]["inputs"]
    total = C.compressed_numel(n, world)
    worker = [torch.zeros(total, dtype=torch.float64) for _ in range(world)]
    server = [torch.zeros(total // world, dtype=torch.float64) for _ in range(world)]
    for step in range(steps):
        want = reference([x.double() for x in inputs[step]], worker, server)
        for r in range(world):
            torch.testing.assert_close(results[r]["outs"][step].double(), want, rtol=1e-5, atol=1e-6)
        # the compressed average stays near the true one (a bounded error, not an exact value)
        mean = sum(inputs[step]) / world
        assert (results[0]["outs"][step] - mean).norm() < 1.5 * mean.norm() + 1e-6
    chunk = total // world
    for r in range(world):
        torch.testing.assert_close(results[r]["worker"].reshape(-1).double(), worker[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[r]["server"].reshape(-1).double(), server[r], rtol=1e-5, atol=1e-6)
        assert torch.equal(results[r]["exact"], results[r]["same"])
        # the wire: T/8 bytes of signs each way plus 4-byte scales
        per_step = {k: v / steps for k, v in results[r]["wire"].items()}
        assert per_step == {"all_to_all": total // 8, "all_gather": total // 8 + 8 * world}
    assert C.compressed_allreduce_plan(n, world).total_bytes == 2 * (total // 8) + 8 * world
    assert chunk % 8 == 0


SIGN_KERNELS = """
import torch
from zerostep.parallel import compressed as C, sign_kernels as K

assert K.available()
torch.manual_seed(0)
for n in (8, 4096, 4096 * 3 + 40):  # one byte, one program, several programs with a masked tail
    x = torch.randn(n)
    x[::7] = 0.0  # sign(0) = +1
    x[1::11] = -0.0
    packed = K.pack_signs(x)
    assert packed.dtype == torch.uint8 and torch.equal(packed, C.pack_signs_torch(x)), n
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(K.unpack_signs(packed, dtype), C.unpack_signs_torch(packed, dtype)), n
assert not K.usable(x)  # CPU tensors keep the torch ops in parallel.compressed
print("SIGNS_OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_sign_packing_matches_the_torch_ops_in_the_interpreter():
    # the interpreter must be chosen before triton is first imported: a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1", ZEROSTEP_TRITON="1")
    result = subprocess.run(
        [sys.executable, "-c", SIGN_KERNELS], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0 and "SIGNS_OK" in result.stdout, result.stdout + result.stderr
