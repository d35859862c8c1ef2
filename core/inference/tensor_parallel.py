"""Tensor parallelism for inference over ``torch.distributed.tensor.parallel`` (Megatron-style).

Per transformer block: the attention's fused ``qkv`` and the MLP's ``fc`` are column-wise (each rank
computes its heads / its slice of the hidden units), ``proj`` and ``out`` row-wise (each rank's partial
product all-reduced), so one block costs two all-reduces and each rank holds 1/tp of the block weights.
Embeddings, the final norm and the (tied) head stay replicated.

Policies: zerostep's own GPT (``core/gpt.py``) is known; other models raise naming the architecture.
A fused ``qkv`` weight ``[3C, C]`` is ``[q; k; v]``: its rows are reordered to ``[q_0 k_0 v_0; q_1 k_1
v_1; ...]`` (``_r`` the heads of rank ``r``) before the column-wise split, so each rank's shard is its own
heads' q, k and v, and the attention's forward is rebound to split the local width.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from zerostep.errors import ConfigError


def _mesh(tp_size: int, device_type: str) -> DeviceMesh:
    from zerostep.parallel.groups import maybe_init_distributed

    if not maybe_init_distributed():
        raise RuntimeError(
            f"init_inference: tensor_parallel.tp_size={tp_size} needs torch.distributed initialized on "
            f"{tp_size} ranks (launch with torchrun or call zerostep.init_distributed first)"
        )
    world = dist.get_world_size()
    if world != tp_size:
        raise ConfigError(
            f"init_inference: tensor_parallel.tp_size={tp_size} must equal the world size {world}"
        )
    return init_device_mesh(device_type, (tp_size,), mesh_dim_names=("tp",))


def _interleave_qkv(linear: nn.Linear, tp_size: int) -> None:
    """Rows [q; k; v] -> [q_0 k_0 v_0; q_1 k_1 v_1; ...] in place (weight [3C, C], bias [3C])."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(linear, name)
            if t is None:
                continue
            c = t.shape[0] // 3
            # [3, tp, C/tp, ...] -> [tp, 3, C/tp, ...] -> [3C, ...]
            parts = t.reshape(3, tp_size, c // tp_size, *t.shape[1:]).transpose(0, 1)
            t.copy_(parts.reshape(t.shape))


def _local_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """core/gpt.py's CausalSelfAttention.forward on this rank's heads (``self.n_head`` is local)."""
    B, T, _ = x.shape
    qkv = self.qkv(x)  # [B, T, 3 * C_local]: this rank's q, k, v
    c = qkv.shape[-1] // 3
    q, k, v = (t.view(B, T, self.n_head, c // self.n_head).transpose(1, 2) for t in qkv.split(c, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, n_head_local, T, c / n_head]
    return self.proj(y.transpose(1, 2).reshape(B, T, c))  # row-wise: all-reduced to [B, T, C]


def _gpt_policy(model: nn.Module, tp_size: int, mesh: DeviceMesh) -> None:
    cfg = model.cfg
    for block in model.blocks:
        _interleave_qkv(block.attn.qkv, tp_size)
        block.attn.n_head = cfg.n_head // tp_size
        block.attn.forward = types.MethodType(_local_attention_forward, block.attn)
        plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(), "fc": ColwiseParallel()}
        plan["out"] = RowwiseParallel()
        parallelize_module(block, mesh, plan)


def check_divides(model: nn.Module, tp_size: int) -> None:
    """The shape checks alone (no process group needed): tp_size divides the heads and the hidden size."""
    from zerostep.core.gpt import GPT

    if not isinstance(model, GPT):
        raise ConfigError(
            f"init_inference: no tensor-parallel policy for {type(model).__name__}; "
            "known: zerostep.core.gpt.GPT"
        )
    if model.cfg.n_experts > 0:
        raise ConfigError(
            "init_inference: tensor parallelism of the MoE GPT (n_experts > 0) is not supported"
        )
    for what, n in (("n_head", model.cfg.n_head), ("n_embd", model.cfg.n_embd)):
        if n % tp_size:
            raise ConfigError(f"init_inference: tensor_parallel.tp_size={tp_size} does not divide {what}={n}")


def apply_tensor_parallel(model: nn.Module, tp_size: int) -> DeviceMesh:
    """Shard ``model`` in place over a ``tp_size``-rank mesh (every rank holds the same full weights on
    entry, e.g. the same seed or checkpoint); returns the mesh."""
    check_divides(model, tp_size)
    device_type = "cuda" if any(p.is_cuda for p in model.parameters()) else "cpu"
    mesh = _mesh(tp_size, device_type)
    _gpt_policy(model, tp_size, mesh)
    return mesh
