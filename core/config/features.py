"""Top-level DeepSpeed keys that zerostep does not parse into its Config, and what to say about each.

DeepSpeed ignores unknown top-level keys; zerostep never drops one silently. A key for a DeepSpeed
feature zerostep lacks is an error when the block turns the feature on and a warning when it is
present but off. A key that only tunes DeepSpeed internals is accepted, with a warning when it is set
away from DeepSpeed's default. Anything else close to a known key is a typo (an error with a
did-you-mean); the rest is warned about and ignored, as DeepSpeed ignores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zerostep.core.config.values import ConfigError, did_you_mean, fail, show, warn


def _any_enabled(value: Any) -> bool:
    """Whether an ``"enabled": true`` appears anywhere in the block (compression and data-efficiency
    blocks nest their switches)."""
    if isinstance(value, Mapping):
        return value.get("enabled") is True or any(_any_enabled(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_any_enabled(item) for item in value)
    return False


def _non_empty(value: Any) -> bool:
    """For blocks without a switch: their presence configures the feature."""
    if isinstance(value, Mapping):
        return bool(value)
    return value not in (None, False)


def _deepcompile(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("deepcompile") is True


# key -> (is the feature on?, what it is / what to use instead)
UNSUPPORTED_FEATURES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pipeline": (_non_empty, "pipeline parallelism for a model other than a zerostep.pipe.PipelineModule"),
    "sparse_attention": (_non_empty, "sparse attention (removed from DeepSpeed too)"),
    "compression_training": (_any_enabled, "compression training"),
    "amp": (_any_enabled, "NVIDIA Apex AMP (use fp16 or bf16)"),
    "aio": (_non_empty, "async I/O for NVMe offload"),
    "autotuning": (_any_enabled, "the autotuner"),
    "eigenvalue": (_any_enabled, "eigenvalue computation"),
    "nebula": (_any_enabled, "Nebula checkpointing"),
    "quantize_training": (_any_enabled, "quantized training (MoQ)"),
    "weight_quantization": (_non_empty, "weight quantization"),
    "expert_parallel": (_non_empty, "expert parallelism configuration"),
    "compile": (_deepcompile, "DeepCompile (zerostep compiles its own step: initialize(compile=True))"),
}

# Keys that tune DeepSpeed internals zerostep does not have: key -> (DeepSpeed default, why inert).
NO_EFFECT_KEYS: dict[str, tuple[Any, str]] = {
    "zero_allow_untested_optimizer": (False, "every zerostep optimizer works with every ZeRO stage"),
    "zero_force_ds_cpu_optimizer": (True, "zerostep has no DeepSpeed CPU optimizers"),
    "dump_state": (False, "zerostep does not dump engine state"),
    "disable_allgather": (False, "zerostep always all-gathers updated parameters"),
    "vocabulary_size": (None, "it only drives a DeepSpeed tensor-core alignment warning"),
    "log_level": (None, "zerostep logs through Python logging"),
    "graph_harvesting": (False, "zerostep compiles with torch.compile"),
    "managed_gradient_accumulation": (True, "zerostep always accumulates over gradient_accumulation_steps"),
    "use_data_before_expert_parallelism": (
        False,
        "zerostep's expert groups have DeepSpeed's default layout (expert-parallel groups are rank blocks)",
    ),
    # DeepSpeed reads "moe" only in its inference config; training MoE is zerostep.moe.layer.MoE in the model
    "moe": ({}, "it configures DeepSpeed's inference engine; training takes MoE from zerostep.moe.layer.MoE"),
    "communication_data_type": (None, "zerostep communicates gradients in their own dtype"),
    "seq_parallel_communication_data_type": (
        "fp32",
        "zerostep reduces sequence-parallel gradients in their own dtype, like all gradients",
    ),
    "timers": (None, "zerostep's timers follow wall_clock_breakdown"),
}


def check_gradient_allreduce_op(value: Any) -> None:
    if value == "sum":
        raise fail(
            "gradient_allreduce_op",
            value,
            'only "mean" is implemented: zerostep averages gradients over micro-batches and ranks',
        )
    if value != "mean":
        raise fail("gradient_allreduce_op", value, 'must be "mean" (or DeepSpeed\'s "sum", not implemented)')


def check_other_keys(raw: Mapping[str, Any], known: list[str]) -> None:
    """Report every top-level key the Config parser did not take (``known`` lists the ones it did)."""
    for key, value in raw.items():
        if key in known:
            continue
        if key == "gradient_allreduce_op":
            check_gradient_allreduce_op(value)
        elif key in UNSUPPORTED_FEATURES:
            is_on, feature = UNSUPPORTED_FEATURES[key]
            if is_on(value):
                raise fail(
                    key,
                    value,
                    f"{feature} is not implemented by zerostep; remove the block "
                    "(or switch it off) to train with zerostep",
                )
            warn(
                f"{key} = {show(value)}: {feature} is not implemented by zerostep; the block is off "
                "and ignored"
            )
        elif key in NO_EFFECT_KEYS:
            default, reason = NO_EFFECT_KEYS[key]
            if value != default:
                warn(f"{key} = {show(value)} has no effect in zerostep: {reason}")
        else:
            everything = [*known, *UNSUPPORTED_FEATURES, *NO_EFFECT_KEYS]
            hint = did_you_mean(key, everything, cutoff=0.8)
            if hint is not None:
                raise ConfigError(f"{key} = {show(value)}: unknown key; did you mean {hint!r}?")
            warn(f"{key} = {show(value)}: unknown top-level key, ignored (DeepSpeed ignores it too)")
