"""nan_policy (issue 4): a non-finite loss or gradient norm either raises, naming where it
happened and leaving the parameters and optimizer state as they were before that step, or
drops the step as if its batch had never been seen, up to max_consecutive_skips."""

from __future__ import annotations

import copy

import pytest
import torch

from framework import Callback, Engine, NonFiniteError
from tests.scripts.issue4_common import Net, data, flat, read_metrics, without_windows

BATCH = 16


class Snapshots(Callback):
    """Copies of the parameters and optimizer state after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.opt_state: list[dict] = []

    def on_step_end(self, engine, module, metrics):
        self.params.append(flat(module))
        self.opt_state.append(copy.deepcopy(module.opt.state_dict()["state"]))


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, state in a.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[k][name])), (k, name)


@pytest.mark.parametrize("clip", [1.0, None], ids=["total-norm", "fused-check"])
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_raise_names_step_epoch_batch_and_leaves_the_state_as_before(poison, clip):
    # 4 windows per epoch of 2 micro-batches each; the poisoned forward is the first micro-batch
    # of epoch 1, batch 2 = optimizer step 6. "grad" keeps the loss finite: the gradient check
    # catches it. With clipping the total norm is checked; without, on a step that logs nothing,
    # the engine's cheaper fused check (framework.parallel.grads.NonFiniteCheck) is.
    x, y = data(4 * BATCH)
    module = Net(optimizer="adamw", lr=1e-2, poison_call=(4 + 2) * 2, poison=poison)
    snaps = Snapshots()
    engine = Engine(
        max_epochs=3,
        batch_size=BATCH,
        micro_batch_size=BATCH // 2,
        clip_grad_norm=clip,
        log_every_n_steps=50,
        progress=False,
        callbacks=[snaps],
    )
    with pytest.raises(NonFiniteError, match=r"optimizer step 6 \(epoch 1, batch 2\)") as err:
        engine.fit(module, (x, y))
    assert 'nan_policy="skip"' in str(err.value)  # the message names a way out
    assert len(snaps.params) == 6  # steps 0..5 completed
    after = flat(module)
    assert torch.isfinite(after).all()
    assert torch.equal(after, snaps.params[-1])
    assert_state_equal(module.opt.state_dict()["state"], snaps.opt_state[-1])
    assert all(p.grad is None for p in module.parameters())  # the poisoned gradients are gone


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_skip_equals_a_run_that_never_saw_those_batches(tmp_path, micro_batch_size):
    """Windows 2 and 3 (of 6) hold one NaN item each. Skipping them must leave exactly the state of
    a run over the data without those windows: same parameters, AdamW moments and step counts,
    and a scheduler stepped 6 - 2 = 4 times, i.e. never for a dropped step."""
    bad_windows = [2, 3]
    x, y = data(6 * BATCH, nan_items=[2 * BATCH + 5, 3 * BATCH + BATCH - 1])
    kw = {"batch_size": BATCH, "micro_batch_size": micro_batch_size, "shuffle": False, "progress": False}

    module = Net(optimizer="adamw", lr=1e-2, scheduler="lambda")
    engine = Engine(max_epochs=1, nan_policy="skip", log_every_n_steps=1, run_dir=str(tmp_path), **kw)
    engine.fit(module, (x, y))

    reference = Net(optimizer="adamw", lr=1e-2, scheduler="lambda")
    Engine(max_epochs=1, **kw).fit(reference, without_windows((x, y), bad_windows, BATCH))

    assert engine.skipped_steps == 2 and engine.step == 6
    assert torch.isfinite(flat(module)).all()
    assert torch.equal(flat(module), flat(reference))
    assert_state_equal(module.opt.state_dict()["state"], reference.opt.state_dict()["state"])
    assert module.sched.last_epoch == reference.sched.last_epoch == 6 - 2
    assert module.lambda_calls == reference.lambda_calls == [0, 1, 2, 3, 4]

    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("train/skipped_steps", 0) for r in records] == [0, 0, 1, 2, 2, 2]
    assert all("train/grad_norm" in r and "lr" in r for r in records)
    # The lr after a skipped step is unchanged: the scheduler did not move.
    assert [r["lr"] for r in records] == pytest.approx([1e-2 / s for s in (2, 3, 3, 3, 4, 5)])


def test_skipped_steps_do_not_count_toward_the_limit_once_a_step_succeeds():
    # Two runs of 2 bad windows, separated by a good one, with max_consecutive_skips=3: no error.
    x, y = data(6 * BATCH, nan_items=[0, BATCH, 3 * BATCH, 4 * BATCH])
    engine = Engine(
        max_epochs=1, batch_size=BATCH, shuffle=False, nan_policy="skip", max_consecutive_skips=3, progress=False
    )
    module = Net(optimizer="sgd", lr=0.1)
    engine.fit(module, (x, y))
    assert engine.skipped_steps == 4 and engine.consecutive_skips == 0
    assert torch.isfinite(flat(module)).all()


def test_max_consecutive_skips_raises():
    x, y = data(6 * BATCH, nan_items=list(range(BATCH, 6 * BATCH, BATCH)))  # windows 1..5 all bad
    module = Net(optimizer="sgd", lr=0.1)
    engine = Engine(
        max_epochs=1, batch_size=BATCH, shuffle=False, nan_policy="skip", max_consecutive_skips=3, progress=False
    )
    with pytest.raises(
        NonFiniteError,
        match=r"3 consecutive non-finite steps.*optimizer step 3 \(epoch 0, batch 3\)"
        r".*max_consecutive_skips=3",
    ):
        engine.fit(module, (x, y))
    assert engine.skipped_steps == 3
    assert torch.isfinite(flat(module)).all()


def test_nan_policy_and_skip_limit_are_checked_up_front():
    with pytest.raises(ValueError, match=r"nan_policy='ignore'.*\"raise\" or \"skip\""):
        Engine(max_steps=1, nan_policy="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        Engine(max_steps=1, nan_policy="skip", max_consecutive_skips=0)


# ---------------------------------------------------------------- nan_check="deferred" (framework.guard)
# The verdict is read a step late and a bad step is skipped by the fused optimizer on the device, so
# the loop needs no host sync; the end state must be bitwise that of reading the verdict at once.


@pytest.mark.parametrize("clip", [None, 1.0], ids=["fused-check", "total-norm"])
@pytest.mark.parametrize(
    ("doctor", "micro_batch_size", "bad_windows"),
    [("off", None, [2, 3, 7]), ("basic", 4, [3, 5, 7])],  # (the doctor's checked steps 0, 1, 2, 4 read at once)
)
def test_deferred_skip_ends_bitwise_where_reading_at_once_ends(clip, doctor, micro_batch_size, bad_windows):
    # Two bad steps in a row (the flag must be lowered in between) and the last step (settled after the loop).
    x, y = data(8 * BATCH, nan_items=[w * BATCH + 3 for w in bad_windows])
    kw = dict(batch_size=BATCH, micro_batch_size=micro_batch_size, shuffle=False, progress=False, doctor=doctor)
    kw.update(nan_policy="skip", clip_grad_norm=clip, max_epochs=1)
    runs = {}
    for check in ("step", "deferred"):
        module = Net(optimizer="adamw", lr=1e-2, scheduler="lambda", fused=True)
        engine = Engine(nan_check=check, trace=True, **kw)
        engine.fit(module, (x, y))
        assert engine._fit.defer == (check == "deferred")
        runs[check] = (engine, module)
    (at_once, a), (late, b) = runs["step"], runs["deferred"]
    assert late.skipped_steps == at_once.skipped_steps == 3 and late.step == 8
    assert torch.isfinite(flat(b)).all()
    assert torch.equal(flat(a), flat(b))
    assert_state_equal(a.opt.state_dict()["state"], b.opt.state_dict()["state"])
    assert b.sched.last_epoch == a.sched.last_epoch == 8 - 3
    assert [g["lr"] for g in b.opt.param_groups] == [g["lr"] for g in a.opt.param_groups]
    assert late.trace == at_once.trace  # a skipped step has no optimizer_step/scheduler_step event


def test_deferred_skip_does_change_the_state_when_the_device_skip_is_missing(monkeypatch):
    # Sanity check of the test above: without the optimizer's device-side skip the bad step is applied
    # (its NaN gradient reaches AdamW's moments) and the end state is far from reading at once.
    import framework.step as fs

    monkeypatch.setattr(fs, "step_unless_found", lambda optimizer, found: optimizer.step())
    x, y = data(8 * BATCH, nan_items=[3 * BATCH])
    module = Net(optimizer="adamw", lr=1e-2, fused=True)
    kw = dict(batch_size=BATCH, shuffle=False, progress=False, doctor="off", nan_policy="skip")
    Engine(max_epochs=1, nan_check="deferred", **kw).fit(module, (x, y))
    assert not torch.isfinite(flat(module)).all()


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_deferred_raise_names_the_step_and_leaves_its_state(poison):
    x, y = data(4 * BATCH)
    module = Net(optimizer="adamw", lr=1e-2, poison_call=(4 + 2) * 2, poison=poison, fused=True)
    snaps = Snapshots()
    engine = Engine(
        max_epochs=3,
        batch_size=BATCH,
        micro_batch_size=BATCH // 2,
        nan_check="deferred",
        progress=False,
        callbacks=[snaps],
    )
    with pytest.raises(NonFiniteError, match=r"optimizer step 6 \(epoch 1, batch 2\).*read a step late"):
        engine.fit(module, (x, y))
    # Step 6 ended as if applied (its verdict came with step 7), but the optimizer had skipped it.
    assert len(snaps.params) == 7
    assert torch.equal(flat(module), snaps.params[5]) and torch.equal(snaps.params[6], snaps.params[5])
    assert_state_equal(module.opt.state_dict()["state"], snaps.opt_state[5])
    assert all(p.grad is None for p in module.parameters())


def test_nan_check_deferred_needs_an_optimizer_that_can_skip_on_the_device():
    x, y = data(2 * BATCH)
    with pytest.raises(ValueError, match=r'nan_check="deferred": AdamW cannot skip a step on the device.*fused=True'):
        Engine(max_epochs=1, batch_size=BATCH, nan_check="deferred", progress=False).fit(Net(optimizer="adamw"), (x, y))
    with pytest.raises(ValueError, match=r"nan_check='sometimes'"):
        Engine(max_steps=1, nan_check="sometimes")
    engine = Engine(max_epochs=1, batch_size=BATCH, progress=False)  # "auto" reads at once on CPU: it is free
    engine.fit(Net(optimizer="adamw", fused=True), (x, y))
    assert engine._fit.defer is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_on_a_gpu_auto_defers_with_a_fused_optimizer_and_ends_where_reading_at_once_ends(precision):
    x, y = data(8 * BATCH, nan_items=[3 * BATCH + 1, 6 * BATCH + 2])
    kw = dict(max_epochs=1, batch_size=BATCH, shuffle=False, progress=False, doctor="off", nan_policy="skip")
    runs = {}
    for check in ("step", "auto"):
        module = Net(optimizer="adamw", lr=1e-2, scheduler="lambda", fused=True)
        engine = Engine(nan_check=check, mixed_precision=precision, **kw)
        engine.fit(module, (x, y))
        runs[check] = (engine, module)
    (at_once, a), (late, b) = runs["step"], runs["auto"]
    assert late._fit.defer and not at_once._fit.defer
    assert late.skipped_steps == at_once.skipped_steps == 2
    assert torch.equal(flat(a), flat(b)) and torch.isfinite(flat(b)).all()
    assert b.sched.last_epoch == a.sched.last_epoch == 8 - 2


@pytest.mark.parametrize("nan_check", ["step", "deferred"])
def test_logged_train_loss_leaves_out_skipped_steps(tmp_path, nan_check):
    """Windows 2 and 3 (of 6) have a NaN loss and are skipped. Logged every 3 steps, train/loss is the
    mean of the interval's finite step losses, not NaN; an interval with only bad steps logs NaN."""
    x, y = data(6 * BATCH, nan_items=[2 * BATCH + 5, 3 * BATCH + 1])
    kw = dict(max_epochs=1, batch_size=BATCH, shuffle=False, progress=False, nan_policy="skip", nan_check=nan_check)
    per_step = {}
    for every in (1, 3):
        run_dir = tmp_path / f"every{every}"
        Engine(log_every_n_steps=every, run_dir=str(run_dir), **kw).fit(Net(optimizer="adamw", fused=True), (x, y))
        per_step[every] = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    single = {step: r["train/loss"] for step, r in per_step[1].items()}
    assert [step for step, loss in single.items() if loss != loss] == [3, 4]  # alone in its interval: NaN
    assert per_step[3][3]["train/loss"] == pytest.approx((single[1] + single[2]) / 2, rel=1e-12)
    assert per_step[3][6]["train/loss"] == pytest.approx((single[5] + single[6]) / 2, rel=1e-12)
    assert per_step[3][6]["train/skipped_steps"] == 2


