"""framework/doctor on several optimizers (issue #17): alternating phases (a GAN: discriminator, then
generator, each with its own optimizer and loss) and joint steps (every optimizer steps on one loss,
e.g. Muon for matrices and AdamW for the rest).

The engine does not run phases yet, so these tests drive the Doctor the way it will: per optimizer
step ``start_step``; ``watch`` around forward (``check_train_mode``); per phase ``zero_grad`` of
that phase's optimizer, ``watch`` around ``compute_loss(..., phase)`` (``check_loss``), backward,
``after_backward(phase)``, the optimizer step, ``after_optimizer_step(applied, phase)``. That is the
doctor under test, on real modules and optimizers; nothing of it is mocked.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopError, LoopModule, LoopWarning
from framework.doctor import CHECKS, Doctor
from framework.doctor.inspect import autograd_clock, sequence_nr
from tests.helpers import doctor_step

PHASES = ["discriminator", "generator"]
NOISE = 8


class DCGAN(LoopModule):
    """A tiny DCGAN on 1x8x8 images: forward generates fakes from noise (once per batch, shared by
    the phases); the discriminator's loss sees them detached, the generator's through the discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(
            nn.ConvTranspose2d(NOISE, 16, 4, 1, 0),  # 1x1 -> 4x4
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 1, 4, 2, 1),  # 4x4 -> 8x8
            nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            nn.Conv2d(1, 16, 4, 2, 1),  # 8x8 -> 4x4
            nn.LeakyReLU(0.2),
            nn.Conv2d(16, 1, 4, 1, 0),  # 4x4 -> 1x1
            nn.Flatten(),
        )

    def split_batch(self, batch):
        images, _ = batch
        return images, images  # inputs: how many fakes to make; targets: the real images

    def forward(self, inputs):
        return self.generator(torch.randn(len(inputs), NOISE, 1, 1))

    def compute_loss(self, outputs, targets, phase):
        if phase == "discriminator":
            real, fake = self.discriminator(targets), self.discriminator(outputs.detach())
            return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
                fake, torch.zeros_like(fake)
            )
        fake = self.discriminator(outputs)
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    def configure_optimizers(self):
        return {
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            "generator": torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        }


def images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(n)


def drive(module: LoopModule, doctor: Doctor, steps: int = 4, optimizers=None) -> list[str]:
    """Train ``module`` in alternating phases as the engine will, reporting to ``doctor``;
    returns the LoopWarnings' texts."""
    opts = optimizers if optimizers is not None else module.configure_optimizers()
    batch = images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor.start_fit(module, list(opts.values()), phases=list(opts))
        module.train()
        for _ in range(steps):
            doctor.start_step()
            inputs, targets = module.split_batch(batch)
            with doctor.watch(module, batch):
                outputs = module(inputs)
                doctor.check_train_mode(module, "forward")
            doctor.check_count(module, module.count_items(batch))
            for phase, opt in opts.items():
                opt.zero_grad(set_to_none=True)
                with doctor.watch(module, batch, where="compute_loss"):
                    loss = module.compute_loss(outputs, targets, phase)
                    doctor.check_loss(module, loss, outputs, phase=phase)
                loss.backward()
                doctor.after_backward(phase=phase)
                opt.step()
                doctor.after_optimizer_step(True, phase=phase)
        doctor.end_fit()
    return [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]


def statuses(doctor: Doctor) -> dict[str, str]:
    return {check: status for check, _, status, _ in doctor.report()}


def test_the_autograd_clock_orders_nodes_by_creation_in_this_torch():
    """What the stale-loss check rests on: a graph node made after a clock reading is numbered above it,
    one made before is numbered below it (also through autocast and after a backward)."""
    lin = nn.Linear(3, 3)
    old = lin(torch.randn(2, 3)).sum()
    mark = autograd_clock()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = lin(torch.randn(2, 3)).sum()
    assert mark is not None and sequence_nr(old) < mark < sequence_nr(new)
    new.backward()
    assert autograd_clock() > sequence_nr(new)


@pytest.mark.parametrize("level", ["basic", "full"])
def test_a_correct_gan_in_alternating_phases_has_no_findings(level):
    torch.manual_seed(0)
    module, doctor = DCGAN(), Doctor(level)
    said = drive(module, doctor)
    assert doctor.findings == [] and said == [], doctor.format_report()
    s = statuses(doctor)
    # The generator gets gradients only in its phase, the discriminator's loss does not reach `outputs`:
    # neither is a finding, and these checks did run.
    for check in ("optimizer_coverage", "loop_calls", "train_mode", "loss_value", "loss_graph", "gradients", "updates"):
        assert s[check] == "ok", (check, doctor.format_report())
    # The halves probe does not run in alternating phases, and says why.
    assert "alternating phases" in doctor.not_run["count_weights"]
    assert set(s) == set(CHECKS)


class StaleGenerator(DCGAN):
    """Keeps the generator's loss of the first step and returns it again."""

    def compute_loss(self, outputs, targets, phase):
        if phase == "generator":
            if not hasattr(self, "kept"):
                self.kept = super().compute_loss(outputs, targets, phase)
            return self.kept
        return super().compute_loss(outputs, targets, phase)


