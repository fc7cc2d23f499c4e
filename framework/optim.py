"""Turn what ``configure_optimizers`` returned into (optimizer, scheduler, interval), or say what is wrong."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Optimization:
    """The optimizer, its optional LR scheduler, and when the scheduler steps ("step" | "epoch")."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    interval: str = "step"


def fused_on_gpu(params: Iterable[torch.Tensor]) -> bool | None:
    """``fused=`` for a torch optimizer: True where every parameter is a floating-point CUDA tensor,
    else None (torch's default). A fused optimizer can skip a non-finite step on the device, so the
    engine's NaN guard needs no host sync per step (``Engine(nan_check="auto")``).

    Example::

        torch.optim.AdamW(self.parameters(), lr=3e-4, fused=fused_on_gpu(self.parameters()))
    """
    params = list(params)
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "step") and hasattr(obj, "state_dict") and hasattr(obj, "optimizer")


def _check_scheduler(scheduler: Any, owner: str) -> None:
    # ReduceLROnPlateau.step needs a metric; the engine steps schedulers without one, so it would
    # fail with a TypeError only at the first scheduler step (after a whole epoch of training).
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            f"{owner} returned ReduceLROnPlateau, which steps on a metric the engine does not pass; "
            "return only the optimizer and step the scheduler yourself in a Callback, e.g. "
            'on_validation_end(self, engine, module, metrics): sched.step(metrics["val/loss"])'
        )


def parse_optimizers(returned: Any, owner: str = "configure_optimizers") -> Optimization:
    """Accept an optimizer, ``(optimizer, scheduler)`` or ``{"optimizer", "scheduler", "interval"}``.

    Example::

        >>> parse_optimizers(torch.optim.SGD(model.parameters(), lr=0.1)).interval
        'step'
    """
    fix = (
        f"{owner} must return an optimizer, (optimizer, scheduler), or "
        '{"optimizer": opt, "scheduler": sched, "interval": "step" | "epoch"}'
    )
    if isinstance(returned, torch.optim.Optimizer):
        return Optimization(returned)
    if isinstance(returned, (tuple, list)):
        if len(returned) == 2 and isinstance(returned[0], torch.optim.Optimizer) and _is_scheduler(returned[1]):
            _check_scheduler(returned[1], owner)
            return Optimization(returned[0], returned[1])
        raise TypeError(
            f"{owner} returned a {type(returned).__name__} of {[type(x).__name__ for x in returned]}; {fix}"
        )
    if isinstance(returned, dict):
        unknown = set(returned) - {"optimizer", "scheduler", "interval"}
        if unknown or not isinstance(returned.get("optimizer"), torch.optim.Optimizer):
            raise TypeError(f"{owner} returned a dict with keys {sorted(returned)}; {fix}")
        scheduler = returned.get("scheduler")
        if scheduler is not None and not _is_scheduler(scheduler):
            raise TypeError(f"{owner} returned scheduler={type(scheduler).__name__}, not an LR scheduler; {fix}")
        _check_scheduler(scheduler, owner)
        interval = returned.get("interval", "step")
        if interval not in ("step", "epoch"):
            raise ValueError(f'{owner} returned interval={interval!r}; use "step" or "epoch"')
        return Optimization(returned["optimizer"], scheduler, interval)
    raise TypeError(f"{owner} returned {type(returned).__name__}; {fix}")
