"""Sharded checkpoints: every rank writes its file, rank 0 commits; loads reshard to any world size.

Save protocol (layout in ``zerostep.io.manifest``)::

    all ranks   agree on a checkpoint id naming rank 0's process (``zerostep.io.leftovers``)
    rank r      writes <save_dir>/.tmp-<tag>-<id>/rank_r.msgpack (fsync) and reports checksums or its error
    rank 0      gathers the reports; if all succeeded: removes what dead writers left, writes the manifest
                and <save_dir>/.latest-<id> (fsync both), puts the folder at <tag> (an atomic exchange
                where an old <tag> exists), replaces <save_dir>/latest, fsyncs <save_dir>, deletes the
                old <tag>'s content, prunes old tags
    all ranks   learn the outcome; on any failure the temporary files are removed and every rank raises

A crash at any point leaves ``latest`` naming a whole checkpoint (a killed save leaves ``.tmp-*`` names,
which readers ignore and the next save removes). A failure before ``latest`` is replaced is undone (an
overwritten tag gets its content back), so "previous checkpoints untouched" is true when said; every
other message says what the folder holds. Coordination runs on a dedicated gloo group with the default
group's timeout, so an async save's background thread never interleaves with the training loop's
collectives; a pending async save is finished before the interpreter exits.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import thread as _futures_thread  # noqa: F401 - registers its exit hook before ours
from typing import Any

import torch
import torch.distributed as dist

from zerostep.io import leftovers, native, writer
from zerostep.io import manifest as mf
from zerostep.io.codec import TensorRef
from zerostep.io.errors import CheckpointError
from zerostep.io.reshard import load_flat_shard
from zerostep.io.writer import _fsync_dir, write_pytree

_groups: dict[tuple[int, int], Any] = {}
_pending: SaveHandle | None = None
_pending_lock = threading.Lock()


class SaveHandle:
    """A save in progress (or done). ``wait()`` returns the checkpoint's folder or raises its error."""

    def __init__(self, path: str):
        self.path = path
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._reported = False  # the error reached the caller once already

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str:
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint save to {self.path} still running after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error
        return self.path


def _finish_pending_save_at_exit() -> None:
    """At interpreter exit (return from main, ``sys.exit``, an uncaught exception), before the worker
    threads stop taking work: let a pending async save finish, as a synchronous one would have. If it
    failed and nobody saw its error, print it and exit with status 1: a lost checkpoint is never silent.
    Then the saves' own gloo groups are shut down while the interpreter is whole, rather than by the
    teardown of torch's globals in whatever order it happens.

    Only in the process that imported this module: a forked child (a DataLoader worker) runs threading's
    exit hooks too when it ends, and must neither wait for its parent's save nor shut down the gloo
    groups it inherited (that aborted the worker: ``terminate called ... std::system_error``)."""
    if os.getpid() != _OWNER_PID:
        return
    with _pending_lock:
        handle = _pending
    if handle is not None:
        handle._done.wait()
        if handle._error is not None and not handle._reported:
            try:
                sys.stdout.flush()
                print(
                    f"zerostep: the async checkpoint save to {handle.path} failed: {handle._error}",
                    file=sys.stderr,
                )
                sys.stderr.flush()
            finally:
                os._exit(1)
    while _groups:
        _, group = _groups.popitem()
        try:
            if dist.is_initialized():
                dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - exiting anyway; a group torch already dropped is fine
            pass


# Threads' exit hooks run in reverse order of registration, before non-daemon threads are joined;
# concurrent.futures registered its own (which refuses new work from then on) when the writer's pool
# module was imported, so this one runs first, while the save can still use the pool.
_OWNER_PID = os.getpid()
_register_exit_hook = getattr(threading, "_register_atexit", None)
if _register_exit_hook is not None:
    _register_exit_hook(_finish_pending_save_at_exit)
else:  # pragma: no cover - every supported Python has it
    atexit.register(_finish_pending_save_at_exit)


def wait_for_pending_save() -> None:
    """Block until this process's previous async save has finished; raise its error unless its handle's
    ``wait()`` already did."""
    global _pending
    with _pending_lock:
        handle, _pending = _pending, None
    if handle is not None:
        handle._done.wait()
        if not handle._reported:
            handle.wait()


