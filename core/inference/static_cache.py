"""A static KV cache and a decode step compiled once, for zerostep's GPT (``core/gpt.py``).

``GPT.generate`` re-runs the whole window for every new token. Here the keys and values of every layer
are kept in preallocated buffers ``[B, H, max_len, D]`` (``H`` this rank's heads under tensor
parallelism), written at the positions of the tokens just run (``index_copy_`` along the position dim),
and each step attends over the whole buffer with a mask ``key position <= query position``: masked
scores are ``-inf``, so unwritten (or stale) slots weigh exactly zero and the result is the uncached
causal attention's. Every decode step has the same shapes (tokens ``[B, 1]``, position ``[1]``, the
buffers), so ``torch.compile(dynamic=False)`` compiles it once and never again for that batch size; the
position enters as a tensor, not a Python int, so its value is no guard. The prompt (prefill) runs
uncompiled through the same code: its length varies per call, and one forward per call is not worth a
compile per length. Every decoder in the process shares one code object, so each batch size, dtype or
layer kind (int8, tensor-parallel) compiled is one more entry in dynamo's cache for it: past
``torch._dynamo.config.recompile_limit`` (8) entries dynamo logs a warning and runs the new ones eager
(the same tokens, uncompiled). Marking the batch dim dynamic (``mark_dynamic`` on the tokens and the
buffers) does not help as written: the trace specializes it (dynamo's ConstraintViolationError).

The decoder reads the GPT's own submodules (``wte``, ``wpe``, each block's ``ln1``, ``attn.qkv``,
``attn.proj``, ``ln2``, ``fc``, ``out``, then ``ln_f``, ``head``), so whatever the engine did to them
(dtype, int8 ``Int8Linear``, tensor-parallel ``ParallelLinear`` with its collectives) holds here too.
The buffers are the decoder's registered buffers, as CUDA graphs (``mode="reduce-overhead"``) want
in-place-mutated state to be. Not for the MoE GPT or sequence parallelism (refused by ``supports``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zerostep.core.gpt import GPT, LocalAttention


def supports(model: nn.Module) -> bool:
    """True for a dense GPT at sequence_parallel_size 1 (every block a plain ``Block``)."""
    return (
        isinstance(model, GPT)
        and model.sequence is None
        and model.cfg.n_experts == 0
        and all(isinstance(b.attn.attend, LocalAttention) for b in model.blocks)
    )


class StaticKVCache(nn.Module):
    """Keys and values of every layer, ``[B, H, max_len, D]`` each, as buffers ``k{i}`` / ``v{i}``."""

    def __init__(
        self, n_layer: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.shape = shape  # (B, H, max_len, D)
        for i in range(n_layer):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.n_layer = n_layer

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @property
    def max_len(self) -> int:
        return self.shape[2]


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """q [B, H, T, D] at ``positions`` [T] over the whole cache [B, H, L, D] -> [B, H, T, D]."""
    slots = torch.arange(keys.shape[2], device=keys.device)  # [L]
    visible = slots[None, :] <= positions[:, None]  # [T, L]: causal over the positions written so far
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


class CachedGPTDecoder(nn.Module):
    """``forward(idx [B, T], positions [T]) -> logits [B, T, vocab]``, the GPT's forward for tokens at
    ``positions`` given every earlier position's keys and values in ``cache``; writes theirs."""

    def __init__(self, model: GPT, cache: StaticKVCache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model, (B, T) = self.model, idx.shape
        x = model.wte(idx) + model.wpe(positions)  # [B, T, C]
        for i, block in enumerate(model.blocks):
            attn, (keys, values) = block.attn, self.cache.layer(i)
            qkv = attn.qkv(block.ln1(x))  # [B, T, 3C'] (C' = C / tp under tensor parallelism)
            width = qkv.shape[-1] // 3
            # [B, T, C'] -> [B, H', T, D]
            q, k, v = (
                t.view(B, T, attn.n_head, width // attn.n_head).transpose(1, 2) for t in qkv.split(width, 2)
            )
            keys.index_copy_(2, positions, k)
            values.index_copy_(2, positions, v)
            y = _attend(q, keys, values, positions).transpose(1, 2).reshape(B, T, width)  # [B, T, C']
            x = x + block.drop(attn.proj(y))
            x = x + block.drop(block.out(F.gelu(block.fc(block.ln2(x)))))
        return model.head(model.ln_f(x))  # [B, T, vocab]


def _cache_shape(model: GPT, batch: int, max_len: int) -> tuple[int, int, int, int]:
    attn = model.blocks[0].attn
    # qkv's output width is 3 * (this rank's heads * head dim)
    width = _out_features(attn.qkv) // 3
    return batch, attn.n_head, max_len, width // attn.n_head


def _out_features(linear: nn.Module) -> int:
    """The output width of any Linear kind here: ``nn.Linear``, ``ParallelLinear`` (``transposed``:
    ``[in, out]``), their int8 versions (``weight_int8 [out, in]``)."""
    if hasattr(linear, "weight_int8"):
        return int(linear.weight_int8.shape[0])
    return int(linear.weight.shape[1] if getattr(linear, "transposed", False) else linear.weight.shape[0])


class StaticCacheGenerator:
    """``generate(prompt, new_tokens, ...)`` for a GPT with a static KV cache and, when ``compile_mode``
    is given, the decode step compiled once per batch size with ``torch.compile(mode=compile_mode)``.

    The cache holds ``min(max_out_tokens, block_size)`` positions: DeepSpeed's ``max_out_tokens`` bounds
    prompt + new tokens, and the GPT has ``block_size`` position embeddings."""

    def __init__(self, model: GPT, max_out_tokens: int, compile_mode: str | None, backend: str = "inductor"):
        if not supports(model):
            raise ValueError("StaticCacheGenerator: a dense GPT at sequence_parallel_size 1 is needed")
        self.model, self.max_out_tokens = model, max_out_tokens
        self.max_len = min(max_out_tokens, model.cfg.block_size)
        self.compile_mode, self.backend = compile_mode, backend
        self._decoders: dict[int, tuple[CachedGPTDecoder, object]] = {}  # batch -> (eager, decode step)

    def _check_length(self, total: int) -> None:
        if total > self.max_out_tokens:
            raise RuntimeError(
                f"init_inference: prompt + new tokens ({total}) exceed max_out_tokens={self.max_out_tokens}; "
                "raise max_out_tokens (max_tokens) in the inference config"
            )
        if total > self.max_len:
            raise RuntimeError(
                f"init_inference: prompt + new tokens ({total}) exceed the GPT's block_size={self.max_len}, "
                "the static KV cache's length (engine.module.generate slides a window instead)"
            )

    def _decoder(self, batch: int, like: torch.Tensor) -> tuple[CachedGPTDecoder, object]:
        if batch not in self._decoders:
            self._decoders.clear()  # one cache at a time: another batch size frees the previous one
            cache = StaticKVCache(
                len(self.model.blocks), _cache_shape(self.model, batch, self.max_len), like.dtype, like.device
            )
            eager = CachedGPTDecoder(self.model, cache)
            step = eager
            if self.compile_mode is not None:
                step = torch.compile(eager, mode=self.compile_mode, dynamic=False, backend=self.backend)
            self._decoders[batch] = (eager, step)
        return self._decoders[batch]

    def _activation(self) -> torch.Tensor:
        """A tensor of the dtype and device the keys take: the position embedding's."""
        return self.model.wpe.weight

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        new_tokens: int,
        temperature: float = 0.8,
        seed: int = 0,
        do_sample: bool = True,
    ) -> torch.Tensor:
        """``GPT.generate``'s contract (``prompt`` [T] -> [T + new_tokens], sampled with ``temperature``
        from a generator seeded ``seed``), also for a batch ``[B, T]`` -> ``[B, T + new_tokens]``;
        ``do_sample=False`` picks the argmax (greedy)."""
        idx = prompt[None] if prompt.dim() == 1 else prompt
        B, T = idx.shape
        self._check_length(T + new_tokens)
        if new_tokens <= 0:
            return prompt
        gen = torch.Generator(device=idx.device).manual_seed(seed) if do_sample else None
        eager, step = self._decoder(B, self._activation())

        def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, vocab] -> [B, 1]
            if not do_sample:
                return logits.argmax(-1, keepdim=True)
            probs = F.softmax(logits.float() / temperature, dim=-1)
            return torch.multinomial(probs, 1, generator=gen)

        out = torch.empty(B, T + new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        token = pick(eager(idx, torch.arange(T, device=idx.device))[:, -1])  # prefill; [B, 1]
        out[:, T : T + 1] = token
        position = torch.full((1,), T, dtype=torch.long, device=idx.device)
        for t in range(T + 1, T + new_tokens):  # every step the same shapes: one compiled graph
            token = pick(step(token, position)[:, -1])  # [B, 1, vocab] -> [B, 1]
            out[:, t : t + 1] = token
            position += 1
        return out[0] if prompt.dim() == 1 else out


def hf_static_cache_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """``generate`` kwargs for a Hugging Face model whose forward the engine compiled: a static cache
    (``cache_implementation="static"``: fixed shapes, so the compiled decode step is one graph) where the
    model supports one (``_can_compile_fullgraph``) and neither the caller (kwargs, or a
    ``generation_config`` passed) nor the model's own ``generation_config`` (a hub file may name one, e.g.
    Gemma-2's "hybrid") chose a cache or turned it off; Hugging Face's own compile of the forward off
    (``disable_compile``): the engine's in-place compile is already there."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    chosen = bool({"past_key_values", "cache_implementation"} & set(kwargs))
    chosen = chosen or getattr(config, "cache_implementation", None) is not None
    no_cache = kwargs.get("use_cache") is False or getattr(config, "use_cache", True) is False
    if chosen or no_cache or not getattr(model, "_can_compile_fullgraph", False):
        return kwargs
    return {
        **kwargs,
        "cache_implementation": "static",
        "disable_compile": kwargs.get("disable_compile", True),
    }
