"""framework/observability/metrics.py and its wiring in the engine: metrics.jsonl, trackers, progress, summary,
rank-0-only output, and no host reads outside log steps.

Real engines on a tiny model; the progress tests look at what a real terminal
(a pseudo-terminal) or a pipe receives.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

import pytest
import torch
from torch import nn

from framework import Callback, EarlyStopping, Engine
from framework.observability.metrics import MetricsLog, tracker_config
from framework.observability.progress import Progress
from tests.helpers import ROOT, CrashAt, TinyClassifier, classification_data, launch

SCRIPTS = ROOT / "tests" / "scripts"
PROGRESS_LINE = re.compile(r"^epoch \d+ step (\d+): loss=\S+ lr=\S+ items/s=\S+$")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def fit(**kw) -> tuple[Engine, TinyClassifier]:
    """2 epochs x 7 steps (200 items, batch 32), validation on 64 items."""
    x, y = classification_data(200)
    kw.setdefault("progress", False)
    kw.setdefault("max_epochs", 2)
    torch.manual_seed(0)
    module = TinyClassifier()
    engine = Engine(batch_size=32, seed=0, **kw)
    engine.fit(module, (x, y), (x[:64], y[:64]))
    return engine, module


# ---------------------------------------------------------------- metrics.jsonl


def test_metrics_jsonl_has_train_and_epoch_records_with_sane_values(tmp_path):
    engine, module = fit(run_dir=str(tmp_path), log_every_n_steps=3)
    recs = records(tmp_path)
    train = [r for r in recs if "train/loss" in r]
    epochs = [r for r in recs if "epoch_time" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 12]  # every log_every_n_steps, across epochs
    assert [(r["step"], r["epoch"]) for r in epochs] == [(7, 0), (14, 1)]
    # The last record says why the run stopped; every record carries the wall clock it was written at.
    assert recs[-1] == {**recs[-1], "step": 14, "epoch": 2, "stop": "max_epochs", "stop_reason": "max_epochs=2 reached"}
    assert len(recs) == len(train) + len(epochs) + 1
    stamps = [r.pop("time") for r in recs]
    assert stamps == sorted(stamps) and all(abs(t - time.time()) < 600 for t in stamps)
    for r in train:
        assert set(r) >= {"step", "epoch", "train/loss", "lr", "train/items_per_sec", "train/grad_norm"}
        assert 0 < r["train/loss"] < 5 and r["lr"] == pytest.approx(1e-3)
        assert r["train/items_per_sec"] > 0 and math.isfinite(r["train/items_per_sec"])
        assert r["train/grad_norm"] > 0 and math.isfinite(r["train/grad_norm"])
    for r in epochs:
        assert r["epoch_time"] > 0
        assert set(r) == {"step", "epoch", "epoch_time", "val/loss", "val/acc"}
        assert 0 < r["val/loss"] < 5 and 0 <= r["val/acc"] <= 1
    # The last epoch record is the final model's exact validation.
    x, y = classification_data(200)
    assert epochs[-1]["val/loss"] == pytest.approx(engine.validate(module, (x[:64], y[:64]))["loss"], rel=1e-6)


def test_grad_norm_is_the_norm_of_the_logged_steps_gradient(tmp_path):
    """train/grad_norm is the pre-clip global norm of that very step's gradient."""

    class Grabber(Callback):
        def __init__(self):
            self.norms: dict[int, float] = {}

        def on_step_end(self, engine, module, metrics):
            if metrics:  # read .grad here: after the step, before the next zero_grad
                g = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
                self.norms[engine.step] = float(g.norm())

    grab = Grabber()
    fit(run_dir=str(tmp_path), log_every_n_steps=2, clip_grad_norm=0.05, callbacks=[grab])
    train = [r for r in records(tmp_path) if "train/loss" in r]
    for r in train:
        assert r["train/grad_norm"] > 0.05  # pre-clip: larger than the clipped gradient
        assert grab.norms[r["step"]] == pytest.approx(0.05, rel=1e-4)  # which was clipped to 0.05


