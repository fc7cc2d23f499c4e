"""Checks ``loss_value`` and ``loss_graph``: ``compute_loss`` returns a differentiable scalar tensor,
computed in this step from this step's forward.

``loss_value`` runs every step: three attribute reads for a good loss; the error path says what was
returned and how to fix it. ``loss_graph`` runs on checked steps and reads no device value:

- a stale loss (kept from an earlier step, e.g. ``self.last_loss``): autograd numbers its nodes in
  creation order (:func:`~framework.doctor.inspect.autograd_clock`), so a loss whose ``grad_fn`` is
  numbered below the clock read when this forward (or this ``compute_loss``) began was built before it.
  That holds whatever the loss depends on, so an alternating phase whose loss does not reach
  ``outputs`` (a discriminator's loss of ``outputs.detach()``) is not mistaken for a stale one. Only
  when the numbers say "older" is the graph walked, to confirm the loss does not reach this step's
  outputs either (no false alarm if a loss were ever numbered on another thread);
- a forward run under ``torch.no_grad()`` whose loss still requires grad (a weight penalty hides it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .context import Context
from .findings import LoopError
from .inspect import autograd_clock, reaches, sequence_nr, tensors_in


def split_loss(result: Any, owner: str) -> tuple[Any, dict[str, Any]]:
    """``compute_loss``'s result as ``(loss, extras)``: a dict ``{"loss": scalar, **extras}`` is split, anything
    else is the loss with no extras. A dict without ``"loss"``, with a key that is not a str, or with an extra
    that is not a scalar is a :class:`LoopError` that shows the keys (``owner`` names the method).

    Example:

        >>> from framework.doctor.loss import split_loss
        >>> split_loss({"loss": torch.tensor(0.5), "acc": 0.9}, "Net.compute_loss")
        (tensor(0.5000), {'acc': 0.9})
        >>> split_loss({"acc": 0.9}, "Net.compute_loss")
        Traceback (most recent call last):
        ...
        framework.doctor.findings.LoopError: Net.compute_loss returned a dict with keys ['acc'] and no 'loss'; ...
    """
    if not isinstance(result, Mapping):
        return result, {}
    keys = list(result)
    if "loss" not in result or not all(isinstance(k, str) for k in keys):
        raise LoopError(
            f"{owner} returned a dict with keys {keys} and no 'loss'; return {{'loss': <the scalar to "
            "backpropagate>, **extras}, e.g. {'loss': ce, 'acc': acc} (the extras are logged as train/<name>, "
            "like self.log(name, value))",
            "loss_value",
        )
    extras = {k: v for k, v in result.items() if k != "loss"}
    for k, v in extras.items():
        scalar = (isinstance(v, torch.Tensor) and v.numel() == 1) or (
            isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not scalar:
            shown = f"a tensor of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise LoopError(
                f"{owner} returned a dict with keys {keys} whose {k!r} is {shown}; an extra is logged like "
                f"self.log({k!r}, value): give a scalar (a number or a one-element tensor), e.g. its .mean()",
                "loss_value",
            )
    return result["loss"], extras


class LossValue:
    """``loss_value`` (and the ``loss_graph`` finding of a forward that cannot learn at all): a
    :class:`LoopError` for a float, a ``[32]`` tensor or a detached loss."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_loss(self, module: nn.Module, loss: Any, outputs: Any, phase: str | None) -> None:
        record = self.ctx.record
        record.ran.add("loss_value")
        if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad:
            return  # a good loss: done, at the cost of three attribute reads
        name = type(module).__name__
        method = f"{name}.compute_loss" if phase is None else f"{name}.compute_loss(..., phase={phase!r})"
        if not isinstance(loss, torch.Tensor):
            record.fail(
                "loss_value",
                f"{method} returned a {type(loss).__name__} ({loss!r:.40}); return a scalar tensor, "
                "the mean loss over the batch's items, e.g. F.cross_entropy(outputs, targets) "
                "(a Python number has no gradient: no .item(), float() or math.* on the loss)",
            )
        if loss.ndim != 0:
            record.fail(
                "loss_value",
                f"{method} returned a tensor of shape {list(loss.shape)}; return a scalar "
                "(mean over items), e.g. loss.mean() or F.cross_entropy(..., reduction='mean')",
            )
        outs = tensors_in(outputs) if outputs is not None else []  # the error path only: cost is no concern
        if any(t.requires_grad for t in outs):
            record.fail(
                "loss_value",
                f"{method} returned a loss that does not require grad although forward's outputs "
                "do: compute_loss detached it (.detach(), .item(), torch.tensor(...), .numpy(), or a "
                "non-differentiable op such as argmax). Fix: compute the loss from `outputs` with "
                "differentiable torch ops, e.g. F.cross_entropy(outputs, targets)",
            )
        if outs:
            record.fail(
                "loss_graph",
                f"{name}.forward returned outputs that do not require grad: forward ran under "
                "torch.no_grad()/torch.inference_mode() or detached its result, so nothing in forward can "
                "learn. Fix: remove the no_grad/inference_mode/.detach() from forward (the engine already "
                "runs validation without gradients)",
            )
        record.fail(
            "loss_value",
            f"{method} returned a loss that does not require grad: it is detached "
            "(.detach(), .item(), torch.tensor(...)) or forward ran under torch.no_grad()/inference_mode(); "
            "compute the loss from forward's outputs with differentiable torch ops",
        )


class LossGraph:
    """``loss_graph``: the loss was built in this step, from this step's forward."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._mark: int | None = None

    def on_checked_step_start(self) -> None:
        self._mark = autograd_clock()

    def on_watch_enter(self, module: nn.Module) -> None:
        self._mark = autograd_clock()  # a loss made in this block is numbered above it

    def on_checked_loss(self, module: nn.Module, loss: Any, outputs: Any, phase: str | None) -> None:
        if outputs is None:
            return
        record, name = self.ctx.record, type(module).__name__
        record.ran.add("loss_graph")
        found = tensors_in(outputs)
        outs = [t for t in found if t.requires_grad]
        if found and not outs and phase is None:
            # (In alternating phases a forward may return data for the phases to use; not a sign of no_grad.)
            record.fail(
                "loss_graph",
                f"{name}.forward returned outputs that do not require grad (forward ran under torch.no_grad()/"
                f"inference_mode() or detached them), yet {name}.compute_loss returned a loss that does: the loss "
                "does not come from this step's forward. Fix: remove the no_grad/.detach() from forward and "
                "compute the loss from `outputs`",
            )
        if self._is_stale(loss, outs, phase):
            record.fail(
                "loss_graph",
                f"{name}.compute_loss returned a loss that is not computed from this step's forward outputs: a "
                "stale loss kept from an earlier step (e.g. self.last_loss; its autograd graph was built before "
                "this step's forward), or one computed from something else. Its gradient would not be this "
                "batch's. Fix: compute the loss from `outputs` inside compute_loss, every step",
            )

    def _is_stale(self, loss: torch.Tensor, outs: list[torch.Tensor], phase: str | None) -> bool:
        if loss.grad_fn is None:  # a leaf that requires grad: made by no operation of this step
            return not any(loss is t for t in outs)
        number = sequence_nr(loss)
        if number is None or self._mark is None:  # no autograd clock: the graph walk alone decides
            return phase is None and bool(outs) and reaches(loss, outs) is False
        if number > self._mark:
            return False  # built after this block began
        # Numbered before: confirm that it does not reach this step's outputs either.
        return not outs or reaches(loss, outs) is False
