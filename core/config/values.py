"""Reading one block of a DeepSpeed config: typed values, key paths in errors, did-you-mean, provenance.

Every parser in ``zerostep.core.config`` reads its dict through a :class:`Block`, so every error names
the full key path, the offending value and the rule, and every value read is recorded as coming from the
user or from a default (what ``zerostep config check`` prints).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from zerostep.errors import ConfigError

T = TypeVar("T")

# Where a value came from, as printed by `zerostep config check`.
DEFAULT = "default"
DERIVED = "derived"
AUTO = "auto"  # the user wrote "auto" and zerostep filled in the value


class ConfigWarning(UserWarning):
    """A config key zerostep accepts but does not act on (DeepSpeed ignores or zerostep lacks the feature)."""


def show(value: Any) -> str:
    """A value as the user wrote it in JSON, shortened for messages."""
    try:
        text = json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):  # non-string keys mixed with string keys, ...
        text = _safe_repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _safe_repr(value: Any) -> str:
    # An int of more than 4300 digits cannot become a string (ValueError since Python 3.11).
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return f"<an integer of about {int(value.bit_length() * math.log10(2))} digits>"
    try:
        return repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to print>"


def fail(path: str, value: Any, rule: str) -> ConfigError:
    """The one message shape for a bad value: ``path = value: rule``."""
    return ConfigError(f"{path} = {show(value)}: {rule}")


def warn(message: str) -> None:
    """Warn, attributing the warning to the first caller outside the config modules."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn()'s caller
    while frame is not None and frame.f_code.co_filename.startswith(_CONFIG_MODULES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, ConfigWarning, stacklevel=level)


