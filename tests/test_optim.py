"""framework/optim.py: what configure_optimizers may return, the errors for anything else, and fused_on_gpu."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.optim import Optimization, fused_on_gpu, parse_optimizers


@pytest.fixture
def opt():
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def test_optimizer_alone(opt):
    assert parse_optimizers(opt) == Optimization(opt, None, "step")


@pytest.mark.parametrize("container", [tuple, list])
def test_optimizer_and_scheduler(opt, container):
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert parse_optimizers(container([opt, sched])) == Optimization(opt, sched, "step")


def test_dict_forms(opt):
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert parse_optimizers({"optimizer": opt}) == Optimization(opt, None, "step")
    assert parse_optimizers({"optimizer": opt, "scheduler": sched}) == Optimization(opt, sched, "step")
    assert parse_optimizers({"optimizer": opt, "scheduler": sched, "interval": "epoch"}) == Optimization(
        opt, sched, "epoch"
    )


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_plateau_scheduler_refused_up_front(opt, form):
    # The engine steps schedulers without a metric; ReduceLROnPlateau would crash at the end of
    # the first epoch instead. Refuse it at setup, naming the callback way to step it.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    returned = (opt, plateau) if form == "tuple" else {"optimizer": opt, "scheduler": plateau, "interval": "epoch"}
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau.*Callback.*on_validation_end"):
        parse_optimizers(returned, "Net.configure_optimizers")


FIX = r"must return an optimizer, \(optimizer, scheduler\), or"


@pytest.mark.parametrize(
    "make",
    [
        lambda o: None,
        lambda o: 0.1,
        lambda o: o.param_groups,
        lambda o: [o],
        lambda o: (o, o),
        lambda o: (o, torch.optim.lr_scheduler.StepLR(o, 1), "step"),
        lambda o: {"opt": o},
        lambda o: {"optimizer": o, "lr_scheduler": None},
        lambda o: {"optimizer": "adam"},
        lambda o: {"optimizer": o, "scheduler": o},
    ],
    ids=[
        "none",
        "float",
        "param_groups",
        "list1",
        "two_optimizers",
        "triple",
        "wrong_key",
        "extra_key",
        "string_optimizer",
        "optimizer_as_scheduler",
    ],
)
def test_junk_is_a_type_error_naming_the_forms(opt, make):
    with pytest.raises(TypeError, match=FIX):
        parse_optimizers(make(opt), "Net.configure_optimizers")


def test_error_names_the_owner_and_what_came_back(opt):
    with pytest.raises(TypeError, match=r"^Net.configure_optimizers returned NoneType; Net.configure_optimizers must"):
        parse_optimizers(None, "Net.configure_optimizers")
    with pytest.raises(TypeError, match=r"returned a tuple of \['SGD', 'SGD'\]"):
        parse_optimizers((opt, opt), "Net.configure_optimizers")


def test_bad_interval(opt):
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(ValueError, match=r"interval='batch'; use \"step\" or \"epoch\""):
        parse_optimizers({"optimizer": opt, "scheduler": sched, "interval": "batch"})


def test_fused_on_gpu_leaves_cpu_and_non_float_parameters_to_torch():
    assert fused_on_gpu(torch.nn.Linear(2, 2).parameters()) is None  # (a generator is fine)
    assert fused_on_gpu([]) is None
    assert fused_on_gpu([torch.zeros(2, dtype=torch.long)]) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_on_gpu_on_cuda_parameters():
    linear = torch.nn.Linear(2, 2).cuda()
    assert fused_on_gpu(linear.parameters()) is True
    assert fused_on_gpu([*linear.parameters(), torch.zeros(2)]) is None  # one on the CPU: torch's default
    opt = torch.optim.AdamW(linear.parameters(), fused=fused_on_gpu(linear.parameters()))
    assert opt.defaults["fused"] is True
