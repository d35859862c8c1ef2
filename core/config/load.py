"""Reading a config file (JSON or hjson) and merging override sources, remembering each value's source."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zerostep.core.config.values import ConfigError, same_value, show


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load keeps the last of two equal keys; a config that says two things must be an error.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ConfigError(
                f"duplicate key {key!r} in one object (values {show(result[key])} and {show(value)})"
            )
        result[key] = value
    return result


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict in a JSON file, or an hjson one (comments, trailing commas, unquoted keys)."""
    file = Path(path)
    try:
        content = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
    try:
        data = json.loads(content, object_pairs_hook=_no_duplicates)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except ValueError as json_error:
        data = _read_hjson(path, content, json_error)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a JSON object, not {type(data).__name__} {show(data)}")
    return data


def _read_hjson(path: str | os.PathLike[str], content: str, json_error: ValueError) -> Any:
    import hjson

    try:
        return hjson.loads(content, object_pairs_hook=_no_duplicates)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # hjson raises a variety of errors on malformed input
        raise ConfigError(f"{path}: not valid JSON ({json_error}) nor hjson ({error})") from None


def merge_sources(sources: list[tuple[str, str, Mapping[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge ``(name, provenance label, dict)`` sources into one dict.

    Returns the merged dict and, for each leaf's dotted key path, the provenance label of the source
    that gave it. A leaf given by two sources with different values is an error naming both.
    """
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}  # dotted path -> source name that gave the leaf
    labels: dict[str, str] = {}
    for name, label, data in sources:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{name}: must be a dict of DeepSpeed config keys, not {show(data)}")
        _merge_into(merged, data, "", name, label, owner, labels)
    return merged, labels


def _merge_into(target: dict[str, Any], data: Mapping[str, Any], prefix: str, name: str, label: str,
                owner: dict[str, str], labels: dict[str, str]) -> None:
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in target:
            target[key] = _copy(value)
            _claim(value, path, name, label, owner, labels)
            continue
        existing = target[key]
        if isinstance(existing, str) and existing == "auto" and not isinstance(value, Mapping):
            # Filling an "auto" is what overrides are for (the Hugging Face integration does the same).
            target[key] = value
            _claim(value, path, name, label, owner, labels)
        elif isinstance(value, str) and value == "auto":
            pass  # an earlier source already gave the value "auto" asks for
        elif isinstance(existing, dict) and isinstance(value, Mapping):
            _merge_into(existing, value, path, name, label, owner, labels)
        elif not same_value(existing, value):
            first = owner.get(path) or _owner_below(path, owner)
            raise ConfigError(f"{path} is given twice with different values: {show(existing)} in {first} "
                              f"and {show(value)} in {name}")


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    return value


def _claim(
    value: Any, path: str, name: str, label: str, owner: dict[str, str], labels: dict[str, str]
) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _claim(item, f"{path}.{key}", name, label, owner, labels)
    else:
        owner[path] = name
        labels[path] = label


def _owner_below(path: str, owner: dict[str, str]) -> str:
    for key, name in owner.items():
        if key.startswith(path + "."):
            return name
    return "an earlier source"


def origin_lookup(labels: dict[str, str], fallback: str) -> Any:
    """``path -> label``: the leaf's own label, else the label of the leaves below it (a block)."""

    def origin(path: str) -> str:
        if path in labels:
            return labels[path]
        below = {label for key, label in labels.items() if key.startswith(path + ".")}
        if len(below) == 1:
            return below.pop()
        return "+".join(sorted(below)) if below else fallback

    return origin
