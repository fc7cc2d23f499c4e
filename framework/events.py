"""The loop's events: the loop emits each once, and everything that observes it subscribes.

The fit loop (:mod:`framework.engine`) and the optimizer step (:mod:`framework.step`) call
:meth:`Events.emit` at fixed points; subscribers (the doctor, callbacks, the trace, throughput and the
profiler: :mod:`framework.observability`) define ``on_<event>`` methods and are called in the order they
subscribed. The loop itself never calls a subscriber, so adding an observer changes no line of the loop
(Composer's ``Event`` and one dispatcher are the model).

The events of one fit, in order (payloads in brackets; ``phase`` is the alternating phase or None,
``micro`` the micro-batch's index in the window)::

    fit_start (fit)                          the fit is built and resumed; subscribers bind to it
      epoch_start ()
        step_start (step: StepInfo)          a window begins, before zero_grad
          counts (counts)                    the window's count_items values on this rank
          zero_grad (micro, phase)           1. (once per window, per phase)
          forward (micro, phase, batch)      2. about to run forward
          after_forward (micro, phase, real) (real: False for a zero-weight filler)
          loss (micro, phase, batch)         3. about to run compute_loss
          after_loss (micro, phase, loss, outputs)
          backward (micro, phase)            4. about to run backward
          after_backward (phase)             after the window's (phase's) last backward
          optimizer_step (phase)             5. about to run the optimizer step
          applied (micro, label)             an optimizer stepped (one per optimizer)
          scheduler_step (micro, label)      a per-step scheduler stepped
          nonfinite (loss, params, notes)    a bad step, before the NaN policy acts (notes: append text)
          after_optimizer_step (applied, phase)
        train_record (record)                a log step's train record, before it is written and shown: a
                                             subscriber may add keys (throughput: train/step_time, ...)
        step_end (record)                    counters advanced; record: the train record on log steps, else {}
        step_retracted (step)                a step taken as applied was skipped (a verdict read a step late)
        validation_start ()
          eval_forward (module)              after each validation forward
        validation_end (metrics)
        checkpoint_start ()                  the loop takes a checkpoint (the profiler's ``checkpoint`` range)
        checkpoint_save (path)               a checkpoint is on disk (checkpoint_async: once its write is done)
        checkpoint_end ()                    the loop goes on (checkpoint_async: the write goes on in the background)
      epoch_end (metrics)
    stop (reason: StopReason)                why the fit ends (max_steps, EarlyStopping, preemption, ...)
    fit_end ()
    close (error)                            always, also when the fit raises (error: that exception, else None):
                                             release what is held (the profiler dumps the memory history on a CUDA OOM)

Before them, while the fit is built: ``build (module, rt)`` (the module as built, before the layout wraps
or shards it) and, when ``resume`` loaded a checkpoint, ``checkpoint_load (path)``.

Observation never steers: a subscriber reads state; it must not draw on the global RNG streams,
reorder data or touch gradients (the doctor and the trace keep to that; tests prove it bitwise).

Example:

    >>> class StepCounter:  # a subscriber: any object with on_<event> methods
    ...     def __init__(self):
    ...         self.steps = 0
    ...
    ...     def on_step_end(self, record):
    ...         self.steps += 1
    >>> engine = framework.Engine(max_steps=2, batch_size=32, progress=False)
    >>> counter = StepCounter()
    >>> engine.events.subscribe(counter)
    >>> engine = engine.fit(Classifier(), train_data)
    >>> counter.steps
    2
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Event(enum.Enum):
    """The loop's events (see the module docstring for their order and payloads); a subscriber's method for one
    is ``"on_" + event.value``.

    Example:

        >>> Event.AFTER_BACKWARD.value, Event("zero_grad")
        ('after_backward', <Event.ZERO_GRAD: 'zero_grad'>)
    """

    BUILD = "build"
    FIT_START = "fit_start"
    CHECKPOINT_LOAD = "checkpoint_load"
    EPOCH_START = "epoch_start"
    STEP_START = "step_start"
    COUNTS = "counts"
    ZERO_GRAD = "zero_grad"
    FORWARD = "forward"
    AFTER_FORWARD = "after_forward"
    LOSS = "loss"
    AFTER_LOSS = "after_loss"
    BACKWARD = "backward"
    AFTER_BACKWARD = "after_backward"
    OPTIMIZER_STEP = "optimizer_step"
    APPLIED = "applied"
    SCHEDULER_STEP = "scheduler_step"
    NONFINITE = "nonfinite"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    TRAIN_RECORD = "train_record"
    STEP_END = "step_end"
    STEP_RETRACTED = "step_retracted"
    VALIDATION_START = "validation_start"
    EVAL_FORWARD = "eval_forward"
    VALIDATION_END = "validation_end"
    CHECKPOINT_START = "checkpoint_start"
    CHECKPOINT_SAVE = "checkpoint_save"
    CHECKPOINT_END = "checkpoint_end"
    EPOCH_END = "epoch_end"
    STOP = "stop"

    # A member is its own identity (Enum's equality is identity), so the C-level identity hash is correct, and
    # it spares the Python-level Enum.__hash__ on each of the step's dozen emits (about 6 us a step on this VM).
    __hash__ = object.__hash__
    FIT_END = "fit_end"
    CLOSE = "close"


@dataclass
class StepInfo:
    """What the loop knows about the optimizer step that begins (the ``step_start`` payload).

    ``step``: optimizer steps taken before this one. ``log_now``: this step writes a train record.
    ``read_now``: a subscriber needs this step's NaN verdict at once, not a step late (the doctor's checked
    steps set it; ``nan_check="deferred"`` then reads it at once for this step).

    Example:

        >>> info = StepInfo(0, log_now=False)
        >>> info.read_now = info.step < 2  # a subscriber's on_step_start: read steps 0 and 1 at once
        >>> info
        StepInfo(step=0, log_now=False, read_now=True)
    """

    step: int
    log_now: bool
    read_now: bool = False


@dataclass(frozen=True)
class StopReason:
    """Why a fit stopped: the ``stop`` event's payload, ``engine.stop_reason``, the last record of ``metrics.jsonl``
    and the fit's last line on rank 0.

    ``cause`` is one of ``"max_steps"``, ``"max_epochs"``, ``"max_time"``, ``"early_stopping"``, ``"callback"``
    (a callback set ``engine.should_stop``), ``"preempted"`` (SIGTERM/SIGUSR1) or ``"interrupted"`` (Ctrl-C);
    ``text`` says it in a sentence (with the numbers: the limit, the best value and its step, ...); ``step`` and
    ``epoch`` are where the fit stopped.

    Example:

        >>> engine = framework.Engine(max_steps=2, batch_size=32, progress=False).fit(Classifier(), train_data)
        >>> reason = engine.stop_reason
        >>> reason.cause, reason.step, reason.epoch
        ('max_steps', 2, 0)
        >>> print(reason)  # e.g. "max_time=270s ran out after 151 of max_steps=750 steps" for cause="max_time"
        max_steps=2 reached
    """

    cause: str
    text: str
    step: int
    epoch: int

    def __str__(self) -> str:
        return self.text

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record: ``{"step", "epoch", "stop": cause, "stop_reason": text}``.

        Example:

            >>> StopReason("max_steps", "max_steps=5 reached", 5, 1).record()
            {'step': 5, 'epoch': 1, 'stop': 'max_steps', 'stop_reason': 'max_steps=5 reached'}
        """
        return {"step": self.step, "epoch": self.epoch, "stop": self.cause, "stop_reason": self.text}


