"""Sharded checkpoints: multi-rank saves (gloo), resharded loads, faults, keep_last, async, crash, export."""

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from zerostep.io import (
    CheckpointError,
    export_consolidated,
    inspect_checkpoint,
    load_checkpoint,
    read_flat,
    save_checkpoint,
    shard_numel,
)
from zerostep.io import cli as io_cli
from zerostep.io import writer as writer_mod
from zerostep.parallel.launch import spawn_ranks

NUMELS = (0, 1, 2, 7, 10, 1027)  # includes numel < world size and numel not divisible by it
LAYOUTS = {
    "g0": {"dtype": "float32", "entries": [["lin.weight", [2, 3], 0], ["lin.bias", [4], 6]]},
    "g1": {"dtype": "bfloat16", "entries": [["emb", [7], 0]]},
}


def logical(name: str, numel: int, step: int) -> torch.Tensor:
    dtype = torch.bfloat16 if name.endswith("g1") else torch.float32
    return (torch.arange(numel, dtype=torch.float64) * 1.5 + step + len(name)).to(dtype)


def flat_leaves() -> dict[str, int]:
    leaves = {f"flat/n{n}": n for n in NUMELS}
    leaves.update({"master/g0": 10, "master/g1": 7, "opt_state/exp_avg/g0": 10})
    return leaves


