"""``self.log(name, value)`` in forward/compute_loss and ``compute_loss`` returning ``{"loss": ..., **extras}``:
``train/<name>`` on log steps, the item-weighted mean over each step's global batch averaged over the steps
since the last record (exact, on 1 and 2 processes), with no host read off log steps and no effect on training."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from framework import Callback, Engine
from framework.doctor import LoopError
from tests.helpers import ROOT, TinyClassifier, classification_data, launch
from tests.observability.test_metrics import LOGGED, VALIDATED, SGDClassifier, count_reads, per_step, reading_engine

SCRIPT = ROOT / "tests" / "scripts" / "self_log_run.py"


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Logging(TinyClassifier):
    """Logs the micro-batch's accuracy (a tensor) and its item count (a number), through self.log or as dict
    extras; remembers what it logged, per training call, for the test to recompute the records."""

    def __init__(self, form: str = "log") -> None:
        super().__init__()
        self.form, self.seen = form, []

    def compute_loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        acc = (outputs.argmax(-1) == targets).float().mean()
        if self.training:  # (validation and the doctor's probe run in eval mode: nothing is logged there)
            self.seen.append((acc.detach().clone(), len(targets)))
        if self.form == "dict":
            return {"loss": loss, "acc": acc, "items": len(targets)}
        if self.form == "log":
            self.log("acc", acc)
            self.log("items", len(targets))
        return loss


class StepEnds(Callback):
    def on_step_end(self, engine, module, metrics):
        module.seen.append("end")


def expected(seen: list, logged_at: list[int], name: str) -> list[float]:
    """Per log step: the mean over the steps since the last one of each step's item-weighted mean."""
    steps, current = [], []
    for entry in seen:
        if entry == "end":
            steps.append(current)
            current = []
        else:
            current.append(entry)
    per_step = []
    for parts in steps:
        n = sum(k for _, k in parts)
        per_step.append(sum((float(v) if name == "acc" else k) * k for v, k in parts) / n)
    out, last = [], 0
    for step in logged_at:
        window = per_step[last:step]
        out.append(sum(window) / len(window))
        last = step
    return out


def fit(form: str, run_dir, **kw) -> tuple[Engine, Logging]:
    x, y = classification_data(204)  # 7 steps an epoch: 6 of 32 items, one of 12
    torch.manual_seed(0)
    module = Logging(form)
    engine = Engine(
        max_epochs=2, batch_size=32, micro_batch_size=8, log_every_n_steps=3, progress=False, seed=0,
        run_dir=str(run_dir), callbacks=[StepEnds()], **kw,
    )  # fmt: skip
    engine.fit(module, (x, y), (x[:64], y[:64]))
    return engine, module


@pytest.mark.parametrize("form", ["log", "dict"])
def test_logged_values_are_exact_item_weighted_means_over_each_interval(tmp_path, form):
    engine, module = fit(form, tmp_path)
    train = [r for r in records(tmp_path) if "train/loss" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    at = [3, 6, 9, 12, 14]  # the fit's end computes the record of steps 13-14 (engine.metrics)
    for name in ("acc", "items"):
        want = expected(module.seen, at, name)
        assert [r[f"train/{name}"] for r in train] == pytest.approx(want[:-1], rel=1e-12)
        assert engine.metrics[f"train/{name}"] == pytest.approx(want[-1], rel=1e-12)
    # Micro-batches of 8 in steps of 32 (4 x 8 * 8/32 = 8); the epoch's last step of 12 items has micro-batches of
    # 8 and 4, weighted 8/12 and 4/12: (8 * 8 + 4 * 4) / 12.
    assert train[0]["train/items"] == 8.0 and train[2]["train/items"] == pytest.approx((80 / 12 + 8 + 8) / 3)
    assert not any("train/acc" in r for r in records(tmp_path) if "train/loss" not in r)  # train records only


def test_the_dict_form_means_the_same_as_self_log_and_neither_changes_training(tmp_path):
    runs = {form: fit(form, tmp_path / form) for form in ("log", "dict", "none")}
    logged = {form: [r for r in records(tmp_path / form) if "train/loss" in r] for form in runs}
    for r_log, r_dict in zip(logged["log"], logged["dict"], strict=True):
        assert r_log["train/acc"] == r_dict["train/acc"] and r_log["train/items"] == r_dict["train/items"]
    assert all("train/acc" not in r for r in logged["none"])
    # Observation never steers: logging leaves the final parameters bitwise as without it.
    plain = runs["none"][1].state_dict()
    for form in ("log", "dict"):
        assert all(torch.equal(plain[k], v) for k, v in runs[form][1].state_dict().items())


def test_logging_reads_nothing_on_the_device_off_log_steps(monkeypatch):
    class LoggingSGD(SGDClassifier):
        def compute_loss(self, outputs, targets):
            self.log("acc", (outputs.argmax(-1) == targets).float().mean())
            self.log("items", len(targets))
            return F.cross_entropy(outputs, targets)

    engine = reading_engine(None, "off")
    reads = count_reads(monkeypatch, engine, LoggingSGD())
    assert engine.step == 14 and "train/acc" in engine.metrics
    for v, n in per_step(reads).items():  # the guard's one read per step; log steps and validations their own
        assert n <= (1 if v < 14 else 0) + (v in LOGGED) + (v in VALIDATED), (v, per_step(reads))


class Unsteady(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def compute_loss(self, outputs, targets):
        self.calls += 1
        if self.calls % 2:  # every other micro-batch only
            self.log("acc", (outputs.argmax(-1) == targets).float().mean())
        return F.cross_entropy(outputs, targets)


def test_logging_a_name_on_some_micro_batches_only_is_an_error_before_any_update():
    x, y = classification_data(64)
    module = Unsteady()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(
        LoopError, match=r"logged \[\] .* but earlier micro-batches logged \['acc'\].*every micro-batch"
    ):
        Engine(max_steps=2, batch_size=32, micro_batch_size=8, progress=False, doctor="off").fit(module, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda loss: {"ce": loss, "acc": loss.detach()}, r"returned a dict with keys \['ce', 'acc'\] and no 'loss'"),
        (
            lambda loss: {"loss": loss, "per_item": torch.ones(4)},
            r"keys \['loss', 'per_item'\] whose 'per_item' is a tensor of shape \[4\]",
        ),
    ],
    ids=["no-loss-key", "non-scalar-extra"],
)
@pytest.mark.parametrize("doctor", ["basic", "off"])
def test_a_wrong_dict_is_a_loop_error_that_shows_its_keys(returned, message, doctor):
    class Wrong(TinyClassifier):
        def compute_loss(self, outputs, targets):
            return returned(F.cross_entropy(outputs, targets))

    x, y = classification_data(64)
    with pytest.raises(LoopError, match=message):
        Engine(max_steps=1, batch_size=32, progress=False, doctor=doctor).fit(Wrong(), (x, y))


