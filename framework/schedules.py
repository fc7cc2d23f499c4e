"""Learning-rate schedules built from optimizer-step counters.

The engine steps a per-step scheduler exactly once per *applied* optimizer step
(never for a step dropped by ``nan_policy="skip"`` or skipped by the fp16
GradScaler), at any world size. So a schedule written in optimizer steps means
the same thing with 1 or 8 processes and with or without gradient accumulation.

Example:

    >>> from framework.schedules import warmup_cosine
    >>> class Warmed(Classifier):
    ...     def configure_optimizers(self):
    ...         opt = torch.optim.AdamW(self.parameters(), lr=3e-4)
    ...         return opt, warmup_cosine(opt, warmup_steps=2, total_steps=6)  # e.g. 100 and 2_000
    >>> engine = framework.Engine(max_steps=1, batch_size=32, log_every_n_steps=1, progress=False)
    >>> engine.fit(Warmed(), train_data).metrics["lr"]  # after 1 step: the full lr (2 warmup steps)
    0.0003
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "warmup_cosine"]


class WarmupCosine:
    """The LR multiplier of :func:`warmup_cosine` as a function of the optimizer step.

    A class rather than a closure so that ``LambdaLR.state_dict()`` records its
    settings (LambdaLR saves the ``__dict__`` of callable objects, not of functions).

    Example:

        >>> f = WarmupCosine(warmup_steps=2, total_steps=6)
        >>> [round(f(s), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the very first update already moves (an lr of exactly 0 would waste it),
            # and the last warmup step reaches the full lr.
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def __repr__(self) -> str:
        return (
            f"WarmupCosine(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
            f"min_lr_ratio={self.min_lr_ratio})"
        )


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup over ``warmup_steps`` optimizer steps, then cosine decay to ``min_lr_ratio * lr``.

    Step ``s`` (0-based, counted in applied optimizer steps) uses
    ``lr * (s + 1) / warmup_steps`` during warmup, then follows half a cosine from
    ``lr`` at ``s = warmup_steps`` down to ``min_lr_ratio * lr`` at
    ``s = total_steps``, and stays there if training runs longer. Return it from
    ``configure_optimizers`` with the default ``interval="step"``.

    For an epoch-based run, ``total_steps = max_epochs * ceil(len(train_data) / batch_size)``.

    Example:

        >>> optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        >>> scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=6)
        >>> lrs = []
        >>> for _ in range(7):  # what the engine does after each applied optimizer step
        ...     lrs.append(round(scheduler.get_last_lr()[0], 3))
        ...     optimizer.step()
        ...     scheduler.step()
        >>> lrs
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"warmup_cosine({name}={value!r}); use a non-negative int number of optimizer steps")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_cosine(warmup_steps={warmup_steps}, total_steps={total_steps}): total_steps must be greater "
            "than warmup_steps (it counts the warmup too); e.g. total_steps = max_steps"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warmup_cosine(min_lr_ratio={min_lr_ratio!r}); use a fraction of the base lr in [0, 1]")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
