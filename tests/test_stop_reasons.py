"""A run says why it stopped: on rank 0 at the end whatever ``progress`` is, as the last record of metrics.jsonl,
as the ``stop`` event and as ``engine.stop_reason``; for each cause (max_steps, max_epochs, max_time,
EarlyStopping, a callback's should_stop, preemption), and what a recipe says when max_time cut it short."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from framework import Callback, EarlyStopping, Engine
from framework.cli.recipe import target_line
from framework.events import StopReason
from tests.helpers import TinyClassifier, classification_data


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Stops:
    """An event subscriber: what the stop event carried, and where it came (before fit_end)."""

    def __init__(self):
        self.seen: list = []

    def on_stop(self, reason):
        self.seen.append(reason)

    def on_fit_end(self):
        self.seen.append("fit_end")


def run(tmp_path, module=None, data=None, val=True, **kw) -> tuple[Engine, Stops]:
    x, y = data or classification_data(128)
    torch.manual_seed(0)
    engine = Engine(batch_size=32, run_dir=str(tmp_path), progress=False, seed=0, **kw)
    stops = Stops()
    engine.events.subscribe(stops)
    engine.fit(module or TinyClassifier(), (x, y), (x[:64], y[:64]) if val else None)
    return engine, stops


def check(engine: Engine, stops: Stops, tmp_path, capsys, cause: str, text: str) -> StopReason:
    reason = engine.stop_reason
    assert isinstance(reason, StopReason) and reason.cause == cause and str(reason) == text, reason
    assert (reason.step, reason.epoch) == (engine.step, engine.epoch)
    assert stops.seen == [reason, "fit_end"]  # the stop event, once, before fit_end
    last = records(tmp_path)[-1]
    assert {k: last[k] for k in ("step", "epoch", "stop", "stop_reason")} == reason.record()
    lines = capsys.readouterr().err.splitlines()  # progress=False: the run dir, and the last line says why
    assert lines[-1].startswith(f"fit done at step {engine.step}: {text}"), lines
    return reason


def test_max_steps_and_max_epochs(tmp_path, capsys):
    engine, stops = run(tmp_path / "a", max_steps=5)
    check(engine, stops, tmp_path / "a", capsys, "max_steps", "max_steps=5 reached")
    engine, stops = run(tmp_path / "b", max_epochs=2)
    check(engine, stops, tmp_path / "b", capsys, "max_epochs", "max_epochs=2 reached")


class Slow(TinyClassifier):
    def forward(self, inputs):
        time.sleep(0.05)
        return super().forward(inputs)


def test_max_time_says_where_it_cut_the_run_and_a_recipe_says_how_to_give_it_more(tmp_path, capsys):
    engine, stops = run(tmp_path, Slow(), max_steps=1000, max_time=0.3, val=False)
    assert 3 <= engine.step < 20
    text = f"max_time=0.3s ran out at step {engine.step}, epoch {engine.epoch} (before max_steps=1000)"
    check(engine, stops, tmp_path, capsys, "max_time", text)
    line = target_line(engine, False, "val/acc >= 0.97")
    assert line.startswith(f"target val/acc >= 0.97: NOT reached, because time ran out ({text})")
    want = 60 * -(-0.3 * 1000 / engine.step * 1.2 // 60)  # scaled to the planned steps, 20% more, whole minutes
    assert line.endswith(f"Give it more time: --max-time {want:.0f} (or --max-time none)")
    assert target_line(engine, True, "val/acc >= 0.97") == "target val/acc >= 0.97: reached"


class SGD(TinyClassifier):
    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_early_stopping_names_its_monitor_best_value_and_step_and_patience(tmp_path, capsys):
    # lr=0: every validation equals the first, which stays the best; patience=2 stops at the 3rd epoch's end.
    es = EarlyStopping(patience=2)
    engine, stops = run(tmp_path, SGD(0.0), max_epochs=50, callbacks=[es], doctor="off")
    best = records(tmp_path)[0 if "val/loss" in records(tmp_path)[0] else 1]["val/loss"]
    text = (
        f"EarlyStopping: val/loss did not improve for 2 validation(s) (patience=2); best val/loss={best:.4g} at step 4"
    )
    check(engine, stops, tmp_path, capsys, "early_stopping", text)
    assert engine.epoch == 3 and es.best_step == 4


class StopAt(Callback):
    def __init__(self, step, why=None):
        self.step, self.why = step, why

    def on_step_end(self, engine, module, metrics):
        if engine.step == self.step:
            engine.should_stop = True

    def stop_reason(self):
        return self.why


def test_a_callbacks_should_stop_is_named_with_its_event_and_step_or_says_why_itself(tmp_path, capsys):
    engine, stops = run(tmp_path / "a", max_epochs=5, callbacks=[StopAt(3)])
    check(engine, stops, tmp_path / "a", capsys, "callback", "StopAt.on_step_end set engine.should_stop at step 3")
    engine, stops = run(tmp_path / "b", max_epochs=5, callbacks=[StopAt(2, "loss below 0.5")])
    check(engine, stops, tmp_path / "b", capsys, "callback", "loss below 0.5")


class SigtermAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, engine, module, metrics):
        if engine.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler only sets a flag


def test_preemption_is_the_stop_record_and_a_resume_continues_past_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run(tmp_path, max_steps=6, callbacks=[SigtermAt(3)], val=False)
    assert exited.value.code == 143
    last = records(tmp_path)[-1]
    assert last["stop"] == "preempted" and last["step"] == 3
    assert last["stop_reason"].startswith("preempted (a preemption signal) at step 3: checkpoint saved to ")
    assert capsys.readouterr().err.splitlines()[-1] == last["stop_reason"]
    # The resumed run goes on from step 3: the old stop record goes, the new one says why this one ended.
    run(tmp_path, max_steps=6, resume="auto", val=False)
    stopped = [r for r in records(tmp_path) if "stop" in r]
    assert [(r["stop"], r["step"]) for r in stopped] == [("max_steps", 6)]


def test_the_stop_records_change_no_parameter(tmp_path):
    # Observation never steers: a run that writes its records ends bitwise where one without a run dir does.
    x, y = classification_data(128)
    finals = []
    for run_dir in (None, str(tmp_path)):
        torch.manual_seed(0)
        module = TinyClassifier()
        Engine(max_epochs=2, batch_size=32, run_dir=run_dir, progress=False, seed=0).fit(
            module, (x, y), (x[:64], y[:64])
        )
        finals.append(module.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