def test_log_names_and_values_are_checked_where_they_are_logged():
    module = TinyClassifier()
    with pytest.raises(ValueError, match=r"self.log\(name='loss'.*engine's own train/ keys"):
        module.log("loss", 1.0)
    with pytest.raises(TypeError, match=r"takes a scalar; got a tensor of shape \[3\].*value.mean\(\)"):
        module.log("acc", torch.ones(3))
    with pytest.raises(TypeError, match=r"takes a number or a one-element tensor, got str"):
        module.log("acc", "high")
    module.eval()
    module.log("acc", 1.0)  # eval mode (validation, prediction): nothing is kept
    assert not module.__dict__.get("_framework_logged")


def test_alternating_phases_log_per_phase():
    from tests.scripts.phases_common import GAN, ring_data  # a GAN with discriminator and generator phases

    class LoggingGAN(GAN):
        def compute_loss(self, outputs, targets, phase):
            loss = super().compute_loss(outputs, targets, phase)
            self.log(f"{phase}_loss_copy", loss.detach())
            return loss

    engine = Engine(max_steps=4, batch_size=64, micro_batch_size=32, log_every_n_steps=2, progress=False)
    engine.fit(LoggingGAN(), ring_data(256))
    for phase in ("discriminator", "generator"):
        assert engine.metrics[f"train/{phase}_loss_copy"] == pytest.approx(
            engine.metrics[f"train/loss/{phase}"], rel=1e-6
        )


def _target_means(logged_at: list[int]) -> list[float]:
    """train/target_mean of the script: 200 items in order, steps of 32 (the 7th of 8), 2 epochs."""
    _, y = classification_data(200)
    per_step = [y[i : i + 32].double().mean().item() for _ in range(2) for i in range(0, 200, 32)]
    out, last = [], 0
    for step in logged_at:
        out.append(sum(per_step[last:step]) / (step - last))
        last = step
    return out


def _check_script_records(run_dir) -> list[dict]:
    train = [r for r in records(run_dir) if "train/loss" in r]
    at = [r["step"] for r in train]
    assert at == [3, 6, 9, 12]
    assert [r["train/target_mean"] for r in train] == pytest.approx(_target_means(at), rel=1e-12, abs=1e-12)
    for r in train:  # the loss as an extra is the logged train/loss (float32 sums there)
        assert r["train/loss_copy"] == pytest.approx(r["train/loss"], rel=1e-6)
    return train


def test_logged_values_on_one_process_match_the_global_batches(tmp_path):
    import subprocess

    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one")], check=True, timeout=120, cwd=ROOT)
    _check_script_records(tmp_path / "one")


@pytest.mark.multiprocess
def test_logged_values_are_reduced_over_two_processes_exactly(tmp_path):
    launch(SCRIPT, str(tmp_path / "two"), timeout=180)  # 2 CPU processes, each 2 micro-batches of 8 per step
    two = _check_script_records(tmp_path / "two")
    assert all(r["train/target_mean"] > 0 for r in two)
