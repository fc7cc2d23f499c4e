"""A run's checkpoints dir: the next save cleans up after interrupted saves and prunes, a corrupt old
checkpoint never blocks a save, a resume from an older checkpoint starts a clean branch, and the
`latest` pointer is checked where it is followed."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

import framework
from framework.checkpoint import CheckpointReader, CorruptCheckpointError, abandon_newer, prune, read_latest
from tests.helpers import TinyClassifier, fit_tiny, reseal


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    fit_tiny(run)  # checkpoints at steps 4 and 8
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    return run


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


class Loaded(framework.Callback):
    def __init__(self) -> None:
        self.paths: list[str] = []

    def on_checkpoint_load(self, engine, path):
        self.paths.append(Path(path).name)


def test_the_next_save_cleans_up_what_interrupted_saves_and_prunes_left(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    root = run / "checkpoints"
    (root / ".tmp-step-00000099").mkdir()  # a save killed mid-write
    (root / ".tmp-step-00000099" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(root / "step-00000004", root / ".trash-step-00000002")  # a prune killed mid-delete
    shutil.copytree(root / "step-00000004", root / "step-00000003")  # an old-style prune killed mid-rmtree
    os.remove(root / "step-00000003" / "manifest.json")
    shutil.copytree(root / "step-00000004", root / "step-00000006")  # half-deleted: a listed file gone
    os.remove(root / "step-00000006" / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_tiny(run, resume="auto", max_epochs=3)  # resumes step 8, saves step 12
    removed = [str(w.message) for w in caught if "removing incomplete checkpoint" in str(w.message)]
    assert len(removed) == 1, [str(w.message) for w in caught]
    assert "step-00000003 (no manifest.json)" in removed[0] and "step-00000006 (" in removed[0]
    assert "model.safetensors is missing" in removed[0]
    assert names(root) == ["latest", "step-00000004", "step-00000008", "step-00000012"]
    for step in (4, 8, 12):
        CheckpointReader(root / f"step-{step:08d}")  # what verified is still there and still verifies


def test_a_corrupt_old_checkpoint_never_blocks_a_save_and_keep_best_reads_only_manifests(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    root = run / "checkpoints"
    (root / "step-00000004" / "manifest.json").write_text("{ not json")  # unreadable: skipped, never deleted
    best_seen = {8: json.loads((root / "step-00000008" / "manifest.json").read_text())["monitor_value"]}

    class Garble(framework.Callback):
        """After each save, make the state.json of every older kept checkpoint garbage (manifest resealed
        to match, so it still verifies): the old pruning parsed each one for keep_best, and raised."""

        def on_validation_end(self, engine, module, metrics):
            best_seen[engine.step] = metrics["val/loss"]

        def on_checkpoint_save(self, engine, path):
            for old in root.glob("step-*"):
                if old.name not in (Path(path).name, "step-00000004"):
                    (old / "state.json").write_text("garbage, no JSON here")
                    reseal(old)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_tiny(run, resume="auto", max_epochs=5, keep_last=1, keep_best=1, callbacks=[Garble()])
    about_4 = [str(w.message) for w in caught if "step-00000004" in str(w.message)]
    assert len(about_4) == 1 and "when pruning; it is left as it is" in about_4[0], about_4  # named once, 3 saves
    best = min(best_seen, key=lambda s: best_seen[s])
    assert names(root) == sorted({"latest", "step-00000004", "step-00000020", f"step-{best:08d}"})
    assert (root / "step-00000004" / "manifest.json").read_text() == "{ not json"


def test_an_explicit_resume_from_an_older_checkpoint_starts_a_clean_branch(tmp_path, capsys):
    run = tmp_path / "run"
    fit_tiny(run, max_epochs=3)  # checkpoints 4, 8, 12
    root = run / "checkpoints"
    old_12 = CheckpointReader(root / "step-00000012").files["model.safetensors"].sha256

    # Branch at step 4; this branch stops at step 10 (a checkpoint at 8, the final one at 10).
    loaded = Loaded()
    fit_tiny(run, resume=str(root / "step-00000004"), max_epochs=3, max_steps=10, callbacks=[loaded])
    assert loaded.paths == ["step-00000004"]
    err = capsys.readouterr().err
    assert f"moved step-00000008, step-00000012 aside to {root / 'abandoned'}" in err
    assert err.count("moved ") == 1
    assert names(root / "abandoned") == ["step-00000008", "step-00000012"]
    assert CheckpointReader(root / "abandoned" / "step-00000012").files["model.safetensors"].sha256 == old_12
    assert [p for p in names(root) if p.startswith("step-")] == ["step-00000004", "step-00000008", "step-00000010"]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "stop" not in r] == [4, 8]  # (the old branch's after step 4 went; this
    assert (recs[-1]["stop"], recs[-1]["step"]) == ("max_steps", 10)  # branch ended mid-epoch 2, on max_steps)

    # "auto" continues the new branch (step 10), never the abandoned step 12.
    loaded = Loaded()
    engine, _ = fit_tiny(run, resume="auto", max_epochs=3, callbacks=[loaded])
    assert loaded.paths == ["step-00000010"] and engine.step == 12
    assert read_latest(root) == "step-00000012"
    assert CheckpointReader(root / "step-00000012").files["model.safetensors"].sha256 == old_12  # (exact resume)

    # Branching again (at step 8; keep_last=3 pruned step 4 meanwhile) keeps both abandoned timelines.
    fit_tiny(run, resume=str(root / "step-00000008"), max_epochs=2)
    assert names(root / "abandoned") == ["step-00000008", "step-00000010", "step-00000012", "step-00000012.2"]


def test_abandon_newer_returns_what_moved_and_points_latest_back(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    root = run / "checkpoints"
    assert abandon_newer(root, 8) == []
    assert abandon_newer(root, 4) == [root / "abandoned" / "step-00000008"]
    assert read_latest(root) == "step-00000004"


@pytest.mark.parametrize("content", [b"", b"../../etc\n", b"step-00000008\nstep-00000004\n", b"\xff\xfe", b"x" * 300])
def test_a_bad_latest_is_named_where_it_is_followed_and_ignored_by_auto(tmp_path, base_run, content):
    run = copy_run(base_run, tmp_path)
    root = run / "checkpoints"
    (root / "latest").write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/latest .*one line like 'step-00000120'"):
        framework.load_weights(TinyClassifier(), root / "latest")
    loaded = Loaded()
    fit_tiny(run, resume="auto", max_epochs=3, callbacks=[loaded])  # (auto reads the step-* dirs, not latest)
    assert loaded.paths == ["step-00000008"]
    assert read_latest(root) == "step-00000012"  # (rewritten by the next save)


def test_latest_is_followed_to_the_checkpoint_it_names(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    module = framework.load_weights(TinyClassifier(), run / "checkpoints" / "latest")
    saved = CheckpointReader(run / "checkpoints" / "step-00000004").tensors("model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


def test_prune_never_follows_or_removes_a_link(tmp_path, base_run):
    run = copy_run(base_run, tmp_path)
    root = run / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "step-00000004", elsewhere / "step-00000002")
    os.symlink(elsewhere / "step-00000002", root / "step-00000002")
    with pytest.warns(UserWarning, match="step-00000002 is a symbolic link: pruning leaves it"):
        removed = prune(root, keep_last=1)
    assert removed == [root / "step-00000004"]
    assert os.path.islink(root / "step-00000002") and (elsewhere / "step-00000002" / "manifest.json").is_file()


@pytest.fixture
def fast_disk(tmp_path):
    """A private tmpfs where the system allows one (saves then take milliseconds, so the reader races many
    prunes), else plain tmp_path."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True)
    try:
        yield disk
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_reader_polling_a_run_dir_never_loses_to_pruning(fast_disk, tmp_path):
    """A real run publishes a checkpoint every step with keep_last=1 (each prune deletes the checkpoint a
    reader may be verifying); load_weights(run_dir) polled meanwhile, hundreds of times, never fails: a
    reader that loses the race reads the newest complete checkpoint instead."""
    import signal

    from tests.helpers import ROOT
    from tests.procs import Run, script_cmd
    from tests.scripts.keep_last_run import Wide

    run_dir = fast_disk / "run"
    latest = run_dir / "checkpoints" / "latest"
    polls, overlapped, failures = 0, 0, []
    with Run(script_cmd(ROOT / "tests/scripts/keep_last_run.py", run_dir, 100_000, ddp=False), run_dir,
             tmp_path / "train.log") as run:  # fmt: skip
        run.wait_until(latest.exists, 120, "the first checkpoint")
        deadline = time.monotonic() + 120
        while polls < 600 and time.monotonic() < deadline:
            newest = latest.read_text().strip()
            try:
                framework.load_weights(Wide(), run_dir)
            except Exception as e:  # (any failure counts)
                failures.append(f"{type(e).__name__}: {e}")
            polls += 1
            overlapped += not (run_dir / "checkpoints" / newest).exists()  # (pruned while this poll read)
            assert run.proc.poll() is None, run.output()[-3000:]
        os.kill(run.proc.pid, signal.SIGTERM)  # (a preemption: it checkpoints and exits 143)
        assert run.wait(60) == 143, run.output()[-3000:]
    assert failures == [], f"{len(failures)} of {polls} polls failed ({overlapped} raced a prune): {failures[:3]}"
    assert polls >= 600, f"only {polls} polls in 120 s"
    print(f"{polls} polls, {overlapped} of them raced a prune, no failure")
