"""framework.guard: the pieces of the deferred NaN verdict. A fused optimizer must skip a flagged step
exactly (parameters, state, step counts), the host copy must not change under later writes, and a
skipped step's scheduler step must be undone exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.guard import Pending, read_later, step_unless_found, why_not_deferred

FUSED = {
    "Adam": {},
    "AdamW": {"weight_decay": 0.1},
    "SGD": {"momentum": 0.9, "weight_decay": 0.1},
    "Adagrad": {},
}


def snapshot(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    return [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", list(FUSED))
def test_a_fused_optimizer_skips_a_flagged_step_exactly_and_takes_the_next(name):
    p = nn.Parameter(torch.linspace(-1, 1, 6))
    opt = getattr(torch.optim, name)([p], lr=0.1, fused=True, **FUSED[name])
    assert why_not_deferred(opt, None, "step") is None
    p.grad = torch.ones(6)
    step_unless_found(opt, torch.zeros(()))  # a good step is taken
    before = snapshot(opt, p)
    p.grad = torch.full((6,), float("nan"))
    step_unless_found(opt, torch.ones(()))  # a flagged one is not: nothing moves, step counts included
    after = snapshot(opt, p)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # a plain step() is plain again
    p.grad = torch.ones(6)
    step_unless_found(opt, torch.zeros(()))
    assert not torch.equal(p.detach(), before[0])


def test_why_not_deferred_names_the_fix():
    p = nn.Parameter(torch.ones(2))
    assert "fused=True" in (why_not_deferred(torch.optim.AdamW([p]), None, "step") or "")

    class Stepper:  # a scheduler-like object without state: its step cannot be undone
        def step(self) -> None: ...

    fused = torch.optim.SGD([p], lr=0.1, fused=True)
    assert "no state_dict" in (why_not_deferred(fused, Stepper(), "step") or "")
    assert why_not_deferred(fused, Stepper(), "epoch") is None  # an epoch scheduler steps after settling


def test_read_later_keeps_the_value_it_was_given():
    flag = torch.zeros(1)
    read = read_later(flag)
    flag.fill_(1.0)  # the engine's flag tensor is reused by the next step
    assert read() == [0.0]


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_pending_undo_restores_the_scheduler_and_the_learning_rates(tensor_lr):
    p = nn.Parameter(torch.ones(2))
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    opt = torch.optim.SGD([p], lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    p.grad = torch.ones(2)
    opt.step()
    sched.step()
    expected = (sched.state_dict(), float(opt.param_groups[0]["lr"]))
    pending = Pending.before_step(1, 0, 1, lambda: [1.0], opt, sched)
    opt.step()
    sched.step()  # what the engine does for a step whose verdict is still on its way
    assert float(opt.param_groups[0]["lr"]) != expected[1]
    pending.undo(opt, sched)
    assert sched.state_dict() == expected[0] and float(opt.param_groups[0]["lr"]) == expected[1]
    sched.step()  # and it goes on from there as if that step had never been
    assert sched.last_epoch == expected[0]["last_epoch"] + 1