_CONFIG_MODULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def did_you_mean(word: str, known: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str | None:
    matches = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- value converters: (path, value) -> typed value, or ConfigError --------------------------------


def boolean(path: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise fail(path, value, "must be true or false")


# Every integer of a config ends up in Python arithmetic with int64 tensors (counters, sizes, seeds),
# and every float in float32 ones (loss scales, learning rates, clipping): values beyond those
# ranges are errors here, not OverflowErrors (or silent infinities) inside a step.
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the smallest normal float32


def integer(path: str, value: Any, minimum: int | None = None, maximum: int = INT64_MAX) -> int:
    # DeepSpeed files write sizes as 5e8, which JSON reads as a float; an integral float is an int.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, value, "must be an integer")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise fail(path, value, "must be an integer")
    low = -INT64_MAX - 1 if minimum is None else minimum
    if not low <= value <= maximum:  # compared as written: the message shows the user's value
        if minimum is not None and value < minimum:
            raise fail(path, value, f"must be an integer >= {minimum}")
        raise fail(path, value, f"must be an integer in [{low}, {maximum}]" + _int64_note(maximum))
    return int(value)


def _int64_note(maximum: int) -> str:
    return " (it is kept as a 64-bit integer)" if maximum == INT64_MAX else ""


def size(path: str, value: Any) -> int:
    """A count of elements or bytes: an integer >= 0 (DeepSpeed's ``Field(ge=0)``)."""
    return integer(path, value, minimum=0)


def positive_int(path: str, value: Any) -> int:
    return integer(path, value, minimum=1)


def number(path: str, value: Any, minimum: float | None = None, maximum: float = FLOAT32_MAX) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, value, "must be a number")
    # Compared before float(): an int beyond float range would raise OverflowError there.
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(path, value, "must be a finite number (not NaN or infinity)")
    if minimum is not None and value < minimum:
        raise fail(path, value, f"must be a number >= {minimum:g}")
    if not -FLOAT32_MAX <= value <= maximum:
        limit = "float32's finite range, |x| <= 3.4e38" if maximum == FLOAT32_MAX else f"<= {maximum:g}"
        raise fail(path, value, f"must be a number within {limit} (it is used in float32 arithmetic)")
    return float(value)


def non_negative(path: str, value: Any) -> float:
    return number(path, value, minimum=0.0)


def text(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise fail(path, value, "must be a string")
    if "\x00" in value:  # names and paths: the OS rejects NUL ("embedded null byte") much later
        raise fail(path, value, "must not contain NUL characters")
    return value


def mapping(path: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    raise fail(path, value, "must be a JSON object (a dict of keys)")


def integer_list(minimum: int | None = None, what: str = "integers") -> Callable[[str, Any], tuple[int, ...]]:
    """A non-empty JSON list of integers (each >= ``minimum``), as a tuple; ``what`` names them."""

    def convert(path: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise fail(path, value, f"must be a non-empty list of {what}")
        return tuple(integer(f"{path}[{i}]", v, minimum=minimum) for i, v in enumerate(value))

    return convert


def optional(convert: Callable[[str, Any], T]) -> Callable[[str, Any], T | None]:
    """``convert`` that also accepts JSON null (for keys whose DeepSpeed default is None)."""

    def convert_or_none(path: str, value: Any) -> T | None:
        return None if value is None else convert(path, value)

    return convert_or_none


def choice(options: tuple[str, ...], case_insensitive: bool = True) -> Callable[[str, Any], str]:
    """One of ``options``, returned in the spelling ``options`` uses."""

    def convert(path: str, value: Any) -> str:
        word = text(path, value)
        for option in options:
            if word == option or (case_insensitive and word.lower() == option.lower()):
                return option
        raise fail(path, value, f"must be one of {', '.join(options)}")

    return convert


# --- one block -------------------------------------------------------------------------------------


# What fills an "auto" the Hugging Face Trainer would have filled, by the key's last name.
AUTO_HINTS = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1/--adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay",
    "warmup_num_steps": "--warmup_steps/--warmup_ratio",
    "total_num_steps": "--max_steps or the epoch count",
    "warmup_max_lr": "--learning_rate",
    "enabled": "--fp16/--bf16",
    "train_batch_size": "--per_device_train_batch_size",
    "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
}


class Context:
    """What one parse shares across blocks: provenance, where each raw key came from, open "auto"s."""

    def __init__(self, origin: Callable[[str], str]) -> None:
        self.origin = origin
        self.sources: dict[str, str] = {}
        self.unresolved_autos: list[str] = []

    def unresolved(self, path: str) -> None:
        """Note an "auto" zerostep cannot fill; all of them are reported together at the end."""
        self.unresolved_autos.append(path)

    def raise_unresolved(self) -> None:
        if not self.unresolved_autos:
            return
        items = []
        for path in self.unresolved_autos:
            hint = AUTO_HINTS.get(path.rsplit(".", 1)[-1])
            items.append(f"{path} (the Hugging Face Trainer fills it from {hint})" if hint else path)
        raise ConfigError(
            '"auto" values zerostep cannot derive: ' + "; ".join(items) + ". Give values in the config, "
            'or pass them via overrides, which replace "auto", e.g. Config.from_file(path, '
            'overrides={"optimizer": {"params": {"lr": 3e-5}}}, train_micro_batch_size_per_gpu=8)'
        )


class Block:
    """One dict of the user's config, read key by key.

    ``take`` converts and records a key; ``finish`` rejects keys nothing took, with a did-you-mean
    (DeepSpeed's pydantic models reject unknown keys inside a block too).
    """

    def __init__(self, raw: Any, path: str, ctx: Context) -> None:
        if not isinstance(raw, Mapping):
            raise fail(path, raw, "must be a JSON object (a dict of keys)")
        for key in raw:
            if not isinstance(key, str):
                raise fail(join(path, repr(key)), raw[key], "config keys must be strings")
        self.raw = raw
        self.path = path
        self.ctx = ctx
        self.known: list[str] = []

    def key_path(self, key: str) -> str:
        return join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def record(self, key: str, label: str) -> None:
        self.ctx.sources[self.key_path(key)] = label

    def origin(self, key: str) -> str:
        return self.ctx.origin(self.key_path(key))

    def take(
        self,
        key: str,
        default: T,
        convert: Callable[[str, Any], T],
        *,
        aliases: tuple[str, ...] = (),
        auto: bool = False,
    ) -> T:
        """The value of ``key`` (or one of its ``aliases``) converted, else ``default``.

        ``auto``: ``"auto"`` means ``default`` (Hugging Face writes it where DeepSpeed's default is
        fine); otherwise an ``"auto"`` is noted as unresolved and ``default`` stands in meanwhile.
        """
        names = (key, *aliases)
        self.known.extend(names)
        given = [name for name in names if name in self.raw]
        if not given:
            self.record(key, DEFAULT)
            return default
        if len(given) > 1:
            first, second = given[0], given[1]
            if not same_value(self.raw[first], self.raw[second]):
                raise ConfigError(
                    f"{self.key_path(first)} = {show(self.raw[first])} and its alias "
                    f"{self.key_path(second)} = {show(self.raw[second])} disagree: give only one"
                )
        name = given[0]
        value = self.raw[name]
        if isinstance(value, str) and value == "auto":
            self.record(key, AUTO)
            if not auto:
                self.ctx.unresolved(self.key_path(name))
            return default
        result = convert(self.key_path(name), value)
        self.record(key, self.origin(name))
        return result

    def child(self, key: str, aliases: tuple[str, ...] = ()) -> Block | None:
        """The sub-block at ``key`` (or an alias), or None when absent or null."""
        self.known.extend((key, *aliases))
        present = [name for name in (key, *aliases) if self.raw.get(name) is not None]
        if len(present) > 1:
            raise fail(
                self.key_path(present[1]),
                self.raw[present[1]],
                f"{self.key_path(present[0])} is also given; they are one block: give only one",
            )
        if not present:
            return None
        return Block(self.raw[present[0]], self.key_path(present[0]), self.ctx)

    def allow(self, *keys: str) -> None:
        """Mark keys as read by hand (their caller validates them)."""
        self.known.extend(keys)

    def finish(self) -> None:
        for key in self.raw:
            if key not in self.known:
                hint = did_you_mean(key, self.known)
                accepted = ", ".join(sorted(set(self.known)))
                rule = (
                    f"unknown key; did you mean {hint!r}?"
                    if hint
                    else f"unknown key; {self.path or 'the config'} accepts {accepted}"
                )
                raise fail(self.key_path(key), self.raw[key], rule)


def same_value(a: Any, b: Any) -> bool:
    """Equal as config values: ``true`` and ``1`` differ, ``1`` and ``1.0`` do not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # exotic objects in a hand-built dict: treat as different
        return False