def shard_of(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    length = shard_numel(full.numel(), world_size)
    padded = torch.zeros(length * world_size, dtype=full.dtype)
    padded[: full.numel()] = full
    return padded[rank * length : (rank + 1) * length].clone()


def rank_state(rank: int, world_size: int, step: int) -> dict:
    flat = {path: shard_of(logical(path, n, step), rank, world_size) for path, n in flat_leaves().items()}
    return {
        "step": torch.tensor(step),
        "master": {"g0": flat["master/g0"], "g1": flat["master/g1"]},
        "opt_state": {"exp_avg": {"g0": flat["opt_state/exp_avg/g0"]}},
        "flat": {k.split("/")[1]: v for k, v in flat.items() if k.startswith("flat/")},
        "params": {"w": torch.full((2, 3), float(step)), "b": torch.arange(4, dtype=torch.int64)},
        "scaler": (torch.tensor(2.0**16), 0, None),
        "note": f"step {step}",
    }


def _save_ranks(rank, world_size, root):
    meta = lambda step: {"step": step, "zero_stage": 2, "config": {"train_batch_size": 8}, "layouts": LAYOUTS}
    if rank == 0:  # a dead writer's leftover: the first save's rank 0 removes it, once every rank wrote
        os.makedirs(os.path.join(root, f".tmp-a-{_save_id(os.getpid(), 0)}", "rank_00001.msgpack"))
    save_checkpoint(root, "a", rank_state(rank, world_size, 1), flat_numel=flat_leaves(), meta=meta(1))
    handle = save_checkpoint(
        root, "b", rank_state(rank, world_size, 2), flat_numel=flat_leaves(), meta=meta(2), async_save=True
    )
    handle.wait()
    # A write failing on one rank fails the save on every rank and leaves the others untouched.
    real, errors = writer_mod.write_all, []
    if rank == 1:
        writer_mod.write_all = _disk_full
    try:
        save_checkpoint(root, "c", rank_state(rank, world_size, 3), flat_numel=flat_leaves(), meta=meta(3))
    except CheckpointError as e:
        errors.append(str(e))
    writer_mod.write_all = real
    # So does a rank whose tree differs from rank 0's.
    state = rank_state(rank, world_size, 4)
    if rank == world_size - 1:
        state["params"]["w"] = torch.zeros(5)
    try:
        save_checkpoint(root, "d", state, flat_numel=flat_leaves(), meta=meta(4))
    except CheckpointError as e:
        errors.append(str(e))
    return errors


def _disk_full(fd, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints 'a' and 'b' saved by 2 and by 3 gloo ranks."""
    dirs = {}
    for world_size in (2, 3):
        root = str(tmp_path_factory.mktemp(f"ws{world_size}"))
        for full, mismatch in spawn_ranks(_save_ranks, world_size, root, timeout=120):
            assert "c: save failed" in full and "No space left on device" in full
            assert (
                "d: save failed" in mismatch
                and f"ranks [{world_size - 1}] describe a different tree" in mismatch
            )
        dirs[world_size] = root
    return dirs


def test_multi_rank_failure_left_previous_checkpoints_and_no_temporary(saved):
    for root in saved.values():
        assert sorted(os.listdir(root)) == ["a", "b", "latest"]
        assert open(os.path.join(root, "latest")).read() == "b"


@pytest.mark.parametrize("saved_ws", [2, 3])
@pytest.mark.parametrize("load_ws", [1, 2, 3, 4])
def test_reshard_matrix(saved, saved_ws, load_ws):
    for rank in range(load_ws):
        tree, meta = load_checkpoint(saved[saved_ws], rank=rank, world_size=load_ws)
        assert meta["step"] == 2 and meta["layouts"] == LAYOUTS
        flat = {f"flat/{k}": v for k, v in tree["flat"].items()}
        flat.update({"master/g0": tree["master"]["g0"], "master/g1": tree["master"]["g1"]})
        flat["opt_state/exp_avg/g0"] = tree["opt_state"]["exp_avg"]["g0"]
        for path, numel in flat_leaves().items():
            assert torch.equal(flat[path], shard_of(logical(path, numel, 2), rank, load_ws)), (path, rank)
        assert torch.equal(tree["params"]["w"], torch.full((2, 3), 2.0)) and tree["step"].item() == 2
        assert tree["scaler"] == (torch.tensor(2.0**16), 0, None) and isinstance(tree["scaler"], tuple)
        assert tree["note"] == "step 2"


def test_read_flat_and_partial_loads(saved):
    for root in saved.values():
        for path, numel in flat_leaves().items():
            assert torch.equal(read_flat(root, "a", path), logical(path, numel, 1))
        tree, _ = load_checkpoint(root, "a", rank=0, world_size=1, leaves=["params", "master/g1"])
        assert set(tree) == {"master", "opt_state", "flat", "params", "scaler", "note"}  # "step" is a tensor
        assert list(tree["master"]) == ["g1"] and tree["opt_state"] == {"exp_avg": {}} and tree["flat"] == {}
        assert torch.equal(tree["params"]["b"], torch.arange(4)) and tree["scaler"][0] is None


def _copy(saved, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(saved[3], root)
    return root


def test_missing_extra_and_foreign_shards(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shutil.move(root / "b" / "rank_00002.msgpack", tmp_path / "r2")
    with pytest.raises(CheckpointError, match=r"rank_00002.msgpack: missing shard .*world size 3"):
        load_checkpoint(root, rank=0, world_size=1)
    shutil.copy(root / "a" / "rank_00002.msgpack", root / "b" / "rank_00002.msgpack")
    with pytest.raises(CheckpointError, match=r"b/rank_00002.msgpack: shard from another checkpoint"):
        load_checkpoint(root, rank=0, world_size=1)
    shutil.move(tmp_path / "r2", root / "b" / "rank_00002.msgpack")
    shutil.copy(root / "b" / "rank_00000.msgpack", root / "b" / "rank_00003.msgpack")
    with pytest.raises(CheckpointError, match=r"unexpected shard files \['rank_00003.msgpack'\]"):
        load_checkpoint(root, rank=0, world_size=1)


def test_damaged_shards_and_manifest(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shard = root / "b" / "rank_00001.msgpack"
    data = shard.read_bytes()
    from zerostep.io import PytreeReader

    with PytreeReader(shard) as reader:  # rank 1's part of the one leaf long enough to reach it
        payload_byte = reader.records[reader.paths["flat/n1027"]].extents[0][0]
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"rank_00001.msgpack: truncated"):
        load_checkpoint(root, rank=0, world_size=1)
    flipped = bytearray(data)
    flipped[payload_byte] ^= 1
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"rank_00001.msgpack: checksum mismatch in tensor"):
        load_checkpoint(root, rank=0, world_size=1)
    assert load_checkpoint(root, rank=0, world_size=1, verify=False)[1]["step"] == 2  # verify=False trusts it
    shard.write_bytes(data)
    manifest = root / "b" / "manifest.msgpack"
    manifest.write_bytes(manifest.read_bytes()[:-1] + b"!")
    with pytest.raises(CheckpointError, match=r"b/manifest.msgpack: truncated or damaged"):
        load_checkpoint(root)
    manifest.unlink()
    with pytest.raises(CheckpointError, match=r"missing manifest"):
        load_checkpoint(root)
    (root / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no 'latest' file"):
        load_checkpoint(root)
    assert load_checkpoint(root, "a", rank=1, world_size=2)[1]["step"] == 1


def test_bad_flat_shapes_and_tags_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="shard of 7 elements over 1 ranks must be 1-D with 16 elements"):
        save_checkpoint(tmp_path, "t", {"m": torch.zeros(3)}, flat_numel={"m": 7}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="not tensors in the tree"):
        save_checkpoint(tmp_path, "t", {"m": torch.zeros(3)}, flat_numel={"x": 3})
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        save_checkpoint(tmp_path, "latest", {})
    with pytest.raises(ValueError, match="needs torch.distributed"):
        save_checkpoint(tmp_path, "t", {}, rank=0, world_size=2)
    assert os.listdir(tmp_path) == []


def test_keep_last_deletes_oldest_by_step_never_the_new_one(tmp_path):
    for step in (5, 1, 3):
        save_checkpoint(tmp_path, f"s{step}", {"x": torch.tensor(step)}, meta={"step": step}, fsync=False)
    save_checkpoint(tmp_path, "s2", {"x": torch.tensor(2)}, meta={"step": 2}, keep_last=2, fsync=False)
    assert sorted(os.listdir(tmp_path)) == ["latest", "s2", "s5"]  # s2 is older by step but just written
    assert load_checkpoint(tmp_path)[0]["x"].item() == 2
    assert [c["tag"] for c in inspect_checkpoint(tmp_path)["checkpoints"]] == ["s2", "s5"]


def test_async_save_snapshots_and_reports_errors(tmp_path, monkeypatch):
    w = torch.ones(1000)
    handle = save_checkpoint(tmp_path, "x", {"w": w}, async_save=True, fsync=False)
    w.zero_()  # the save wrote a snapshot
    assert handle.wait() == os.path.join(tmp_path, "x") and handle.done()
    assert torch.equal(load_checkpoint(tmp_path)[0]["w"], torch.ones(1000))
    monkeypatch.setattr(writer_mod, "write_all", _disk_full)
    handle = save_checkpoint(tmp_path, "y", {"w": w}, async_save=True)
    with pytest.raises(CheckpointError, match="y: save failed.*No space left"):
        handle.wait()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest", "x"]


def test_disk_full_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "good", {"w": torch.arange(5000.0)}, meta={"step": 1})
    real, count = writer_mod.write_all, [0]

    def fills_up(fd, data):
        count[0] += 1
        if count[0] == 3:  # after the preamble and the first payload
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(writer_mod, "write_all", fills_up)
    with pytest.raises(
        CheckpointError, match=r"next: save failed.*rank_00000.msgpack: write failed.*No space"
    ):
        save_checkpoint(tmp_path, "next", {"w": torch.zeros(5000), "v": torch.ones(10)}, meta={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["good", "latest"]
    assert torch.equal(load_checkpoint(tmp_path)[0]["w"], torch.arange(5000.0))


KILLED_SAVE = """
import sys, time, torch
from zerostep.io import save_checkpoint, writer
root = sys.argv[1]
save_checkpoint(root, "good", {"w": torch.arange(100000.0)}, meta={"step": 1})
real = writer.write_all
def slow(fd, data):
    print("WRITING", flush=True)
    time.sleep(60)
    real(fd, data)
writer.write_all = slow
save_checkpoint(root, "doomed", {"w": torch.zeros(100000)}, meta={"step": 2})
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(KILLED_SAVE))
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (root / "latest").read_text() == "good" and not (root / "doomed").exists()
    tree, meta = load_checkpoint(root)
    assert meta["step"] == 1 and torch.equal(tree["w"], torch.arange(100000.0))
    assert [c["tag"] for c in inspect_checkpoint(root)["checkpoints"]] == ["good"]
    (left,) = inspect_checkpoint(root)["leftovers"]  # the killed save's folder, a dead writer's
    assert left["name"].startswith(".tmp-doomed-") and left["owner"] == "dead" and left["stale"]
    save_checkpoint(root, "next", {"w": torch.zeros(3)}, meta={"step": 3}, fsync=False)
    assert sorted(os.listdir(root)) == ["good", "latest", "next"]


def test_export_consolidated_and_cli(saved, tmp_path, capsys):
    from safetensors.torch import load_file

    root = saved[3]
    g0, g1 = logical("master/g0", 10, 2), logical("master/g1", 7, 2).float()
    expected = {"lin.weight": g0[:6].reshape(2, 3), "lin.bias": g0[6:10], "emb": g1}
    shapes = export_consolidated(root, tmp_path / "w.safetensors")
    assert shapes == {"lin.weight": (2, 3), "lin.bias": (4,), "emb": (7,)}
    got = load_file(tmp_path / "w.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    export_consolidated(root, tmp_path / "w.pt", tag="a", dtype=torch.bfloat16)
    got = torch.load(tmp_path / "w.pt")
    assert got["lin.bias"].dtype == torch.bfloat16
    assert torch.equal(got["lin.bias"], logical("master/g0", 10, 1)[6:].bfloat16())

    parser = argparse.ArgumentParser(prog="zerostep")
    io_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["checkpoint", "inspect", root])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "b: step 2, world size 3, ZeRO stage 2" in out and "(latest: b)" in out
    assert "g0: float32[16]" in out  # 10 elements over 3 ranks: 16 each, aligned
    args = parser.parse_args(
        ["checkpoint", "export", os.path.join(root, "a"), str(tmp_path / "x.safetensors"), "--dtype", "fp16"]
    )
    assert args.func(args) == 0 and load_file(tmp_path / "x.safetensors")["emb"].dtype == torch.float16
    args = parser.parse_args(["checkpoint", "inspect", str(tmp_path / "nothing")])
    assert args.func(args) == 1 and "error:" in capsys.readouterr().err


def _one_save(root, tag="good", step=1):
    save_checkpoint(root, tag, {"w": torch.arange(10.0) + step}, meta={"step": step}, fsync=False)


BAD_TAGS = ["ckpt ", " ckpt", "ckpt\n", "../other/good", "/abs/good", "a/b", ".", "..", "", "latest", "x\0y"]


def test_tags_are_one_plain_folder_name_inside_the_save_folder(tmp_path):
    from zerostep.io.manifest import InvalidTagError

    root, other = tmp_path / "ckpt", tmp_path / "other"
    _one_save(root)
    _one_save(other, step=5)
    for tag in BAD_TAGS + [" good"]:
        with pytest.raises(InvalidTagError, match="invalid checkpoint tag") as e:
            save_checkpoint(root, tag, {"w": torch.zeros(2)})
        assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)
        assert repr(tag) in str(e.value)
        with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
            load_checkpoint(root, tag)
    assert sorted(os.listdir(root)) == ["good", "latest"]
    # `latest` holding a path, or a tag with whitespace: refused, never resolved elsewhere
    for held in ("../other/good", str(other / "good"), "good ", " good", "good\n\n"):
        (root / "latest").write_text(held)
        with pytest.raises(CheckpointError, match=r"latest: invalid checkpoint tag in 'latest'"):
            load_checkpoint(root)
    (root / "latest").write_text("good\n")  # one line ending, as an editor writes it, is fine
    assert load_checkpoint(root)[1]["step"] == 1


