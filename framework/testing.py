"""Helpers for your own pytest suite: check a LoopModule's loop on one batch, in seconds.

``check_loop`` runs every doctor check (``doctor="full"``) through a real
:class:`~framework.Engine` on one batch and raises with the report;
``assert_overfits`` is the classic sanity check that the loop can drive the
loss on one batch close to zero. Both leave the module as they found it
(parameters, buffers, gradients, modes, device) and do not disturb the
global RNG.

Example:

    >>> from framework.testing import assert_overfits, check_loop
    >>> batch = train_data[:8]  # (inputs, targets): one collated batch
    >>> doctor = check_loop(Classifier(), batch)  # raises LoopError if the doctor finds anything
    >>> class FastClassifier(Classifier):
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters(), lr=0.1)
    >>> assert_overfits(FastClassifier(), batch, steps=40) <= 0.05
    True

In your own suite they are plain tests, e.g. ``def test_loop_is_sound(): check_loop(MyModel(), batch)`` in
``tests/test_my_model.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .doctor import Doctor, LoopError, LoopWarning, format_table, report_rows
from .engine import Engine, NonFiniteError
from .module import LoopModule


def check_loop(module: LoopModule, batch: Any, *, steps: int = 2, ignore: Iterable[str] = ()) -> Doctor:
    """Run the doctor's checks on ``batch`` and raise :class:`~framework.LoopError` with the report if it
    finds anything (errors or warnings).

    It runs ``steps`` optimizer steps on ``batch`` (one micro-batch each) through a real Engine with
    ``doctor="full"``, then one validation pass over it, so every check runs:
    the loss (scalar, differentiable, computed from this step's outputs, a mean rather than a sum),
    ``backward()``/``zero_grad()``/``optimizer.step()`` calls inside your hooks, mode switches, parameters
    that get no gradient, are missing from the optimizer or do not change, ``count_items``, non-finite
    values. Afterwards the module is restored (parameters, buffers, gradients, modes, device) and the
    global RNG is untouched. ``batch`` is one collated batch, as your data loader yields it.

    ``ignore`` lists check ids (see ``framework.doctor.CHECKS``) whose findings you accept.
    Returns the :class:`~framework.doctor.Doctor` (its ``format_report()`` is the table).

    Example:

        >>> batch = train_data[:16]  # (inputs, targets): one collated batch
        >>> print(check_loop(Classifier(), batch).format_report().splitlines()[-1])
        15 ok, 0 warning, 0 error, 1 not run
        >>> class Summed(Classifier):
        ...     def compute_loss(self, outputs, targets):
        ...         return F.cross_entropy(outputs, targets, reduction="sum")
        >>> check_loop(Summed(), batch)
        Traceback (most recent call last):
        ...
        framework.doctor.findings.LoopError: check_loop found 1 problem(s) in Summed's loop:
        - [warning] Summed.compute_loss scales with the batch size, like a sum: ...

        ``check_loop(module, batch, ignore={"updates"})`` accepts what one check finds (e.g. a frozen stem).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}; use at least 1 (2 lets the doctor check parameter updates)")
    ignored = set(ignore)
    engine = Engine(max_steps=steps, max_epochs=1, doctor="full", progress=False, seed=0)
    failure: BaseException | None = None
    with _restored(module), warnings.catch_warnings():
        # The findings are collected and raised together below; don't also print each one.
        warnings.simplefilter("ignore", LoopWarning)
        try:
            engine.fit(module, _repeat(batch, steps))
            engine.validate(module, _repeat(batch, 1))
        except (LoopError, NonFiniteError) as e:
            failure = e  # recorded by the doctor as a finding; reported with the others
    doctor = engine.doctor
    findings = [f for f in doctor.findings if f.check not in ignored]
    if failure is not None and not any(f.severity == "error" for f in doctor.findings):
        raise failure  # an error the doctor did not record (should not happen): don't swallow it
    if findings:
        rows = report_rows(findings, doctor.ran, doctor.not_run)
        summary = "\n".join(f"- [{f.severity}] {f.message}" for f in findings)
        raise LoopError(
            f"check_loop found {len(findings)} problem(s) in {type(module).__name__}'s loop:\n{summary}\n\n"
            f"{format_table(rows)}",
            findings[0].check,
        ) from failure
    return doctor


