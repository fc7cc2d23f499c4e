"""The loop doctor: catches the classic training-loop mistakes and names the fix.

The cheap checks (types and shapes of what the user's hooks return, the module's
mode) run on every step: they read Python metadata only, never a device value.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


class LoopError(RuntimeError):
    """A mistake in the user's loop code, with the fix in the message."""


class LoopWarning(UserWarning):
    """A likely mistake in the user's loop code; emitted once per run."""


class Doctor:
    """Checks run by the engine; ``level`` is "basic" (default), "full" or "off".

    Example::

        Engine(doctor="full")   # every check, including the costly ones
    """

    def __init__(self, level: str = "basic") -> None:
        if level not in ("basic", "full", "off"):
            raise ValueError(f'doctor={level!r}; use "basic", "full" or "off"')
        self.level = level
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, LoopWarning, stacklevel=3)

    # -- every step (metadata only) -------------------------------------------------

    def check_loss(self, module: nn.Module, loss: Any) -> None:
        """``compute_loss`` must return a differentiable scalar tensor."""
        name = type(module).__name__
        if not isinstance(loss, torch.Tensor):
            raise LoopError(
                f"{name}.compute_loss returned a {type(loss).__name__} ({loss!r:.40}); return a scalar tensor, "
                "the mean loss over the batch's items, e.g. F.cross_entropy(outputs, targets) "
                "(a Python number has no gradient)"
            )
        if loss.ndim != 0:
            raise LoopError(
                f"{name}.compute_loss returned a tensor of shape {list(loss.shape)}; return a scalar "
                "(mean over items), e.g. loss.mean() or F.cross_entropy(..., reduction='mean')"
            )
        if not loss.requires_grad:
            raise LoopError(
                f"{name}.compute_loss returned a loss that does not require grad: it is detached "
                "(.detach(), .item(), torch.tensor(...)) or forward ran under torch.no_grad()/inference_mode(); "
                "compute the loss from forward's outputs with differentiable torch ops"
            )

    def check_train_mode(self, module: nn.Module, where: str) -> None:
        if not module.training:
            raise LoopError(
                f"{type(module).__name__} switched itself to eval mode during training (in {where}); "
                "remove the .eval() call: the engine sets train mode for training and eval mode for validation"
            )

    def check_eval_mode(self, module: nn.Module) -> None:
        if module.training:
            raise LoopError(
                f"{type(module).__name__} switched itself to train mode during validation; remove the "
                ".train() call from forward/compute_loss/compute_metrics: the engine sets the modes"
            )

    def check_count(self, module: nn.Module, n: Any) -> None:
        """``count_items`` must be a non-negative integer (int or integer tensor)."""
        name = type(module).__name__
        if isinstance(n, bool) or not isinstance(n, (int, torch.Tensor)):
            raise LoopError(
                f"{name}.count_items returned {type(n).__name__} {n!r:.40}; return an int (or an integer "
                "tensor): the number of items compute_loss averages over"
            )
        if isinstance(n, torch.Tensor):
            if n.ndim != 0 or n.is_floating_point() or n.is_complex():
                raise LoopError(
                    f"{name}.count_items returned a {n.dtype} tensor of shape {list(n.shape)}; return an "
                    "integer scalar, e.g. (targets != -100).sum()"
                )
            return
        if n < 0:
            raise LoopError(f"{name}.count_items returned {n}; return the (non-negative) number of items in the batch")
        if n == 0:
            self.warn_once(
                "count_zero",
                f"{name}.count_items returned 0 for a batch, so it adds nothing to the gradient; if that is "
                "not intended, count the items compute_loss averages over (e.g. the non-padding tokens)",
            )

    # -- once, at fit start ---------------------------------------------------------

    def check_setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        name = type(module).__name__
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not trainable:
            raise LoopError(
                f"{name} has no trainable parameters (none with requires_grad=True); create layers in "
                "__init__ as attributes and don't freeze all of them"
            )
