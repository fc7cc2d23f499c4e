"""Callbacks: read-only hooks around the step, never inside it.

A callback sees the engine and the metrics, and can ask the run to stop
(``engine.should_stop = True``, honoured at the next step boundary). It cannot
reorder the five canonical steps: the engine calls it only between optimizer
steps and around epochs, never between zero_grad and the optimizer step. Like
logging, a callback must only read: changing parameters, gradients, the data or
the global RNG from one breaks "observation never steers" (docs/DESIGN.md).

The nine events, in the order a run fires them::

    on_checkpoint_load          if ``resume`` loaded a checkpoint
    on_fit_start                once, before the first step
      on_epoch_start            each epoch (also a resumed, partial one)
        on_step_end             after every optimizer step (applied or skipped: engine.last_step says)
        on_step_retracted       a step seen as applied was skipped (its NaN verdict came a step late)
        on_checkpoint_save      after a step checkpoint was written completely
      on_validation_end         after each validation (epoch end, val_every_n_steps, engine.validate)
      on_epoch_end              after each complete epoch: epoch_time and val/...
      on_checkpoint_save        after the epoch checkpoint
    on_fit_end                  once, after the last step

Callbacks run on every process. Validation metrics are global means, so a stop
decision taken from them agrees across ranks; ``should_stop`` is not
synchronised, so decide it from such global values only (one rank stopping
alone would leave the others waiting in a collective). A callback that writes
files or prints should do so on one process only.

There is no LearningRateMonitor: ``lr`` is in every train record of
``metrics.jsonl`` and in the trackers already.

Example:

    >>> from framework import Callback, EarlyStopping, Engine
    >>> class PrintValLoss(Callback):
    ...     def on_validation_end(self, engine, module, metrics):
    ...         print("epoch", engine.epoch, "val/loss", round(metrics["val/loss"], 3))
    >>> callbacks = [PrintValLoss(), EarlyStopping(patience=3)]
    >>> engine = Engine(max_epochs=2, batch_size=32, progress=False, callbacks=callbacks)
    >>> engine.fit(Classifier(), train_data, val_data).stop_reason.cause
    epoch 0 val/loss 1.286
    epoch 1 val/loss 1.28
    'max_epochs'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .fit import Fit
    from .module import LoopModule


class Callback:
    """Base class: override any of the nine events; the defaults do nothing.

    Events: ``on_fit_start``, ``on_fit_end``, ``on_epoch_start``, ``on_epoch_end``,
    ``on_step_end`` (after an applied or skipped optimizer step; ``engine.last_step.applied`` /
    ``.skipped`` / ``.pending`` tell which), ``on_step_retracted``, ``on_validation_end``,
    ``on_checkpoint_save``, ``on_checkpoint_load``. State returned by ``state_dict``
    is stored in checkpoints (numbers, strings, lists, dicts and tensors) and handed back to
    ``load_state_dict`` on resume.

    Example:

        >>> class PrintLoss(Callback):
        ...     def on_step_end(self, engine, module, metrics):
        ...         if metrics:  # a log step
        ...             print(engine.step, round(metrics["train/loss"], 3))
        >>> engine = framework.Engine(max_steps=4, batch_size=32, log_every_n_steps=2, progress=False,
        ...                           callbacks=[PrintLoss()])
        >>> engine = engine.fit(Classifier(), train_data)
        2 1.161
        4 1.264
    """

    def on_fit_start(self, engine: Engine, module: LoopModule) -> None:
        """Called once before the first step (after a resume, if any).

        Example:

            >>> class SaysWhere(Callback):
            ...     def on_fit_start(self, engine, module):
            ...         print("starting at step", engine.step, "in", "train" if module.training else "eval", "mode")
            >>> engine = framework.Engine(max_steps=1, batch_size=32, progress=False, callbacks=[SaysWhere()])
            >>> engine.fit(Classifier(), train_data).step
            starting at step 0 in train mode
            1
        """

    def on_fit_end(self, engine: Engine, module: LoopModule) -> None:
        """Called once after the last step (metrics.jsonl and trackers are closed by then).

        Example:

            >>> class SaysDone(Callback):
            ...     def on_fit_end(self, engine, module):
            ...         print("done after", engine.step, "steps")
            >>> engine = framework.Engine(max_steps=2, batch_size=32, progress=False, callbacks=[SaysDone()])
            >>> engine = engine.fit(Classifier(), train_data)
            done after 2 steps
        """

    def on_epoch_start(self, engine: Engine, module: LoopModule) -> None:
        """Called at the start of each epoch (also a resumed, partial one).

        Example:

            >>> class SaysEpoch(Callback):
            ...     def on_epoch_start(self, engine, module):
            ...         print("epoch", engine.epoch, "from step", engine.step)
            >>> engine = framework.Engine(max_epochs=2, batch_size=32, progress=False, callbacks=[SaysEpoch()])
            >>> engine = engine.fit(Classifier(), train_data)
            epoch 0 from step 0
            epoch 1 from step 3
        """

    def on_epoch_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each complete epoch's validation; ``metrics`` holds ``epoch_time`` and ``val/...``.

        Example:

            >>> class SaysEpochEnd(Callback):
            ...     def on_epoch_end(self, engine, module, metrics):
            ...         print("epoch", engine.epoch, sorted(metrics))
            >>> engine = framework.Engine(max_epochs=1, batch_size=32, progress=False, callbacks=[SaysEpochEnd()])
            >>> engine = engine.fit(Classifier(), train_data, val_data)
            epoch 0 ['epoch_time', 'val/acc', 'val/loss']
        """

    def on_step_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each optimizer step; ``metrics`` is the train record on log steps, else empty.

        Only log steps carry values: reading a device tensor here on every step
        would add the host sync that the engine avoids. Under ``nan_check="deferred"``
        (the default on a GPU with a fused optimizer) a step's NaN verdict comes a step
        late: this can run for a step that is then undone, and ``engine.skipped_steps``
        counts it from the next step on.

        Example:

            >>> class StopAtLoss(Callback):
            ...     def on_step_end(self, engine, module, metrics):
            ...         if metrics and metrics["train/loss"] < 1.25:
            ...             engine.should_stop = True
            >>> engine = framework.Engine(max_steps=100, batch_size=32, log_every_n_steps=2, progress=False,
            ...                           callbacks=[StopAtLoss()])
            >>> engine.fit(Classifier(), train_data).step
            2
            >>> print(engine.stop_reason)
            StopAtLoss.on_step_end set engine.should_stop at step 2
        """

    def on_step_retracted(self, engine: Engine, module: LoopModule, step: int) -> None:
        """Called when a step that ``on_step_end`` saw as applied turns out skipped: under
        ``nan_check="deferred"`` its NaN verdict comes a step late (the optimizer skipped it on the device).
        ``step`` is the ``engine.step`` its ``on_step_end`` saw (the count of steps taken, that step
        included). ``engine.skipped_steps`` counts it from then on.

        Example:

            >>> class AppliedSteps(Callback):
            ...     def __init__(self):
            ...         self.applied = set()
            ...
            ...     def on_step_end(self, engine, module, metrics):
            ...         if engine.last_step.applied:
            ...             self.applied.add(engine.step)
            ...
            ...     def on_step_retracted(self, engine, module, step):
            ...         self.applied.discard(step)
            >>> steps = AppliedSteps()
            >>> engine = framework.Engine(max_steps=3, batch_size=32, progress=False, callbacks=[steps])
            >>> engine = engine.fit(Classifier(), train_data)
            >>> sorted(steps.applied)
            [1, 2, 3]
            >>> steps.on_step_retracted(engine, None, 3)  # as the engine calls it when step 3 turns out NaN
            >>> sorted(steps.applied)
            [1, 2]
        """

    def on_validation_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each validation with ``{"val/loss": ..., "val/<metric>": ...}`` (global means).

        Example:

            >>> class History(Callback):
            ...     def __init__(self):
            ...         self.history = []
            ...
            ...     def on_validation_end(self, engine, module, metrics):
            ...         self.history.append(round(metrics["val/loss"], 3))
            >>> history = History()
            >>> engine = framework.Engine(max_epochs=2, batch_size=32, progress=False, callbacks=[history])
            >>> engine.fit(Classifier(), train_data, val_data).step, history.history
            (6, [1.286, 1.28])
        """

    def on_checkpoint_save(self, engine: Engine, path: str) -> None:
        """Called after a checkpoint was written completely to ``path``.

        Example:

            >>> class SaysSaved(Callback):
            ...     def on_checkpoint_save(self, engine, path):
            ...         print("saved", path)
            >>> engine = framework.Engine(max_epochs=2, batch_size=32, run_dir="runs/a", progress=False,
            ...                           callbacks=[SaysSaved()])
            >>> engine = engine.fit(Classifier(), train_data)  # a checkpoint at each epoch's end
            saved runs/a/checkpoints/step-00000003
            saved runs/a/checkpoints/step-00000006
        """

    def on_checkpoint_load(self, engine: Engine, path: str) -> None:
        """Called after a checkpoint was loaded from ``path``.

        Example:

            >>> class SaysResumed(Callback):
            ...     def on_checkpoint_load(self, engine, path):
            ...         print("resumed from", path, "at step", engine.step)
            >>> engine = framework.Engine(max_epochs=1, batch_size=32, run_dir="runs/a", progress=False)
            >>> engine.fit(Classifier(), train_data).step
            3
            >>> engine = framework.Engine(max_epochs=2, batch_size=32, run_dir="runs/a", resume="auto",
            ...                           progress=False, callbacks=[SaysResumed()])
            >>> engine.fit(Classifier(), train_data).step
            resumed from runs/a/checkpoints/step-00000003 at step 3
            6
        """

    def stop_reason(self) -> str | None:
        """Why this callback stopped the run, in a sentence, once it set ``engine.should_stop`` (None: not
        stopped, or nothing to add). The fit's last line, ``engine.stop_reason`` and the stop record of
        ``metrics.jsonl`` say it; without it they name the callback and the event that set the flag.

        Example:

            >>> class StopAtLoss(Callback):
            ...     def __init__(self, threshold):
            ...         self.threshold, self.stopped = threshold, False
            ...
            ...     def on_step_end(self, engine, module, metrics):
            ...         if metrics and metrics["train/loss"] < self.threshold:
            ...             engine.should_stop = self.stopped = True
            ...
            ...     def stop_reason(self):
            ...         return f"train/loss fell below {self.threshold}" if self.stopped else None
            >>> engine = framework.Engine(max_steps=100, batch_size=32, log_every_n_steps=2, progress=False,
            ...                           callbacks=[StopAtLoss(1.25)])
            >>> engine.fit(Classifier(), train_data).stop_reason
            StopReason(cause='callback', text='train/loss fell below 1.25', step=2, epoch=0)
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to keep in checkpoints; ``{}`` (the default) stores nothing.

        Example:

            >>> Callback().state_dict()
            {}
            >>> class History(Callback):
            ...     def __init__(self):
            ...         self.history = [1.29, 1.28]
            ...
            ...     def state_dict(self):
            ...         return {"history": self.history}
            >>> History().state_dict()  # what a checkpoint stores for it
            {'history': [1.29, 1.28]}
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned.

        Example:

            >>> class History(Callback):
            ...     def __init__(self):
            ...         self.history = []
            ...
            ...     def on_validation_end(self, engine, module, metrics):
            ...         self.history.append(round(metrics["val/loss"], 3))
            ...
            ...     def state_dict(self):
            ...         return {"history": self.history}
            ...
            ...     def load_state_dict(self, state):
            ...         self.history = list(state["history"])
            >>> run = dict(batch_size=32, run_dir="runs/a", progress=False)
            >>> engine = framework.Engine(max_epochs=1, **run, callbacks=[History()])
            >>> engine.fit(Classifier(), train_data, val_data).step
            3
            >>> resumed = History()
            >>> engine = framework.Engine(max_epochs=2, resume="auto", **run, callbacks=[resumed])
            >>> engine.fit(Classifier(), train_data, val_data).step, resumed.history  # epoch 0's value came back
            (6, [1.286, 1.28])
        """


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` validations.

    The first validation sets the best value; each later one that does not beat
    it (``mode="min"``: lower by more than ``min_delta``; ``"max"``: higher)
    counts as bad, and after ``patience`` bad ones in a row the run stops at
    that epoch's end (its epoch record, checkpoint and callbacks still happen).
    ``monitor`` is a validation key: ``"val/loss"`` or ``"val/<metric>"``. A
    non-finite value never counts as an improvement. The best value and the bad
    count are stored in checkpoints, so a resumed run stops where an
    uninterrupted one would.

    Example:

        >>> from framework import EarlyStopping, Engine
        >>> stopper = EarlyStopping(monitor="val/loss", patience=1, min_delta=0.5)
        >>> engine = Engine(max_epochs=20, batch_size=32, progress=False, callbacks=[stopper])
        >>> engine.fit(Classifier(), train_data, val_data).stop_reason.cause, engine.epoch
        ('early_stopping', 2)

        ``EarlyStopping(monitor="val/acc", mode="max", patience=5)`` watches a metric that should rise.
    """

    def __init__(self, monitor: str = "val/loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}); use 'min' or 'max'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience!r}); use an int >= 1 (validations without improvement)")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}); use a non-negative number")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None  # the optimizer step of the validation that set ``best``
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Compare ``metrics[monitor]`` with the best so far; ask the engine to stop after ``patience`` misses.
        A standalone ``engine.validate`` (outside fit) does not count.

        Example:

            >>> from types import SimpleNamespace
            >>> stopper = EarlyStopping(patience=2)
            >>> engine = SimpleNamespace(fitting=True, step=0, epoch=0, should_stop=False)  # stands in for an Engine
            >>> for loss in (0.5, 0.6, 0.7):
            ...     stopper.on_validation_end(engine, None, {"val/loss": loss})
            >>> stopper.best, stopper.bad_epochs, engine.should_stop
            (0.5, 2, True)
        """
        if not getattr(engine, "fitting", True):
            return
        value = self._value(metrics)
        if self._improved(value):
            self.best, self.bad_epochs, self.best_step = value, 0, getattr(engine, "step", None)
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                self.stopped_epoch = engine.epoch
                engine.should_stop = True

    def on_epoch_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Fail loudly, not never stop, when the run has no validation to monitor.

        Example:

            >>> engine = framework.Engine(max_epochs=2, batch_size=32, progress=False, callbacks=[EarlyStopping()])
            >>> engine.fit(Classifier(), train_data)  # no val_data
            Traceback (most recent call last):
            ...
            KeyError: "EarlyStopping(monitor='val/loss') but validation logged []; pass val_data to fit(...): ..."
        """
        self._value(metrics)

    def stop_reason(self) -> str | None:
        """Once it stopped the run: the monitor, its best value and that validation's step, and the patience.

        Example:

            >>> stopper = EarlyStopping(patience=1, min_delta=0.5)
            >>> stopper.stop_reason() is None  # not stopped
            True
            >>> engine = framework.Engine(max_epochs=20, batch_size=32, progress=False, callbacks=[stopper])
            >>> print(engine.fit(Classifier(), train_data, val_data).stop_reason)
            EarlyStopping: val/loss did not improve by more than min_delta=0.5 for 1 validation(s) (patience=1);
            best val/loss=1.286 at step 3
        """
        if self.stopped_epoch is None:
            return None
        where = f" at step {self.best_step}" if self.best_step is not None else ""
        delta = f" by more than min_delta={self.min_delta:g}" if self.min_delta else ""
        return (
            f"EarlyStopping: {self.monitor} did not improve{delta} for {self.bad_epochs} validation(s) "
            f"(patience={self.patience}); best {self.monitor}={self.best:.4g}{where}"
        )

    def _value(self, metrics: dict[str, float]) -> float:
        if self.monitor not in metrics:
            available = sorted(k for k in metrics if k.startswith("val/"))
            hint = f"pick one of {available}" if available else "pass val_data to fit(...): the run has no validation"
            raise KeyError(f"EarlyStopping(monitor={self.monitor!r}) but validation logged {available}; {hint}")
        return float(metrics[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        """``{"best", "bad_epochs", "stopped_epoch"}``.

        Example:

            >>> EarlyStopping().state_dict()
            {'best': inf, 'bad_epochs': 0, 'stopped_epoch': None, 'best_step': None}
        """
        return {
            "best": self.best, "bad_epochs": self.bad_epochs, "stopped_epoch": self.stopped_epoch,
            "best_step": self.best_step,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s values (``stopped_epoch`` and ``best_step`` are optional, for older checkpoints).

        Example:

            >>> stopper = EarlyStopping()
            >>> stopper.load_state_dict({"best": 0.31, "bad_epochs": 1})  # a checkpoint from before best_step
            >>> stopper.best, stopper.bad_epochs, stopper.best_step
            (0.31, 1, None)
        """
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.stopped_epoch = state.get("stopped_epoch")
        self.best_step = state.get("best_step")


class CallbackHooks:
    """The callbacks as one subscriber of the loop's events (:mod:`framework.events`): each event calls the
    callbacks' method of the same name, in list order, with the engine and the fit's module. It notes which
    callback, in which event, first set ``engine.should_stop`` (:meth:`stop_cause`: why the fit stopped). The
    engine subscribes one to its events (``engine.events``) at construction.
    """

    def __init__(self, engine: Engine, callbacks: list[Callback]) -> None:
        self.engine, self.callbacks = engine, callbacks
        self.module: Any = None  # the module of the fit in progress
        self._stopper: tuple[Callback, str, int] | None = None  # (callback, event, step) that set should_stop

    def _each(self, event: str, *args: Any) -> None:
        engine = self.engine
        for cb in self.callbacks:
            stopped = engine.should_stop
            getattr(cb, event)(engine, *args)
            if not stopped and engine.should_stop and self._stopper is None:
                self._stopper = (cb, event, engine.step)

    def stop_cause(self) -> tuple[str, str] | None:
        """``(cause, text)`` for a fit that a callback stopped: ``"early_stopping"`` for EarlyStopping, else
        ``"callback"``; the callback's :meth:`Callback.stop_reason`, or which callback set the flag in which
        event at which step. A resumed run that had stopped asks its callbacks' restored state. None if no
        callback says it stopped the fit, e.g. ``("callback", "StopAtLoss.on_step_end set engine.should_stop at
        step 37")``.
        """
        if self._stopper is not None:
            cb, event, step = self._stopper
            text = cb.stop_reason() or f"{type(cb).__name__}.{event} set engine.should_stop at step {step}"
            return ("early_stopping" if isinstance(cb, EarlyStopping) else "callback"), text
        for cb in self.callbacks:  # (a resumed run that had stopped: the restored state says why)
            said = cb.stop_reason()
            if said is not None:
                return ("early_stopping" if isinstance(cb, EarlyStopping) else "callback"), said
        return None

    def on_fit_start(self, fit: Fit) -> None:
        self.module = fit.module
        self._stopper = None
        self._each("on_fit_start", self.module)

    def on_checkpoint_load(self, path: str) -> None:
        self._each("on_checkpoint_load", path)

    def on_epoch_start(self) -> None:
        self._each("on_epoch_start", self.module)

    def on_step_end(self, record: dict[str, float]) -> None:
        self._each("on_step_end", self.module, record)

    def on_step_retracted(self, step: int) -> None:
        # The event carries the step's index (from 0); a callback gets the count its on_step_end saw as
        # engine.step, so the two name a step the same way.
        self._each("on_step_retracted", self.module, step + 1)

    def on_validation_end(self, module: LoopModule, metrics: dict[str, float]) -> None:
        self._each("on_validation_end", module, metrics)

    def on_checkpoint_save(self, path: str) -> None:
        self._each("on_checkpoint_save", path)

    def on_epoch_end(self, metrics: dict[str, float]) -> None:
        self._each("on_epoch_end", self.module, metrics)

    def on_fit_end(self) -> None:
        self._each("on_fit_end", self.module)
