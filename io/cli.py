"""``zerostep checkpoint inspect DIR`` and ``zerostep checkpoint export DIR OUT``.

``register(subparsers)`` adds the ``checkpoint`` command to the main CLI's argparse subparsers; each
subcommand's ``func(args)`` returns the process exit code (0 ok, 1 a damaged or missing checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from zerostep.io.checkpoint import inspect_checkpoint
from zerostep.io.errors import CheckpointError
from zerostep.io.export import DTYPE_FLAGS, export_consolidated
from zerostep.io.manifest import MANIFEST


def register(subparsers: Any) -> None:
    ckpt = subparsers.add_parser("checkpoint", help="inspect or export zerostep checkpoints")
    sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    inspect = sub.add_parser("inspect", help="tags, step, world size, stage, tree with shapes, sizes")
    inspect.add_argument("dir", help="a save folder (all tags) or one checkpoint folder")
    inspect.set_defaults(func=_inspect)
    export = sub.add_parser("export", help="consolidated weights to .safetensors or .pt (like zero_to_fp32)")
    export.add_argument("dir", help="the save folder (uses 'latest' unless --tag) or a checkpoint folder")
    export.add_argument("out", help="output file: .safetensors, .pt, .pth or .bin")
    export.add_argument("--tag", default=None)
    export.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default="fp32")
    export.set_defaults(func=_export)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""


def _print_tree(node: Any, indent: str, out) -> None:
    items = node.items() if isinstance(node, dict) else ((f"[{i}]", v) for i, v in enumerate(node))
    for k, v in items:
        if isinstance(v, (dict, list, tuple)) and v:
            print(f"{indent}{k}:", file=out)
            _print_tree(v, indent + "  ", out)
        else:  # tensors are already described as 'dtype[shape]'
            print(f"{indent}{k}: {v if isinstance(v, str) else repr(v)}", file=out)


def _inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_checkpoint(args.dir)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = sys.stdout
    print(f"{info['dir']}  (latest: {info['latest']})", file=out)
    for c in info["checkpoints"]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created"]))
        print(
            f"\n{c['tag']}: step {c['step']}, world size {c['world_size']}, ZeRO stage {c['zero_stage']}, "
            f"{_size(c['nbytes'])} in {len(c['files'])} files, saved {created}",
            file=out,
        )
        _print_tree(c["tree"], "  ", out)
        _print_layouts(c.get("meta", {}).get("layouts"), out)
    _print_leftovers(info["leftovers"], out)
    return 0


_OWNERS = {
    "dead": "its writer is dead",
    "this process": "left by this process",
    "alive": "a save in progress",
    "unknown": "writer unknown",
}


def _print_leftovers(found: list[dict], out) -> None:
    """What killed saves left behind, and which of it the next save removes."""
    if not found:
        return
    total = sum(x["nbytes"] for x in found)
    stale = [x for x in found if x["stale"]]
    print(
        f"\nleftovers of interrupted saves: {len(found)} ({_size(total)}); the next save removes "
        f"{len(stale)} ({_size(sum(x['nbytes'] for x in stale))})",
        file=out,
    )
    for x in found:
        what = _OWNERS[x["owner"]] + ("" if x["stale"] or x["owner"] == "alive" else ", kept for now")
        fate = "stale" if x["stale"] else "kept"
        print(f"  {x['name']}: {_size(x['nbytes'])}, {what} [{fate}]", file=out)


def _print_layouts(layouts: Any, out) -> None:
    """The parameters each flat group holds (name, shape, offset), when the saver recorded them."""
    if not isinstance(layouts, dict):
        return
    print("  parameters:", file=out)
    for group, layout in layouts.items():
        print(f"    group {group} ({layout.get('dtype', '?')}):", file=out)
        for name, shape, offset in layout.get("entries", []):
            print(f"      {name}: {list(shape)} @ {offset}", file=out)


def _export(args: argparse.Namespace) -> int:
    ckpt_dir, tag = args.dir, args.tag
    if tag is None and os.path.isfile(os.path.join(args.dir, MANIFEST)):
        ckpt_dir, tag = os.path.split(os.path.abspath(args.dir))
    try:
        shapes = export_consolidated(ckpt_dir, args.out, tag=tag, dtype=DTYPE_FLAGS[args.dtype])
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(shapes)} tensors ({args.dtype}) to {args.out}")
    return 0