class Applied(Callback):
    """The steps a callback believes applied: added at on_step_end, removed at on_step_retracted."""

    def __init__(self) -> None:
        self.applied: set[int] = set()
        self.retracted: list[int] = []

    def on_step_end(self, engine, module, metrics):
        if engine.last_step.applied:
            self.applied.add(engine.step)

    def on_step_retracted(self, engine, module, step):
        self.retracted.append(step)
        self.applied.discard(step)


def test_a_retracted_step_is_named_as_its_on_step_end_saw_it():
    # Under deferred checking a bad step looks applied at its on_step_end; its retraction must name the same
    # step, so that a callback keeping per-step state ends with exactly the steps reading at once applies.
    x, y = data(8 * BATCH, nan_items=[w * BATCH + 3 for w in (2, 5)])
    kw = dict(batch_size=BATCH, shuffle=False, progress=False, doctor="off", nan_policy="skip", max_epochs=1)
    seen = {}
    for check in ("step", "deferred"):
        callback = Applied()
        Engine(nan_check=check, callbacks=[callback], **kw).fit(Net(optimizer="adamw", fused=True), (x, y))
        seen[check] = callback
    assert seen["step"].applied == {1, 2, 4, 5, 7, 8} and seen["step"].retracted == []
    assert seen["deferred"].retracted == [3, 6]
    assert seen["deferred"].applied == seen["step"].applied
