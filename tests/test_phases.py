"""Issue 17, alternating phases: ``compute_loss(outputs, targets, phase)`` with a dict of named optimizers.

The reference is the update rule of PyTorch's DCGAN example (pytorch/examples, dcgan/main.py),
written by hand in tests/scripts/phases_common.py: D.zero_grad; D's loss on real and on detached
fake points, backward; D steps; G.zero_grad; G's loss on D(fake) through the *updated* D, backward;
G steps. The GAN is small (MLP G and D, Adam) on 2-D points; the noise is part of the data, so the
engine and the hand-written loop see the same noise. One process here; tests/scripts/phases_ddp.py
runs the 2-process checks in one launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework import Engine, NonFiniteError
from framework.checkpoint import newest_complete
from tests.helpers import CrashAt, launch
from tests.procs import shared_dir
from tests.scripts.phases_common import (
    BATCH,
    D_FLAG,
    EPOCHS,
    G_FLAG,
    GAN,
    N_ITEMS,
    SPLIT_TOL,
    TOL,
    assert_same_state,
    dcgan_loop,
    fit_state,
    flagged,
    flat_params,
    joint_loop,
    max_diff,
    phase_trace,
    regression_data,
    ring_data,
)
from tests.threads import one_thread  # noqa: F401  (autouse: tiny models, one thread)

SCRIPT = Path(__file__).parent / "scripts" / "phases_ddp.py"
STEPS = EPOCHS * -(-N_ITEMS // BATCH)  # 30 optimizer steps, 3 of them with a partial batch


def fit(data=None, *, micro: int | None = None, with_schedulers: bool = False, **options) -> tuple[GAN, Engine]:
    model = GAN(with_schedulers)
    engine = Engine(
        max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=micro, shuffle=False, seed=0, progress=False, **options
    )
    engine.fit(model, ring_data() if data is None else data)
    return model, engine


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """The DCGAN example's rule, by hand: final parameters."""
    return flat_params(dcgan_loop(ring_data())[0])


# ---------------------------------------------------------------- the update rule


def test_phases_are_the_dcgan_update_rule(reference):
    model, engine = fit()
    assert engine.step == STEPS
    assert max_diff(flat_params(model), reference) <= TOL  # measured: 0 (bitwise)
    assert max_diff(reference, flat_params(GAN())) > 1e-2, "training moved the parameters"
    # The wrong rules a GAN loop is written with are far outside the tolerance:
    stale = flat_params(dcgan_loop(ring_data(), stale_d=True)[0])  # G's gradient from D before D's step
    unzeroed = flat_params(dcgan_loop(ring_data(), zero_g=False)[0])  # G's gradients never reset
    for wrong in (stale, unzeroed):
        assert max_diff(wrong, reference) > 1000 * TOL


