"""The file layer of checkpoints: no write through a planted symlink, SHA-256 in the manifest and in
a SHA256SUMS that coreutils accepts, the writer's per-rank records, the reader's verification, and a
full disk (a real 2 MB tmpfs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import framework
from framework.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    CorruptCheckpointError,
    newest_complete,
    publish,
)
from framework.checkpoint.files import SymlinkError
from tests.helpers import TinyClassifier, fit_tiny

VICTIM_TEXT = "another run's file: must stay exactly as it is\n"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished run with checkpoints at steps 4 and 8 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("base") / "run"
    fit_tiny(run)
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    return run


# ---------------------------------------------------------------- planted symlinks


def _plant_file(link: Path, victim: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, link)


# (what to plant, relative to the run dir; is the victim a dir; does the run start from the base run; Engine kwargs)
PLANTS = [
    (".lock", False, False, {}),
    ("config.json", False, False, {}),
    ("metrics.jsonl", False, True, {"resume": "auto", "max_epochs": 3}),
    ("metrics.jsonl.tmp", False, True, {"resume": "auto", "max_epochs": 3}),
    ("checkpoints/latest", False, True, {"resume": "auto", "max_epochs": 3}),
    ("checkpoints/.latest.tmp", False, True, {"resume": "auto", "max_epochs": 3}),
    ("checkpoints/.tmp-step-00000012", True, True, {"resume": "auto", "max_epochs": 3}),
    ("checkpoints/step-00000012", True, True, {"resume": "auto", "max_epochs": 3}),
    ("checkpoints", True, False, {}),
    ("checkpoints/abandoned", True, True, {"resume": "<step 4>"}),
]


@pytest.mark.parametrize(("planted", "victim_is_dir", "from_base", "kw"), PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_symlink_is_never_written_through(tmp_path, base_run, planted, victim_is_dir, from_base, kw):
    victim = tmp_path / "victim"
    if victim_is_dir:
        victim.mkdir()
        (victim / "keep.txt").write_text(VICTIM_TEXT)
    else:
        victim.write_text(VICTIM_TEXT)
    run = copy_run(base_run, tmp_path) if from_base else tmp_path / "run"
    link = run / planted
    if link.exists():
        (shutil.rmtree if link.is_dir() else os.remove)(link)
    _plant_file(link, victim)
    if kw.get("resume") == "<step 4>":
        kw = {**kw, "resume": str(run / "checkpoints" / "step-00000004")}
    with pytest.raises(SymlinkError) as info:
        fit_tiny(run, **kw)
    message = str(info.value)
    assert f"{link} is a symbolic link" in message and "Fix: remove the link" in message, message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ELOOP
    if victim_is_dir:
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        assert (victim / "keep.txt").read_text() == VICTIM_TEXT
    else:
        assert victim.read_text() == VICTIM_TEXT
    assert os.path.islink(link)  # (refused, not replaced)


def test_a_symlink_planted_inside_the_staging_dir_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text(VICTIM_TEXT)
    writer = CheckpointWriter(tmp_path / "checkpoints", "step-00000001")
    writer.prepare()
    os.symlink(victim, writer.staging / "model.safetensors")
    os.symlink(victim, writer.staging / "state.json")
    with pytest.raises(SymlinkError, match=r"model\.safetensors is a symbolic link"):
        writer.tensors("model.safetensors", {"w": torch.ones(3)})
    with pytest.raises(SymlinkError, match=r"state\.json is a symbolic link"):
        writer.json("state.json", {"step": 1})
    assert victim.read_text() == VICTIM_TEXT


def test_a_planted_fifo_fails_at_once_instead_of_hanging(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    with pytest.raises(SymlinkError, match="not a regular file"):
        fit_tiny(run)


# ---------------------------------------------------------------- integrity


def test_the_manifest_lists_every_file_with_size_and_sha256_and_the_monitored_value(base_run):
    ckpt = base_run / "checkpoints" / "step-00000008"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest) == {"format", "files", "monitor_value"} and manifest["format"] == 2
    on_disk = {p.name for p in ckpt.iterdir()} - {"manifest.json", "SHA256SUMS"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = json.loads((ckpt / "state.json").read_text())
    assert manifest["monitor_value"] == state["monitor_value"] == state["state"]["metrics"]["val/loss"]


def test_sha256sum_accepts_sha256sums_and_catches_a_flipped_bit(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    ckpt = run / "checkpoints" / "step-00000008"
    sha256sum = shutil.which("sha256sum")
    assert sha256sum is not None, "coreutils' sha256sum is needed for this test"
    ok = subprocess.run([sha256sum, "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK") == len(list(ckpt.iterdir())) - 1  # every file, the manifest too
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    bad = subprocess.run([sha256sum, "-c", "SHA256SUMS"], cwd=ckpt, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "model.safetensors: FAILED" in bad.stdout


def test_the_reader_verifies_up_front_and_again_if_a_file_changes_after(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    ckpt = run / "checkpoints" / "step-00000008"
    reader = CheckpointReader(ckpt)
    assert reader.has("state.json") and not reader.has("ema.safetensors")
    assert set(reader.files) == {p.name for p in ckpt.iterdir()} - {"manifest.json", "SHA256SUMS"}
    assert reader.json("state.json")["state"]["counters"]["step"] == 8
    weights = reader.tensors("model.safetensors")
    assert set(weights) == set(TinyClassifier().state_dict())
    # Same size, other bytes, after the reader verified: it hashes again and refuses.
    text = (ckpt / "state.json").read_text().replace('"step": 8', '"step": 9')
    (ckpt / "state.json").write_text(text)
    with pytest.raises(CorruptCheckpointError, match=r"state\.json: its SHA-256 does not match"):
        reader.json("state.json")


# ---------------------------------------------------------------- the writer, across ranks


def test_two_ranks_write_one_checkpoint_without_a_collective(tmp_path):
    root = tmp_path / "checkpoints"
    main = CheckpointWriter(root, "step-00000001", rank=0, world_size=2, is_main=True, timeout=30)
    other = CheckpointWriter(root, "step-00000001", rank=1, world_size=2, is_main=False, timeout=30)
    main.prepare()
    other.prepare()  # (nothing on a non-main rank)

    def rank1() -> None:
        time.sleep(0.3)  # late: finalize waits for its record
        other.json("rng-rank1.json", {"r": 1})
        (other.staging / "__1_0.distcp").write_bytes(b"shard of rank 1")  # (as DCP would write it)
        other.external("__1_0.distcp")
        other.commit()

    t = threading.Thread(target=rank1)
    t.start()
    main.tensors("model.safetensors", {"w": torch.arange(4.0)})
    main.json("rng-rank0.json", {"r": 0})
    main.commit()
    path = publish(main, keep_last=3)
    t.join()
    reader = CheckpointReader(path)
    assert set(reader.files) == {"model.safetensors", "rng-rank0.json", "rng-rank1.json", "__1_0.distcp"}
    assert reader.files["__1_0.distcp"].sha256 == hashlib.sha256(b"shard of rank 1").hexdigest()
    assert not [p for p in path.iterdir() if p.name.startswith(".writer")]  # (bookkeeping removed)
    assert (root / "latest").read_text() == "step-00000001\n"


def test_finalize_waits_a_bounded_time_and_names_the_missing_rank(tmp_path):
    root = tmp_path / "checkpoints"
    main = CheckpointWriter(root, "step-00000001", rank=0, world_size=3, is_main=True, timeout=0.3)
    main.prepare()
    main.commit()
    CheckpointWriter(root, "step-00000001", rank=2, world_size=3, is_main=False).commit()
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1\] did not finish writing within 0.3 s"):
        main.finalize()
    assert not (root / "step-00000001").exists()


def test_a_rank_that_fails_stops_the_main_process_waiting(tmp_path):
    root = tmp_path / "checkpoints"
    main = CheckpointWriter(root, "step-00000001", rank=0, world_size=2, is_main=True, timeout=60)
    main.prepare()
    main.commit()
    CheckpointWriter(root, "step-00000001", rank=1, world_size=2, is_main=False).abort("OSError: disk full")
    t = time.monotonic()
    with pytest.raises(CheckpointError, match="rank 1 failed to write its part of checkpoint step-00000001: OSError"):
        main.finalize()
    assert time.monotonic() - t < 10


def test_the_writer_refuses_bad_names_and_unrecorded_files(tmp_path):
    root = tmp_path / "checkpoints"
    writer = CheckpointWriter(root, "step-00000001")
    writer.prepare()
    for bad in ("../x", "a/b", "..", ".", "manifest.json", "SHA256SUMS", ".writer-rank0.json", ""):
        with pytest.raises(ValueError):
            writer.json(bad, {})
    for bad_dir in ("../up", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            CheckpointWriter(root, bad_dir)
    (writer.staging / "stray.bin").write_bytes(b"?")
    writer.commit()
    with pytest.raises(CheckpointError, match=r"\['stray.bin'\] were written .* but no rank recorded them"):
        writer.finalize()


def test_re_saving_a_name_replaces_it_whole(tmp_path):
    root = tmp_path / "exports"
    for value in (1.0, 2.0):
        w = CheckpointWriter(root, "final")
        w.prepare()
        w.tensors("model.safetensors", {"w": torch.full((3,), value)})
        w.commit()
        publish(w)
    assert torch.equal(CheckpointReader(root / "final").tensors("model.safetensors")["w"], torch.full((3,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["final", "latest"]


# ---------------------------------------------------------------- a full disk (a real tmpfs)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _save(writer, value: float, n: int) -> None:
    writer.prepare()
    writer.tensors("model.safetensors", {"w": torch.full((n,), value)})
    writer.json("state.json", {"value": value})
    writer.commit()
    publish(writer, keep_last=2)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(small_disk):
    root = small_disk / "checkpoints"
    _save(CheckpointWriter(root, "step-00000001"), 1.0, 1000)
    with pytest.raises(OSError) as info:
        _save(CheckpointWriter(root, "step-00000002"), 2.0, 1_000_000)  # 4 MB on a 2 MB disk
    assert info.value.errno == errno.ENOSPC
    newest = newest_complete(root)
    assert newest is not None and newest.name == "step-00000001"
    assert CheckpointReader(newest).json("state.json") == {"value": 1.0}
    _save(CheckpointWriter(root, "step-00000003"), 3.0, 1000)  # the next save clears the failed one's staging
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000003"]


@pytest.mark.parametrize("raised_at", ["wait", "next save"])
def test_a_background_write_that_fails_raises_at_the_next_wait_or_save(small_disk, raised_at):
    root = small_disk / "checkpoints"
    saver = AsyncCheckpointer()
    _save(saver.writer(root, "step-00000001"), 1.0, 1000)
    assert saver.wait() == root / "step-00000001"
    _save(saver.writer(root, "step-00000002"), 2.0, 1_000_000)  # returns at once; fails in the background
    with pytest.raises(CheckpointError, match="background write of checkpoint step-00000002 failed") as info:
        saver.wait() if raised_at == "wait" else saver.writer(root, "step-00000003")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert saver.wait() is None  # (raised once)
    assert CheckpointReader(root / "step-00000001").json("state.json") == {"value": 1.0}
    _save(saver.writer(root, "step-00000003"), 3.0, 1000)
    saver.wait()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000003"]


def test_load_weights_reads_a_verified_checkpoint(base_run):
    module = TinyClassifier()
    framework.load_weights(module, base_run / "checkpoints" / "step-00000008")
    saved = CheckpointReader(base_run / "checkpoints" / "step-00000008").tensors("model.safetensors")
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved[k])


# ---------------------------------------------------------------- a full disk: room made, or the space named


@pytest.fixture
def disk(tmp_path, request):
    """A real tmpfs of ``request.param`` (e.g. "6m")."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _wide_fit(run_dir: Path, module=None, **kw):
    """tests/scripts/keep_last_run.py's model: a checkpoint of about 1.6 MB (weights and AdamW's moments)."""
    from framework import Engine
    from tests.scripts.keep_last_run import Wide

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 128, generator=g)
    module = module if module is not None else Wide()
    args = dict(batch_size=16, checkpoint_every_n_steps=1, run_dir=str(run_dir), progress=False, doctor="off")
    Engine(**{**args, **kw}).fit(module, (x, x.flip(-1)))
    return module