def test_items_per_sec_and_epoch_time_leave_validation_out(monkeypatch):
    """A fake clock: 1 s per reading, plus 1000 s spent inside each validation. Training
    throughput and epoch_time must not include those 1000 s."""
    import types

    now = [0.0]

    def monotonic():
        now[0] += 1.0
        return now[0]

    def slow_evaluate(*args, **kwargs):
        now[0] += 1000.0
        return original_evaluate(*args, **kwargs)

    class Keep(Callback):
        def __init__(self):
            self.train, self.epochs = [], []

        def on_step_end(self, engine, module, metrics):
            if metrics:
                self.train.append(metrics)

        def on_epoch_end(self, engine, module, metrics):
            self.epochs.append(dict(metrics))

    import framework.fit as fit_mod

    original_evaluate = fit_mod.evaluate
    clock = types.SimpleNamespace(monotonic=monotonic)
    monkeypatch.setattr(fit_mod, "time", clock)  # the fit's clock only
    monkeypatch.setattr(fit_mod, "evaluate", slow_evaluate)
    keep = Keep()
    fit(log_every_n_steps=7, callbacks=[keep])  # one log step per epoch: 7 and 14
    assert [r["step"] for r in keep.train] == [7, 14]
    for r in keep.train:  # all 200 items of the epoch, over a few ticks, not over 1000 s
        assert 200 / 100 < r["train/items_per_sec"] <= 200
    assert all(0 < e["epoch_time"] < 100 for e in keep.epochs)


# ---------------------------------------------------------------- trackers


def test_tensorboard_event_files_hold_the_logged_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tbrun"
    fit(run_dir=str(run_dir), log_every_n_steps=2, log_with=["tensorboard"])
    events = glob.glob(str(run_dir / "tbrun" / "events.out.tfevents.*"))  # RUN_DIR/<project = run dir name>/
    assert len(events) == 1, os.listdir(run_dir)
    acc = EventAccumulator(str(run_dir / "tbrun"))
    acc.Reload()
    assert {"train/loss", "val/loss", "lr", "train/grad_norm", "train/items_per_sec"} <= set(acc.Tags()["scalars"])
    recs = records(run_dir)
    for key in ("train/loss", "val/loss"):
        logged = [(r["step"], r[key]) for r in recs if key in r]
        read_back = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in read_back] == [s for s, _ in logged]
        assert [v for _, v in read_back] == pytest.approx([v for _, v in logged], rel=1e-6)  # float32 on disk


