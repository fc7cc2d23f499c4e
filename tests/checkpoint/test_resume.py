"""Checkpoints: bitwise-exact resume after SIGKILL/SIGTERM, atomic saves, safe loading, pruning."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import framework
from framework import Engine
from framework.checkpoint import CheckpointError, CheckpointReader, list_checkpoints, newest_complete
from tests.helpers import ACCELERATE, ROOT, TinyClassifier, classification_data, reseal

SCRIPT = ROOT / "tests" / "scripts" / "ckpt_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(run_dir: Path, out: Path, *extra: str, ddp: bool = False) -> list[str]:
    args = [str(SCRIPT), str(run_dir), str(out), *extra]
    if ddp:
        return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), *args]
    return [sys.executable, *args]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text()
    except FileNotFoundError:
        return None


def _kill_after_new_checkpoint(cmd: list[str], run_dir: Path, rng: random.Random, timeout: float = 120) -> bool:
    """Start the run, wait for a new checkpoint, SIGKILL it a random moment later. False if it finished first."""
    before = _latest(run_dir)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while _latest(run_dir) == before:
            if proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere mid-step, mid-epoch, or mid-save
        finished = proc.poll() is not None
        _kill_tree(proc.pid)
        return not finished
    finally:
        proc.wait(timeout=30)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant. torchrun starts its workers in sessions of their
    own, so killing the launcher's process group would leave orphaned ranks writing checkpoints."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _assert_bitwise(a_path: Path, b_path: Path) -> None:
    a, b = torch.load(a_path), torch.load(b_path)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("ddp", [False, pytest.param(True, marks=pytest.mark.multiprocess)])
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, ddp):
    """Dropout, shuffling, AdamW and a cosine schedule; killed several times; torch.equal at the end."""
    straight = tmp_path / "straight.pt"
    _run(_cmd(tmp_path / "straight", straight, ddp=ddp))
    run_dir, out = tmp_path / "killed", tmp_path / "killed.pt"
    cmd = _cmd(run_dir, out, "--sleep", "0.04", ddp=ddp)
    rng = random.Random(1234)
    kills = sum(_kill_after_new_checkpoint(cmd, run_dir, rng) for _ in range(3 if not ddp else 2))
    assert kills >= 1
    _run(cmd)
    _assert_bitwise(straight, out)


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight.pt"
    _run(_cmd(tmp_path / "straight", straight, "--every", "1000"))
    run_dir, out = tmp_path / "term", tmp_path / "term.pt"
    # Checkpoints only at epoch ends, so the one SIGTERM writes is mid-epoch.
    cmd = _cmd(run_dir, out, "--every", "1000", "--sleep", "0.05")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while _latest(run_dir) is None:  # the first epoch-end checkpoint: training is under way
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 20  # "within a few seconds", with slack for a loaded CI machine
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"checkpoint saved to {run_dir / 'checkpoints' / saved}" in err
    state = json.loads((run_dir / "checkpoints" / saved / "state.json").read_text())
    assert state["state"]["counters"]["batch_in_epoch"] not in (0, 19), "the SIGTERM checkpoint should be mid-epoch"
    _run(cmd)
    _assert_bitwise(straight, out)


KILL_SCRIPT = ROOT / "tests" / "scripts" / "ckpt_kill.py"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, mode):
    """A real SIGKILL while step 2 is being written (by the training thread, or the background one):
    step 1 is still the newest complete checkpoint, it verifies, and the run resumes from it."""
    run_dir, extra = tmp_path / "run", ["--async"] if mode == "async" else []
    root = run_dir / "checkpoints"
    cmd = [sys.executable, str(KILL_SCRIPT), str(run_dir), *extra]
    proc = subprocess.run([*cmd, "--kill"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (root / ".tmp-step-00000002").is_dir(), "the kill should have landed mid-save"
    assert [f.path.name for f in list_checkpoints(root)] == ["step-00000001"]
    newest = newest_complete(root)
    assert newest is not None and newest.name == "step-00000001"
    CheckpointReader(newest)  # every file's SHA-256 matches its manifest
    proc = _run(cmd, timeout=120)
    assert "resumed from step-00000001" in proc.stdout
    assert not list(root.glob(".tmp-*")), "the next save removes the killed save's staging dir"
    assert [f.path.name for f in list_checkpoints(root)] == ["step-00000002", "step-00000003", "step-00000004"]
    for f in list_checkpoints(root):
        CheckpointReader(f.path)


class TinyCkptNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 3)
        )


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/framework_pickle_marker_should_not_exist"


def _fit(run_dir: Path, **kw) -> tuple[Engine, TinyClassifier]:
    torch.manual_seed(0)
    x, y = classification_data(200)
    module = TinyClassifier()
    args = dict(max_epochs=2, batch_size=32, run_dir=str(run_dir), progress=False)
    args.update(kw)
    engine = Engine(**args)
    engine.fit(module, (x, y), (x[:50], y[:50]))
    return engine, module


@pytest.mark.parametrize("victim", ["model.safetensors", "state.safetensors", "rng-rank0.safetensors", "state.json"])
def test_planted_pickle_is_never_executed(tmp_path, victim):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    _fit(tmp_path / "run", max_epochs=1)
    ckpt = newest_complete(tmp_path / "run" / "checkpoints")
    payload = pickle.dumps(_Evil())
    (ckpt / victim).write_bytes(payload)
    reseal(ckpt)  # a careful attacker fixes the manifest and SHA256SUMS too
    with pytest.raises(CheckpointError, match="corrupt"):
        _fit(tmp_path / "run", max_epochs=2, resume=str(ckpt))
    if victim == "model.safetensors":
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            framework.load_weights(TinyClassifier(), ckpt)
    assert not os.path.exists(MARKER)


def test_keep_last_and_keep_best_pruning(tmp_path):
    torch.manual_seed(0)
    x, y = classification_data(200)
    module = TinyClassifier()
    engine = Engine(max_epochs=6, batch_size=50, run_dir=str(tmp_path), keep_last=2, keep_best=1, progress=False)
    vals = []

    class Record(framework.Callback):
        def on_validation_end(self, engine, module, metrics):
            vals.append((engine.step, metrics["val/loss"]))

    engine.callbacks.append(Record())
    engine.fit(module, (x, y), (x[:50], y[:50]))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    best_step = min(vals, key=lambda sv: sv[1])[0]
    expected = {f"step-{s:08d}" for s in (20, 24)} | {f"step-{best_step:08d}"}
    assert set(names) == expected
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000024"


def test_resume_errors_are_clear_and_never_a_silent_fresh_start(tmp_path):
    _fit(tmp_path / "run", max_epochs=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        _fit(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoints" / "step-99999999"))
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 32 vs now 64"):
        _fit(tmp_path / "run", resume="auto", batch_size=64)
    with pytest.raises(CheckpointError, match="seed: checkpoint 0 vs now 1"):
        _fit(tmp_path / "run", resume="auto", seed=1)
    # "auto" with nothing to resume starts fresh.
    engine, _ = _fit(tmp_path / "fresh", resume="auto", max_epochs=1)
    assert engine.step == 7


def test_resume_may_switch_the_optimizer_kernel_but_not_its_settings(tmp_path):
    # fused/foreach say how the step is computed, not what (the recipes use fused=True on a GPU):
    # a run checkpointed with one kernel resumes with another; a changed lr is still an error.
    class Fusable(TinyClassifier):
        def __init__(self, fused: bool | None, lr: float = 1e-2) -> None:
            super().__init__()
            self.fused, self.lr = fused, lr

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)

    x, y = classification_data(200)
    kw = dict(batch_size=32, run_dir=str(tmp_path), progress=False)
    Engine(max_epochs=1, **kw).fit(Fusable(None), (x, y))
    with pytest.raises(CheckpointError, match=r"optimizers: checkpoint .*'lr': 0.01.* vs now .*'lr': 0.02"):
        Engine(max_epochs=2, resume="auto", **kw).fit(Fusable(True, lr=2e-2), (x, y))
    engine = Engine(max_epochs=2, resume="auto", **kw)
    engine.fit(Fusable(True), (x, y))
    assert engine.step == 14


def test_auto_skips_incomplete_checkpoint_with_a_warning(tmp_path):
    _fit(tmp_path / "run", max_epochs=1)
    root = tmp_path / "run" / "checkpoints"
    broken = root / "step-00000099"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(
        UserWarning, match=r"skipping checkpoint.*step-00000099 \(.*no manifest\.json.*Using the older step-00000007"
    ):
        engine, _ = _fit(tmp_path / "run", resume="auto", max_epochs=2)
    assert engine.step == 14


def test_resume_continues_exactly_in_process(tmp_path):
    straight, m1 = _fit(tmp_path / "a", max_epochs=3, checkpoint_every_n_steps=5)
    _fit(tmp_path / "b", max_epochs=3, max_steps=12, checkpoint_every_n_steps=5)
    resumed, m2 = _fit(tmp_path / "b", max_epochs=3, checkpoint_every_n_steps=5, resume="auto")
    assert resumed.step == straight.step == 21
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_dataloader_input_resumes_exactly(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    def run(run_dir, **kw):
        torch.manual_seed(0)
        x, y = classification_data(200)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        module = TinyClassifier(dropout=0.2)
        engine = Engine(max_epochs=3, run_dir=str(run_dir), progress=False, checkpoint_every_n_steps=4, **kw)
        engine.fit(module, loader)
        return module

    m1 = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=18)  # stops mid-epoch 1 (13 batches per epoch)
    m2 = run(tmp_path / "b", resume="auto")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_save_checkpoint_and_load_weights(tmp_path):
    engine, module = _fit(tmp_path / "run", max_epochs=1)
    path = engine.save_checkpoint(tmp_path / "export" / "final")
    fresh = TinyClassifier()
    framework.load_weights(fresh, path)
    for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh2 = TinyClassifier()
    framework.load_weights(fresh2, tmp_path / "run")  # a run dir: its newest checkpoint
    for a, b in zip(module.parameters(), fresh2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tied_weights_round_trip(tmp_path):
    class Tied(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(3, 3, bias=False)
            self.head = torch.nn.Linear(3, 3, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, inputs):
            return self.head(self.emb(self.net(inputs)))

    torch.manual_seed(0)
    x, y = classification_data(100)
    module = Tied()
    engine = Engine(max_epochs=1, batch_size=50, run_dir=str(tmp_path), progress=False)
    engine.fit(module, (x, y))
    fresh = Tied()
    framework.load_weights(fresh, tmp_path)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.head.weight, module.head.weight)


@pytest.mark.multiprocess
def test_elastic_resume_two_processes_to_one(tmp_path):
    """A 2-process run without dropout, stopped mid-run and resumed on 1 process, ends within 1e-5."""
    straight = tmp_path / "straight.pt"
    _run(_cmd(tmp_path / "straight", straight, "--no-dropout", "--micro", "8", ddp=True))
    run_dir, out = tmp_path / "elastic", tmp_path / "elastic.pt"
    cmd2 = _cmd(run_dir, out, "--no-dropout", "--micro", "8", "--sleep", "0.04", ddp=True)
    assert _kill_after_new_checkpoint(cmd2, run_dir, random.Random(7))
    proc = _run(_cmd(run_dir, out, "--no-dropout", "--micro", "8"))
    assert proc.stderr.count("per-rank RNG streams") == 1
    a, b = torch.load(straight), torch.load(out)
    assert a["step"] == b["step"]
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff <= 1e-5


@pytest.mark.multiprocess
def test_a_checkpoint_one_rank_refuses_is_skipped_by_every_rank(tmp_path):
    """rng-rank1.json of the newest checkpoint is malformed (resealed): only rank 1 reads it. Under
    resume="auto" the ranks agree (one all-reduce) that it cannot be used, and every rank resumes the older
    one: the run then ends bitwise equal to one never interrupted."""
    straight, out = tmp_path / "straight.pt", tmp_path / "o.pt"
    _run(_cmd(tmp_path / "straight", straight, "--epochs", "2", ddp=True))
    run_dir = tmp_path / "run"
    _run(_cmd(run_dir, out, "--epochs", "1", ddp=True))
    newest = newest_complete(run_dir / "checkpoints")
    assert newest is not None
    older = list_checkpoints(run_dir / "checkpoints")[-2].path.name
    rng = json.loads((newest / "rng-rank1.json").read_text())
    rng["numpy"][1] = 9999
    (newest / "rng-rank1.json").write_text(json.dumps(rng))
    reseal(newest)
    proc = _run(_cmd(run_dir, out, "--epochs", "2", ddp=True))
    skips = [line for line in proc.stderr.splitlines() if "fail verification" in line]
    assert len(skips) == 2 and all(f"Using the older {older}" in line for line in skips), proc.stderr[-4000:]
    assert sum("rng-rank1.json: numpy[1]" in line for line in skips) == 1  # rank 1 names the file
    assert sum("rank(s) [1] could not use this checkpoint" in line for line in skips) == 1  # rank 0 names rank 1
    a, b = torch.load(straight), torch.load(out)
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
