"""framework/doctor under the strategies: messages that name a fix that works on the device and
strategy (issues #15), FSDP2's DTensor parameters checked on their local shards (issue #16, one
process over gloo here; tests/doctor/test_ranks.py runs two), and the initial-weights check.

The doctor is driven the way the engine drives it (start_fit, start_step, watch, the checks after
forward, loss, backward and the optimizer step) on real modules, optimizers and DTensors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopError, LoopModule, LoopWarning
from framework.data import Batching
from framework.doctor import Doctor
from tests.helpers import TinyClassifier, classification_data, doctor_step

X, Y = classification_data(32)


def drive(module: LoopModule, doctor: Doctor, steps: int = 3, **start) -> list[str]:
    """Train ``module`` on one batch for ``steps`` optimizer steps, reporting to ``doctor``; returns the
    LoopWarnings' texts."""
    opt = module.configure_optimizers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doctor.start_fit(module, opt, start.pop("batching", None), **start)
        module.train()
        for _ in range(steps):
            doctor_step(doctor, module, [opt], (X, Y), count=True)
        doctor.end_fit()
    return [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]


class WithBatchNorm(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


TWO_PROCESSES = Batching(batch_size=64, micro_batch_size=32, accumulation=1, world_size=2)


def test_batchnorm_advice_under_ddp_on_cpu_names_no_syncbatchnorm():
    said = drive(WithBatchNorm(), Doctor(), steps=1, batching=TWO_PROCESSES, strategy="ddp", device_type="cpu")
    assert len(said) == 1, said
    msg = said[0]
    assert (
        "WithBatchNorm has BatchNorm layers (net.1) and each forward sees a micro-batch of 32 items, not the global batch of 64"
        in msg
    )
    assert (
        "use GroupNorm/LayerNorm, which need no batch statistics (SyncBatchNorm only works on CUDA, not on cpu)" in msg
    )
    assert "or accept per-process statistics" in msg
    assert "convert_sync_batchnorm" not in msg  # "SyncBatchNorm layers only work with GPU modules" on CPU DDP


def test_batchnorm_advice_under_ddp_on_cuda_names_syncbatchnorm():
    (msg,) = drive(WithBatchNorm(), Doctor(), steps=1, batching=TWO_PROCESSES, strategy="ddp", device_type="cuda")
    assert "nn.SyncBatchNorm.convert_sync_batchnorm(module)" in msg and "GroupNorm/LayerNorm" in msg


class Unused(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(3, 3)


def test_unused_parameters_under_ddp_name_find_unused_parameters():
    said = drive(Unused(), Doctor(), steps=1, batching=TWO_PROCESSES, strategy="ddp")
    assert len(said) == 1, said
    assert said[0].startswith("2 trainable parameter(s) of Unused received no gradient: spare.weight, spare.bias")
    assert "Engine(find_unused_parameters=True)" in said[0]
    assert "find_unused_parameters" not in drive(Unused(), Doctor(), steps=2)[0]  # one process: not a DDP matter


def test_unknown_strategy_is_refused():
    module = TinyClassifier()
    with pytest.raises(ValueError, match=r"strategy='deepspeed'; use one of 'single', 'ddp', 'fsdp'"):
        Doctor().start_fit(module, module.configure_optimizers(), strategy="deepspeed")


def test_initial_weights_on_one_process_is_trivially_the_same():
    module = TinyClassifier()
    doctor = Doctor()
    doctor.check_initial_weights(module)  # no process group: nothing to compare
    drive(module, doctor, steps=1)
    assert "initial_weights" in doctor.ran and doctor.findings == []


# ------------------------------------------------------------------ FSDP2 on one process (gloo)


@pytest.fixture
def gloo_group():
    dist = torch.distributed
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t)
    return t


class ZeroLrHead(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(
            [{"params": self.net[0].parameters()}, {"params": self.net[3].parameters(), "lr": 0.0}], lr=0.1
        )


def sharded(module: LoopModule, mesh) -> LoopModule:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    fully_shard(module, mesh=mesh)
    assert type(next(module.parameters())).__name__ == "DTensor"
    return module


FSDP = dict(strategy="fsdp", reduce=all_reduce)


def test_fsdp2_parameters_are_checked_on_their_shards(gloo_group):
    torch.manual_seed(0)
    doctor = Doctor("full")
    module = sharded(TinyClassifier(), gloo_group)
    assert drive(module, doctor, **FSDP) == [] and doctor.findings == [], doctor.format_report()
    status = {c: s for c, _, s, _ in doctor.report()}
    for check in ("trainable", "optimizer_coverage", "loop_calls", "loss_graph", "gradients", "updates"):
        assert status[check] == "ok", (check, doctor.format_report())
    # The halves probe would all-gather on every rank: not run, and the report says why.
    assert "not run under FSDP" in doctor.not_run["count_weights"]
    assert "not run under FSDP" in doctor.not_run["loss_scaling"]


def test_fsdp2_true_positives_no_gradient_and_no_change(gloo_group):
    said = drive(sharded(Unused(), gloo_group), Doctor(), **FSDP)
    assert len(said) == 1 and "received no gradient: spare.weight, spare.bias" in said[0], said
    said = drive(sharded(ZeroLrHead(), gloo_group), Doctor(), **FSDP)
    assert len(said) == 1 and "param group 1 has lr=0: net.3.weight, net.3.bias" in said[0], said


def test_fsdp2_non_finite_gradients_are_named(gloo_group):
    module = sharded(TinyClassifier(), gloo_group)
    doctor = Doctor()
    doctor.start_fit(module, module.configure_optimizers(), **FSDP)
    loss = module.compute_loss(module(X), Y)
    loss.backward()
    weight = module.net[3].weight
    weight.grad.to_local()[0, 0] = float("inf")
    detail = doctor.diagnose_nonfinite(loss.detach(), list(module.parameters()))
    assert detail == ": non-finite gradients in net.3.weight" and doctor.nonfinite_detail == detail
    assert [f.check for f in doctor.findings] == ["finite"]


def test_initial_weights_after_sharding_says_it_cannot_compare(gloo_group):
    doctor = Doctor()
    module = sharded(TinyClassifier(), gloo_group)
    doctor.check_initial_weights(module, reduce=all_reduce)
    assert "after FSDP sharded the model" in doctor.not_run["initial_weights"]


def test_a_stale_loss_is_still_caught_under_fsdp(gloo_group):
    class Stale(TinyClassifier):
        def compute_loss(self, outputs, targets):
            if not hasattr(self, "kept"):
                self.kept = F.cross_entropy(outputs, targets)
            return self.kept

    with pytest.raises(LoopError, match="stale loss"):
        drive(sharded(Stale(), gloo_group), Doctor(), **FSDP)
