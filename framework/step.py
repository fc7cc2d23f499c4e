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

It returns a :class:`StepResult`; stop flags travel beside it (``StepResult.stop``), read in the
same host read as the verdict.

Example::

    step = OptimizerStep(list(optimizers), strategy=strategy, rt=rt, config=config.step, policy=policy, doctor=doctor)
    result = step(window_loss, log_now=False, stop=None, position=(engine.step, engine.epoch, 0))
    result.applied, result.skipped, result.grad_norm
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .guard import NanPolicy, Pending, read_later, step_unless_found
from .optim import Optimization
from .parallel.grads import NonFiniteCheck, pack


@dataclass
class StepResult:
    """What one optimizer step did.

    ``applied``: the optimizers stepped (as far as the host knows: under ``nan_check="deferred"`` the
    verdict comes a step late, ``pending`` is then True and a bad step is retracted later, with the
    ``on_step_retracted`` callback). ``skipped``: dropped by the NaN policy or a GradScaler overflow.
    ``grad_norm``: the global norm before clipping, where it was measured. (The stop flags read with the
    verdict go to the ``on_stop`` callback of :class:`OptimizerStep`, not here.)

    Example::

        if engine.last_step.skipped: print("step", engine.step, "was dropped")
    """

    applied: bool
    skipped: bool = False
    pending: bool = False
    grad_norm: torch.Tensor | None = None