class Events:
    """One dispatcher: ``subscribe`` objects with ``on_<event>`` methods, ``emit`` events to them in order.

    Emitting an event nobody subscribed to costs one list lookup, so the per-micro-batch events are free
    when no observer wants them.

    Example:

        >>> class SaysForward:
        ...     def on_forward(self, micro, phase, batch):
        ...         print("forward of micro-batch", micro)
        >>> events = Events()
        >>> events.subscribe(SaysForward())
        >>> events.wants(Event.FORWARD), events.wants(Event.BACKWARD)
        (True, False)
        >>> events.emit(Event.FORWARD, 0, None, "batch")  # calls on_forward(0, None, "batch")
        forward of micro-batch 0
        >>> class Counts:
        ...     def on_forward(self, micro, phase, batch):
        ...         print("counted first")
        >>> counter = Counts()
        >>> events.subscribe(counter, first=True)  # before the subscribers already there
        >>> events.emit(Event.FORWARD, 1, None, "batch")
        counted first
        forward of micro-batch 1
        >>> events.unsubscribe(counter)  # e.g. once it has what it needed
        >>> events.emit(Event.FORWARD, 2, None, "batch")
        forward of micro-batch 2
    """

    def __init__(self) -> None:
        self._handlers: dict[Event, tuple[Callable[..., Any], ...]] = {e: () for e in Event}
        self.subscribers: list[Any] = []

    def subscribe(self, subscriber: Any, *, first: bool = False) -> None:
        """Call ``subscriber.on_<event>(...)`` for every event it defines a method for, after those that
        subscribed before it (``first=True``: before them)."""
        found = False
        for event in Event:
            handler = getattr(subscriber, "on_" + event.value, None)
            if callable(handler):
                handlers = self._handlers[event]
                self._handlers[event] = (handler, *handlers) if first else (*handlers, handler)
                found = True
        if not found:
            raise TypeError(
                f"{type(subscriber).__name__} has no on_<event> method; define one of "
                f"{', '.join('on_' + e.value for e in Event)}"
            )
        self.subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Any) -> None:
        """Stop calling ``subscriber`` (from the next event on; an event being emitted still reaches it)."""
        for event, handlers in self._handlers.items():
            self._handlers[event] = tuple(h for h in handlers if getattr(h, "__self__", None) is not subscriber)
        self.subscribers = [s for s in self.subscribers if s is not subscriber]

    def wants(self, event: Event) -> bool:
        """Does any subscriber listen to ``event``? (To skip building a payload nobody reads.)"""
        return bool(self._handlers[event])

    def emit(self, event: Event, *payload: Any) -> None:
        """Call every subscriber of ``event`` with ``payload``, in subscription order."""
        for handler in self._handlers[event]:
            handler(*payload)


