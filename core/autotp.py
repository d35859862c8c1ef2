"""AutoTP: which layers of a model split column- or row-wise, as a ``TPPlan`` for
``zerostep.parallel.tensor_parallel.shard_module``. Shared by inference and training.

Known architectures: zerostep's GPT (``core/gpt.py``) and Hugging Face GPT-2, OPT and LLaMA-style
models (``config.model_type`` in ``HF_POLICIES``), found by their block classes wherever they sit
(``GPT2LMHeadModel`` or ``GPT2Model`` alike). In every block the attention's q/k/v (GPT-2's fused
``c_attn``, split head by head) and the MLP's up projections are column-wise, the attention output and
the MLP's down projection row-wise; head counts on the attention modules are divided by tp.

Embeddings and LM head: the token embedding is vocab-parallel and the LM head column-parallel with its
logits gathered, when tp divides the vocabulary. Tied weights (GPT, GPT-2, OPT tie the head to the token
embedding) are split the same way under both names: one ``[V / tp, C]`` shard serves both. When tp does
not divide the vocabulary (GPT-2's 50257) both stay replicated, with a warning. Position embeddings and
norms stay replicated.

A user policy, DeepSpeed's ``injection_policy={Block: ("attn.c_proj", "mlp.c_proj")}`` (a class or its
name -> the paths, inside that block, of the row-parallel linears): every other ``nn.Linear`` / ``Conv1D``
in the block is column-parallel; a fused qkv is recognized by name (``c_attn``, ``qkv``, ``qkv_proj``,
``Wqkv``: three equal parts), and the head-count attributes in ``USER_POLICY_FIXUPS`` found on the block's
modules are divided by tp.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

from torch import nn

from zerostep.errors import ConfigError
from zerostep.parallel.tensor_parallel import TPPlan


@dataclasses.dataclass(frozen=True)
class BlockPolicy:
    """The split of one transformer block class (paths relative to the block)."""

    block: str  # class name
    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    fused: tuple[str, ...] = ()  # colwise paths holding [q; k; v] (three equal parts)
    fixups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


HF_POLICIES: dict[str, BlockPolicy] = {
    "gpt2": BlockPolicy(
        "GPT2Block",
        colwise=("attn.c_attn", "mlp.c_fc"),
        rowwise=("attn.c_proj", "mlp.c_proj"),
        fused=("attn.c_attn",),
        fixups={"attn": ("num_heads", "split_size")},
    ),
    "opt": BlockPolicy(
        "OPTDecoderLayer",
        colwise=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
        rowwise=("self_attn.out_proj", "fc2"),
        fixups={"self_attn": ("num_heads",)},
    ),
    "llama": BlockPolicy(
        "LlamaDecoderLayer",
        colwise=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
        rowwise=("self_attn.o_proj", "mlp.down_proj"),
        # transformers 5 reads the local head count from the shapes; 4.x keeps these attributes
        fixups={"self_attn": ("num_heads", "num_key_value_heads", "hidden_size")},
    ),
}

USER_POLICY_FIXUPS = (
    "num_heads",
    "n_head",
    "n_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "split_size",
)
_FUSED_NAMES = ("c_attn", "qkv", "qkv_proj", "Wqkv")


def known_architectures() -> list[str]:
    return ["zerostep.core.gpt.GPT", *(f"transformers model_type {t!r}" for t in HF_POLICIES)]


def _divides(tp: int, **sizes: int) -> None:
    for what, n in sizes.items():
        if n is not None and n % tp:
            raise ConfigError(f"tensor parallelism: tp_size={tp} does not divide {what}={n}")


def _is_linear_like(m: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face's ``Conv1D`` (weight ``[in, out]``, recognized by class name)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _add_block(
    path: str, block: nn.Module, policy: BlockPolicy, layers: dict, transposed: set, fused: dict, fixups: dict
) -> None:
    """One block's layers, under its path ``path`` in the model."""
    styles = {**dict.fromkeys(policy.colwise, "colwise"), **dict.fromkeys(policy.rowwise, "rowwise")}
    for rel, style in styles.items():
        full = f"{path}.{rel}" if path else rel
        module = block.get_submodule(rel)
        layers[full] = style
        if type(module).__name__ == "Conv1D":
            transposed.add(full)
        if rel in policy.fused:
            width = module.weight.shape[1 if full in transposed else 0]  # the output features
            fused[full] = (width // 3,) * 3
    for rel, attrs in policy.fixups.items():
        fixups[".".join(p for p in (path, rel) if p)] = attrs


def _block_layers(model: nn.Module, policy: BlockPolicy, *out) -> int:
    """Add every ``policy.block`` instance's layers; returns how many blocks were found."""
    blocks = [(p, m) for p, m in model.named_modules() if type(m).__name__ == policy.block]
    for path, block in blocks:
        _add_block(path, block, policy, *out)
    return len(blocks)


def _vocab_layers(
    model: nn.Module, embedding: nn.Module | None, head: nn.Module | None, tp: int, layers: dict
) -> None:
    """Token embedding vocab-parallel, LM head colwise with gathered logits, when tp divides the vocab."""
    paths = {id(m): p for p, m in model.named_modules()}
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    targets = [
        (m, s)
        for m, s, kind in ((embedding, "vocab", nn.Embedding), (head, "colwise_gather", nn.Linear))
        if isinstance(m, kind) and id(m) in paths
    ]
    if not targets:
        return
    vocab = targets[0][0].weight.shape[0]
    if vocab % tp:
        warnings.warn(
            f"tensor parallelism: tp_size={tp} does not divide the vocabulary ({vocab}): the token "
            f"embedding{' and the (tied) LM head' if tied else ' and LM head'} stay replicated",
            stacklevel=4,
        )
        return
    if tied and len(targets) < 2:  # one side of a tie not splittable: keep both replicated
        return
    for module, style in targets:
        layers[paths[id(module)]] = style


def _gpt_plan(model: nn.Module, tp: int) -> TPPlan:
    cfg = model.cfg
    if cfg.n_experts > 0:
        raise ConfigError("tensor parallelism of the MoE GPT (n_experts > 0) is not supported")
    _divides(tp, n_head=cfg.n_head, n_embd=cfg.n_embd)
    layers, fused, fixups = {}, {}, {}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}"
        layers.update(
            {
                f"{b}.attn.qkv": "colwise",
                f"{b}.attn.proj": "rowwise",
                f"{b}.fc": "colwise",
                f"{b}.out": "rowwise",
            }
        )
        fused[f"{b}.attn.qkv"] = (cfg.n_embd,) * 3
        fixups[f"{b}.attn"] = ("n_head",)
    _vocab_layers(model, model.wte, model.head, tp, layers)
    return TPPlan(layers, fused=fused, fixups=fixups)