@pytest.mark.timeout(60)
def test_unreadable_paths_raise_checkpoint_errors_naming_them(tmp_path):
    root = tmp_path / "ckpt"
    _one_save(root)
    latest = root / "latest"
    cases = {
        "not UTF-8": lambda: latest.write_bytes(b"\xff\xfe\x00\x81"),
        "a directory": lambda: latest.mkdir(),
        "Too many levels of symbolic links": lambda: os.symlink(latest, latest),
        "a FIFO": lambda: os.mkfifo(latest),  # a plain open would block here forever
    }
    for message, make in cases.items():
        latest.unlink() if latest.is_file() or latest.is_symlink() or latest.is_fifo() else latest.rmdir()
        make()
        with pytest.raises(CheckpointError, match=rf"{latest}: .*{message}"):
            load_checkpoint(root)
    latest.unlink()
    latest.write_text("good")
    shard = root / "good" / "rank_00000.msgpack"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: a FIFO, not a regular file"):
        load_checkpoint(root)
    shard.unlink()
    os.symlink(shard, shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: cannot open: Too many levels"):
        load_checkpoint(root)
    a_file = root / "latest"
    with pytest.raises(CheckpointError, match=rf"{a_file}: not a directory"):
        load_checkpoint(a_file)
    with pytest.raises(CheckpointError, match=rf"{a_file}: not a directory"):
        inspect_checkpoint(a_file)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'nothing'}: checkpoint folder not found"):
        inspect_checkpoint(tmp_path / "nothing")


