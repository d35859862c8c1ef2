"""The config ``initialize`` runs with, from DeepSpeed's three sources: ``args.deepspeed_config``,
``config`` and ``config_params``.

DeepSpeed 0.19 (``deepspeed.initialize``): ``config_params`` is an older name for ``config`` and used
only when ``config`` is None; ``args.deepscale_config`` is an older name for ``args.deepspeed_config``
(a warning, and an error when both are set); a config file in ``args`` and a ``config`` argument
together is an error ("Not sure how to proceed ..."); no config at all is an error. A source is a dict,
a path to a JSON / hjson file, or a base64-encoded JSON string (DeepSpeed's launcher passes those).

zerostep keeps all of that except one thing it does better: ``config_params`` next to ``config`` (or
next to ``args.deepspeed_config``) is merged into it instead of being ignored, and a key the two give
different values is a ``ConfigError`` naming the key path and both sources. Files are read by
``zerostep.core.config``'s loader, so every problem with one is a ``ConfigError`` naming the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from zerostep.core.config import Config
from zerostep.core.config.load import merge_sources, read_config_file
from zerostep.errors import ConfigError

TWO_CONFIGS = (
    "Not sure how to proceed, we were given deepspeed configs in the deepspeed arguments and "
    "deepspeed.initialize() function call"
)
BOTH_ARG_NAMES = "Not sure how to proceed, we were given both a deepscale_config and deepspeed_config"
NO_CONFIG = "DeepSpeed requires --deepspeed_config to specify configuration file"


def resolve_config_sources(args: Any = None, config: Any = None, config_params: Any = None) -> dict[str, Any]:
    """One DeepSpeed config dict from the sources ``initialize`` was given (see the module docstring).

    ``args`` is updated as DeepSpeed updates it: a deprecated ``deepscale_config`` moves to
    ``deepspeed_config``.
    """
    _move_deepscale_config(args)
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None and config is not None:
        raise ConfigError(
            f"{TWO_CONFIGS}: args.deepspeed_config={_describe(from_args)} and config={_describe(config)}; "
            "pass one of them (config_params may add keys to either)"
        )
    sources = []
    if from_args is not None:
        sources.append(_load("args.deepspeed_config", from_args))
    if config is not None:
        sources.append(_load("config", config))
    if config_params is not None:
        sources.append(_load("config_params", config_params))
    if not sources:
        raise ConfigError(f"{NO_CONFIG} (or pass config= to initialize())")
    merged, _ = merge_sources(sources)
    return merged


def _move_deepscale_config(args: Any) -> None:
    old = getattr(args, "deepscale_config", None) if args is not None else None
    if old is None:
        return
    warnings.warn(
        "--deepscale_config is deprecated, please use --deepspeed_config", FutureWarning, stacklevel=3
    )
    if getattr(args, "deepspeed_config", None) is not None:
        raise ConfigError(
            f"{BOTH_ARG_NAMES}: args.deepscale_config={_describe(old)}, "
            f"args.deepspeed_config={_describe(args.deepspeed_config)}"
        )
    args.deepspeed_config = old
    args.deepscale_config = None


def _describe(source: Any) -> str:
    if isinstance(source, Mapping):
        return "a dict"
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _load(where: str, source: Any) -> tuple[str, str, dict[str, Any]]:
    """(name for messages, provenance label, dict) of one source."""
    if isinstance(source, Mapping):
        return f"{where} (a dict)", "user", dict(source)
    if isinstance(source, Config):
        return f"{where} (a Config)", "user", source.to_dict()
    if isinstance(source, bytes):
        source = source.decode("utf-8", errors="replace")
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"{where}: {type(source).__name__} is not a config; pass a dict, a path to a JSON/hjson file or "
            "a base64-encoded JSON string"
        )
    path = os.fspath(source)
    if os.path.exists(path) or isinstance(source, os.PathLike):
        return f"{where} (file {path!r})", "file", read_config_file(path)
    decoded = _from_base64(path)
    if decoded is None:
        raise ConfigError(
            f"{where}: {_describe(path)} is neither an existing config file nor a base64-encoded JSON config"
        )
    return f"{where} (base64 JSON)", "user", decoded


def _from_base64(text: str) -> dict[str, Any] | None:
    """The dict a base64 (URL-safe, as DeepSpeed's launcher writes it) JSON string encodes, else None."""
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))
        data = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None