def assert_overfits(
    module: LoopModule, batch: Any, *, steps: int = 100, threshold: float = 0.05, seed: int = 0
) -> float:
    """Assert that training on ``batch`` alone for ``steps`` optimizer steps drives its loss to
    ``threshold`` or below, and return that final loss.

    The classic sanity check: a model and loop that cannot memorise one batch have a bug (a loss not
    connected to the parameters, inputs that never reach the output, targets misaligned with inputs, a
    learning rate far off) that no amount of data will fix. It uses your ``configure_optimizers``, the
    engine's default ``doctor="basic"``, and measures the loss in eval mode (``Engine.validate``) before
    and after. The module is restored afterwards and the global RNG untouched (``seed`` seeds the run).
    For a loss with a floor above zero (label smoothing, a KL term), pass a ``threshold`` above it.

    Example:

        >>> batch = train_data[:8]  # (inputs, targets) of 8 items
        >>> assert_overfits(Classifier(), batch, steps=5)  # AdamW's lr=1e-3 needs far more than 5 steps
        Traceback (most recent call last):
        ...
        AssertionError: Classifier did not overfit one batch: its loss fell from ... in 5 optimizer steps; ...
        >>> class FastClassifier(Classifier):
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=0.1)
        >>> assert_overfits(FastClassifier(), batch, steps=40) <= 0.05
        True
    """
    if steps < 1:
        raise ValueError(f"steps={steps}; use a positive number of optimizer steps")
    engine = Engine(max_steps=steps, max_epochs=1, progress=False, seed=seed)
    with _restored(module, seed=seed):
        first = engine.validate(module, _repeat(batch, 1))["loss"]
        try:
            engine.fit(module, _repeat(batch, steps))
        except NonFiniteError as e:
            raise AssertionError(
                f"{type(module).__name__} did not overfit one batch: the loss went non-finite during training "
                f"(from {first:.4g}). {e}"
            ) from e
        last = engine.validate(module, _repeat(batch, 1))["loss"]
    if not last <= threshold:
        trend = "rose" if last > first else "fell"
        raise AssertionError(
            f"{type(module).__name__} did not overfit one batch: its loss {trend} from {first:.4g} to {last:.4g} in "
            f"{steps} optimizer steps; wanted <= {threshold:g}. A model that cannot memorise one batch usually "
            "has a loop or model bug: a loss not connected to the parameters, inputs that never reach the "
            "output, targets misaligned with inputs, or a learning rate far too small (or too large, if the loss "
            "rose). Run framework.testing.check_loop(module, batch) for loop mistakes; if the loss was still "
            "falling, raise steps or the learning rate"
        )
    return last


# -- helpers ------------------------------------------------------------------------------


def _identity(x: Any) -> Any:
    return x


def _repeat(batch: Any, n: int) -> DataLoader[Any]:
    """A DataLoader yielding ``batch`` itself ``n`` times: each is one micro-batch, one optimizer step."""
    batches: Any = [batch] * n  # a list is a valid map-style dataset
    return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity)


@contextlib.contextmanager
def _restored(module: nn.Module, seed: int = 0) -> Iterator[None]:
    """Run a block that trains ``module``, then put back its values, gradients, modes and device, and
    the global RNG streams (the block runs seeded, so results are reproducible)."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = [(p, p.grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    device = next((p.device for p in module.parameters()), None)
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            if device is not None and next(module.parameters()).device != device:
                module.to(device)
            module.load_state_dict(state)
            for p, g in grads:
                p.grad = g
            for m, was in modes:
                m.training = was
