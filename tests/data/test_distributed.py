"""The data pipeline across processes: a resumed run after kill -9 is bitwise the uninterrupted one
with the prefetch thread and with worker processes; and 2 processes match 1 within 1e-5 with random
augmentation (global RNG, item_generator, workers, a stream) and drop_last; data drawing from the
global RNG on one rank only is warned about once."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, launch
from tests.scripts.data_common import fit, flat
from tests.scripts.data_ddp import CASES
from tests.scripts.data_run import save, train

SCRIPT = ROOT / "tests" / "scripts" / "data_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text()
    except FileNotFoundError:
        return None


def _kill_9_after_a_new_checkpoint(cmd: list[str], run_dir: Path, rng: random.Random) -> None:
    """Start the run, wait for a checkpoint newer than the one it resumes from, then SIGKILL its whole
    session (the training process and its workers, as a node failure would) a random moment later."""
    first = _latest(run_dir)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while _latest(run_dir) == first:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # mid-step, mid-epoch, mid-save, with windows prefetched
        assert proc.poll() is None, "the run finished before the kill"
        os.killpg(proc.pid, 9)
    finally:
        proc.wait(timeout=30)


def test_resume_after_kill_9_is_bitwise_exact_with_workers_and_the_prefetch_thread(tmp_path):
    """Random augmentation, dropout, AdamW. Killed while 2 worker processes fetch ahead, resumed with
    the prefetch thread and killed again, finished with the workers: the same bits as one
    uninterrupted run (the data's randomness is the item's, so the mechanism may change on resume)."""
    engine, model = train(str(tmp_path / "straight"), "generator", workers=0, prefetch=2)
    assert engine._fit.source.stage == "thread"
    save(engine, model, str(tmp_path / "straight.pt"))
    run_dir, out = tmp_path / "killed", tmp_path / "killed.pt"
    cmd = [sys.executable, str(SCRIPT), str(run_dir), str(out), "--kind", "generator", "--sleep", "0.05"]
    rng = random.Random(0)
    _kill_9_after_a_new_checkpoint([*cmd, "--workers", "2"], run_dir, rng)
    _kill_9_after_a_new_checkpoint([*cmd, "--workers", "0"], run_dir, rng)
    proc = subprocess.run([*cmd[:-2], "--workers", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(out)
    assert a["step"] == b["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optim"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optim"]["state"][i][k]), (i, k)


@pytest.mark.multiprocess
def test_two_processes_match_one_with_random_augmentation_and_drop_last(tmp_path):
    proc = launch(ROOT / "tests" / "scripts" / "data_ddp.py", str(tmp_path), timeout=300)
    for name, (data, kw) in CASES.items():
        if name == "rank1_only":
            continue  # (its randomness depends on the rank by design)
        engine, module = fit(data(), **kw)
        two = torch.load(tmp_path / f"{name}.pt")
        assert two["step"] == engine.step, name
        diff = (two["params"] - flat(module)).abs().max().item()
        assert diff <= 1e-5, f"{name}: 2 processes differ from 1 by {diff}"
    assert torch.load(tmp_path / "drop_last.pt")["step"] == 2 * 7  # 250 items: 7 full batches of 32 per epoch
    # Data that draws from the global RNG on rank 1 only: one warning, naming the rank.
    warned = [line for line in proc.stderr.splitlines() if "draws from the global torch RNG on rank(s) [1]" in line]
    assert len(warned) == 1, proc.stderr[-4000:]
