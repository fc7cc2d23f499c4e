"""framework/testing.py: check_loop and assert_overfits on good and broken modules, and that both leave
the module and the global RNG as they found them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopError, LoopModule, LoopWarning
from framework.testing import assert_overfits, check_loop
from tests.helpers import TinyClassifier, classification_data

x, y = classification_data(32)
BATCH = (x, y)


class DictBatch(LoopModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 3)

    def split_batch(self, batch):
        return batch["x"], batch["y"]

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


class Detached(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets).detach()


class Unused(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)


class SumLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")


class StepsItself(TinyClassifier):
    def configure_optimizers(self):
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return self.opt

    def compute_loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        loss.backward()
        self.opt.step()
        return loss


def snapshot(module):
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        [p.grad for p in module.parameters()],
        module.training,
    )


def test_check_loop_passes_good_modules_and_restores_everything():
    module = TinyClassifier(dropout=0.2)
    module.eval()  # an unusual starting mode, to see it restored
    module.net[0].weight.grad = torch.ones_like(module.net[0].weight)
    state, grads, training = snapshot(module)
    rng = torch.get_rng_state()
    doctor = check_loop(module, BATCH)
    assert doctor.findings == [] and doctor.level == "full"
    statuses = {check: status for check, _, status, _ in doctor.report()}
    assert statuses.pop("val_data") == "not run"  # one batch: there is no separate validation data to compare
    assert set(statuses.values()) == {"ok"}, doctor.format_report()  # every other check ran, on every hook
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(p.grad is g for p, g in zip(module.parameters(), grads, strict=True)) and module.training is training
    assert torch.equal(torch.get_rng_state(), rng)
    check_loop(DictBatch(), {"x": x, "y": y})


@pytest.mark.parametrize(
    "cls, pattern",
    [
        (
            Detached,
            r"check_loop found 1 problem\(s\) in Detached's loop:\n- \[error\] Detached.compute_loss returned a loss that does not require grad",
        ),
        (Unused, r"\[warning\] 2 trainable parameter\(s\) of Unused received no gradient: spare.weight, spare.bias"),
        (SumLoss, r"\[warning\] SumLoss.compute_loss scales with the batch size, like a sum"),
        (StepsItself, r"\[error\] StepsItself.compute_loss called optimizer.step\(\).*The step was blocked"),
    ],
)
def test_check_loop_raises_with_the_report(cls, pattern):
    module = cls()
    state, _, _ = snapshot(module)
    with pytest.raises(LoopError, match=pattern) as info:
        check_loop(module, BATCH)
    assert "status    check" in str(info.value)  # the full table follows the summary
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_check_loop_ignore_accepts_named_findings():
    doctor = check_loop(Unused(), BATCH, ignore={"gradients"})
    assert [f.check for f in doctor.findings] == ["gradients"]  # still recorded, just not raised


class Quick(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-2)


def test_assert_overfits_good_module():
    module = Quick()
    state, _, _ = snapshot(module)
    final = assert_overfits(module, BATCH, steps=40, threshold=0.05)
    assert final <= 0.05
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())  # restored


class Blind(TinyClassifier):
    """Its forward ignores the inputs: it can only learn the label frequencies."""

    def forward(self, inputs):
        return self.net(torch.zeros_like(inputs))


class Frozen(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("cls", [Blind, Frozen])
def test_assert_overfits_fails_for_modules_that_cannot_learn_the_batch(cls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            AssertionError,
            match=rf"{cls.__name__} did not overfit one batch: its loss .* in 30 optimizer steps; wanted <= 0.05",
        ):
            assert_overfits(cls(), BATCH, steps=30)
    doctor_said = [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]
    # The doctor (basic) already names the cause of Frozen; Blind's loop is sound, only its model is not.
    assert doctor_said == ([] if cls is Blind else [doctor_said[0]]) and all(
        "param group 0 has lr=0" in m for m in doctor_said
    )


def test_assert_overfits_reports_a_loop_mistake_as_such():
    with pytest.raises(LoopError, match="does not require grad"):
        assert_overfits(Detached(), BATCH, steps=5)