def test_a_second_fit_on_the_same_engine_starts_fresh_trackers(tmp_path):
    """Trackers are finished at fit end (not Accelerate's end_training, which would also
    destroy the process group), so the same engine can fit again and keeps logging."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = classification_data(64)
    engine = Engine(
        max_steps=2,
        batch_size=32,
        log_every_n_steps=1,
        progress=False,
        run_dir=str(tmp_path / "r"),
        log_with=["tensorboard"],
    )
    module = TinyClassifier()
    engine.fit(module, (x, y))
    assert engine._rt.accelerator.trackers == []  # finished and dropped
    engine.max_steps = 4
    engine.fit(module, (x, y))
    steps = set()
    for path in glob.glob(str(tmp_path / "r" / "r" / "events.out.tfevents.*")):
        acc = EventAccumulator(path)
        acc.Reload()
        steps |= {e.step for e in acc.Scalars("train/loss")}
    assert steps == {1, 2, 3, 4}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_whose_package_is_missing_is_an_error_not_silently_skipped(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ImportError, match="wandb"):  # Accelerate's own warning, then ours
        fit(run_dir=str(tmp_path), log_with=["wandb"])


def test_tracker_config_keeps_only_scalars():
    assert tracker_config({"a": 1, "b": [1, 2], "c": None, "d": "x", "e": True, "f": 0.5}) == {
        "a": 1, "b": "[1, 2]", "d": "x", "e": True, "f": 0.5,
    }  # fmt: skip


def test_metrics_log_writes_only_on_the_main_process(tmp_path):
    sent = []

    class Tracker:
        def log(self, values, step=None):
            sent.append((step, values))

    MetricsLog(str(tmp_path / "other"), is_main=False, tracker=Tracker()).write({"step": 1, "train/loss": 1.0})
    assert not (tmp_path / "other").exists() and sent == []
    log = MetricsLog(str(tmp_path / "main"), is_main=True, tracker=Tracker())
    log.write({"step": 1, "epoch": 0, "train/loss": 1.0, "note": "text"})
    log.close()
    (written,) = records(tmp_path / "main")
    assert written == {"step": 1, "epoch": 0, "train/loss": 1.0, "note": "text", "time": written["time"]}
    assert abs(written["time"] - time.time()) < 60  # the wall clock it was written at
    assert sent == [(1, {"epoch": 0, "train/loss": 1.0})]  # numbers only (no time), step passed as the step


# ---------------------------------------------------------------- progress and summary


def test_without_a_terminal_one_plain_line_per_log_step_and_no_carriage_returns(capsys):
    fit(progress=True, log_every_n_steps=3)
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" not in err
    lines = err.splitlines()
    assert [int(m.group(1)) for line in lines if (m := PROGRESS_LINE.match(line))] == [3, 6, 9, 12]
    # The model summary comes first: parameters per top-level child, precision, world size, batch.
    assert lines[0].startswith("TinyClassifier: parameters (total / trainable)")
    assert re.match(r"^\s+net\s+387\s+387$", lines[1]) and re.match(r"^\s+total\s+387\s+387$", lines[2])
    assert "precision=no world_size=1" in lines[3] and "global_batch=32" in lines[3] and "accumulation=1" in lines[3]
    assert "nan_check=step " in lines[3]  # (on CPU the verdict is read at once: it costs nothing)
    assert sum(1 for line in lines if line.startswith("epoch") and "val/loss=" in line) == 2  # one per validation
    assert lines[-1].startswith("fit done at step 14: max_epochs=2 reached; train/loss=") and "val/loss=" in lines[-1]
    assert len(lines) == 4 + 4 + 2 + 1  # summary, log steps, validations, the final line: nothing else


def test_progress_false_prints_only_why_the_run_stopped(capsys):
    fit(progress=False, log_every_n_steps=1)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()]  # one line, on stderr
    assert err.startswith("fit done at step 14: max_epochs=2 reached; train/loss=")


def test_summary_counts_frozen_parameters_and_accumulation(capsys):
    class Frozen(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 8)
            self.embed.requires_grad_(False)

        def forward(self, inputs):
            return self.net(self.embed(inputs))

    x, y = classification_data(64)
    Engine(max_steps=1, batch_size=32, micro_batch_size=8, progress=True).fit(Frozen(), (x, y))
    err = capsys.readouterr().err
    assert re.search(r"^\s+embed\s+72\s+0$", err, re.M)
    assert re.search(r"^\s+total\s+459\s+387$", err, re.M)
    assert "micro_batch=8 accumulation=4" in err


def run_on_pty(script: Path, *args: str, timeout: float = 120) -> tuple[str, str]:
    """Run ``script`` with its stderr on a pseudo-terminal; return (what the terminal got, stdout)."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # no output processing: a "\n" stays "\n", so every "\r" seen is the program's
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        stdout = proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return b"".join(chunks).decode(errors="replace"), stdout


def test_on_a_terminal_the_bar_updates_in_place():
    term, stdout = run_on_pty(SCRIPTS / "issue7_progress.py", "--log-every", "2")
    assert stdout.strip() == "DONE 14", term
    assert "\r" in term
    # The bar is redrawn on one line: several "\r"-separated states of epoch 0's bar before its newline.
    bar_lines = [line for line in term.split("\n") if "epoch 0:" in line]
    assert len(bar_lines) == 1 and bar_lines[0].count("\repoch 0:") >= 2, term
    assert "7/7" in bar_lines[0] and "loss=" in bar_lines[0] and "items/s=" in bar_lines[0]
    assert not any(PROGRESS_LINE.match(line) for line in term.split("\n"))  # no plain lines on a terminal
    assert "val/loss=" in term and "TinyClassifier: parameters" in term


