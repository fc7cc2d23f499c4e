"""Step 5, the optimizer step, as one object: unscale, norm, clip, the NaN guard's verdict, step,
schedulers, EMA, for one or several optimizers.

The engine builds one :class:`OptimizerStep` per group of optimizers that step together: all of
them in joint mode (one backward, then every optimizer steps on its own parameters, e.g. Muon for
the matrices + AdamW for the rest), or one per phase in alternating mode (a GAN's discriminator,
then its generator). Calling it after the window's last backward does, in this order:

1. average the gradients over the processes where no DDP wrapper does (alternating phases);
2. unscale them (fp16's GradScaler);
3. measure the global gradient norm where something needs it (clipping, a log step, several
   processes), else one fused non-finite check; clip by norm, then by value;
4. decide whether the loss and the gradients are finite, in one host read together with the
   stop flags of every rank (or a step late, on the device, under ``nan_check="deferred"``);
5. step every optimizer (through the GradScaler under fp16), then the per-step schedulers, then
   the EMA of the parameters.

It returns a :class:`StepResult`; every rank's stop flags, read with the verdict, go to the fit's
:class:`~framework.parallel.preemption.Stops`. The variants of the one host read (several processes,
fp16, the fused check) are the guard's (:func:`framework.guard.read_verdict`); what the step does is
announced on the loop's events (``applied``, ``scheduler_step``, ``nonfinite``, ``step_retracted``).
The engine calls it as ``step(window_loss, log_now=..., read_now=..., stop=..., position=(step, epoch,
batch))`` and keeps the result as ``engine.last_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .events import Event, Events
from .guard import NanPolicy, Pending, read_later, read_verdict, step_unless_found
from .optim import EMA, Optimization
from .parallel.grads import NonFiniteCheck
from .parallel.preemption import Stops
from .parallel.strategy import Strategy

if TYPE_CHECKING:
    from .config import StepConfig
    from .parallel.runtime import Runtime


@dataclass
class StepResult:
    """What one optimizer step did.

    ``applied``: the optimizers stepped (as far as the host knows: under ``nan_check="deferred"`` the
    verdict comes a step late, ``pending`` is then True and a bad step is retracted later, with the
    ``on_step_retracted`` callback). ``skipped``: dropped by the NaN policy or a GradScaler overflow.
    ``grad_norm``: the global norm before clipping, where it was measured.

    Example:

        >>> class Diverges(Classifier):
        ...     def compute_loss(self, outputs, targets):
        ...         return F.cross_entropy(outputs, targets) * float("nan")
        >>> engine = framework.Engine(max_steps=2, batch_size=32, nan_policy="skip", progress=False)
        >>> engine.fit(Diverges(), train_data).last_step
        StepResult(applied=False, skipped=True, pending=False, grad_norm=None)
        >>> engine.step, engine.skipped_steps  # skipped steps count as steps
        (2, 2)
    """

    applied: bool
    skipped: bool = False
    pending: bool = False
    grad_norm: torch.Tensor | None = None


class OptimizerStep:
    """Step 5 for ``group`` (see the module docstring).

    ``events`` hears of each optimizer that stepped (``applied``), each per-step scheduler
    (``scheduler_step``), a bad step before the NaN policy acts (``nonfinite``) and a step that a deferred
    verdict turned into a skipped one (``step_retracted``). ``stops`` receives every rank's stop flags
    whenever they are read (with the verdict: at once, or a step late). ``ema`` (if any) is updated after
    each applied step, skipped on the device with the step under a deferred verdict.
    """

    def __init__(
        self,
        group: list[Optimization],
        *,
        strategy: Strategy,
        rt: Runtime,
        config: StepConfig,
        policy: NanPolicy,
        events: Events,
        stops: Stops,
        defer: bool = False,
        ema: EMA | None = None,
        labelled: bool = False,
    ) -> None:
        self.group, self.strategy, self.rt, self.policy = group, strategy, rt, policy
        self.events, self.stops = events, stops
        self.optimizers = [o.optimizer for o in group]
        self.params = [p for o in group for p in o.params]
        self.clip_norm, self.clip_value = config.clip_grad_norm, config.clip_grad_value
        self.defer, self.ema = defer, ema
        self.labels = [o.name if labelled else None for o in group]
        self._check = NonFiniteCheck()
        self._micro = 0
        self._pending: tuple[tuple[int, int, int], Callable[[], list[float]], list[Pending]] | None = None

    def __call__(
        self,
        window_loss: torch.Tensor,
        *,
        log_now: bool,
        read_now: bool,
        stop: torch.Tensor | None,
        position: tuple[int, int, int],
        micro: int = 0,
    ) -> StepResult:
        """Step 5 after the window's last backward. ``log_now``: the norm is logged (measure it);
        ``read_now``: read the verdict at once even where it could come a step late; ``stop``: the stop
        flags of every rank, on the device; ``position`` = (optimizer step, epoch, batch) names a bad step;
        ``micro`` (the window's micro-batch count) goes into the events."""
        self._micro = micro
        if self._pending is not None:
            self.settle()  # the previous step's verdict first, if it came a step late (before this step applies)
        # 1. average the gradients over the processes where no wrapper did (alternating phases)
        self.strategy.reduce_gradients(self.params)
        # 2. unscale them (fp16)
        scaler = self.rt.scaler
        if scaler is not None:
            for optimizer in self.optimizers:
                scaler.unscale_(optimizer)
        # 3. the global norm (or one fused non-finite check where nothing reads the norm), then clipping
        grad_norm, flag = self._norm_and_clip(window_loss, log_now)
        # 4. the verdict: a step late on the device (no host sync), or read now with every rank's stop flags
        if self.defer and not log_now and not read_now:
            return self._step_deferred(window_loss, flag, grad_norm, stop, position)
        verdict = read_verdict(
            window_loss, grad_norm, flag, stop=stop, world_size=self.rt.world_size, scaler=scaler,
            optimizers=self.optimizers,
        )  # fmt: skip
        if verdict.stop is not None:
            self.stops.agree(verdict.stop)
        if verdict.bad:
            return self._drop(window_loss, position, grad_norm, flag)
        self.policy.good()
        # 5. step every optimizer (through the GradScaler under fp16, which skips an overflowing step)
        for optimizer in self.optimizers:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if scaler is not None:
            scaler.update()
            if verdict.overflow:  # (an overflow-skipped step does not advance the schedulers)
                self.policy.counters.skipped_steps += 1
                return StepResult(False, True, False, grad_norm)
        self._after_applied(None)
        return StepResult(True, False, False, grad_norm)

    def _norm_and_clip(
        self, window_loss: torch.Tensor, log_now: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the global gradient norm, or None; the fused non-finite flag, or None), after clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        flag = None
        if grads and not log_now and self.clip_norm is None and self.rt.world_size == 1 and self.rt.scaler is None:
            # Nothing reads the total norm this step, only whether something went non-finite:
            # one fused check tells that for half the cost of the norms.
            flag = self._check([*grads, window_loss])
        grad_norm = None
        if flag is None:
            grad_norm = self.strategy.grad_norm(grads) if grads else torch.zeros((), device=self.rt.device)
            if self.clip_norm is not None:
                self.strategy.clip_grad_norm(self.params, self.clip_norm, grad_norm)
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_value)
        return grad_norm, flag

    def _drop(
        self, window_loss: torch.Tensor, position: tuple[int, int, int], grad_norm: torch.Tensor | None,
        flag: torch.Tensor | None,
    ) -> StepResult:  # fmt: skip
        """A bad step: name the culprit while the gradients exist, then count it or raise (NaN policy)."""
        if flag is not None:
            self._check.clear()
        notes: list[str] = []
        if self.policy.policy == "raise":
            self.events.emit(Event.NONFINITE, window_loss, self.params, notes)
        if self.rt.scaler is not None:
            self.rt.scaler.update()  # the scaler must close its step even when we drop it
        self.policy.bad(self.optimizers, position, detail="".join(notes))
        return StepResult(False, True, False, grad_norm)

    def _after_applied(self, found: torch.Tensor | None) -> None:
        """The events, the per-step schedulers and the EMA of an applied (or pending) step."""
        for label in self.labels:
            self.events.emit(Event.APPLIED, self._micro, label)
        for o, label in zip(self.group, self.labels, strict=True):
            if o.step_scheduler is not None:
                self.events.emit(Event.SCHEDULER_STEP, self._micro, label)
                o.step_scheduler.step()
        if self.ema is not None:
            self.ema.update(found)

    def _step_deferred(
        self,
        window_loss: torch.Tensor,
        flag: torch.Tensor | None,
        grad_norm: torch.Tensor | None,
        stop: torch.Tensor | None,
        position: tuple[int, int, int],
    ) -> StepResult:
        """Step with the guard's flag as the optimizers' own skip switch, and read the flag a step late
        (framework.guard): no host sync. Returns as an applied step; :meth:`settle` undoes a bad one."""
        if flag is None:  # the total norm was measured (clipping, several processes)
            assert grad_norm is not None
            ok = torch.isfinite(grad_norm)
            if self.rt.world_size == 1:  # (under DDP only the all-reduced norm agrees across ranks)
                ok = ok & torch.isfinite(window_loss)
            flag = (~ok).float()
        found = flag.reshape(())
        flags = found.double().reshape(1) if stop is None else torch.cat([found.double().reshape(1), stop])
        read = read_later(flags)
        undos = [
            Pending.before_step(*position, read, o.optimizer, o.step_scheduler) for o in self.group
        ]  # (before the schedulers step for this step)
        self._pending = (position, read, undos)
        for optimizer in self.optimizers:
            step_unless_found(optimizer, found)
        self._after_applied(found)
        return StepResult(True, False, True, grad_norm)

    def settle(self) -> None:
        """Read the verdict of a step taken with it pending; undo the host's part of it if it was bad. The
        stop flags that came with it (several processes) go to the stops. Called before a checkpoint, so that
        it holds settled state only.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        position, read, undos = pending
        bad, *stop = read()
        if stop:
            self.stops.agree(stop)
        if not bad:
            self.policy.good()
            return
        # The optimizers skipped that step on the device (the EMA too); undo what the host did for it.
        for o, undo in zip(self.group, undos, strict=True):
            undo.undo(o.optimizer, o.step_scheduler)
        self._check.clear()
        self.events.emit(Event.STEP_RETRACTED, position[0])
        # The gradients of the step in progress are good; they go only if the run stops here.
        self.policy.bad(self.optimizers, position, drop_gradients=self.policy.policy == "raise", deferred=True)

    @property
    def pending(self) -> bool:
        """Is a step's verdict still on its way?"""
        return self._pending is not None
