"""framework/optim.py: what configure_optimizers may return, the errors for anything else, and fused_on_gpu."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.optim import Optimization, fused_on_gpu, parse_optimizers, takes_phase


@pytest.fixture
def opt():
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def test_optimizer_alone(opt):
    parsed = parse_optimizers(opt)
    assert parsed.first == Optimization(opt, None, "step") and len(parsed) == 1 and not parsed.named


@pytest.mark.parametrize("container", [tuple, list])
def test_optimizer_and_scheduler(opt, container):
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert parse_optimizers(container([opt, sched])).first == Optimization(opt, sched, "step")


def test_dict_forms(opt):
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert parse_optimizers({"optimizer": opt}).first == Optimization(opt, None, "step")
    assert parse_optimizers({"optimizer": opt, "scheduler": sched}).first == Optimization(opt, sched, "step")
    assert parse_optimizers({"optimizer": opt, "scheduler": sched, "interval": "epoch"}).first == Optimization(
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


def test_a_dict_of_named_optimizers_in_order_each_in_any_single_form():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    b = torch.optim.AdamW(model[1].parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(b, 1)
    parsed = parse_optimizers({"sgd": a, "adamw": {"optimizer": b, "scheduler": sched, "interval": "epoch"}})
    assert parsed.named and [o.name for o in parsed] == ["sgd", "adamw"]
    assert parsed.items[1] == Optimization(b, sched, "epoch", "adamw")
    assert parsed.lrs() == {"lr": 0.1, "lr/sgd": 0.1, "lr/adamw": 1e-3}
    assert parse_optimizers({"opt": a}).named  # one named optimizer is a dict of one


def test_a_parameter_in_two_optimizers_is_refused_naming_both():
    model = nn.Linear(2, 2)
    a, b = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([model.bias], lr=0.1)
    with pytest.raises(ValueError, match=r"in both optimizers 'a' and 'b'"):
        parse_optimizers({"a": a, "b": b})


def test_a_scheduler_of_another_optimizer_is_refused():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    b = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scheduler built on another optimizer"):
        parse_optimizers({"a": (a, torch.optim.lr_scheduler.StepLR(b, 1)), "b": b})


def test_takes_phase_reads_the_signature():
    class Joint:
        def compute_loss(self, outputs, targets): ...

    class Phased:
        def compute_loss(self, outputs, targets, phase): ...

    assert not takes_phase(Joint().compute_loss) and takes_phase(Phased().compute_loss)