class OptimizerStep:
    """Step 5 for ``group`` (see the module docstring).

    ``record(event, micro, label)`` adds a trace event; ``on_retract(step)`` is called when a deferred verdict
    turns a step the host took as applied into a skipped one; ``on_stop(values)`` receives the stop flags
    of every rank whenever they are read (with the verdict: at once, or a step late). ``ema`` (if any) is updated after each
    applied step, skipped on the device with the step under a deferred verdict.

    Example::

        step = OptimizerStep(group, strategy=strategy, rt=rt, config=config, policy=policy, doctor=doctor)
        result = step(window_loss, log_now=True, stop=None, position=(0, 0, 0))
    """

    def __init__(
        self,
        group: list[Optimization],
        *,
        strategy: Any,
        rt: Any,
        config: Any,  # framework.config.StepConfig
        policy: NanPolicy,
        doctor: Any,
        defer: bool = False,
        ema: Any = None,
        labelled: bool = False,
        record: Callable[[str, int, str | None], None] = lambda event, micro, label: None,
        on_retract: Callable[[int], None] = lambda step: None,
        on_stop: Callable[[list[float]], None] = lambda values: None,
    ) -> None:
        self.group, self.strategy, self.rt, self.policy, self.doctor = group, strategy, rt, policy, doctor
        self.optimizers = [o.optimizer for o in group]
        self.params = [p for o in group for p in o.params]
        self.clip_norm, self.clip_value = config.clip_grad_norm, config.clip_grad_value
        self.defer, self.ema, self.labelled = defer, ema, labelled
        self.record, self.on_retract, self.on_stop = record, on_retract, on_stop
        self._check = NonFiniteCheck()
        self._micro = 0
        self._pending: tuple[tuple[int, int, int], Callable[[], list[float]], list[Pending]] | None = None

    def __call__(
        self,
        window_loss: torch.Tensor,
        *,
        log_now: bool,
        stop: torch.Tensor | None,
        position: tuple[int, int, int],
        micro: int = 0,
    ) -> StepResult:
        """Step 5 after the window's last backward; ``position`` = (optimizer step, epoch, batch) names a bad
        step; ``micro`` (the window's micro-batch count) goes into the trace events."""
        rt, scaler = self.rt, self.rt.scaler
        self._micro = micro
        if self._pending is not None:
            self.settle()  # the previous step's verdict first, if it came a step late (before this step applies)
        self.strategy.reduce_gradients(self.params)
        if scaler is not None:
            for optimizer in self.optimizers:
                scaler.unscale_(optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm: torch.Tensor | None = None
        flag: torch.Tensor | None = None  # 1.0 where a gradient or the loss is non-finite (the cheap check)
        if grads and not log_now and self.clip_norm is None and rt.world_size == 1 and scaler is None:
            # Nothing reads the total norm this step, only whether something went non-finite:
            # one fused check tells that for half the cost of the norms.
            flag = self._check([*grads, window_loss])
        if flag is None:
            grad_norm = self.strategy.grad_norm(grads) if grads else torch.zeros((), device=rt.device)
            if self.clip_norm is not None:
                self.strategy.clip_grad_norm(self.params, self.clip_norm, grad_norm)
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_value)
        if self.defer and not log_now and not self.doctor.checking:
            return self._step_deferred(window_loss, flag, grad_norm, stop, position)

        # The one host read per step: did anything go non-finite, and does any rank want to stop?
        # Under fp16 the GradScaler owns overflowing gradients, so only the loss is checked here;
        # the overflow flag its unscale_ just computed joins the same read, so telling a skipped
        # step needs no GradScaler.get_scale() (a host sync each, before and after).
        overflow: list[torch.Tensor] = []
        if scaler is not None:
            found = [v for opt in self.optimizers for v in scaler._found_inf_per_device(opt).values()]
            overflow = [sum(found, torch.zeros((), device=rt.device)).double().reshape(1)]
        extra = [stop] if stop is not None else []
        if rt.world_size > 1:
            # After the gradient all-reduce the gradients are identical on every rank, so the norm decides
            # the same everywhere (a rank's non-finite loss reached it: the engine made that rank's last
            # backward non-finite). Under fp16 the scaler's verdict, on those same gradients, agrees too.
            assert grad_norm is not None  # (the fused check runs on one process only)
            bad = ~torch.isfinite(grad_norm) if scaler is None else torch.zeros((), dtype=torch.bool, device=rt.device)
            values = torch.cat([bad.double().reshape(1), *extra, *overflow]).tolist()
            n_stop = 1 + (stop.numel() if stop is not None else 0)
            bad_host, overflow_f = bool(values[0]), values[n_stop:]
            if n_stop > 1:
                self.on_stop(values[1:n_stop])
        elif scaler is None:
            if flag is not None:
                bad_host = flag.item() != 0.0  # the one read
                if bad_host:
                    self._check.clear()
            else:
                assert grad_norm is not None
                bad_host = not all(map(math.isfinite, pack([grad_norm, window_loss]).tolist()))
            overflow_f = []
        else:
            bad = ~torch.isfinite(window_loss)
            bad_f, *overflow_f = torch.cat([bad.double().reshape(1), *overflow]).tolist()
            bad_host = bool(bad_f)
        if bad_host:
            if self.policy.policy == "raise":
                self.doctor.diagnose_nonfinite(window_loss, self.params)  # names the culprit while gradients exist
            if scaler is not None:
                scaler.update()  # the scaler must close its step even when we drop it
            self.policy.bad(self.optimizers, position)
            return StepResult(False, True, False, grad_norm)
        self.policy.good()
        if scaler is None:
            for optimizer in self.optimizers:
                optimizer.step()
            applied = True
        else:
            # GradScaler.step calls optimizer.step() only without an overflow (the flag read above), and
            # update() then lowers the scale; an overflow-skipped step does not advance the scheduler.
            for optimizer in self.optimizers:
                scaler.step(optimizer)
            scaler.update()
            applied = not any(overflow_f)
            if not applied:
                self.policy.counters.skipped_steps += 1
        if applied:
            self._after_applied(None)
        return StepResult(applied, not applied, False, grad_norm)

    def _after_applied(self, found: torch.Tensor | None) -> None:
        """The trace events, the per-step schedulers and the EMA of an applied (or pending) step."""
        for o in self.group:
            self.record("optimizer_step", self._micro, o.name if self.labelled else None)
        for o in self.group:
            if o.step_scheduler is not None:
                self.record("scheduler_step", self._micro, o.name if self.labelled else None)
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
        rt = self.rt
        if flag is None:  # the total norm was measured (clipping, several processes)
            assert grad_norm is not None
            ok = torch.isfinite(grad_norm)
            if rt.world_size == 1:  # (under DDP only the all-reduced norm agrees across ranks)
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

    def settle(self) -> list[float] | None:
        """Read the verdict of a step taken with it pending; undo the host's part of it if it was bad.
        Returns the stop flags that came with it (several processes), else None.

        Example::

            step.settle()   # before a checkpoint: it holds settled state only
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        position, read, undos = pending
        bad, *stop = read()
        if stop:
            self.on_stop(stop)
        if not bad:
            self.policy.good()
            return stop or None
        # The optimizers skipped that step on the device (the EMA too); undo what the host did for it.
        for o, undo in zip(self.group, undos, strict=True):
            undo.undo(o.optimizer, o.step_scheduler)
        self._check.clear()
        self.on_retract(position[0])
        # The gradients of the step in progress are good; they go only if the run stops here.
        self.policy.bad(self.optimizers, position, drop_gradients=self.policy.policy == "raise", deferred=True)
        return stop or None

    @property
    def pending(self) -> bool:
        """Is a step's verdict still on its way?"""
        return self._pending is not None
