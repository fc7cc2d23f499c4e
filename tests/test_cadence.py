"""Validation every n optimizer steps (``val_every_n_steps``), mid-epoch and on endless streams; keep_best
and EarlyStopping follow it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from framework import Callback, EarlyStopping, Engine

from .helpers import TinyClassifier, classification_data


class StepTagged(TinyClassifier):
    """A classifier for 8 features (the binary set of test_evaluation has 4: it pads)."""

    def forward(self, inputs):
        if inputs.shape[-1] == 4:
            inputs = torch.cat([inputs, inputs], dim=-1)
        return super().forward(inputs)

    def compute_loss(self, outputs, targets):
        return super().compute_loss(outputs, targets.clamp(max=2))


class Endless(IterableDataset):
    """A stream without end and without a length."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(8, generator=g)
            yield x, (x[0] > 0).long()


class ValAt(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, engine, module, metrics):
        self.steps.append(engine.step)


def test_validates_every_n_steps_mid_epoch_instead_of_at_epoch_ends(tmp_path):
    x, y = classification_data(160)  # 5 steps an epoch
    at = ValAt()
    engine = Engine(
        max_epochs=2, batch_size=32, val_every_n_steps=3, progress=False, run_dir=str(tmp_path), callbacks=[at]
    )
    engine.fit(TinyClassifier(), (x, y), (x[:32], y[:32]))
    assert at.steps == [3, 6, 9]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6, 9]
    assert [r["step"] for r in records if "epoch_time" in r] == [5, 10]  # epoch records stay
    # A checkpoint after each validation, ranked for keep_best.
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert {"step-00000003", "step-00000006", "step-00000009"} & set(saved) or len(saved) == 3


def test_an_endless_stream_validates_with_max_steps():
    at = ValAt()
    x, y = classification_data(32)
    Engine(max_steps=7, batch_size=8, val_every_n_steps=3, progress=False, callbacks=[at]).fit(
        TinyClassifier(), Endless(), (x, y)
    )
    assert at.steps == [3, 6]


def test_early_stopping_follows_the_cadence():
    x, y = classification_data(320)
    stop = EarlyStopping(monitor="val/loss", patience=1, min_delta=10.0)  # every validation after the first is "bad"
    engine = Engine(max_epochs=3, batch_size=32, val_every_n_steps=2, progress=False, callbacks=[stop])
    engine.fit(TinyClassifier(), (x, y), (x[:64], y[:64]))
    assert engine.step == 4  # validated at 2 (the best so far), at 4 (bad: patience 1), and stopped there


def test_keep_best_ranks_the_checkpoints_saved_after_each_validation(tmp_path):
    x, y = classification_data(320)
    engine = Engine(
        max_steps=8, batch_size=32, val_every_n_steps=2, keep_best=1, keep_last=1, monitor="val/loss", mode="max",
        progress=False, run_dir=str(tmp_path),
    )  # fmt: skip
    engine.fit(TinyClassifier(), (x, y), (x[:64], y[:64]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [2, 4, 6, 8]
    best = max(val, key=val.get)  # mode="max": the highest val/loss is "best"
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == sorted({best, 8}), (kept, val)


def test_a_validation_on_an_epoch_end_step_is_saved_once_with_its_monitor_value(tmp_path):
    class Saves(Callback):
        def __init__(self):
            self.paths = []

        def on_checkpoint_save(self, engine, path):
            self.paths.append(Path(path).name)

    x, y = classification_data(64)  # 2 steps an epoch: every validation (every 2 steps) lands on an epoch end
    saves = Saves()
    engine = Engine(
        max_epochs=3, batch_size=32, val_every_n_steps=2, keep_best=1, keep_last=1, monitor="val/loss", mode="max",
        progress=False, run_dir=str(tmp_path), callbacks=[saves],
    )  # fmt: skip
    engine.fit(TinyClassifier(), (x, y), (x[:32], y[:32]))
    assert saves.paths == ["step-00000002", "step-00000004", "step-00000006"]  # one save per step, not two
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    best = max(val, key=val.get)
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == sorted({best, 6}), (kept, val)  # keep_best saw each checkpoint's val/loss
    manifest = json.loads((tmp_path / "checkpoints" / f"step-{best:08d}" / "manifest.json").read_text())
    assert manifest["monitor_value"] == val[best]


class FiniteStream(IterableDataset):
    """32 items, then the stream ends; no len()."""

    def __iter__(self):
        x, y = classification_data(32)
        return iter(zip(x, y, strict=True))


def _fit_stream(data, **kw) -> tuple[list[int], list[str]]:
    import warnings

    at = ValAt()
    x, y = classification_data(32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(batch_size=8, progress=False, callbacks=[at], **kw).fit(TinyClassifier(), data, (x, y))
    return at.steps, [str(w.message) for w in caught if "val_every_n_steps" in str(w.message)]


def test_a_stream_without_len_ended_by_max_steps_warns_naming_val_every_n_steps():
    # Endless, ended by max_steps, validation at epoch ends: it would validate 0 times, silently.
    steps, warned = _fit_stream(Endless(), max_steps=5)
    assert steps == [] and len(warned) == 1, warned
    assert "max_steps=5" in warned[0] and "Pass val_every_n_steps=N" in warned[0]
    # With val_every_n_steps it validates, and says nothing.
    assert _fit_stream(Endless(), max_steps=5, val_every_n_steps=2) == ([2, 4], [])
    # A finite stream trained by epochs ends its epochs and validates there: no warning.
    assert _fit_stream(FiniteStream(), max_epochs=2) == ([4, 8], [])
