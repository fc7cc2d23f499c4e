"""The NaN guard's verdict a step late, so that a GPU step needs no host sync.

The guard decides, before the optimizer step, whether the gradients and the loss are finite.
Read at once, that verdict is one device-to-host sync per step: free on CPU, but on a GPU it
drains the queue of kernels every step. An optimizer that can skip its own step on the device
(torch's fused Adam, AdamW, SGD and Adagrad read a ``found_inf`` tensor, as GradScaler uses them)
lets the engine defer the read instead:

1. the step runs with ``found_inf`` = the guard's flag, so a bad step changes no parameter and
   no optimizer state (step counters included), on the device, without the host knowing;
2. the flag is copied to the host asynchronously, and read at the next step, after that step's
   backward is queued: by then the copy is normally done, and waiting for it alone (not for the
   work queued after it) leaves the GPU busy;
3. if it was bad, the host undoes its own part of that step (the per-step LR scheduler and the
   param groups' lr) and counts it as skipped, or raises: the same end state as a verdict read
   at once. Callbacks saw that step end as if applied; the error cannot name the parameters
   whose gradients went bad (``nan_check="step"`` does).

:func:`why_not_deferred` says whether an optimizer and its scheduler allow the deferred read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .parallel.grads import pack, zero_grad

NAN_CHECKS = ("auto", "step", "deferred")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm under ``nan_policy="raise"``; parameters are left untouched.

    Example:

        >>> class Diverges(Classifier):
        ...     def compute_loss(self, outputs, targets):
        ...         return F.cross_entropy(outputs, targets) * float("nan")
        >>> model = Diverges()
        >>> before = model.net.weight.clone()
        >>> framework.Engine(max_steps=2, batch_size=32, progress=False).fit(model, train_data)
        Traceback (most recent call last):
        ...
        framework.guard.NonFiniteError: non-finite loss or gradient norm at optimizer step 0 (epoch 0, batch 0): ...
        >>> torch.equal(model.net.weight, before)  # parameters untouched
        True
    """


