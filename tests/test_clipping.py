"""Gradient clipping (issue 4): by total norm and by value, once per optimizer step, after all
micro-batches; the pre-clip norm is logged at log steps without an extra host read on the others.

With plain SGD and lr=1 one optimizer step moves the parameters by exactly minus the (clipped)
gradient, so the clipped gradient can be read off the parameters."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from framework import Callback, Engine
from tests.scripts.issue4_common import Net, data, flat, read_metrics

BATCH = 32


def manual_grad(module: Net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean loss over (x, y), by hand, on a copy of ``module``."""
    ref = copy.deepcopy(module)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])


def one_step(module: Net, x, y, micro_batch_size=None, **engine_kw) -> torch.Tensor:
    """Take one optimizer step over all of (x, y); return the parameter change."""
    before = flat(module)
    Engine(
        max_steps=1, batch_size=len(x), micro_batch_size=micro_batch_size, shuffle=False, progress=False, **engine_kw
    ).fit(module, (x, y))
    return flat(module) - before


@pytest.mark.parametrize("micro_batch_size", [None, 8])
def test_clip_grad_norm_moves_parameters_by_exactly_c(micro_batch_size):
    x, y = data(BATCH)
    module = Net(optimizer="sgd", lr=1.0)
    grad = manual_grad(module, x, y)
    raw = grad.norm().item()
    c = raw / 4
    assert raw > c  # the precondition: this step is clipped
    delta = one_step(module, x, y, micro_batch_size, clip_grad_norm=c)
    # Clipping once over the whole window's gradient gives a step of norm c exactly; clipping each
    # micro-batch's gradient (or clipping before the last micro-batch) would give less than c.
    assert delta.norm().item() == pytest.approx(c, rel=1e-5)
    torch.testing.assert_close(delta, -grad * (c / raw), rtol=1e-4, atol=1e-6)


def test_clip_grad_norm_leaves_a_small_gradient_alone():
    x, y = data(BATCH)
    module = Net(optimizer="sgd", lr=1.0)
    grad = manual_grad(module, x, y)
    delta = one_step(module, x, y, micro_batch_size=8, clip_grad_norm=grad.norm().item() * 2)
    torch.testing.assert_close(delta, -grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("micro_batch_size", [None, 8])
def test_clip_grad_value_clamps_each_element(micro_batch_size):
    x, y = data(BATCH)
    module = Net(optimizer="sgd", lr=1.0)
    grad = manual_grad(module, x, y)
    v = grad.abs().quantile(0.5).item()  # half the elements get clipped, half do not
    assert (grad.abs() > v * 1.01).any() and (grad.abs() < v * 0.99).any()
    delta = one_step(module, x, y, micro_batch_size, clip_grad_value=v)
    torch.testing.assert_close(delta, -grad.clamp(-v, v), rtol=1e-4, atol=1e-6)
    assert delta.abs().max().item() <= v * (1 + 1e-5)


def test_logged_grad_norm_is_the_pre_clip_norm(tmp_path):
    x, y = data(BATCH)
    module = Net(optimizer="sgd", lr=1.0)
    raw = manual_grad(module, x, y).norm().item()
    Engine(
        max_steps=1,
        batch_size=BATCH,
        micro_batch_size=8,
        shuffle=False,
        progress=False,
        clip_grad_norm=raw / 4,
        log_every_n_steps=1,
        run_dir=str(tmp_path),
    ).fit(module, (x, y))
    (record,) = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert record["train/grad_norm"] == pytest.approx(raw, rel=1e-5)  # not raw / 4: measured before clipping
    assert record["lr"] == 1.0


class _TensorCount(Net):
    """Counts items as a tensor (as token-level losses do): the engine's all-reduce path for the counts."""

    def count_items(self, batch):
        return torch.as_tensor(len(batch[1]))


class _HostReads(Callback):
    """Snapshots the number of device->host reads after every optimizer step."""

    def __init__(self, counter: list[int]) -> None:
        self.counter, self.at_step_end = counter, []

    def on_step_end(self, engine, module, metrics):
        self.at_step_end.append((self.counter[0], bool(metrics)))


@pytest.mark.parametrize("module_cls", [Net, _TensorCount], ids=["int_counts", "tensor_counts"])
def test_one_host_read_per_step_and_grad_norm_only_on_log_steps(monkeypatch, module_cls):
    """Each read of a tensor's value on the host is a GPU sync. The step allows exactly one
    (non-finite check + stop flag together); reading the grad norm waits for log steps."""
    counter = [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            counter[0] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = _HostReads(counter)
    x, y = data(6 * 16)
    # doctor="off": the doctor's own sparse checks read values on the steps they check (its
    # contract, tested with it); this test pins the engine's step itself.
    Engine(
        max_steps=6,
        batch_size=16,
        micro_batch_size=8,
        clip_grad_norm=1.0,
        log_every_n_steps=3,
        shuffle=False,
        progress=False,
        doctor="off",
        callbacks=[reads],
    ).fit(module_cls(optimizer="sgd", lr=0.1), (x, y))
    monkeypatch.undo()
    # Reads during steps 2..6 (step 1 also holds the setup's reads); steps 3 and 6 are log steps.
    counts = [n for n, _ in reads.at_step_end]
    per_step = [b - a for a, b in itertools.pairwise(counts)]
    logged = [flag for _, flag in reads.at_step_end[1:]]
    assert logged == [False, True, False, False, True]
    plain = [n for n, flag in zip(per_step, logged, strict=True) if not flag]
    assert plain == [1, 1, 1], f"host reads on non-log steps: {plain} (want exactly 1 each)"
    assert all(n > 1 for n, flag in zip(per_step, logged, strict=True) if flag)  # the loss and grad norm are read there


def test_clipping_arguments_are_checked_before_training():
    with pytest.raises(ValueError, match="clip_grad_norm"):
        Engine(max_steps=1, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="clip_grad_value"):
        Engine(max_steps=1, clip_grad_value=-1.0)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        Engine(max_steps=1, clip_grad_norm=math.nan)
