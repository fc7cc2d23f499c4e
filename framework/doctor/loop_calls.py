"""Check ``loop_calls``: the user's ``forward``/``compute_loss`` leave ``backward()``, ``zero_grad()``
and ``optimizer.step()`` to the engine (checked steps, inside :meth:`~framework.doctor.Doctor.watch`).

Two ways to catch them. At the call: while the user's code runs, ``zero_grad`` of the module and of
the optimizers is replaced by one that raises, and a global optimizer step pre-hook refuses a step
of this module's parameters (an inner-loop optimizer over other tensors is fine). By the effect: a
``backward()`` or a submodule's ``zero_grad()`` changes the identity or the version counter of some
parameter's ``.grad`` (metadata only, no device read), compared with a snapshot taken when the watch
began. The patches are removed when the watch ends, also when the user's code raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .context import Context
from .inspect import version_of

_MISSING = object()


class LoopCalls:
    """``loop_calls``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._grads: list[tuple[nn.Parameter, torch.Tensor | None, int]] = []
        self._patched: list[tuple[Any, Any]] = []
        self._hook: Any = None

    def on_watch_enter(self, module: nn.Module) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        fit = self.ctx.fit
        self.ctx.record.ran.add("loop_calls")
        self._grads = [(p, p.grad, version_of(p.grad)) for _, p in fit.stepped]
        for owner in (module, *fit.optimizers):
            self._patched.append((owner, owner.__dict__.get("zero_grad", _MISSING)))
            owner.__dict__["zero_grad"] = self._user_zero_grad
        self._hook = register_optimizer_step_pre_hook(self._user_optimizer_step)

    def on_watch_exit(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for owner, previous in reversed(self._patched):
            if previous is _MISSING:
                owner.__dict__.pop("zero_grad", None)
            else:
                owner.__dict__["zero_grad"] = previous
        self._patched, self._grads = [], []

    def on_checked_forward(self, module: nn.Module) -> None:
        self._check_grads_untouched()

    def on_checked_loss(self, module: nn.Module, loss: Any, outputs: Any, phase: str | None) -> None:
        if self.ctx.watching:
            self._check_grads_untouched()

    def _where(self) -> str:
        return f"{self.ctx.module_name()}.{self.ctx.where}"

    def _user_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        # Raised at the call, so the traceback points at the user's line.
        self.ctx.record.fail(
            "loop_calls",
            f"{self._where()} called zero_grad(): the engine zeroes the gradients once per optimizer step, "
            "before the first micro-batch; zeroing them again in forward/compute_loss throws away the "
            "gradients of the earlier micro-batches. Fix: remove the zero_grad() call",
        )

    def _user_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.ctx.watching:
            return
        # An inner-loop optimizer over other tensors (meta-learning, test-time training) is legitimate;
        # one that steps this module's parameters runs step 5 before the batch's gradient is complete.
        stepped = self.ctx.fit.stepped_ids
        if not any(id(p) in stepped for g in optimizer.param_groups for p in g["params"]):
            return
        self.ctx.record.fail(
            "loop_calls",
            f"{self._where()} called optimizer.step(): the engine steps the optimizer once per optimizer step, "
            "after the backward of every micro-batch; stepping inside forward/compute_loss updates the "
            "parameters from an incomplete (or stale) gradient. The step was blocked, the parameters are "
            "unchanged. Fix: remove the optimizer.step() call",
        )

    def _check_grads_untouched(self) -> None:
        """Did the user's code just run backward() or zero_grad()? Each gradient's identity and version
        counter against the snapshot: metadata only, no device read."""
        names = self.ctx.fit.param_names
        for p, g, version in self._grads:
            now = p.grad
            if now is g and version_of(now) == version:
                continue
            if g is None:
                what = "backward() (gradients appeared)"
            elif now is None:
                what = "zero_grad() (gradients were set to None)"
            else:
                what = "backward() or zero_grad(set_to_none=False) (gradients changed)"
            self.ctx.record.fail(
                "loop_calls",
                f"{self._where()} called {what}, e.g. on {names.get(id(p), 'a parameter')}: the engine runs "
                "backward once per micro-batch, scaled so the step's gradient is the mean over the whole batch, "
                "and zeroes gradients once per step; doing it again in forward/compute_loss counts gradients "
                "twice or drops them. Fix: remove the call and return the loss from compute_loss",
            )
