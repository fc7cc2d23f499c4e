"""Issue 17, joint optimizers: ``configure_optimizers`` returns ``{"muon": Muon(matrices), "adamw": AdamW(rest)}``
and ``compute_loss`` takes no ``phase``: one forward, one loss, one backward per micro-batch, then every
optimizer steps on its own parameters, with its own scheduler.

The reference is the hand-written loop of tests/scripts/phases_common.py (zero both, backward once,
step both). Muon orthogonalises its update in bfloat16 (torch.optim.Muon's Newton-Schulz iteration),
so in float32 the rounding differences of an accumulated gradient (about 1e-7) flip bf16 roundings
and grow to 1e-4..3e-3 in the parameters within 12 steps. The accumulation test therefore runs in
float64, where the accumulated and whole-batch gradients round to the same bf16 values and the
runs agree to 3e-17. (2 processes: tests/test_phases.py, in its one launch.)
"""

from __future__ import annotations

import json

import pytest
import torch

from framework import Engine
from tests.helpers import CrashAt
from tests.scripts.phases_common import (
    BATCH,
    EPOCHS,
    TOL,
    Joint,
    assert_same_state,
    fit_state,
    flat_params,
    joint_loop,
    max_diff,
    regression_data,
)
from tests.threads import one_thread  # noqa: F401  (autouse: tiny models, one thread)

STEPS = EPOCHS * 4  # 232 items: 3 windows of 64 and one of 40 per epoch


def fit(dtype=torch.float32, *, micro=None, with_schedulers=False, **options) -> tuple[Joint, Engine]:
    model = Joint(dtype, with_schedulers)
    engine = Engine(
        max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=micro, shuffle=False, seed=0, progress=False, **options
    )
    engine.fit(model, regression_data(dtype=dtype))
    return model, engine


def test_joint_step_matches_the_hand_written_loop():
    hand = flat_params(joint_loop(regression_data()))
    model, _ = fit()
    assert max_diff(flat_params(model), hand) <= TOL  # measured: 0 (bitwise)
    assert max_diff(hand, flat_params(Joint())) > 1e-2, "training moved the parameters"
    # AdamW's gradients never reset (zeroing only Muon's) is far outside the tolerance:
    assert max_diff(flat_params(joint_loop(regression_data(), zero_adamw=False)), hand) > 1000 * TOL


@pytest.mark.parametrize("micro", [16, 8])
def test_accumulation_matches_the_whole_batch(micro):
    # Windows of 64 as 4 (8) micro-batches; the 40-item window as 16 + 16 + 8 (5 x 8).
    data = regression_data(dtype=torch.float64)
    hand = flat_params(joint_loop(data, dtype=torch.float64))
    model, _ = fit(torch.float64, micro=micro)
    assert max_diff(flat_params(model), hand) <= TOL
    # Each micro-batch's mean divided by the accumulation steps (the naive scaling) is not the same step:
    naive = flat_params(joint_loop(data, dtype=torch.float64, micro=micro))
    assert max_diff(naive, hand) > 1000 * TOL


def test_each_optimizer_steps_its_own_scheduler(tmp_path):
    # Muon: StepLR per optimizer step; AdamW: ExponentialLR per epoch.
    lrs: list[tuple[float, float]] = []
    hand = flat_params(joint_loop(regression_data(), with_schedulers=True, lrs=lrs))
    assert max_diff(hand, flat_params(joint_loop(regression_data()))) > 1000 * TOL, "the schedules change the run"
    model, engine = fit(with_schedulers=True, run_dir=tmp_path, log_every_n_steps=1, trace=True)
    assert max_diff(flat_params(model), hand) <= TOL
    # The logged lrs: `lr` is the first optimizer's, `lr/<name>` each one's, after that step.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r, (lr_muon, lr_adamw) in zip(train, lrs, strict=True):
        assert (r["lr"], r["lr/muon"], r["lr/adamw"]) == (lr_muon, lr_muon, lr_adamw), r["step"]
    assert len({r["lr/muon"] for r in train}) == 5 and len({r["lr/adamw"] for r in train}) == EPOCHS
    # The trace: one optimizer_step per optimizer, each naming it; scheduler_step for the per-step one only.
    assert engine.trace is not None
    for step in range(STEPS):
        events = [e for e in engine.trace if e[1] == step]
        assert events[0] == ("zero_grad", step, 0)  # one reset for both optimizers
        assert events[1:4] == [(n, step, 0) for n in ("forward", "loss", "backward")]  # (one micro-batch)
        k = 1
        assert events[4:] == [
            ("optimizer_step", step, k, "muon"),
            ("optimizer_step", step, k, "adamw"),
            ("scheduler_step", step, k, "muon"),
        ]


def test_clipping_uses_one_norm_over_every_optimizer():
    # Joint: one backward, one global gradient norm over all parameters (as with a single optimizer).
    clip = 0.05
    hand = flat_params(joint_loop(regression_data(), clip=clip))
    assert max_diff(hand, flat_params(joint_loop(regression_data()))) > 1000 * TOL, "the clip is active"
    model, _ = fit(clip_grad_norm=clip)
    assert max_diff(flat_params(model), hand) <= TOL


def test_resume_restores_every_optimizer_and_scheduler_bitwise(tmp_path):
    # Stopped after step 7, resumed from the checkpoint of step 6: torch.equal with the uninterrupted run,
    # Muon's momentum buffers, AdamW's moments, both schedulers (one per step, one per epoch) and the EMA.
    def run(run_dir, callbacks=(), resume=None):
        model = Joint(with_schedulers=True)
        engine = Engine(
            max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=32, seed=0, progress=False, run_dir=run_dir,
            checkpoint_every_n_steps=3, resume=resume, ema_decay=0.9, callbacks=list(callbacks), trace=True,
        )  # fmt: skip
        engine.fit(model, regression_data())
        return model, engine

    straight, straight_engine = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", [CrashAt(7)])
    resumed, resumed_engine = run(tmp_path / "stopped", resume="auto")
    assert resumed_engine.trace is not None and resumed_engine.trace[0][:2] == ("zero_grad", 6), "resumed at 6"
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = fit_state(straight_engine)
    assert set(state) == {"optimizer/muon", "optimizer/adamw", "scheduler/muon", "scheduler/adamw", "ema"}
    assert state["optimizer/muon"]["state"], "Muon has state to restore"
    assert_same_state(state, fit_state(resumed_engine))


def test_default_doctor_reports_nothing_for_muon_and_adamw():
    # Each optimizer holds a part of the parameters: together they cover all of them.
    _, engine = fit(max_steps=4)
    assert [f for f in engine.doctor.findings if f.severity in ("warning", "error")] == []