@pytest.mark.parametrize("disk", ["6m"], indirect=True)
@pytest.mark.parametrize("background", [False, True], ids=["sync", "checkpoint_async"])
def test_a_run_whose_disk_holds_three_checkpoints_continues_with_keep_last_1(disk, tmp_path, background):
    """3 checkpoints of 1.6 MB fill a 6 MB disk; resumed with keep_last=1, the next save would need a whole
    checkpoint of space before its prune. The checkpoints beyond keep_last go first, and the run goes on,
    bitwise equal to one that never ran out of space."""
    run = disk / "run"
    _wide_fit(run, max_steps=3, keep_last=3, checkpoint_async=background)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [f"step-0000000{i}" for i in (1, 2, 3)]
    assert shutil.disk_usage(disk).free < 1_600_000  # (too little for one more)
    with pytest.warns(UserWarning, match=r"too little for the next checkpoint: removing step-00000001, step-00000002"):
        resumed = _wide_fit(run, max_steps=6, keep_last=1, resume="auto", checkpoint_async=background)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000006"]
    straight = _wide_fit(tmp_path / "straight", max_steps=6)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True))
    framework.load_weights(straight, run)  # (verified, and the same weights)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True))


@pytest.mark.parametrize("disk", ["2500k"], indirect=True)
def test_a_disk_too_small_for_one_more_checkpoint_stops_naming_the_space_needed_and_free(disk):
    from framework.checkpoint.files import DiskFullError

    run = disk / "run"
    with pytest.raises(DiskFullError) as info:
        _wide_fit(run, max_steps=4, keep_last=1)
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and info.value.errno == errno.ENOSPC
    assert "no space left for checkpoint step-00000002: it needs about 1.6 MB" in message, message
    assert "MB are free on the disk holding" in message and "lower keep_last" in message, message
    # Nothing corrupt: the previous checkpoint verifies, and resume="auto" would take it.
    assert newest_complete(run / "checkpoints") == run / "checkpoints" / "step-00000001"
    assert CheckpointReader(run / "checkpoints" / "step-00000001").json("state.json")["state"]["counters"]["step"] == 1


@pytest.mark.parametrize("disk", ["3m"], indirect=True)
def test_a_write_that_runs_out_of_space_makes_room_and_is_retried_once(disk):
    """The writer's own retry, without the check before the save: ENOSPC, the checkpoints beyond keep_last
    removed, the same file written again."""
    import functools
    import warnings

    from framework.checkpoint import store

    root = disk / "checkpoints"
    for step in (1, 2):
        _save_kept(CheckpointWriter(root, f"step-0000000{step}"), float(step), 250_000)  # 1 MB each, all kept
    writer = CheckpointWriter(root, "step-00000003")
    writer.room = functools.partial(store.make_room, root, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _save(writer, 3.0, 300_000)  # 1.2 MB: fits only once step 1 is gone (publish keeps 2)
    assert any("removing step-00000001 (beyond keep_last=1)" in str(w.message) for w in caught)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert torch.equal(CheckpointReader(root / "step-00000003").tensors("model.safetensors")["w"],
                       torch.full((300_000,), 3.0))  # fmt: skip


def _save_kept(writer, value: float, n: int) -> None:
    writer.prepare()
    writer.tensors("model.safetensors", {"w": torch.full((n,), value)})
    writer.commit()
    publish(writer, keep_last=None)
