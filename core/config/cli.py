"""``zerostep config check FILE [--world-size N]``: print the resolved config and each value's source."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from zerostep.core.config import Config, ConfigError, ConfigWarning

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``config check`` to a ``zerostep`` argument parser's subcommands."""
    config = subparsers.add_parser("config", help="inspect DeepSpeed configs")
    commands = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="parse a DeepSpeed config and print every resolved value, marked as given or default",
    )
    check.add_argument("file", metavar="FILE", help="DeepSpeed config (JSON or hjson)")
    check.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel world size for the batch resolution (default 1)",
    )
    check.set_defaults(func=check_command)


def check_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            config = Config.from_file(args.file, world_size=args.world_size)
        except ConfigError as error:
            print(f"error: {error}", file=err)
            return EXIT_CONFIG_ERROR
    for warning in caught:
        print(f"warning: {warning.message}", file=err)
    print(render(config, world_size_given=args.world_size is not None), file=out)
    return EXIT_OK


def render(config: Config, world_size_given: bool = False) -> str:
    """One line per resolved value: ``key.path = value  (source)``, sources aligned."""
    rows = [("world_size", json.dumps(config.world_size), "argument" if world_size_given else "default")]
    for path, value in _leaves(config.to_dict(), ""):
        rows.append((path, json.dumps(value), config.source(path)))
    width = max(len(path) + len(value) + 3 for path, value, _ in rows)
    lines = [f"{f'{path} = {value}':<{width}}  ({source})" for path, value, source in rows]
    legend = (
        "sources: file = from the config file, default = DeepSpeed's default, derived = computed "
        'from other values, auto = "auto" filled in by zerostep'
    )
    return "\n".join([*lines, "", legend])


def _leaves(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m zerostep.core.config.cli config check FILE`` and for tests."""
    parser = argparse.ArgumentParser(prog="zerostep")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