@pytest.mark.parametrize("micro", [16, 8])
def test_accumulation_keeps_each_phase_exact(reference, micro):
    # 64 items per step as micro-batches of 16 (or 8); the 40-item window as 16 + 16 + 8 (or 5 x 8). The
    # forward of each micro-batch is shared by both phases, each phase backwards through every one of them.
    model, engine = fit(micro=micro, trace=True)
    assert max_diff(flat_params(model), reference) <= SPLIT_TOL  # measured: 6e-8 (16), 3e-8 (8)
    k_last = -(-(N_ITEMS % BATCH) // micro)
    per_epoch = phase_trace(STEPS // EPOCHS, BATCH // micro, last_micro=k_last)
    expected = [e for epoch in range(EPOCHS) for e in _shift(per_epoch, epoch * STEPS // EPOCHS)]
    assert engine.trace == expected


def _shift(events, by):
    return [(name, step + by, micro, phase) for name, step, micro, phase in events]


def test_trace_names_the_phase_of_every_event():
    _, engine = fit(trace=True, with_schedulers=True)
    assert engine.trace == phase_trace(STEPS, 1, with_schedulers=True)


def test_phases_need_named_optimizers():
    class OneOptimizer(GAN):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match=r"compute_loss takes `phase`.*dict of named optimizers"):
        Engine(max_steps=1, batch_size=BATCH, progress=False).fit(OneOptimizer(), ring_data())


def test_validation_calls_compute_loss_without_a_phase():
    # Validation has no phase to pass: a phased module that validates gives `phase` a default.
    class Validated(GAN):
        def compute_loss(self, outputs, targets, phase=None):
            return super().compute_loss(outputs, targets, phase or "discriminator")

    data = ring_data()
    val = tuple(t[:100] for t in data)
    model, _ = fit(data)
    validated = Validated()
    engine = Engine(max_epochs=EPOCHS, batch_size=BATCH, shuffle=False, progress=False)
    engine.fit(validated, data, val)
    assert torch.equal(flat_params(validated), flat_params(model)), "a default for `phase` changes no step"
    assert engine.metrics["val/loss"] == pytest.approx(engine.validate(validated, val)["loss"])


def test_phases_refuse_fsdp_and_a_deferred_verdict():
    with pytest.raises(ValueError, match=r"alternating phases .* use Engine\(strategy='ddp'\)"):
        Engine(max_steps=1, batch_size=BATCH, progress=False, strategy="fsdp").fit(GAN(), ring_data())

    class Fused(GAN):  # optimizers that could skip on the device: the phases are what reads at once
        def configure_optimizers(self):
            return {n: torch.optim.Adam(m.parameters(), fused=True) for n, m in (("d", self.D), ("g", self.G))}

    with pytest.raises(ValueError, match="alternating phases read each phase's verdict at once"):
        Engine(max_steps=1, batch_size=BATCH, progress=False, nan_check="deferred").fit(Fused(), ring_data())


# ---------------------------------------------------------------- schedulers and logged values


def test_each_phase_steps_its_own_scheduler_and_logs_its_lr(tmp_path, reference):
    lrs: list[tuple[float, float]] = []
    hand = flat_params(dcgan_loop(ring_data(), with_schedulers=True, lrs=lrs)[0])
    assert max_diff(hand, reference) > 1000 * TOL, "the schedules change the run"
    model, _ = fit(with_schedulers=True, run_dir=tmp_path, log_every_n_steps=1)
    assert max_diff(flat_params(model), hand) <= TOL
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss/discriminator" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r, (lr_d, lr_g) in zip(train, lrs, strict=True):
        # lr is the first optimizer's (the discriminator's); each phase also under its own name
        assert (r["lr"], r["lr/discriminator"], r["lr/generator"]) == (lr_d, lr_d, lr_g), r["step"]
        for key in ("train/loss/generator", "train/grad_norm/discriminator", "train/grad_norm/generator"):
            assert key in r
    # (the warm-up takes 9 values, then stays; StepLR halves every 7 steps)
    assert len({r["lr/generator"] for r in train}) == 9 and len({r["lr/discriminator"] for r in train}) == 5


def test_clipping_is_per_phase(reference):
    # clip_grad_norm bounds each phase's gradients by their own norm (the phases' gradients exist at
    # different times: there is no joint norm).
    clip = 0.05
    hand = flat_params(dcgan_loop(ring_data(), clip=clip)[0])
    assert max_diff(hand, reference) > 1000 * TOL, "the clip is active"
    model, _ = fit(clip_grad_norm=clip)
    assert max_diff(flat_params(model), hand) <= TOL


# ---------------------------------------------------------------- the NaN guard per phase


def test_nan_in_one_phase_skips_only_that_phases_step():
    # The generator's loss is NaN in the 5th window of every epoch (items 256..319), the discriminator's
    # in the 8th: under "skip" the other phase of each still steps (G through the D that did not step).
    data = flagged(ring_data(), {4 * BATCH + 3: G_FLAG, 7 * BATCH + 10: D_FLAG})
    hand = flat_params(dcgan_loop(data)[0])
    model, engine = fit(data, nan_policy="skip", trace=True)
    assert max_diff(flat_params(model), hand) <= TOL
    assert engine.skipped_steps == 2 * EPOCHS  # (each skipped phase counts as one skipped step)
    stepped = {(s, phase) for name, s, _, phase in engine.trace if name == "optimizer_step"}
    per_epoch = STEPS // EPOCHS
    for epoch in range(EPOCHS):
        g_bad, d_bad = epoch * per_epoch + 4, epoch * per_epoch + 7
        assert (g_bad, "discriminator") in stepped and (g_bad, "generator") not in stepped
        assert (d_bad, "discriminator") not in stepped and (d_bad, "generator") in stepped
    assert len(stepped) == 2 * STEPS - 2 * EPOCHS
    # Skipping the whole step (both phases) instead would be another run:
    both = flat_params(dcgan_loop(flagged(ring_data(), {4 * BATCH + 3: G_FLAG, 4 * BATCH + 4: D_FLAG}))[0])
    assert max_diff(both, hand) > 1000 * TOL


def test_nan_in_a_phase_raises_naming_the_step_with_that_phase_unstepped():
    data = flagged(ring_data(), {5 * BATCH: G_FLAG})
    model = GAN()
    engine = Engine(max_epochs=EPOCHS, batch_size=BATCH, shuffle=False, progress=False)
    with pytest.raises(NonFiniteError, match=r"optimizer step 5 \(epoch 0, batch 5\)"):
        engine.fit(model, data)
    # Phases read the verdict at once: D's step 5 was applied, G's was not.
    hand, _ = dcgan_loop(data, stop_at=("generator", 5))
    assert max_diff(flat_params(model), flat_params(hand)) <= TOL


# ---------------------------------------------------------------- EMA


def test_ema_updates_after_the_last_phases_applied_step():
    # A skipped generator step (step 4) leaves the EMA alone although D stepped; a skipped discriminator
    # step (step 7) does not, as G stepped.
    decay = 0.8
    data = flagged(ring_data(), {4 * BATCH: G_FLAG, 7 * BATCH: D_FLAG})
    model, engine = fit(data, ema_decay=decay, nan_policy="skip")
    hand_model, hand_ema = dcgan_loop(data, ema_decay=decay)
    assert hand_ema is not None and engine._fit is not None and engine._fit.ema is not None
    ema = engine._fit.ema.state_dict()
    names = [n for n, _ in model.named_parameters()]
    assert max_diff(torch.cat([ema[n].flatten() for n in names]), torch.cat([e.flatten() for e in hand_ema])) <= TOL
    assert max_diff(flat_params(model), flat_params(hand_model)) <= TOL
    # An EMA updated after every phase's step (twice a step) is another average:
    _, every_phase = dcgan_loop(data, ema_decay=decay, ema_every_phase=True)
    assert every_phase is not None
    assert max_diff(torch.cat([e.flatten() for e in every_phase]), torch.cat([e.flatten() for e in hand_ema])) > 1e-3


# ---------------------------------------------------------------- checkpoints


def test_resume_restores_every_optimizer_and_scheduler_bitwise(tmp_path):
    # Stopped after step 10, resumed from the checkpoint of step 8 with resume="auto": the end state
    # equals the uninterrupted run's, torch.equal, for the parameters, every optimizer, scheduler and the EMA.
    def run(run_dir, callbacks=(), resume=None):
        model = GAN(with_schedulers=True)
        engine = Engine(
            max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=32, seed=0, progress=False, run_dir=run_dir,
            checkpoint_every_n_steps=4, resume=resume, ema_decay=0.9, callbacks=list(callbacks), trace=True,
        )  # fmt: skip
        engine.fit(model, ring_data())  # (shuffled: the data position resumes too)
        return model, engine

    straight, straight_engine = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", [CrashAt(10)])
    resumed, resumed_engine = run(tmp_path / "stopped", resume="auto")
    assert resumed_engine.trace is not None and resumed_engine.trace[0][:2] == ("zero_grad", 8), "resumed at 8"
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = fit_state(straight_engine)
    names = ["discriminator", "generator"]
    assert set(state) == {*(f"{kind}/{n}" for kind in ("optimizer", "scheduler") for n in names), "ema"}
    assert_same_state(state, fit_state(resumed_engine))
    saved = json.loads((newest_complete(tmp_path / "stopped" / "checkpoints") / "state.json").read_text())
    assert set(state) - {"ema"} <= set(saved["state"])


# ---------------------------------------------------------------- the doctor


def test_default_doctor_reports_nothing_for_a_correct_gan():
    # The discriminator's loss uses only detached generator outputs, each optimizer holds half of the
    # parameters, each phase leaves the other's parameters without a gradient: none of it is a mistake.
    engine = Engine(max_epochs=2, batch_size=BATCH, micro_batch_size=32, progress=False)
    engine.fit(GAN(), ring_data())
    assert [f for f in engine.doctor.findings if f.severity in ("warning", "error")] == []


# ---------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """The one 2-process launch (tests/scripts/phases_ddp.py); shared by the tests below, also across
    pytest-xdist workers (tests/procs.shared_dir)."""
    return shared_dir(tmp_path_factory, "phases_ddp", lambda out: launch(SCRIPT, str(out), timeout=240))


def _load(out: Path, name: str):
    return torch.load(out / name, weights_only=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["gan", "gan_nan"])
def test_two_processes_keep_each_phase_exact(ddp, reference, name):
    # 2 processes x 2 micro-batches of 16 against the DCGAN rule on one process and one batch of 64;
    # in "gan_nan" the flagged items sit on one rank only: both ranks skip that phase's step.
    data = ring_data() if name == "gan" else flagged(ring_data(), {4 * BATCH + 3: G_FLAG, 7 * BATCH + 40: D_FLAG})
    hand = reference if name == "gan" else flat_params(dcgan_loop(data)[0])
    params = [_load(ddp, f"params_{name}_r{r}.pt") for r in (0, 1)]
    assert torch.equal(params[0], params[1]), "the ranks hold identical parameters"
    assert max_diff(params[0], hand) <= SPLIT_TOL
    if name == "gan_nan":
        assert [_load(ddp, f"skipped_{name}_r{r}.pt") for r in (0, 1)] == [2 * EPOCHS] * 2


@pytest.mark.multiprocess
def test_two_process_trace_and_doctor(ddp):
    # Every rank runs each phase over its 2 micro-batches (the 40-item window: 16 + 4 per rank); the
    # generator's parameters, idle in the discriminator's phase, trip neither DDP nor the doctor.
    steps_per_epoch = STEPS // EPOCHS
    per_epoch = phase_trace(steps_per_epoch, 2)
    expected = [e for epoch in range(EPOCHS) for e in _shift(per_epoch, epoch * steps_per_epoch)]
    for rank in (0, 1):
        assert _load(ddp, f"trace_gan_r{rank}.pt") == expected, f"rank {rank}"
        assert _load(ddp, f"findings_gan_r{rank}.pt") == [], f"rank {rank}"


@pytest.mark.multiprocess
def test_two_processes_joint_muon_adamw_match_the_hand_loop(ddp):
    # (Joint optimizers, in this launch to save one: 2 processes x 2 micro-batches of 16, float64, against
    # the hand-written loop over whole batches; tests/test_joint_optimizers.py has the 1-process checks.)
    hand = flat_params(joint_loop(regression_data(dtype=torch.float64), dtype=torch.float64))
    for rank in (0, 1):
        assert max_diff(_load(ddp, f"params_joint_r{rank}.pt"), hand) <= TOL


@pytest.mark.multiprocess
def test_two_process_resume_is_bitwise(ddp):
    for rank in (0, 1):
        straight, resumed = _load(ddp, f"resume_straight_r{rank}.pt"), _load(ddp, f"resume_resumed_r{rank}.pt")
        assert (straight["first_step"], resumed["first_step"]) == (0, 8)
        assert torch.equal(straight["params"], resumed["params"])
        assert_same_state(straight["state"], resumed["state"])


def test_validation_of_a_phase_without_default_reports_each_phases_loss():
    data = ring_data()
    val = tuple(t[:100] for t in data)
    engine = Engine(max_epochs=1, batch_size=BATCH, shuffle=False, progress=False)
    module = GAN()
    engine.fit(module, data, val)
    assert {"val/loss/discriminator", "val/loss/generator"} <= set(engine.metrics) and "val/loss" not in engine.metrics
    standalone = Engine(batch_size=BATCH, progress=False).validate(module, val)
    assert standalone["loss/discriminator"] == pytest.approx(engine.metrics["val/loss/discriminator"], abs=1e-6)
    assert standalone["loss/generator"] != standalone["loss/discriminator"]