def test_progress_unit():
    """Progress alone: disabled or non-main prints nothing; a pipe gets plain lines on log steps only."""
    import io

    class Pipe(io.StringIO):
        def isatty(self):
            return False

    for enabled, is_main in [(False, True), (True, False)]:
        stream = Pipe()
        p = Progress(enabled, is_main, stream=stream)
        p.start_epoch(0, 3)
        p.update(1, {"train/loss": 1.0}, step=1)
        p.message("hello")
        p.close()
        assert stream.getvalue() == ""
    stream = Pipe()
    p = Progress(True, True, stream=stream)
    p.start_epoch(1, 3)
    p.update(1, {}, step=1)
    p.update(1, {"train/loss": 0.5, "lr": 1e-4, "train/items_per_sec": 12345.6}, step=2)
    assert stream.getvalue() == "epoch 1 step 2: loss=0.5 lr=1.000e-04 items/s=12346\n"


def test_on_a_terminal_the_bars_loss_is_the_latest_windows_read_without_a_sync_per_step():
    """The bar shows the loss of the latest optimizer step (a device tensor, looked at every PEEK_EVERY seconds,
    never per step), not the record's mean since the previous log step; lr and items/s come from the record."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    window = {"loss": torch.tensor(0.0, dtype=torch.float64)}
    looked = []

    def latest():
        looked.append(1)
        return window["loss"]

    p = Progress(True, True, stream=Terminal())
    p.latest = latest
    p.start_epoch(0, 100)
    p.PEEK_EVERY = 3600.0  # (an instance's own: the clock decides when to look)
    for step in range(1, 11):
        window["loss"] = torch.tensor(1.0 / step, dtype=torch.float64)
        p.update(1, {"train/loss": 9.0, "lr": 1e-3} if step == 5 else {}, step=step)
    assert len(looked) == 2  # the first update (its clock starts at 0) and the log step: not every step
    assert p._bar.postfix == "loss=0.2 lr=0.001"  # step 5's own loss, not the record's 9.0
    p.PEEK_EVERY = 0.0
    p.update(1, {}, step=11)
    assert p._bar.postfix == "loss=0.1 lr=0.001"  # the latest window's, with the last record's figures
    p.close()


# ---------------------------------------------------------------- observation never steers


def test_logging_progress_trackers_and_callbacks_do_not_change_training(tmp_path, capsys):
    """Observation never steers: with everything observing on, the parameters are bitwise the same."""

    class Reader(Callback):
        def on_step_end(self, engine, module, metrics):
            self.seen = [p.detach().sum() for p in module.parameters()]

    x, y = classification_data(200)

    def run(**kw):
        torch.manual_seed(0)
        module = TinyClassifier(dropout=0.2)  # dropout: any stray RNG draw would show
        Engine(max_epochs=2, batch_size=32, seed=0, **kw).fit(module, (x, y), (x[:64], y[:64]))
        return params(module)

    plain = run(progress=False)
    observed = run(
        progress=True,
        log_every_n_steps=1,
        run_dir=str(tmp_path),
        log_with=["tensorboard"],
        callbacks=[Reader(), EarlyStopping(patience=10)],
    )
    assert torch.equal(plain, observed)
    assert len([r for r in records(tmp_path) if "train/loss" in r]) == 14


# ---------------------------------------------------------------- host reads


# The engine reads one value per optimizer step: the NaN guard's "is the step finite?"
# (folded with the stop flags under DDP), needed to skip or raise *before* optimizer.step
# touches the parameters. Everything else waits for a log step, except the doctor's checks,
# which read only on its sparse "checked" steps (the first two, then 4, 8, ...). Lower this
# to 0 if the guard ever moves onto the device.
GUARD_READS_PER_STEP = 1
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class SGDClassifier(TinyClassifier):
    """SGD has no step counter (AdamW reads its CPU step tensors with .item() inside torch.optim)."""

    fused: bool | None = None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, fused=self.fused)


class FusedSGDClassifier(SGDClassifier):
    fused = True  # can skip a step on the device: nan_check="deferred"


def count_reads(monkeypatch, engine: Engine, module: TinyClassifier) -> list[tuple[int, bool]]:
    """Fit, and return every read of a tensor's value (a host sync) between fit start and end, by anyone:
    (engine.step at the read, whether the doctor was checking that step)."""
    reads: list[tuple[int, bool]] = []

    class Loop(Callback):  # count from the first step to the end, not the setup before it
        active = False

        def on_fit_start(self, engine, module):
            Loop.active = True

        def on_fit_end(self, engine, module):
            Loop.active = False

    engine.callbacks.append(Loop())

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if Loop.active:
                reads.append((engine.step, engine.doctor.checking))
            return original(self, *args, **kwargs)

        return wrapper

    x, y = classification_data(200)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    engine.fit(module, (x, y), (x[:64], y[:64]))
    monkeypatch.undo()
    return reads


def reading_engine(clip: float | None, doctor: str, nan_check: str = "step") -> Engine:
    return Engine(
        max_epochs=2,
        batch_size=32,
        micro_batch_size=8,
        clip_grad_norm=clip,
        log_every_n_steps=3,
        progress=False,
        seed=0,
        doctor=doctor,
        nan_check=nan_check,
    )


# 200 items, batch 32: 7 steps an epoch, 14 in all. While engine.step == v the run takes step v (its guard
# read), then, once the counter reached v, writes the train record of log step v (and, at the end, of the
# last steps) and validates at epoch ends.
LOGGED, VALIDATED = {3, 6, 9, 12, 14}, {7, 14}


def per_step(reads: list[tuple[int, bool]], checked: bool = False) -> dict[int, int]:
    return {v: sum(1 for s, c in reads if s == v and c == checked) for v in range(15)}


# Without clipping, steps that log nothing check with the fused non-finite flag instead of the total norm.
@pytest.mark.parametrize("clip", [1.0, None], ids=["total-norm", "fused-check"])
@pytest.mark.parametrize("doctor", ["off", "basic"])
def test_no_host_reads_outside_log_steps_except_the_nan_guard(monkeypatch, doctor, clip):
    engine = reading_engine(clip, doctor)
    reads = count_reads(monkeypatch, engine, SGDClassifier())
    assert engine.step == 14
    unchecked = per_step(reads)
    for v, n in unchecked.items():  # every step at most the guard's one read; log steps and validation their own
        guard = GUARD_READS_PER_STEP if v < 14 else 0
        assert n <= guard + (v in LOGGED) + (v in VALIDATED), (v, unchecked)
    # The counting sees reads at all: the guard's of the unchecked steps, the records and validations.
    assert len(reads) >= 14 + len(LOGGED), unchecked
    # ... and the doctor reads only on its sparse checked steps (0, 1, 2, 4, 8: while each is taken, and
    # until the next starts), none when off.
    checked_at = {s for s, c in reads if c}
    assert checked_at == set() if doctor == "off" else checked_at and checked_at <= {0, 1, 2, 3, 4, 5, 8, 9}


@pytest.mark.parametrize("clip", [1.0, None], ids=["total-norm", "fused-check"])
@pytest.mark.parametrize("doctor", ["off", "basic"])
def test_deferred_nan_check_reads_nothing_on_the_device_outside_log_and_checked_steps(monkeypatch, doctor, clip):
    # nan_check="deferred" (framework.guard): a step's verdict is copied to the host without waiting and read
    # a step later; a step itself reads at once only where reading is allowed anyway: on log steps and on the
    # doctor's sparse checked steps.
    engine = reading_engine(clip, doctor, nan_check="deferred")
    reads = count_reads(monkeypatch, engine, FusedSGDClassifier())
    assert engine.step == 14 and engine._fit.defer
    unchecked = per_step(reads)
    read_at_once = {2, 5, 8, 11}  # engine.step while the log steps 3, 6, 9, 12 are taken
    for v, n in unchecked.items():  # the previous step's late verdict, plus what log steps read at once
        assert n <= 1 + (v in read_at_once) + (v in LOGGED) + (v in VALIDATED), (v, unchecked)
    if doctor == "off":
        assert unchecked[0] == 0, unchecked  # the first step's verdict waits for the second step: no sync in it
    late = [v for v, n in unchecked.items() if n > (v in read_at_once) + (v in LOGGED) + (v in VALIDATED)]
    assert len(late) >= 5, unchecked  # verdicts read a step late, one at a time


# ---------------------------------------------------------------- 2 processes


@pytest.mark.multiprocess
def test_only_rank_0_logs_under_two_processes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch(SCRIPTS / "issue7_ddp_logging.py", str(tmp_path))
    pid0, pid1 = ((tmp_path / f"pid-rank{r}.txt").read_text() for r in (0, 1))
    err0, err1 = ((tmp_path / f"stderr-rank{r}.txt").read_text() for r in (0, 1))
    # Progress and summary on rank 0 only.
    log_steps = [2, 4, 6, 8, 10, 12, 14]
    assert [int(m.group(1)) for line in err0.splitlines() if (m := PROGRESS_LINE.match(line))] == log_steps
    assert "world_size=2" in err0 and "\r" not in err0
    assert not any(PROGRESS_LINE.match(line) for line in err1.splitlines()), err1
    assert "parameters" not in err1 and "val/loss" not in err1, err1
    assert "Warning" not in err0 + err1, (err0, err1)  # (none at exit either: the teardown hook is quiet)
    # One metrics.jsonl writer: every record once (a second writer would duplicate them).
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs if "train/loss" in r] == log_steps
    assert [r["step"] for r in recs if "val/loss" in r] == [7, 14]
    # TensorBoard: files from rank 0's process only (event file names end in .<pid>.<n>), holding train/loss.
    events = glob.glob(str(tmp_path / "run" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events and all(f".{pid0}." in os.path.basename(e) for e in events), (events, pid0, pid1)
    acc = EventAccumulator(str(tmp_path / "run" / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == log_steps
    # The process group outlived fit (trackers finished without end_training): validate still worked.
    after = json.loads((tmp_path / "after_fit.json").read_text())
    assert after["validate"]["loss"] == pytest.approx(after["val/loss"], rel=1e-12)


def test_a_resumed_run_drops_the_records_logged_after_its_checkpoint(tmp_path, capsys):
    x, y = classification_data(200)
    kw = dict(
        max_epochs=2, batch_size=32, seed=0, run_dir=str(tmp_path), log_every_n_steps=1, checkpoint_every_n_steps=4
    )
    with pytest.raises(KeyboardInterrupt):
        Engine(progress=False, callbacks=[CrashAt(10)], **kw).fit(TinyClassifier(), (x, y), (x[:64], y[:64]))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines][-3:] == [8, 9, 10]  # step 7's epoch record is in there too
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "epoch": 1, "train/lo')  # the kill cut a write short

    resumed = Engine(resume="auto", progress=True, **kw)
    resumed.fit(TinyClassifier(), (x, y), (x[:64], y[:64]))  # from step-00000008
    assert "dropped 3 record(s) logged after step 8" in capsys.readouterr().err

    after = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert after[: len(lines) - 2] == lines[:-2]  # the records up to the checkpoint, byte for byte
    recs = [json.loads(line) for line in after]
    train_steps = [r["step"] for r in recs if "train/loss" in r]
    assert train_steps == list(range(1, 15))  # every step once, in order
    assert [r["step"] for r in recs if "val/loss" in r] == [7, 14]
    # An exact resume logs the dropped steps again with the same loss.
    again = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    assert [again[9], again[10]] == [json.loads(line)["train/loss"] for line in lines[-2:]]


def test_the_cut_keeps_what_the_checkpoint_had_seen(tmp_path):
    """Resumed at step 12 inside epoch 1: the records of steps <= 12 stay, except an epoch record of
    epoch 1 (a stream's last window can be checkpointed before its epoch's validation ran)."""
    lines = [
        {"step": 6, "epoch": 0, "train/loss": 1.0},
        {"step": 6, "epoch": 0, "epoch_time": 1.0, "val/loss": 0.9},  # epoch 0 ended before the checkpoint
        {"step": 12, "epoch": 1, "train/loss": 0.5},
        {"step": 12, "epoch": 1, "epoch_time": 1.0, "val/loss": 0.4},  # epoch 1 had not, at the checkpoint
        {"step": 14, "epoch": 2, "train/loss": 0.3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = MetricsLog(str(tmp_path), is_main=True, resumed_at=(12, 1))
    log.close()
    assert log.dropped == 2
    assert records(tmp_path) == lines[:3]


def test_the_cut_ends_a_last_record_that_lost_its_newline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "epoch": 0}\n{"step": 3, "epoch": 0}')  # no newline
    log = MetricsLog(str(tmp_path), is_main=True, resumed_at=(3, 0))
    log.write({"step": 4, "epoch": 0})
    log.close()
    assert log.dropped == 0
    assert [r["step"] for r in records(tmp_path)] == [2, 3, 4]  # (not "...3}{"step": 4...")
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_auto_without_a_checkpoint_starts_the_log_again_and_says_so(tmp_path, capsys):
    x, y = classification_data(200)
    kw = dict(max_steps=6, batch_size=32, run_dir=str(tmp_path), log_every_n_steps=2, checkpoint_every_epoch=False)
    with pytest.raises(KeyboardInterrupt):  # (killed before its first checkpoint)
        Engine(progress=False, callbacks=[CrashAt(4)], **kw).fit(TinyClassifier(), (x, y))
    assert [r["step"] for r in records(tmp_path)] == [2, 4]
    Engine(resume="auto", progress=True, **kw).fit(TinyClassifier(), (x, y))
    assert "dropped 2 record(s) of an earlier start of this run (resume='auto' found no checkpoint" in (
        capsys.readouterr().err
    )
    assert [r["step"] for r in records(tmp_path) if "stop" not in r] == [2, 4, 6]  # one run's log, not two
    assert records(tmp_path)[-1]["stop"] == "max_steps"


def test_a_resumed_run_hides_the_tensorboard_events_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = classification_data(200)
    kw = dict(
        max_epochs=2, batch_size=32, seed=0, run_dir=str(tmp_path / "tb"), log_every_n_steps=1,
        checkpoint_every_n_steps=4, log_with=["tensorboard"], progress=False,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        Engine(callbacks=[CrashAt(10)], **kw).fit(TinyClassifier(), (x, y))
    time.sleep(1.1)  # (event file names hold the second they were opened in)
    Engine(resume="auto", **kw).fit(TinyClassifier(), (x, y))  # from step-00000008
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))  # both event files, oldest first
    acc.Reload()
    assert len(glob.glob(str(tmp_path / "tb" / "tb" / "events.out.tfevents.*"))) == 2
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 15))  # 9 and 10 once, not twice


# ---------------------------------------------------------------- TrainLoss


@pytest.mark.parametrize("keep", [False, True], ids=["cpu-buffer", "kept-tensors"])
def test_train_loss_sums_finite_steps_across_folds_and_processes(keep):
    from framework.observability.metrics import TrainLoss

    values = [0.5, float("nan"), 1.5, float("inf"), 2.0, 3.0, 4.0]
    doubled = TrainLoss(lambda t: t.mul_(2), torch.device("cpu"), capacity=2)  # 2 processes; folds every 2 adds
    if keep:
        doubled._slots = None  # the GPU path: the step's own tensors are kept
    for v in values:
        doubled.add(torch.tensor(v))
    total, count = doubled.take()
    assert total.item() == 2 * (0.5 + 1.5 + 2.0 + 3.0 + 4.0) and count.item() == 5
    doubled.add(torch.tensor(float("nan")))
    total, count = doubled.take()  # a fresh interval: nothing from before
    assert total.item() == 0.0 and count.item() == 0


def test_train_loss_on_cpu_keeps_no_step_tensor_alive():
    """A small tensor kept alive per step fragments glibc's heap among the freed activations (peak
    RSS of the medium MLP grew 1.1-1.3x over 200 steps): on CPU each loss is copied, not kept."""
    import weakref

    from framework.observability.metrics import TrainLoss

    losses = TrainLoss(lambda t: t, torch.device("cpu"))
    loss = torch.tensor(0.25)
    ref = weakref.ref(loss)
    losses.add(loss)
    del loss
    assert ref() is None
    total, count = losses.take()
    assert (total.item(), count.item()) == (0.25, 1)
