"""Reading a config file (JSON or hjson) and merging override sources, remembering each value's source."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from typing import Any

from zerostep.core.config.values import ConfigError, same_value, show

# Objects and lists inside one another: a DeepSpeed config needs four or five levels. Deeper input is
# refused before the recursive readers see it (they would raise RecursionError near 1000 levels).
MAX_NESTING = 100


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
    content = _read_text(path)
    if not content.strip():
        raise ConfigError(f"config file {_name(path)} is empty; it must hold a JSON object of DeepSpeed keys")
    try:
        data = json.loads(content, object_pairs_hook=_no_duplicates)
    except ConfigError as error:
        raise ConfigError(f"{_name(path)}: {error}") from None
    except RecursionError:
        raise _too_deep(path) from None
    except ValueError as json_error:
        data = _read_hjson(path, content, json_error)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_name(path)}: the config must be a JSON object, not {type(data).__name__} {show(data)}"
        )
    if not data and "{" not in content:  # hjson reads a file of only comments as {}
        raise ConfigError(f"config file {_name(path)} holds no config (only comments or whitespace)")
    return data


def _name(path: str | os.PathLike[str]) -> str:
    return repr(os.fspath(path))


def _read_text(path: str | os.PathLike[str]) -> str:
    """The file's text. Only a regular file is read: opened without blocking, so a FIFO (or a device)
    is refused instead of waiting forever for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"config file {_name(path)} does not exist") from None
    except (OSError, ValueError, TypeError) as error:  # ValueError: a NUL byte in the path
        raise ConfigError(f"config file {_name(path)} cannot be opened: {error}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"config file {_name(path)} is not a regular file ({_kind(mode)})")
        with open(fd, "rb", closefd=False) as file:
            return file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {_name(path)} cannot be read: {error}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _too_deep(path: str | os.PathLike[str]) -> ConfigError:
    return ConfigError(
        f"{_name(path)}: objects and lists nest more than {MAX_NESTING} levels deep "
        "(a DeepSpeed config needs a handful)"
    )


def _read_hjson(path: str | os.PathLike[str], content: str, json_error: ValueError) -> Any:
    import hjson

    try:
        return hjson.loads(content, object_pairs_hook=_no_duplicates)
    except ConfigError as error:
        raise ConfigError(f"{_name(path)}: {error}") from None
    except RecursionError:
        raise _too_deep(path) from None
    except Exception as error:  # hjson raises a variety of errors on malformed input
        raise ConfigError(f"{_name(path)}: not valid JSON ({json_error}) nor hjson ({error})") from None


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
        check_nesting(data, name)
        _merge_into(merged, data, "", name, label, owner, labels)
    return merged, labels


def _merge_into(
    target: dict[str, Any],
    data: Mapping[str, Any],
    prefix: str,
    name: str,
    label: str,
    owner: dict[str, str],
    labels: dict[str, str],
) -> None:
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
            raise ConfigError(
                f"{path} is given twice with different values: {show(existing)} in {first} "
                f"and {show(value)} in {name}"
            )


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


def check_nesting(data: Any, name: str) -> None:
    """ConfigError when dicts and lists in ``data`` nest more than ``MAX_NESTING`` levels deep or a
    container holds itself. Iterative, so any depth is measured without recursion; each container is
    measured once (its height is remembered), so shared sub-objects cost nothing extra."""
    heights: dict[int, int] = {}  # id of a finished container -> its levels, itself included
    on_path: set[int] = set()
    # Frames: [container, path labels, iterator over its (label, child), tallest child seen].
    stack: list[list[Any]] = []

    def enter(value: Any, labels: tuple[str, ...]) -> int | None:
        """Push ``value`` if it must be walked; else its known height (0 for a scalar)."""
        children = _children(value)
        if children is None:
            return 0
        key = id(value)
        if key in on_path:
            raise ConfigError(f"{name}: {_dotted(labels)} contains itself (a config must be a tree)")
        depth = len(labels) + 1
        if key in heights:
            if depth - 1 + heights[key] > MAX_NESTING:
                raise _nested(name, labels)
            return heights[key]
        if depth > MAX_NESTING:
            raise _nested(name, labels)
        on_path.add(key)
        stack.append([value, labels, children, 0])
        return None

    enter(data, ())
    while stack:
        frame = stack[-1]
        value, labels, children = frame[0], frame[1], frame[2]
        for label, child in children:
            known = enter(child, (*labels, label))
            if known is None:
                break  # walk the child first; this frame resumes its iterator afterwards
            frame[3] = max(frame[3], known)
        else:
            stack.pop()
            on_path.discard(id(value))
            heights[id(value)] = frame[3] + 1
            if stack:
                stack[-1][3] = max(stack[-1][3], frame[3] + 1)


def _children(value: Any) -> Iterator[tuple[str, Any]] | None:
    if isinstance(value, Mapping):
        return ((key if isinstance(key, str) else show(key), item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ((f"[{index}]", item) for index, item in enumerate(value))
    return None


def _dotted(labels: tuple[str, ...]) -> str:
    shown = labels if len(labels) <= 8 else (*labels[:4], "...", *labels[-3:])
    text = ""
    for label in shown:
        text += label if label.startswith("[") or not text else f".{label}"
    return text or "the top level"


def _nested(name: str, labels: tuple[str, ...]) -> ConfigError:
    return ConfigError(
        f"{name}: {_dotted(labels)} is more than {MAX_NESTING} levels of objects and lists deep "
        "(a DeepSpeed config needs a handful)"
    )
