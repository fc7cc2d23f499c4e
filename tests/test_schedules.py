"""LR schedulers (issue 4): one scheduler step per applied optimizer step (per epoch with
interval="epoch") at any world size and accumulation, the LR logged as ``lr``, and
``framework.schedules.warmup_cosine``."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import framework
from framework import Engine
from framework.schedules import WarmupCosine, warmup_cosine
from tests.helpers import ROOT, launch
from tests.scripts.issue4_common import Net, data, read_metrics


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)


def test_warmup_cosine_shape():
    opt = _opt()
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Linear warmup: the first step already moves; the last warmup step reaches the peak.
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    # Cosine decay from the peak at step 4 to 0 at step 12 (half-way at step 8), then flat.
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[8] == pytest.approx(0.25)
    assert lrs[6] == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[12:] == pytest.approx([0.0] * 4)


def test_warmup_cosine_min_ratio_and_no_warmup():
    f = WarmupCosine(warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5)


def test_warmup_cosine_state_dict_records_its_settings():
    sched = warmup_cosine(_opt(), warmup_steps=3, total_steps=9)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [{"warmup_steps": 3, "total_steps": 9, "min_lr_ratio": 0.0}]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"warmup_steps": 10, "total_steps": 10}, "total_steps must be greater than warmup_steps"),
        ({"warmup_steps": -1, "total_steps": 10}, r"warmup_steps=-1.*non-negative int"),
        ({"warmup_steps": 1, "total_steps": 10.0}, r"total_steps=10.0.*non-negative int"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 2.0}, r"min_lr_ratio=2.0.*\[0, 1\]"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(_opt(), **kw)


def test_schedules_is_reachable_from_the_package():
    assert framework.schedules.warmup_cosine is warmup_cosine


def test_per_step_scheduler_once_per_optimizer_step_with_accumulation(tmp_path):
    # 40 items, batch 16, micro 4: windows of 4, 4 and 2 micro-batches; 2 epochs = 6 steps.
    x, y = data(40)
    module = Net(optimizer="sgd", lr=0.3, scheduler="lambda")
    engine = Engine(
        max_epochs=2,
        batch_size=16,
        micro_batch_size=4,
        log_every_n_steps=1,
        run_dir=str(tmp_path),
        progress=False,
        trace=True,
    )
    engine.fit(module, (x, y))
    assert module.lambda_calls == list(range(7))  # construction + one per step, none per micro-batch
    assert sum(name == "scheduler_step" for name, _, _ in engine.trace) == 6
    # Logged after the step: the lr the next step will use.
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r["lr"] for r in records] == pytest.approx([0.3 / (1 + s) for s in range(1, 7)])


def test_epoch_interval_steps_once_per_epoch(tmp_path):
    x, y = data(40)
    module = Net(optimizer="sgd", lr=0.3, scheduler="lambda_epoch")
    engine = Engine(
        max_epochs=3,
        batch_size=16,
        micro_batch_size=8,
        log_every_n_steps=1,
        run_dir=str(tmp_path),
        progress=False,
        trace=True,
    )
    engine.fit(module, (x, y))
    assert module.lambda_calls == [0, 1, 2, 3]
    assert not any(name == "scheduler_step" for name, _, _ in engine.trace)  # nothing per step
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    # 3 steps per epoch; within an epoch the lr is constant, and it drops between epochs.
    assert [r["lr"] for r in records] == pytest.approx([0.3] * 3 + [0.15] * 3 + [0.1] * 3)


def test_warmup_cosine_drives_the_engine_lr(tmp_path):
    class Cosine(Net):
        def configure_optimizers(self):
            self.opt = torch.optim.SGD(self.parameters(), lr=0.2)
            return self.opt, warmup_cosine(self.opt, warmup_steps=2, total_steps=8)

    x, y = data(8 * 8)
    Engine(max_steps=8, batch_size=8, log_every_n_steps=1, run_dir=str(tmp_path), progress=False).fit(Cosine(), (x, y))
    f = WarmupCosine(2, 8)
    logged = [r["lr"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert logged == pytest.approx([0.2 * f(s) for s in range(1, 9)])


@pytest.mark.multiprocess
def test_two_processes_one_scheduler_step_per_optimizer_step_and_nan_steps_agree(tmp_path):
    """One launch (2 CPU processes, 2 accumulation steps each) checks: a LambdaLR is called exactly
    once per optimizer step on each rank (Accelerate's prepared scheduler would step it
    num_processes times); a NaN seen by rank 1 only is dropped by both ranks under "skip" and
    raised by both under "raise" (a rank that went on alone would hang in the next all-reduce)."""
    launch(ROOT / "tests" / "scripts" / "issue4_ddp.py", str(tmp_path), timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, out in enumerate(ranks):
        assert out["world_size"] == 2 and out["rank"] == r and out["forwards_per_step"] == [2]
        assert out["lambda_calls"] == list(range(7)), out["lambda_calls"]  # 2 epochs x 3 windows
        assert out["lambda_epoch_calls"] == [0, 1, 2]
        assert out["skip"]["skipped_steps"] == 1 and out["skip"]["lambda_calls"] == [0, 1, 2]
        assert all(math.isfinite(v) for v in out["skip"]["params"])
        assert out["raise"] is not None and "optimizer step 1 (epoch 0, batch 1)" in out["raise"]
    assert ranks[0]["lambda_params"] == ranks[1]["lambda_params"]
    assert ranks[0]["skip"]["params"] == ranks[1]["skip"]["params"]  # the ranks stayed in step
    # nan_check="deferred": the verdict a step late (skipped on the device), bitwise the same end state.
    for out in ranks:
        at_once, late = out["fused_step"], out["fused_deferred"]
        assert (at_once["deferred"], late["deferred"]) == (False, True)
        assert late["skipped_steps"] == at_once["skipped_steps"] == 2  # window 1 of both epochs
        assert late["last_epoch"] == at_once["last_epoch"] == 6 - 2
        assert late["params"] == at_once["params"] and all(math.isfinite(v) for v in late["params"])
        assert out["deferred_raise"] is not None and "optimizer step 1 (epoch 0, batch 1)" in out["deferred_raise"]
    assert ranks[0]["fused_deferred"]["params"] == ranks[1]["fused_deferred"]["params"]