class Trace:
    """``Engine(trace=True)``: the step events as ``(name, optimizer_step, micro)`` tuples, with a fourth
    element, the phase or optimizer name, where a fit has phases or several optimizers. An optimizer step
    the NaN guard skipped has no ``optimizer_step`` event; a retracted one loses its events. Read it as
    ``engine.trace`` (:attr:`framework.Engine.trace`), e.g. ``[("zero_grad", 0, 0), ("forward", 0, 0), ...]``.
    """

    def __init__(self, counters: Any) -> None:
        self.counters = counters  # (framework.checkpoint.state.Counters: the step events belong to)
        self.events: list[tuple[Any, ...]] = []

    def _add(self, name: str, micro: int, label: str | None) -> None:
        step = self.counters.step
        self.events.append((name, step, micro) if label is None else (name, step, micro, label))

    def on_zero_grad(self, micro: int, phase: str | None) -> None:
        self._add("zero_grad", micro, phase)

    def on_forward(self, micro: int, phase: str | None, batch: Any) -> None:
        self._add("forward", micro, phase)

    def on_loss(self, micro: int, phase: str | None, batch: Any) -> None:
        self._add("loss", micro, phase)

    def on_backward(self, micro: int, phase: str | None) -> None:
        self._add("backward", micro, phase)

    def on_applied(self, micro: int, label: str | None) -> None:
        self._add("optimizer_step", micro, label)

    def on_scheduler_step(self, micro: int, label: str | None) -> None:
        self._add("scheduler_step", micro, label)

    def on_step_retracted(self, step: int) -> None:
        self.events[:] = [e for e in self.events if not (e[1] == step and e[0] in ("optimizer_step", "scheduler_step"))]