def test_export_to_an_unwritable_path_is_a_checkpoint_error(saved, tmp_path):
    for out in ("/proc/zerostep-w.safetensors", "/proc/zerostep-w.pt", str(tmp_path / "f" / "w.pt")):
        (tmp_path / "f").write_text("a file where a folder should be")
        with pytest.raises(CheckpointError, match=rf"{out}: export failed"):
            export_consolidated(saved[2], out)
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_damaged_structure_bytes_of_any_opened_rank_file_are_detected(saved, tmp_path):
    from zerostep.io import PytreeReader

    root = _copy(saved, tmp_path)
    shard = root / "b" / "rank_00001.msgpack"
    with PytreeReader(shard) as reader:
        first_payload = min(off for rec in reader.records for off, _ in rec.extents)
    data = bytearray(shard.read_bytes())
    data[first_payload - 1] ^= 0x40  # the last byte of the first tensor's ext header, not its payload
    shard.write_bytes(bytes(data))
    # this load reads leaves from rank 1's file, whose payload checksums still pass
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch in the tree structure"):
        load_checkpoint(root, rank=0, world_size=1)
    assert load_checkpoint(root, rank=0, world_size=1, verify=False)[1]["step"] == 2


def _fills_up_on_latest(real):
    def write_all(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".latest-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    return write_all


def _w(root, tag):
    return load_checkpoint(root, tag)[0]["w"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failed_commit_is_undone_and_says_so(tmp_path, monkeypatch, exchange):
    from zerostep.io import native

    if not exchange:  # a filesystem without renameat2(RENAME_EXCHANGE): the tag is moved aside first
        monkeypatch.setattr(native, "exchange", lambda a, b: False)
    root = tmp_path
    _one_save(root, "a", 1)
    _one_save(root, "b", 2)
    a, b = _w(root, "a"), _w(root, "b")

    def unchanged():
        assert sorted(os.listdir(root)) == ["a", "b", "latest"]
        assert (root / "latest").read_text() == "b"
        assert torch.equal(_w(root, "a"), a) and torch.equal(_w(root, "b"), b)

    # the disk fills up while 'latest' is written: nothing was committed, a new tag or an overwrite
    real_write = writer_mod.write_all
    monkeypatch.setattr(writer_mod, "write_all", _fills_up_on_latest(real_write))
    for tag in ("c", "a"):
        with pytest.raises(
            CheckpointError, match=rf"{tag}: save failed, previous checkpoints untouched: .*space"
        ):
            save_checkpoint(root, tag, {"w": torch.zeros(10)}, meta={"step": 9})
        unchanged()
    monkeypatch.setattr(writer_mod, "write_all", real_write)
    # 'latest' cannot be replaced after the new folder took the tag's name: the previous content returns
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for tag in ("a", "c"):
        with pytest.raises(
            CheckpointError, match=rf"{tag}: save failed, previous checkpoints untouched: .*Input/output"
        ):
            save_checkpoint(root, tag, {"w": torch.zeros(10)}, meta={"step": 9})
        unchanged()
    monkeypatch.setattr(os, "replace", real_replace)
    save_checkpoint(root, "a", {"w": torch.zeros(10)}, meta={"step": 9})  # and an overwrite that works
    assert sorted(os.listdir(root)) == ["a", "b", "latest"] and not _w(root, "a").any()


def test_bad_keep_last_raises_before_anything_is_written(tmp_path):
    _one_save(tmp_path, "a")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
            save_checkpoint(tmp_path, "b", {"w": torch.zeros(2)}, keep_last=bad)
    assert sorted(os.listdir(tmp_path)) == ["a", "latest"]


def _save_id(pid, start, host=None):
    from zerostep.io import leftovers

    return f"{'0' * 16}-{host or leftovers._host()}-{pid}-{start}"


def test_leftovers_of_dead_writers_are_reported_and_removed_by_the_next_save(tmp_path, capsys):
    from zerostep.io import leftovers

    root = tmp_path
    _one_save(root, "good")
    me, parent = os.getpid(), os.getppid()
    dead = _save_id(me, leftovers.process_start(me) + 1)  # our pid, another start: a process before us
    mine = _save_id(me, leftovers.process_start(me))  # an earlier save of this very process
    live = _save_id(parent, leftovers.process_start(parent))  # a save in progress elsewhere
    remote = _save_id(1, 1, host="deadbeef")
    day_ago = time.time() - 2 * 24 * 3600

    def folder(name, files=("rank_00000.msgpack",), old=False):
        (root / name).mkdir()
        for f in files:
            (root / name / f).write_bytes(b"x" * 1000)
        if old:
            for p in [root / name / f for f in files] + [root / name]:
                os.utime(p, (day_ago, day_ago))

    stale = {
        f".tmp-doomed-{dead}": folder,
        f".tmp-x-{mine}": folder,
        f".del-old-{dead}": folder,
        f".old-good-{dead}": folder,  # the tag exists: an overwrite's previous content, no longer needed
        f".tmp-y-{'a' * 32}": lambda n: folder(n, old=True),  # an older zerostep's, untouched for days
        "killed-prune": lambda n: folder(n, ("rank_00001.msgpack", ".rank_00002.msgpack.tmp-0123456789ab")),
        f".latest-{dead}": lambda n: (root / n).write_text("x"),
    }
    kept = {
        f".tmp-live-{live}": folder,
        f".tmp-z-{remote}": folder,
        f".tmp-w-{'b' * 32}": folder,
        "notes": lambda n: folder(n, ("readme.txt",)),  # not a checkpoint's folder: never touched
        ".hidden": lambda n: (root / n).write_text("mine"),
    }
    for name, make in {**stale, **kept}.items():
        make(name)
    shutil.copytree(root / "good", root / f".old-gone-{dead}")  # a tag a crash left moved aside
    found = {x["name"]: x for x in inspect_checkpoint(root)["leftovers"]}
    assert {n for n, x in found.items() if x["stale"]} == set(stale) | {f".old-gone-{dead}"}
    assert {n for n, x in found.items() if not x["stale"]} == set(kept) - {"notes", ".hidden"}
    assert found[f".tmp-live-{live}"]["owner"] == "alive" and found[f".tmp-doomed-{dead}"]["nbytes"] == 1000
    args = argparse.ArgumentParser(prog="zerostep")
    io_cli.register(args.add_subparsers(dest="command"))
    parsed = args.parse_args(["checkpoint", "inspect", str(root)])
    assert parsed.func(parsed) == 0
    out = capsys.readouterr().out
    assert "leftovers of interrupted saves: 11" in out and "the next save removes 8" in out
    assert f".tmp-doomed-{dead}: 1000 B, its writer is dead [stale]" in out

    _one_save(root, "next", step=2)
    assert sorted(os.listdir(root)) == sorted(["good", "gone", "latest", "next", *kept])
    assert load_checkpoint(root, "gone")[1]["step"] == 1  # the moved-aside tag was put back
    assert {x["name"] for x in inspect_checkpoint(root)["leftovers"]} == set(kept) - {"notes", ".hidden"}


EXIT_DURING_ASYNC_SAVE = """
import os, sys, time, torch
import torch.distributed as dist
from zerostep.io import save_checkpoint, writer
root, how = sys.argv[1], sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
real = writer.write_all
def slow(fd, data):  # the save is still writing when the main thread ends
    time.sleep(0.2)
    if how == "full" and int(os.environ.get("RANK", "0")) == world - 1:
        raise OSError(28, "No space left on device")
    real(fd, data)
writer.write_all = slow
save_checkpoint(root, "t", {"w": torch.arange(64.0)}, flat_numel={"w": 64 * world}, async_save=True)
if how == "exit":
    sys.exit(0)
if how == "raise":
    raise KeyError("the training loop failed")
"""


def test_an_async_save_finishes_or_fails_loudly_at_interpreter_exit(tmp_path):
    from zerostep.parallel.launch import free_port

    script = tmp_path / "exit.py"
    script.write_text(EXIT_DURING_ASYNC_SAVE)
    # -> exit status; "full" returns from the script normally after its save failed
    cases = {(2, "exit"): 0, (1, "raise"): 1, (1, "full"): 1}
    procs = {}
    for world, how in cases:  # all at once: most of the time is each process importing torch
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
        procs[world, how] = [
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / f"{how}{world}"), how],
                env=dict(env, RANK=str(r)),
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]
    try:
        errs = {case: [p.communicate(timeout=120)[1] for p in ps] for case, ps in procs.items()}
    finally:
        for p in (p for ps in procs.values() for p in ps):
            p.kill()
            p.wait()
    for (world, how), code in cases.items():
        root = tmp_path / f"{how}{world}"
        assert [p.returncode for p in procs[world, how]] == [code] * world, errs[world, how]
        if how == "full":  # every rank says the save failed, and nothing was committed
            assert all("the async checkpoint save to" in e and "No space left" in e for e in errs[world, how])
            assert os.listdir(root) == []
            continue
        assert all("zerostep:" not in e for e in errs[world, how])
        for rank in range(world):
            tree, _ = load_checkpoint(root, rank=rank, world_size=world)
            assert torch.equal(tree["w"], torch.arange(64.0))