def _hf_sizes(config) -> dict[str, int | None]:
    heads = getattr(config, "num_attention_heads", None)
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "hidden_size": getattr(config, "hidden_size", None) if config.model_type != "llama" else None,
        "intermediate_size": getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_dim", None)
        or getattr(config, "n_inner", None),
    }


def _hf_plan(model: nn.Module, tp: int) -> TPPlan:
    config = model.config
    policy = HF_POLICIES[config.model_type]
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(f"tensor parallelism: {type(model).__name__} with cross-attention is not supported")
    _divides(tp, **_hf_sizes(config))
    layers, transposed, fused, fixups = {}, set(), {}, {}
    if not _block_layers(model, policy, layers, transposed, fused, fixups):
        raise ConfigError(
            f"tensor parallelism: {type(model).__name__} (model_type {config.model_type!r}) has no "
            f"{policy.block} blocks; pass injection_policy= for this architecture"
        )
    _vocab_layers(model, model.get_input_embeddings(), model.get_output_embeddings(), tp, layers)
    return TPPlan(layers, frozenset(transposed), fused, fixups)


def _user_plan(model: nn.Module, tp: int, injection_policy: Mapping) -> TPPlan:
    layers, transposed, fused, fixups = {}, set(), {}, {}
    for key, rowwise in injection_policy.items():
        name = key if isinstance(key, str) else getattr(key, "__name__", None)
        if name is None:
            raise ConfigError(f"injection_policy: keys are block classes or class names, got {key!r}")
        if isinstance(rowwise, str):
            rowwise = (rowwise,)
        blocks = [(p, m) for p, m in model.named_modules() if type(m).__name__ == name]
        if not blocks:
            raise ConfigError(f"injection_policy: no {name} module in {type(model).__name__}")
        for path, block in blocks:
            linears = {rel: m for rel, m in block.named_modules() if rel and _is_linear_like(m)}
            missing = sorted(set(rowwise) - set(linears))
            if missing:
                raise ConfigError(
                    f"injection_policy: {name} has no Linear/Conv1D {missing}; its linears: {sorted(linears)}"
                )
            colwise = tuple(r for r in linears if r not in rowwise)
            heads = {
                rel: tuple(a for a in USER_POLICY_FIXUPS if isinstance(getattr(m, a, None), int))
                for rel, m in block.named_modules()
            }
            policy = BlockPolicy(
                name,
                colwise,
                tuple(rowwise),
                fused=tuple(r for r in colwise if r.split(".")[-1] in _FUSED_NAMES),
                fixups={rel: attrs for rel, attrs in heads.items() if attrs},
            )
            _add_block(path, block, policy, layers, transposed, fused, fixups)
    if hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings"):
        _vocab_layers(model, model.get_input_embeddings(), model.get_output_embeddings(), tp, layers)
    return TPPlan(layers, frozenset(transposed), fused, fixups)


def tp_plan(model: nn.Module, tp_size: int, injection_policy: Mapping | None = None) -> TPPlan:
    """The ``TPPlan`` of ``model`` at ``tp_size``: the user's ``injection_policy`` when given, else the
    known policy of its architecture. Raises ``ConfigError`` naming what does not divide or fit."""
    from zerostep.core.gpt import GPT

    if injection_policy:
        return _user_plan(model, tp_size, injection_policy)
    if isinstance(model, GPT):
        return _gpt_plan(model, tp_size)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HF_POLICIES:
        return _hf_plan(model, tp_size)
    described = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    raise ConfigError(
        f"tensor parallelism: no policy for {described}; known: {', '.join(known_architectures())}; "
        "or pass injection_policy={BlockClass: ('names of', 'row-parallel linears')}"
    )
