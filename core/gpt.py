"""A small byte-level GPT for ``zerostep train``: the user's model, not part of the engine.

nanoGPT-shaped: token + position embeddings, ``n_layer`` pre-norm blocks in an ``nn.ModuleList``
(one ZeRO unit each), final LayerNorm, a head tied to the token embedding. Vocabulary: the 256 byte
values, so any text trains without a tokenizer download. With ``n_experts > 0`` every block's MLP is a
top-1 Mixture of Experts (``zerostep.moe.layer.MoE``, ``n_experts`` copies of the MLP split over
``ep_size`` ranks): the same active parameters per token as the dense model plus a gate, and the
load-balancing losses times ``aux_loss_coef`` added to the cross-entropy. With
``sequence_parallel_size = P > 1`` (DeepSpeed-Ulysses, parallel/ulysses.py) each rank of a group of
``P`` consecutive ranks gets ``T / P`` consecutive positions of every sequence
(``zerostep.sequence.split_sequence``),
attention runs through ``zerostep.sequence.layer.DistributedAttention`` over ``n_head / P`` heads of the
whole sequence, and the loss is the whole sequence's (the same on every rank of the group, its gradient
reaching only this rank's positions), so the engine's sum over the group is the one-process gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    n_experts: int = 0  # > 0: MoE MLPs (top-1, DeepSpeed's defaults otherwise)
    ep_size: int = 1
    aux_loss_coef: float = 0.01
    sequence_parallel_size: int = 1  # > 1: Ulysses over groups of this many consecutive ranks
    # with sequence_parallel_size > 1 and AutoTP training: the config's tensor_parallel.autotp_size (the
    # sequence groups are strided by it, parallel/mesh.sequence_tensor_layout); otherwise unused
    tensor_parallel_size: int = 1


class LocalAttention(nn.Module):
    """Causal attention over whole sequences: q, k, v [B, T, h, D] -> [B, T, h, D]."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, T, D]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return y.transpose(1, 2)  # [B, T, h, D]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, sequence_group: object = None):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attend = LocalAttention(cfg.dropout)
        if sequence_group is not None:  # the all-to-alls around it: [B, T/P, H, D] <-> [B, T, H/P, D]
            from zerostep.sequence.layer import DistributedAttention

            self.attend = DistributedAttention(self.attend, sequence_group, scatter_idx=2, gather_idx=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # T: this rank's positions (T / P under sequence parallelism)
        qkv = self.qkv(x)  # [B, T, 3C]; under tensor parallelism this rank's heads: [B, T, 3C / tp]
        C = qkv.shape[-1] // 3
        # [B, T, C] -> [B, T, n_head, C // n_head] (n_head: this rank's heads under tensor parallelism)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in qkv.split(C, dim=2))
        if isinstance(self.attend, LocalAttention):
            y = self.attend(q, k, v)
        else:
            y = self.attend(q, k, v, 0)  # batch_dim_idx 0
        return self.proj(y.reshape(B, T, C))  # [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, sequence_group: object = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, sequence_group)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class MLP(nn.Module):
    """The dense block's MLP as a module: one expert of the MoE block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class MoEBlock(nn.Module):
    """A block whose MLP is a top-1 MoE; ``forward`` returns ``(x, l_aux)``."""

    def __init__(self, cfg: GPTConfig):
        from zerostep.parallel.moe_layer import MoE

        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.moe = MoE(
            cfg.n_embd, MLP(cfg), num_experts=cfg.n_experts, ep_size=cfg.ep_size, eval_capacity_factor=2.0
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop(self.attn(self.ln1(x)))
        out, l_aux, _ = self.moe(self.ln2(x))
        return x + self.drop(out), l_aux


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.sequence = _sequence_groups(cfg)  # None at sequence_parallel_size 1
        group = None if self.sequence is None else self.sequence.sp_group
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.n_experts > 0:
            self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.n_layer))
        else:
            self.blocks = nn.ModuleList(Block(cfg, group) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] without ``targets``; the mean cross-entropy (a scalar) with them.
        Under sequence parallelism ``idx`` / ``targets`` are this rank's ``T / P`` positions, logits too,
        and the loss is the whole sequence's."""
        B, T = idx.shape
        first = 0 if self.sequence is None else self.sequence.sp_rank * T  # this chunk's first position
        if first + T > self.cfg.block_size:
            total = T if self.sequence is None else T * self.sequence.sp_size
            raise ValueError(f"sequence length {total} is longer than block_size={self.cfg.block_size}")
        pos = torch.arange(first, first + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # [B, T, C]
        aux = []
        for block in self.blocks:
            x = block(x)
            if isinstance(x, tuple):  # an MoE block: (x, load-balancing loss)
                x, l_aux = x
                aux.append(l_aux)
        logits = self.head(self.ln_f(x))  # [B, T, vocab]
        if targets is None:
            return logits
        if self.sequence is not None:
            from zerostep.parallel.ulysses import gather_sequence

            token_loss = F.cross_entropy(
                logits.reshape(B * T, -1).float(), targets.reshape(B * T), reduction="none"
            )
            # [B, T/P] -> [B, T]: every position's loss; the gradient reaches this rank's positions only
            return gather_sequence(token_loss.view(B, T), self.sequence.sp_group, dim=1).mean()
        loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        if aux:
            loss = loss + self.cfg.aux_loss_coef * torch.stack(aux).sum()
        return loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.8, seed: int = 0):
        """Sample ``new_tokens`` bytes after ``prompt`` [T]; returns [T + new_tokens]."""
        if self.sequence is not None:
            raise ValueError("generate() runs on a GPT built with sequence_parallel_size=1")
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
        idx = prompt[None]
        for _ in range(new_tokens):
            logits = self(idx[:, -self.cfg.block_size :])[:, -1, :].float() / temperature
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
        return idx[0]


def _sequence_groups(cfg: GPTConfig):
    """The Ulysses groups for ``cfg.sequence_parallel_size`` (made on every rank, collectively), checked
    against the model's heads; None for 1."""
    sp = cfg.sequence_parallel_size
    if sp == 1:
        return None
    from zerostep.parallel import ulysses

    tp = cfg.tensor_parallel_size
    if cfg.n_head % (sp * tp):
        what = f"sequence_parallel_size={sp}" + (f" x tensor_parallel_size={tp}" if tp > 1 else "")
        raise ValueError(f"n_head={cfg.n_head} is not divisible by {what}")
    if cfg.n_experts > 0:
        raise ValueError("a MoE GPT (n_experts > 0) with sequence_parallel_size > 1 is not implemented")
    return ulysses.initialize_sequence_parallel(sp, tp)