def why_not_deferred(optimizer: torch.optim.Optimizer, scheduler: Any, interval: str) -> str | None:
    """None if steps with this optimizer and scheduler can be skipped on the device and undone on
    the host, else why not, in the user's terms (a fused AdamW: None; a plain SGD: why not, and the fix).
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return (
            f"{type(optimizer).__name__} cannot skip a step on the device; create it with fused=True "
            "(torch.optim.Adam, AdamW, SGD and Adagrad support it)"
        )
    if scheduler is not None and interval == "step" and not hasattr(scheduler, "load_state_dict"):
        return f"the per-step scheduler {type(scheduler).__name__} has no state_dict to undo a skipped step with"
    return None


@dataclass
class Verdict:
    """What the one host read of an optimizer step found: ``bad`` (a non-finite loss or gradient, NaN
    policy's business), ``overflow`` (fp16: the GradScaler will skip the step) and ``stop`` (every rank's
    stop flags, where they travelled with the read; else None).
    """

    bad: bool
    overflow: bool = False
    stop: list[float] | None = None


def read_verdict(
    window_loss: torch.Tensor,
    grad_norm: torch.Tensor | None,
    flag: torch.Tensor | None,
    *,
    stop: torch.Tensor | None,
    world_size: int,
    scaler: Any,
    optimizers: list[torch.optim.Optimizer],
) -> Verdict:
    """The one host read per step (``nan_check="step"``): did anything go non-finite, will fp16's
    GradScaler skip the step, and does any rank want to stop?

    - Several processes: after the gradient all-reduce the gradients are identical on every rank, so the
      global norm decides the same everywhere (a rank's non-finite loss reached it: the engine made that
      rank's last backward non-finite). The stop flags join the same read.
    - One process: the fused non-finite ``flag`` (:class:`framework.parallel.grads.NonFiniteCheck`) where
      it was run, else the norm and the loss.
    - fp16: the GradScaler owns overflowing gradients, so only the loss is checked here; the overflow flag
      its ``unscale_`` just computed joins the same read, so telling a skipped step needs no
      ``GradScaler.get_scale()`` (a host sync each, before and after).
    """
    device = window_loss.device
    overflow: list[torch.Tensor] = []
    if scaler is not None:
        found = [v for opt in optimizers for v in scaler._found_inf_per_device(opt).values()]
        overflow = [sum(found, torch.zeros((), device=device)).double().reshape(1)]
    if world_size > 1:
        assert grad_norm is not None  # (the fused check runs on one process only)
        bad = ~torch.isfinite(grad_norm) if scaler is None else torch.zeros((), dtype=torch.bool, device=device)
        extra = [stop] if stop is not None else []
        values = torch.cat([bad.double().reshape(1), *extra, *overflow]).tolist()
        n_stop = 1 + (stop.numel() if stop is not None else 0)
        return Verdict(bool(values[0]), any(values[n_stop:]), values[1:n_stop] if n_stop > 1 else None)
    if scaler is not None:
        bad_f, *overflow_f = torch.cat([(~torch.isfinite(window_loss)).double().reshape(1), *overflow]).tolist()
        return Verdict(bool(bad_f), any(overflow_f))
    if flag is not None:
        return Verdict(flag.item() != 0.0)
    assert grad_norm is not None
    return Verdict(not all(map(math.isfinite, pack([grad_norm, window_loss]).tolist())))


def read_later(flags: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying ``flags`` to the host without waiting; the returned function waits for that copy
    only (not for the work queued after it) and returns the values: call it now, queue the next step's
    forward and backward, then call the function it returned.
    """
    if flags.device.type == "cuda":
        host = flags.to("cpu", non_blocking=True)  # pinned memory, filled in stream order
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()

        def read() -> list[float]:
            done.synchronize()
            return host.tolist()

        return read
    host = flags.detach().clone()  # CPU: computed already; a copy, as the flag tensor is reused
    return host.tolist


def step_unless_found(optimizer: torch.optim.Optimizer, found: torch.Tensor) -> None:
    """``optimizer.step()``, which the optimizer itself turns into a no-op (parameters, state and step
    counts untouched) where the 0-dim float tensor ``found`` is non-zero: GradScaler's protocol for
    fused optimizers, with no scale.
    """
    holder: Any = optimizer
    holder.found_inf, holder.grad_scale = found, None
    try:
        optimizer.step()
    finally:
        del holder.found_inf, holder.grad_scale


@dataclass
class Pending:
    """A step taken with its verdict still on the way, and what the host must undo if it was bad."""

    step: int  # the engine's step counter when it was taken
    epoch: int
    batch: int
    read: Callable[[], list[float]]  # [bad, then (time_up, preempted) under several processes]
    scheduler_state: dict[str, Any] | None  # the per-step scheduler before it stepped for this step (if any)
    lrs: list[Any]  # each param group's lr before that (with a per-step scheduler)

    @classmethod
    def before_step(
        cls, step: int, epoch: int, batch: int, read: Callable[[], list[float]], optimizer: Any, scheduler: Any
    ) -> Pending:
        """Record what a bad verdict must undo: call before the scheduler steps for this step. Without a
        per-step scheduler nothing on the host changes the learning rates, and nothing is recorded."""
        if scheduler is None:
            return cls(step, epoch, batch, read, None, [])
        lrs = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]
        return cls(step, epoch, batch, read, scheduler.state_dict(), lrs)

    def undo(self, optimizer: Any, scheduler: Any) -> None:
        """Put the scheduler and the learning rates back to before this (skipped) step."""
        if self.scheduler_state is None:
            return
        scheduler.load_state_dict(self.scheduler_state)
        for group, lr in zip(optimizer.param_groups, self.lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(lr)  # (a tensor lr is updated in place by schedulers)
            else:
                group["lr"] = lr


class NanPolicy:
    """What a step with a non-finite loss or gradient does: it is dropped on every rank and counted
    (``nan_policy="skip"``, raising after ``max_consecutive_skips`` in a row), or it raises
    :class:`NonFiniteError` (``"raise"``). Either way the bad gradients go first, so nothing can step on them.

    ``counters`` holds ``skipped_steps`` and ``consecutive_skips`` (the engine's, checkpointed). Under
    ``"skip"``, :meth:`bad` counts a bad step at ``(optimizer step, epoch, batch)`` and raises after
    ``max_consecutive`` in a row.
    """

    def __init__(self, policy: str, max_consecutive: int, counters: Any) -> None:
        self.policy, self.max_consecutive, self.counters = policy, max_consecutive, counters

    def good(self) -> None:
        """A step whose verdict was finite."""
        self.counters.consecutive_skips = 0

    def bad(
        self,
        optimizers: list[torch.optim.Optimizer],
        position: tuple[int, int, int],
        *,
        drop_gradients: bool = True,
        deferred: bool = False,
        detail: str = "",
    ) -> None:
        """Count or raise for a bad step at ``position`` = (optimizer step, epoch, batch); ``detail`` names the
        culprit (what the ``nonfinite`` event's subscribers found: the doctor names the loss or parameters)."""
        where = "optimizer step {} (epoch {}, batch {})".format(*position)
        if drop_gradients:
            for optimizer in optimizers:
                zero_grad(optimizer)  # the bad gradients go before anything can step on them
        if self.policy == "raise":
            late = " (read a step late, nan_check=deferred; nan_check='step' names the parameters)" if deferred else ""
            raise NonFiniteError(
                f"non-finite loss or gradient norm at {where}{detail}{late}; parameters and "
                "optimizer state are unchanged. Fix: lower the learning rate, set clip_grad_norm, check that batch's "
                'data, or use nan_policy="skip" to drop such steps'
            )
        self.counters.skipped_steps += 1
        self.counters.consecutive_skips += 1
        if self.counters.consecutive_skips >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.counters.consecutive_skips} consecutive non-finite steps up to {where} "
                f"(max_consecutive_skips={self.max_consecutive}); training has diverged: lower the "
                "learning rate or set clip_grad_norm"
            )