def group_timeout_s(group: Any = None) -> float:
    """The collective timeout of ``group`` (default: the default group), as given to
    ``init_process_group`` (zerostep's start-up passes ``$ZEROSTEP_DIST_TIMEOUT``); where torch does not
    say, ``$ZEROSTEP_DIST_TIMEOUT`` or its default."""
    try:
        pg = group if group is not None else dist.group.WORLD
        timeout = pg._get_backend(torch.device("cpu")).options._timeout
        if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
            return timeout.total_seconds()
    except (AttributeError, RuntimeError, ValueError):
        pass
    from zerostep.parallel.groups import default_timeout_s

    return default_timeout_s()


class LostContact(CheckpointError):
    """A collective among the saving or loading ranks failed: a peer died or did not answer in time."""


class _Coordinator:
    """Broadcast / gather of small objects among the saving ranks (no-ops for one rank), on a gloo group
    of their own with the default group's timeout (or ``timeout``). A failed collective raises
    ``LostContact`` and drops the group, which a dead peer has broken for good."""

    def __init__(self, world_size: int, timeout: float | None, where: str, group: Any = None):
        self.group, self.where, self.given = None, where, group is not None
        self.timeout = timeout if timeout is not None else group_timeout_s(group)
        if world_size > 1 and group is not None:  # the caller's dedicated group over the saving ranks
            if dist.get_world_size(group) != world_size:
                raise ValueError(
                    f"saving from {world_size} ranks over a group of {dist.get_world_size(group)} ranks"
                )
            self.group = group
        elif world_size > 1:
            if not dist.is_initialized() or dist.get_world_size() != world_size:
                raise ValueError(
                    f"saving from {world_size} ranks needs torch.distributed initialized with them"
                )
            key = (id(dist.group.WORLD), world_size, self.timeout)
            if key not in _groups:  # collective: every rank's first save creates it together
                delta = datetime.timedelta(seconds=self.timeout)
                _groups[key] = self._collective(
                    "creating the save's process group", lambda: dist.new_group(backend="gloo", timeout=delta)
                )
            self.key, self.group = key, _groups[key]

    def _collective(self, what: str, run: Any) -> Any:
        try:
            return run()
        except RuntimeError as e:  # gloo's errors: connection closed or reset, or timed out
            self._drop()
            raise LostContact(
                self.where,
                f"{what}: lost contact with the other ranks (one died, or did not answer within "
                f"{self.timeout:g} s): {e}",
            ) from e

    def _drop(self) -> None:
        group, self.group = self.group, None
        if group is None or self.given:  # the caller's group is the caller's to drop
            return
        _groups.pop(self.key, None)
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - already broken; dropping it is all that is left to do
            pass

    def broadcast(self, obj: Any, what: str) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        self._collective(what, lambda: dist.broadcast_object_list(box, group_src=0, group=self.group))
        return box[0]

    def gather(self, obj: Any, rank: int, what: str) -> list[Any] | None:
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size(self.group) if rank == 0 else None
        self._collective(what, lambda: dist.gather_object(obj, out, group_dst=0, group=self.group))
        return out