def _peer_stops_answering(rank, world_size, root):
    import torch.distributed as dist

    from zerostep.io.checkpoint import LostContact

    save_checkpoint(root, "a", rank_state(rank, world_size, 1), flat_numel=flat_leaves(), meta={"step": 1})
    if rank == 1:  # never joins the next save; meets rank 0 in the barrier once it gave up
        time.sleep(2)
        dist.barrier()
        return None
    start = time.monotonic()
    try:
        save_checkpoint(root, "b", rank_state(rank, world_size, 2), flat_numel=flat_leaves())
    except LostContact as e:  # a CheckpointError, not gloo's RuntimeError
        error = (str(e), time.monotonic() - start)
    dist.barrier()
    return error


def test_save_coordination_uses_the_process_group_timeout_and_raises_checkpoint_errors(tmp_path):
    from zerostep.io.checkpoint import LostContact

    assert issubclass(LostContact, CheckpointError)
    (message, waited), _ = spawn_ranks(
        _peer_stops_answering, 2, str(tmp_path), timeout=120, collective_timeout=4
    )
    assert 3.5 < waited < 30, waited  # the group's 4 s, not a fixed 600 s
    assert f"{tmp_path / 'b'}: save failed before anything was written" in message
    assert "did not answer within 4 s" in message
    assert sorted(os.listdir(tmp_path)) == ["a", "latest"]


def test_the_exit_hook_does_nothing_in_a_forked_child(monkeypatch):
    # A DataLoader worker forked after a save runs threading's exit hooks when it ends: it must not wait
    # for its parent's pending save nor shut down the parent's gloo groups (that aborted the worker).
    from zerostep.io import checkpoint as ckpt

    never_done = ckpt.SaveHandle("/nowhere")  # its _done event is never set
    monkeypatch.setattr(ckpt, "_pending", never_done)
    monkeypatch.setattr(ckpt, "_OWNER_PID", os.getpid() + 1)  # as seen from a forked child
    ckpt._finish_pending_save_at_exit()  # returns at once instead of waiting forever
    assert not never_done.done()