def test_a_stale_loss_in_a_phase_is_an_error_before_its_backward():
    torch.manual_seed(0)
    doctor = Doctor("full")
    with pytest.raises(
        LoopError,
        match=r"StaleGenerator.compute_loss returned a loss that is not computed from this step's forward outputs: a stale loss",
    ) as info:
        drive(StaleGenerator(), doctor, steps=3)
    assert info.value.check == "loss_graph"
    # ... and not mistaken for the discriminator's loss of detached outputs: the error is the generator's.
    assert [f.check for f in doctor.findings] == ["loss_graph"]


class DetachedGenerator(DCGAN):
    """The generator's loss of detached fakes: the generator never learns."""

    def compute_loss(self, outputs, targets, phase):
        return super().compute_loss(outputs.detach() if phase == "generator" else outputs, targets, phase)


def test_a_phase_whose_parameters_get_no_gradient_is_named_with_its_phase():
    torch.manual_seed(0)
    doctor = Doctor("basic")
    said = drive(DetachedGenerator(), doctor)
    assert len(said) == 1, said
    assert said[0].startswith(
        "6 trainable parameter(s) of DetachedGenerator received no gradient in the generator phase: generator.0.weight"
    )
    assert "the generator optimizer never trains them" in said[0]
    assert [f.check for f in doctor.findings] == ["gradients"]  # not reported again as "did not change"


class ForgetsALayer(DCGAN):
    def configure_optimizers(self):
        opts = super().configure_optimizers()
        opts["generator"] = torch.optim.Adam(self.generator[:3].parameters(), lr=2e-4)  # not the last conv
        return opts


def test_a_parameter_in_no_optimizer_is_named():
    torch.manual_seed(0)
    doctor = Doctor("basic")
    said = drive(ForgetsALayer(), doctor)
    assert len(said) == 1, said
    assert (
        "2 trainable parameter(s) of ForgetsALayer are in no param group of any of the 2 optimizers (discriminator, generator)"
        in said[0]
    )
    assert "generator.3.weight, generator.3.bias" in said[0]


def test_a_parameter_in_two_phases_optimizers_is_a_warning_naming_both():
    torch.manual_seed(0)
    module, doctor = DCGAN(), Doctor("basic")
    shared = module.discriminator[0].weight  # e.g. a backbone both phases train
    opts = module.configure_optimizers()
    opts["generator"].add_param_group({"params": [shared]})
    said = drive(module, doctor, optimizers=opts)
    assert [f.check for f in doctor.findings] == ["optimizer_coverage"], said
    assert "1 parameter(s) of DCGAN are in the discriminator optimizer and the generator optimizer" in said[0]
    assert "discriminator.0.weight" in said[0]


# ------------------------------------------------------------------ joint steps over several optimizers


class TwoOptimizers(LoopModule):
    """Matrices in one optimizer (SGD with momentum, standing in for Muon), the rest in AdamW."""

    def __init__(self, forget_biases: bool = False, overlap: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))
        self.forget_biases, self.overlap = forget_biases, overlap

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.ndim == 2]
        rest = [p for p in self.parameters() if p.ndim != 2]
        if self.forget_biases:
            rest = [self.net[2].weight, self.net[2].bias]
        if self.overlap:
            rest = [*rest, matrices[0]]
        return [torch.optim.SGD(matrices, lr=0.1, momentum=0.9), torch.optim.AdamW(rest, lr=1e-2)]


def drive_joint(module: LoopModule, doctor: Doctor, steps: int = 4) -> list[str]:
    opts = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor.start_fit(module, opts)
        for _ in range(steps):
            doctor_step(doctor, module, opts, (x, y))
        doctor.end_fit()
    return [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]


def test_joint_optimizers_are_checked_together():
    torch.manual_seed(0)
    doctor = Doctor("full")
    assert drive_joint(TwoOptimizers(), doctor) == [] and doctor.findings == [], doctor.format_report()
    assert {statuses(doctor)[c] for c in ("optimizer_coverage", "gradients", "updates", "count_weights")} == {"ok"}

    said = drive_joint(TwoOptimizers(forget_biases=True), Doctor("basic"))
    assert (
        len(said) == 1
        and "2 trainable parameter(s) of TwoOptimizers are in no param group of any of the 2 optimizers" in said[0]
    )
    assert "net.0.bias, net.3.bias" in said[0]


def test_a_parameter_in_two_joint_optimizers_is_an_error_naming_both():
    doctor = Doctor("basic")
    with pytest.raises(
        LoopError,
        match=r"1 parameter\(s\) of TwoOptimizers are in optimizer 0 \(SGD\) and optimizer 1 \(AdamW\).*net.0.weight.*updated twice per step",
    ) as info:
        drive_joint(TwoOptimizers(overlap=True), doctor)
    assert info.value.check == "optimizer_coverage"


def test_phases_must_match_the_optimizers():
    module = DCGAN()
    with pytest.raises(ValueError, match=r"phases=\['discriminator'\] names 1 phase\(s\) for 2 optimizer\(s\)"):
        Doctor("basic").start_fit(module, list(module.configure_optimizers().values()), phases=["discriminator"])
