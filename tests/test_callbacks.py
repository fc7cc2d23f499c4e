"""framework/callbacks.py and the debug runs: events and their order, read-only hooks,
EarlyStopping, limit_train_batches / limit_val_batches / overfit_batches.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from framework import Callback, EarlyStopping, Engine
from tests.helpers import TinyClassifier, classification_data


class Events(Callback):
    """Records every event, and at each step end the trace's tail (to prove where hooks run)."""

    def __init__(self):
        self.events: list[str] = []
        self.step_metrics: dict[int, dict] = {}
        self.trace_tails: list[tuple] = []

    def on_fit_start(self, engine, module):
        self.events.append("fit_start")

    def on_fit_end(self, engine, module):
        self.events.append("fit_end")

    def on_epoch_start(self, engine, module):
        self.events.append("epoch_start")

    def on_epoch_end(self, engine, module, metrics):
        self.events.append("epoch_end")

    def on_step_end(self, engine, module, metrics):
        self.events.append("step_end")
        self.step_metrics[engine.step] = dict(metrics)
        if engine.trace is not None:
            self.trace_tails.append((engine.step, engine.trace[-1], len(engine.trace)))

    def on_validation_end(self, engine, module, metrics):
        self.events.append("validation_end")


class SGD(TinyClassifier):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_events_fire_in_order_between_steps_never_inside():
    x, y = classification_data(96)
    rec = Events()
    e = Engine(
        max_epochs=2,
        batch_size=32,
        micro_batch_size=16,
        log_every_n_steps=2,
        progress=False,
        trace=True,
        callbacks=[rec],
    )
    e.fit(TinyClassifier(), (x, y), (x[:32], y[:32]))
    epoch = ["epoch_start", "step_end", "step_end", "step_end", "validation_end", "epoch_end"]
    assert rec.events == ["fit_start", *epoch, *epoch, "fit_end"]
    # At each on_step_end the step is complete (its optimizer_step is the last trace event)
    # and the next step has not begun: the hook sits between steps.
    for step, last, _ in rec.trace_tails:
        assert last == ("optimizer_step", step - 1, 2)
    lengths = [length for _, _, length in rec.trace_tails]
    assert lengths == [8 * s for s in range(1, 7)]  # zero_grad + 2 x (forward, loss, backward) + optimizer_step
    # Metrics reach on_step_end on log steps only.
    assert [s for s, m in rec.step_metrics.items() if m] == [2, 4, 6]
    assert set(rec.step_metrics[2]) >= {"train/loss", "lr", "train/grad_norm", "train/items_per_sec"}


def test_a_callback_can_stop_the_run_at_a_step_boundary():
    class StopAt(Callback):
        def on_step_end(self, engine, module, metrics):
            if engine.step == 5:
                engine.should_stop = True

    x, y = classification_data(320)
    e = Engine(max_epochs=3, batch_size=32, progress=False, callbacks=[StopAt()])
    e.fit(TinyClassifier(), (x, y), (x[:32], y[:32]))
    assert e.step == 5 and e.epoch == 0


# ---------------------------------------------------------------- EarlyStopping


