"""Who is writing a save, and what killed saves left behind in a save folder.

A save's id (``new_save_id``) names its writer: ``<16 hex>-<host>-<pid>-<start>``, the host a crc32 of
the host name, ``start`` the process's start time in clock ticks since boot (``/proc/<pid>/stat``), so a
pid that was reused is not taken for the writer. Every temporary name a save creates in the save folder
ends in its id::

    .tmp-<tag>-<id>/    the checkpoint being written (after an overwrite: the previous content)
    .old-<tag>-<id>/    an overwritten tag's previous content, where names cannot be swapped atomically
    .del-<tag>-<id>/    a checkpoint being deleted by ``prune``
    .latest-<id>        the next content of ``latest``

A writer killed (SIGKILL, power loss) leaves these behind; so did older zerostep versions, whose ids are
32 hex digits, and a prune killed halfway through left a tag folder without a manifest. ``scan`` lists
them and says which are stale: the writer is dead (same host, no such process, or another process under
its pid), or is this very process (its saves run one at a time, so an earlier one of its own is over),
or, where the writer cannot be known (another host, an older version), nothing in it changed for a day.
A tag folder without a manifest is always stale (saves never write into tag folders). A save in
progress by a live process is never stale. ``remove_stale`` deletes the stale ones, except
that an overwritten tag's previous content goes back to its tag when a crash left the tag missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
import zlib
from dataclasses import dataclass

UNKNOWN_OWNER_STALE_S = 24 * 3600.0
_ID = r"(?P<id>[0-9a-f]{16}-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<start>[0-9]+)|(?P<legacy>[0-9a-f]{32}))"
_NAMES = re.compile(rf"^\.(?P<kind>tmp|old|del)-(?P<tag>.+)-{_ID}$|^\.latest-{_ID.replace('?P<', '?P<l_')}$")
_OUR_FILES = re.compile(r"^(rank_[0-9]{5}\.msgpack|\..+\.tmp-[0-9a-f]{12})$")  # what a tag folder may hold


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None if there is no such process
    (or no ``/proc`` to ask: then 0 for a live pid, which matches any recorded 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def new_save_id() -> str:
    """A fresh id naming this process as the writer."""
    start = process_start(os.getpid())
    return f"{uuid.uuid4().hex[:16]}-{_host()}-{os.getpid()}-{start or 0}"


@dataclass(frozen=True)
class Leftover:
    name: str  # in the save folder
    kind: str  # "tmp", "old", "del", "latest", or "no-manifest" (a tag folder a killed prune left)
    tag: str | None
    owner: str  # "alive", "this process", "dead", or "unknown"
    stale: bool
    nbytes: int


def _owner(host: str | None, pid: str | None, start: str | None) -> str:
    if host is None or host != _host():
        return "unknown"
    if int(pid) == os.getpid() and int(start) == (process_start(os.getpid()) or 0):
        return "this process"
    now = process_start(int(pid))
    return "alive" if now is not None and now == int(start) else "dead"


def _newest_change(path: str) -> float:
    """The latest mtime of ``path`` and (for a folder) of what it holds, one level deep."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for e in entries:
                try:
                    newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def _size(path: str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _is_killed_prune(path: str, manifest: str) -> bool:
    """A tag folder without a manifest that holds only files a checkpoint holds (a prune killed halfway
    through deleting it); a folder holding anything else is someone else's and is left alone."""
    if not os.path.isdir(path) or os.path.islink(path) or os.path.lexists(os.path.join(path, manifest)):
        return False
    names = os.listdir(path)
    return bool(names) and all(_OUR_FILES.match(n) and os.path.isfile(os.path.join(path, n)) for n in names)


def scan(save_dir: str, manifest: str, latest: str, *, current: str | None = None) -> list[Leftover]:
    """Every leftover of a save in ``save_dir`` (``manifest`` and ``latest``: the file names a
    checkpoint's manifest and the latest pointer have), except those of the save ``current`` (its id)."""
    out = []
    now = time.time()
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        try:
            m = _NAMES.match(name)
            if m is not None:
                kind = m["kind"] or "latest"
                save_id = m["id"] or m["l_id"]
                if save_id == current:
                    continue
                host, pid, start = (
                    (m["host"], m["pid"], m["start"])
                    if m["kind"]
                    else (
                        m["l_host"],
                        m["l_pid"],
                        m["l_start"],
                    )
                )
                owner = _owner(host, pid, start)
                tag = m["tag"]
            elif name != latest and not name.startswith(".") and _is_killed_prune(path, manifest):
                # nothing writes into a tag folder, a prune only deletes it: stale whoever left it
                out.append(Leftover(name, "no-manifest", name, "unknown", True, _size(path)))
                continue
            else:
                continue
            if owner == "unknown":
                stale = now - _newest_change(path) > UNKNOWN_OWNER_STALE_S
            else:
                stale = owner in ("dead", "this process")
            out.append(Leftover(name, kind, tag, owner, stale, _size(path)))
        except FileNotFoundError:  # removed while we looked (its writer finished)
            continue
    return out


def remove_stale(save_dir: str, manifest: str, latest: str, *, current: str | None = None) -> list[str]:
    """Delete the stale leftovers of ``scan``; an overwritten tag's previous content (``.old-``) whose tag
    a crash left missing is renamed back to it instead. Returns the names handled. Best effort: a
    leftover that cannot be removed stays (and is reported again)."""
    done = []
    for left in scan(save_dir, manifest, latest, current=current):
        if not left.stale:
            continue
        path = os.path.join(save_dir, left.name)
        if left.kind == "old" and not os.path.lexists(os.path.join(save_dir, left.tag)):
            if os.path.isfile(os.path.join(path, manifest)):
                try:
                    os.rename(path, os.path.join(save_dir, left.tag))
                    done.append(left.name)
                    continue
                except OSError:
                    pass
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
        if not os.path.lexists(path):
            done.append(left.name)
    return done