def _rank_and_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def _snapshot(tree: Any) -> Any:
    """Host copies of every tensor, so training may modify the originals while a thread writes."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, Mapping):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_snapshot(v) for v in tree]
        return tuple(items) if isinstance(tree, tuple) else items
    return tree


def save_checkpoint(
    save_dir: str | os.PathLike,
    tag: str,
    tree: Any,
    *,
    flat_numel: Mapping[str, int] | None = None,
    meta: dict | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    keep_last: int | None = None,
    fsync: bool = True,
    async_save: bool = False,
    timeout: float | None = None,
    update_latest: bool = True,
    group: Any = None,
) -> SaveHandle:
    """Save this rank's ``tree`` as part of checkpoint ``<save_dir>/<tag>``; every rank calls it.

    ``flat_numel`` maps leaf paths that are this rank's part of a flat 1-D tensor to the tensor's total
    element count; all other tensors are replicated (rank 0's copy is written). ``meta`` goes into the
    manifest as is. ``keep_last=N`` then deletes all but the newest N checkpoints (by ``meta['step']``,
    then time), never the one just written. With ``async_save`` tensors are copied to host memory now and
    written by a thread; the returned handle's ``wait()`` joins it, and the next save or load waits too,
    as does the interpreter's exit (a failure nobody waited for is printed and the exit status is 1).
    ``update_latest=False`` commits the checkpoint without pointing ``latest`` at it (DeepSpeed's
    ``save_latest=False``): it loads by its tag.
    Raises ``CheckpointError`` on every rank if any rank's write fails. The ranks coordinate with the
    default process group's timeout (``timeout`` seconds if given); a rank that dies or stops answering
    makes the others raise ``LostContact`` (a ``CheckpointError``) saying what became of the save.
    ``group``: a gloo group of exactly the saving ranks, reserved for checkpoints, when they are not the
    whole world (one data-parallel replica of a model-parallel mesh); ``rank`` / ``world_size`` are then
    within it.
    """
    wait_for_pending_save()
    save_dir = os.fspath(save_dir)
    mf.check_tag(save_dir, tag)
    if keep_last is not None:
        check_keep_last(keep_last)
    rank, world_size = _rank_and_size(rank, world_size)
    table = mf.describe_leaves(tree, flat_numel or {}, world_size)
    own = mf.rank_tree(tree, table, rank)
    coord = _Coordinator(world_size, timeout, os.path.join(save_dir, tag), group)
    new_id = leftovers.new_save_id() if rank == 0 else None
    ckpt_id = coord.broadcast(new_id, "save failed before anything was written, agreeing on its id")
    handle = SaveHandle(os.path.join(save_dir, tag))
    args = (
        save_dir,
        tag,
        ckpt_id,
        own,
        table,
        meta or {},
        rank,
        world_size,
        keep_last,
        fsync,
        coord,
        update_latest,
    )
    if not async_save:
        _write_and_commit(*args)
        handle._done.set()
        return handle
    global _pending
    args = args[:3] + (_snapshot(own),) + args[4:]
    thread = threading.Thread(target=handle._run, args=(lambda: _write_and_commit(*args),), name="zs-ckpt")
    with _pending_lock:
        _pending = handle
    thread.start()
    return handle


def _write_and_commit(
    save_dir, tag, ckpt_id, own, table, meta, rank, world_size, keep_last, fsync, coord, update_latest
):
    tmp = os.path.join(save_dir, f".tmp-{tag}-{ckpt_id}")
    try:
        os.makedirs(tmp, exist_ok=True)
        shard_meta = {"checkpoint_id": ckpt_id, "tag": tag, "rank": rank, "world_size": world_size}
        written = write_pytree(os.path.join(tmp, mf.rank_file(rank)), own, meta=shard_meta, fsync=fsync)
        digests = {p: mf.tensor_digest(written.records[i]) for p, i in written.paths.items()}
        report = {"nbytes": written.nbytes, "checksum": written.checksum, "digests": digests, "leaves": table}
    except Exception as e:  # reported to rank 0 so every rank fails together instead of hanging
        report = {
            "error": str(e) if isinstance(e, CheckpointError) else f"rank {rank}: {type(e).__name__}: {e}"
        }
    if rank == 0:  # without every report rank 0 commits nothing
        what = UNTOUCHED + "collecting the ranks' reports"
    else:
        what = f"save of {tag!r} ended without word from rank 0 whether it committed it (see {mf.LATEST!r})"
    try:
        reports = coord.gather(report, rank, what)
    except LostContact:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    outcome = None
    if rank == 0:
        errors = [r["error"] for r in reports if "error" in r]
        differ = [i for i, r in enumerate(reports) if "leaves" in r and r.pop("leaves") != table]
        if differ and not errors:
            errors.append(
                f"ranks {differ} describe a different tree (leaf paths, shapes or flat sizes) than rank 0"
            )
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = UNTOUCHED + "; ".join(errors)
        else:
            # every rank is done writing: what dead writers left can go (a live writer's is kept)
            leftovers.remove_stale(save_dir, mf.MANIFEST, mf.LATEST, current=ckpt_id)
            try:
                _commit(
                    save_dir,
                    tag,
                    tmp,
                    ckpt_id,
                    reports,
                    table,
                    meta,
                    world_size,
                    keep_last,
                    fsync,
                    update_latest,
                )
            except _CommitFailed as e:
                outcome = str(e)
    if rank == 0:
        what = (
            "save failed, telling the other ranks"
            if outcome
            else (
                f"checkpoint {tag!r} committed and named by {mf.LATEST!r}, but telling the other ranks failed"
            )
        )
    else:
        what = f"save of {tag!r} ended without word from rank 0 whether it committed it (see {mf.LATEST!r})"
    outcome = coord.broadcast(outcome, what)
    if outcome is not None:
        raise CheckpointError(os.path.join(save_dir, tag), outcome)


UNTOUCHED = "save failed, previous checkpoints untouched: "


class _CommitFailed(Exception):
    """The commit stopped; the message says what the save folder holds now."""


def _reason(e: BaseException) -> str:
    return e.reason if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def write_latest(save_dir: str | os.PathLike, tag: str, fsync: bool = True) -> None:
    """Point ``<save_dir>/latest`` at ``tag`` as a save's commit does: the new content in a
    ``.latest-<id>`` file (a leftover the next save removes, if this dies), then an atomic replace and,
    with ``fsync``, the folder synced. For a ``latest`` above several committed checkpoints (one per
    model-parallel rank, core/mp_checkpoint.py)."""
    save_dir = os.fspath(save_dir)
    tmp = os.path.join(save_dir, f".{mf.LATEST}-{leftovers.new_save_id()}")
    try:
        _write_small(tmp, tag, fsync)
        os.replace(tmp, os.path.join(save_dir, mf.LATEST))
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(save_dir)


def _write_small(path: str, text: str, fsync: bool) -> None:
    """A new file ``path`` holding ``text`` (``write_all``, so tests can fill the disk here too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        writer.write_all(fd, text.encode("utf-8", "surrogatepass"))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


class _Swap:
    """Put the folder ``new`` at ``final``; ``undo()`` puts back what ``final`` held. Where the system
    can, the two names are exchanged atomically (``final`` always holds a whole checkpoint, and
    ``new``'s name then holds the previous one); elsewhere ``final`` moves aside to ``old`` first."""

    def __init__(self, new: str, final: str, old: str):
        self.new, self.final, self.old = new, final, old
        self.exchanged = self.moved_aside = self.moved_in = False

    def do(self) -> None:
        if os.path.lexists(self.final) and native.exchange(self.new, self.final):
            self.exchanged = True
            return
        if os.path.lexists(self.final):
            os.replace(self.final, self.old)
            self.moved_aside = True
        os.replace(self.new, self.final)
        self.moved_in = True

    def undo(self) -> None:
        """Undo what ``do`` did, also when it stopped halfway."""
        if self.exchanged:
            if not native.exchange(self.new, self.final):
                raise OSError(f"cannot exchange {self.new} and {self.final} back")
            self.exchanged = False
            return
        if self.moved_in:
            os.replace(self.final, self.new)
            self.moved_in = False
        if self.moved_aside:
            os.replace(self.old, self.final)
            self.moved_aside = False

    def previous(self) -> str | None:
        """Where the content ``final`` held before now is, or None if there was none."""
        return self.new if self.exchanged else self.old if self.moved_aside else None


def _commit(
    save_dir, tag, tmp, ckpt_id, reports, table, meta, world_size, keep_last, fsync, update_latest=True
) -> None:
    """Make the written folder ``tmp`` checkpoint ``tag`` and point ``latest`` at it (unless not
    ``update_latest``). Raises
    ``_CommitFailed`` saying truthfully what the save folder holds: until ``latest`` is replaced every
    failure is undone (an overwritten tag gets its previous content back)."""
    files = [dict(r, name=mf.rank_file(i), rank=i) for i, r in enumerate(reports)]
    manifest = {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "checkpoint_id": ckpt_id,
        "tag": tag,
        "world_size": world_size,
        "created": time.time(),
        "versions": mf.versions(),
        "leaves": table,
        "files": files,
        "meta": meta,
    }
    final = os.path.join(save_dir, tag)
    latest = os.path.join(save_dir, mf.LATEST)
    latest_tmp = os.path.join(save_dir, f".{mf.LATEST}-{ckpt_id}")
    swap = _Swap(tmp, final, os.path.join(save_dir, f".old-{tag}-{ckpt_id}"))
    try:  # the new files, fsynced, before any name the readers see changes (a full disk fails here)
        write_pytree(os.path.join(tmp, mf.MANIFEST), manifest, fsync=fsync)
        if fsync:
            _fsync_dir(tmp)
        if update_latest:
            _write_small(latest_tmp, tag, fsync)
        swap.do()
        if update_latest:
            os.replace(latest_tmp, latest)
    except BaseException as e:
        reason = _reason(e)
        try:
            swap.undo()
            _remove(tmp)
            _remove(latest_tmp)
        except BaseException as undo:
            raise _CommitFailed(_half_committed(save_dir, tag, ckpt_id, swap, reason, undo)) from e
        if not isinstance(e, Exception):
            raise
        raise _CommitFailed(UNTOUCHED + reason) from e
    # committed: 'latest' names the new checkpoint (if it was to)
    named = "committed and named by 'latest'" if update_latest else "committed ('latest' not updated)"
    problems = []
    if fsync:
        try:
            _fsync_dir(save_dir)
        except OSError as e:
            problems.append(f"syncing the save folder failed, so the commit may not survive a crash: {e}")
    previous = swap.previous()
    if previous is not None:
        _remove(previous)  # if this fails, the next save removes it (a leftover of an ended save)
    if keep_last is not None:
        try:
            prune(save_dir, keep_last, keep=tag)
        except Exception as e:
            warnings.warn(
                f"{save_dir}: checkpoint {tag!r} saved, deleting older ones failed: {e}", stacklevel=1
            )
    if problems:
        raise _CommitFailed(f"checkpoint {tag!r} {named}, but " + "; ".join(problems))


def _half_committed(
    save_dir: str, tag: str, ckpt_id: str, swap: _Swap, reason: str, undo: BaseException
) -> str:
    """What the save folder holds when undoing a failed commit failed too."""
    final = os.path.join(save_dir, tag)
    try:
        held = mf.load_pytree(os.path.join(final, mf.MANIFEST), verify=False).get("checkpoint_id")
        holds = "the new checkpoint" if held == ckpt_id else "its previous checkpoint"
    except Exception:
        holds = "no checkpoint" if not os.path.lexists(final) else "an unreadable checkpoint"
    try:
        names = repr(mf.read_latest(save_dir))
    except CheckpointError:
        names = "nothing readable"
    where = swap.previous()
    kept = f"; the previous content of {tag!r} is in {where}" if where and os.path.lexists(where) else ""
    return (
        f"save failed ({reason}) and undoing it failed too ({type(undo).__name__}: {undo}): "
        f"{final} holds {holds}, 'latest' names {names}{kept}"
    )


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[str, dict]]:
    """(tag, manifest) of every committed checkpoint under ``save_dir``, oldest first (step, then time)."""
    save_dir = mf.check_save_dir(save_dir)
    found = []
    try:
        names = os.listdir(save_dir)
    except OSError as e:
        raise CheckpointError(save_dir, f"cannot list the save folder: {e.strerror or e}") from None
    for name in names:
        path = os.path.join(save_dir, name, mf.MANIFEST)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            manifest = mf.load_pytree(path, verify=False)
        except CheckpointError:
            continue
        step = manifest.get("meta", {}).get("step") if isinstance(manifest, dict) else None
        key = (step if isinstance(step, (int, float)) else float("-inf"), os.path.getmtime(path))
        found.append((key, name, manifest))
    return [(name, manifest) for _, name, manifest in sorted(found, key=lambda x: x[0])]


def prune(save_dir: str | os.PathLike, keep_last: int, *, keep: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``keep``); returns the deleted tags.
    Each is renamed to a ``.del-`` name first, so a prune killed midway never leaves a tag folder
    without its manifest (the next save removes the rest)."""
    check_keep_last(keep_last)
    save_dir = os.fspath(save_dir)
    tags = [t for t, _ in list_checkpoints(save_dir) if t != keep]
    doomed = tags[: max(0, len(tags) - (keep_last - (keep is not None)))]
    save_id = leftovers.new_save_id()
    for tag in doomed:
        aside = os.path.join(save_dir, f".del-{tag}-{save_id}")
        try:
            os.rename(os.path.join(save_dir, tag), aside)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointError(os.path.join(save_dir, tag), f"cannot delete: {e.strerror or e}") from None
        shutil.rmtree(aside, ignore_errors=True)
    return doomed


def check_keep_last(keep_last: Any) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1 (None keeps every checkpoint), got {keep_last!r}")


def load_checkpoint(
    load_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    verify: bool = True,
    leaves: Iterable[str] | None = None,
) -> tuple[Any, dict]:
    """(tree, meta) of checkpoint ``tag`` (default: the one named by ``latest``) for this rank.

    Replicated leaves come back as saved; each flat leaf comes back as this rank's part for *this* world
    size (``shard_numel(numel, world_size)`` elements, zero padded), read from whichever saved files
    overlap it. ``leaves`` (paths or path prefixes) restricts what is read: other tensors are left out of
    dicts, or are None inside lists and tuples. ``verify`` checks the crc32 of every byte read.
    """
    wait_for_pending_save()
    rank, world_size = _rank_and_size(rank, world_size)
    wanted = None if leaves is None else list(leaves)
    with mf.CheckpointDir.open(load_dir, tag, verify=verify) as ckpt:
        rank0 = ckpt.reader(0)
        by_index = {i: p for p, i in rank0.paths.items()}
        skip = object()

        def build(node: Any) -> Any:
            if isinstance(node, TensorRef):
                path = by_index[node.index]
                if not mf.selected(path, wanted):
                    return skip
                if ckpt.leaves[path]["kind"] == "flat":
                    return load_flat_shard(ckpt, path, rank, world_size, verify=verify)
                return rank0.tensor(node.index, verify=verify)
            if isinstance(node, dict):
                items = {k: build(v) for k, v in node.items()}
                return {k: v for k, v in items.items() if v is not skip}
            if isinstance(node, (list, tuple)):
                items = [None if v is skip else v for v in map(build, node)]
                return tuple(items) if isinstance(node, tuple) else items
            return node

        return build(rank0.skeleton), ckpt.manifest["meta"]


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """A summary for tooling: ``path`` is a save folder (all tags) or one checkpoint folder. Also lists
    what killed saves left in the save folder (``zerostep.io.leftovers``), each with its size and
    whether the next save removes it (``stale``)."""
    path = mf.check_save_dir(path)
    if os.path.isfile(os.path.join(path, mf.MANIFEST)):
        save_dir, tags = os.path.dirname(os.path.abspath(path)), [os.path.basename(os.path.abspath(path))]
    else:
        save_dir, tags = path, [t for t, _ in list_checkpoints(path)]
    try:
        latest = mf.read_latest(save_dir)
    except CheckpointError:
        latest = None
    out = []
    for tag in tags:
        with mf.CheckpointDir.open(save_dir, tag) as ckpt:
            m = ckpt.manifest
            rank0 = ckpt.reader(0)
            shapes = {i: "{dtype}{shape}".format(**ckpt.leaves[p]) for p, i in rank0.paths.items()}
            out.append(
                {
                    "tag": tag,
                    "path": ckpt.path,
                    "step": m["meta"].get("step"),
                    "world_size": m["world_size"],
                    "zero_stage": m["meta"].get("zero_stage"),
                    "created": m["created"],
                    "versions": m["versions"],
                    "nbytes": sum(f["nbytes"] for f in m["files"]),
                    "files": [f["name"] for f in m["files"]],
                    "leaves": m["leaves"],
                    "tree": _describe(rank0.skeleton, shapes),
                    "meta": m["meta"],
                }
            )
    found = leftovers.scan(save_dir, mf.MANIFEST, mf.LATEST)
    return {"dir": save_dir, "latest": latest, "checkpoints": out, "leftovers": [vars(x) for x in found]}


def _describe(node: Any, shapes: dict[int, str]) -> Any:
    """The tree with each tensor replaced by 'dtype[shape]'."""
    if isinstance(node, TensorRef):
        return shapes[node.index]
    if isinstance(node, dict):
        return {k: _describe(v, shapes) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_describe(v, shapes) for v in node)
    return node