def test_early_stopping_ends_a_plateaued_run_after_patience_epochs(tmp_path):
    """lr=0: the validation loss is the same every epoch, so the first validation is the best
    and each later one is a miss; patience=2 stops after epoch 3 (index 2) of 50."""
    x, y = classification_data(128)
    es = EarlyStopping(monitor="val/loss", patience=2)
    rec = Events()
    # doctor="off": the doctor rightly warns that lr=0 leaves the parameters unchanged; here that is the point.
    e = Engine(max_epochs=50, batch_size=32, progress=False, run_dir=str(tmp_path), callbacks=[es, rec], doctor="off")
    e.fit(SGD(lr=0.0), (x, y), (x[:64], y[:64]))
    assert es.stopped_epoch == 2 and es.bad_epochs == 2
    assert e.epoch == 3 and e.step == 3 * 4
    assert rec.events.count("validation_end") == 3 and rec.events[-1] == "fit_end"
    val = [r for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val/loss" in (r := json.loads(line))]
    assert len(val) == 3 and len({r["val/loss"] for r in val}) == 1  # truly plateaued


def test_early_stopping_lets_an_improving_run_finish():
    """Full-batch gradient descent with a small lr, early in training: the held-out loss
    falls every epoch, so even patience=1 never triggers."""
    x, y = classification_data(128)
    es = EarlyStopping(patience=1)
    e = Engine(max_epochs=6, batch_size=128, progress=False, callbacks=[es])
    e.fit(SGD(lr=0.05), (x, y), classification_data(128, seed=1))
    assert e.epoch == 6 and es.stopped_epoch is None and es.bad_epochs == 0


def stub_engine():
    return SimpleNamespace(epoch=0, should_stop=False)


def feed(es: EarlyStopping, values, key="val/loss"):
    """Run es over validations with these values; return the 0-based index where it asked to stop."""
    engine = stub_engine()
    for i, v in enumerate(values):
        engine.epoch = i
        es.on_validation_end(engine, None, {key: v})
        if engine.should_stop:
            return i
    return None


def test_early_stopping_mode_and_min_delta():
    assert feed(EarlyStopping(patience=2), [1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.72]) == 6
    # min_delta: improvements of 0.01 are too small
    assert feed(EarlyStopping(patience=2, min_delta=0.05), [1.0, 0.99, 0.98]) == 2
    assert feed(EarlyStopping(patience=2, min_delta=0.005), [1.0, 0.99, 0.98]) is None
    # mode="max" follows a metric that should rise
    assert feed(EarlyStopping(monitor="val/acc", mode="max", patience=1), [0.5, 0.6, 0.6], key="val/acc") == 2
    assert feed(EarlyStopping(monitor="val/acc", mode="max", patience=1), [0.5, 0.6, 0.7], key="val/acc") is None
    # a NaN is never an improvement
    assert feed(EarlyStopping(patience=1), [1.0, math.nan]) == 1


def test_early_stopping_state_round_trips_through_json():
    es = EarlyStopping(patience=3)
    feed(es, [1.0, 1.1])
    state = json.loads(json.dumps(es.state_dict()))
    fresh = EarlyStopping(patience=3)
    fresh.load_state_dict(state)
    assert (fresh.best, fresh.bad_epochs) == (1.0, 1)
    assert feed(fresh, [1.2, 1.3]) == 1  # continues the count: 2 more misses reach patience 3


def test_early_stopping_names_the_fix_for_a_wrong_monitor_or_no_validation():
    x, y = classification_data(64)
    val = classification_data(64, seed=1)
    with pytest.raises(KeyError, match=r"pick one of \['val/acc', 'val/loss'\]"):
        Engine(max_epochs=2, batch_size=32, progress=False, callbacks=[EarlyStopping(monitor="val/accuracy")]).fit(
            TinyClassifier(), (x, y), val
        )
    with pytest.raises(KeyError, match="pass val_data"):
        Engine(max_epochs=2, batch_size=32, progress=False, callbacks=[EarlyStopping()]).fit(TinyClassifier(), (x, y))


@pytest.mark.parametrize("kw", [{"mode": "best"}, {"patience": 0}, {"patience": 1.5}, {"min_delta": -0.1}])
def test_early_stopping_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        EarlyStopping(**kw)


# ---------------------------------------------------------------- debug runs


class Seen(TinyClassifier):
    """Records the training inputs of every forward."""

    def __init__(self):
        super().__init__()
        self.train_inputs: list[torch.Tensor] = []

    def forward(self, inputs):
        if self.training:
            self.train_inputs.append(inputs.detach().clone())
        return super().forward(inputs)


def test_limit_train_batches_cuts_every_epoch():
    x, y = classification_data(320)  # 10 batches of 32 per epoch
    rec = Events()
    module = Seen()
    e = Engine(max_epochs=2, batch_size=32, limit_train_batches=3, progress=False, callbacks=[rec])
    e.fit(module, (x, y), (x[:32], y[:32]))
    assert e.step == 6 and e.epoch == 2
    assert len(module.train_inputs) == 6
    assert rec.events.count("validation_end") == 2  # each shortened epoch still validates
    # Epoch 1 is a fresh shuffle, not a repeat of epoch 0's first batches.
    assert not torch.equal(module.train_inputs[0], module.train_inputs[3])


def test_limit_val_batches_validates_on_the_first_batches_only():
    x, y = classification_data(200)
    xv, yv = classification_data(200, seed=1)
    torch.manual_seed(0)
    module = TinyClassifier()
    e = Engine(max_epochs=1, batch_size=32, limit_val_batches=2, progress=False)
    e.fit(module, (x, y), (xv, yv))
    with torch.no_grad():
        first_two = F.cross_entropy(module(xv[:64]), yv[:64]).item()
        full = F.cross_entropy(module(xv), yv).item()
    assert e.metrics["val/loss"] == pytest.approx(first_two, rel=1e-6)
    assert abs(full - first_two) > 1e-4  # so the check above tells the two apart
    assert e.validate(module, (xv, yv))["loss"] == pytest.approx(first_two, rel=1e-6)  # validate() obeys it too


def test_overfit_batches_trains_on_the_same_batches_every_epoch():
    x, y = classification_data(320)
    module = Seen()
    e = Engine(max_epochs=3, batch_size=32, overfit_batches=2, shuffle=True, progress=False)
    e.fit(module, (x, y))
    seen = module.train_inputs
    assert e.step == 6 and len(seen) == 6
    assert not torch.equal(seen[0], seen[1])  # two different batches ...
    for epoch in (1, 2):  # ... repeated, in the same order, each epoch despite shuffle=True
        assert torch.equal(seen[2 * epoch], seen[0]) and torch.equal(seen[2 * epoch + 1], seen[1])


def test_overfit_batches_drives_the_training_loss_towards_zero():
    """The point of overfit_batches: a working model and loop can memorise one batch."""
    x, y = classification_data(320)
    y = torch.randint(0, 3, (320,), generator=torch.Generator().manual_seed(1))  # random labels: only memorisable

    class Fast(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    e = Engine(max_epochs=30, batch_size=8, overfit_batches=1, log_every_n_steps=10, progress=False)
    e.fit(Fast(), (x, y))
    assert e.step == 30
    assert e.metrics["train/loss"] < 0.05
