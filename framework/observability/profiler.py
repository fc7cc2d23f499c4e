"""Where a step's time and memory go: ``Engine(profile_steps=(start, stop), profile_memory=...)``.

:class:`Profiler` subscribes to the loop's events (only when asked: off, it is not subscribed and costs
nothing) and runs ``torch.profiler`` over the optimizer steps ``start .. stop - 1`` (counted from 0, as
``range``); each profiled step runs from the end of the step before it, so what comes between steps
(the wait for data, a validation, a checkpoint) is in the trace too (step 0 warms up and runs under the
FLOP counter of :mod:`~framework.observability.throughput`: profile later steps). It writes
``RUN_DIR/profile/rank{R}.trace.json`` on every rank, a Chrome trace (Perfetto at https://ui.perfetto.dev,
``chrome://tracing``), with the steps as ``ProfilerStep#N`` and these ranges in them, opened and closed
at the loop's events:

==================  =================================================================
range               from .. to (events)
==================  =================================================================
``data_wait``       the end of the step before (and of its validation, checkpoint) .. ``step_start``
``zero_grad``       ``zero_grad`` .. ``forward``
``forward``         ``forward`` .. ``after_forward`` (per micro-batch)
``loss``            ``loss`` .. ``after_loss``
``backward``        ``backward`` .. the next micro-batch's ``forward`` / ``loss``, or ``after_backward``
``optimizer_step``  ``optimizer_step`` .. ``after_optimizer_step`` (the step, schedulers, EMA)
``validation``      ``validation_start`` .. ``validation_end``
``checkpoint``      ``checkpoint_start`` .. ``checkpoint_end``
==================  =================================================================

At the end of the range rank 0 prints a short table: each range's time per step and share, then the
top ops by self time (:func:`summary`). ``profile_memory=True`` adds memory to the profile and, on CUDA,
records the caching allocator's history from the fit's start (``torch.cuda.memory._record_memory_history``):
``RUN_DIR/profile/rank{R}.memory.pickle`` at the end of the range (of the fit without ``profile_steps``),
and ``rank{R}.oom.pickle`` when the fit raises CUDA's out-of-memory error, written before the error goes on
(drag either onto https://pytorch.org/memory_viz).

Example:

    >>> import json, os
    >>> engine = framework.Engine(max_steps=3, batch_size=32, run_dir="runs/p", profile_steps=(1, 2), progress=False)
    >>> _ = engine.fit(Classifier(), train_data)             # prints the table (on stderr with progress=False)
    >>> os.listdir("runs/p/profile")
    ['rank0.trace.json']
    >>> events = json.load(open("runs/p/profile/rank0.trace.json"))["traceEvents"]
    >>> ranges = {"data_wait", "zero_grad", "forward", "loss", "backward", "optimizer_step"}
    >>> sorted({e["name"] for e in events} & ranges)
    ['backward', 'data_wait', 'forward', 'loss', 'optimizer_step', 'zero_grad']
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, record_function

from .throughput import say

if TYPE_CHECKING:
    from ..fit import Fit

RANGES = ("data_wait", "zero_grad", "forward", "loss", "backward", "optimizer_step", "validation", "checkpoint")
TOP_OPS = 8  # rows of the end-of-range table's top ops
MEMORY_ENTRIES = 100_000  # allocator events the CUDA history keeps (the newest)


class Profiler:
    """The subscriber behind ``profile_steps`` and ``profile_memory`` (see the module docstring), which the
    Engine subscribes to the loop's events when either is given.

    Example:

        >>> profiler = Profiler((3, 5), memory=False, run_dir="runs/x")
        >>> profiler.steps, profiler.dir.as_posix(), profiler.trace_path     # nothing written before the fit
        ((3, 5), 'runs/x/profile', None)
    """

    def __init__(self, steps: tuple[int, int] | None, memory: bool, run_dir: str) -> None:
        self.steps = (int(steps[0]), int(steps[1])) if steps is not None else None
        self.memory = memory
        self.dir = Path(run_dir) / "profile"
        self.trace_path: Path | None = None  # the trace written, once written
        self._fit: Fit | None = None
        self._prof: Any = None  # the torch.profiler.profile while it records
        self._range: Any = None  # the open record_function
        self._history = False  # CUDA's allocator history is being recorded

    # ---- the fit

    def on_fit_start(self, fit: Fit) -> None:
        self._fit = fit
        self._check(fit)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.memory and fit.rt.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_ENTRIES)
            self._history = True
        if self.steps is not None and fit.counters.step == self.steps[0]:
            self._start()

    def _check(self, fit: Fit) -> None:
        """Refuse a range this fit does not reach (``max_steps`` is checked with the config) or has passed."""
        if self.steps is None:
            if self.memory and fit.rt.device.type != "cuda":
                raise ValueError(
                    f"profile_memory=True without profile_steps records CUDA's allocator history, and this fit runs "
                    f"on {fit.rt.device.type}: pass profile_steps=(start, stop) too, for memory in the profile"
                )
            return
        start, stop = self.steps
        first, last = fit.counters.step, fit.planned_steps()
        if start < first:
            raise ValueError(
                f"profile_steps=({start}, {stop}) starts before step {first}, where this fit resumes; profile later "
                f"steps, e.g. profile_steps=({first}, {first + stop - start})"
            )
        if last is not None and stop > last:
            fix = f"profile_steps=({max(first, last - (stop - start))}, {last})"
            raise ValueError(
                f"profile_steps=({start}, {stop}) reaches past step {last}, where this fit ends (max_epochs of its "
                f"data, or max_steps); profile steps before it, e.g. {fix}"
            )

    def _start(self) -> None:
        assert self._fit is not None and self.steps is not None
        activities = [ProfilerActivity.CPU]
        if self._fit.rt.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # (a schedule that always records: the profiler then marks each step as ProfilerStep#N)
        self._prof = profile(
            activities=activities, schedule=lambda step: ProfilerAction.RECORD, profile_memory=self.memory
        )
        self._prof.step_num = self.steps[0]
        self._prof.start()

    def _finish(self, note: str = "") -> None:
        """Stop recording, write this rank's trace, and print the summary on rank 0."""
        fit, prof = self._fit, self._prof
        assert fit is not None and self.steps is not None
        self._close()
        prof.stop()
        self._prof = None
        rank = fit.rt.rank
        self.trace_path = self.dir / f"rank{rank}.trace.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self._history:
            self._dump("memory")
        if fit.rt.is_main:
            start, stop = self.steps
            head = f"profile of optimizer steps {start}..{stop - 1}{note}, rank 0: {self.trace_path}"
            say(fit, head + " (open it in https://ui.perfetto.dev)\n" + summary(prof.key_averages(), cuda=_cuda(fit)))

    def on_fit_end(self) -> None:
        if self._prof is not None:  # (a stop came first: max_time, EarlyStopping)
            self._finish(note=f" (the fit ended at step {self._step()})")
        elif self._history and self.steps is None:
            self._dump("memory")

    def on_close(self, error: BaseException | None) -> None:
        if self._prof is not None:  # (the fit raised: the trace of what ran, and the error goes on)
            try:
                self._finish(note=f" (the fit raised {type(error).__name__} at step {self._step()})")
            except Exception as e:  # (the fit's own error is the one to raise; this one is said)
                assert self._fit is not None
                say(self._fit, f"profile: the trace of the steps before the error was not written: {e!r}")
        if self._history:
            if isinstance(error, torch.OutOfMemoryError):
                self._dump("oom")
            torch.cuda.memory._record_memory_history(enabled=None)
            self._history = False

    def _dump(self, name: str) -> None:
        assert self._fit is not None
        path = self.dir / f"rank{self._fit.rt.rank}.{name}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))  # type: ignore[no-untyped-call]
        say(self._fit, f"profile: CUDA memory history written to {path} (drag it onto https://pytorch.org/memory_viz)")

    def _step(self) -> int:
        assert self._fit is not None
        return self._fit.counters.step

    # ---- the ranges

    def _open(self, name: str) -> None:
        self._close()
        if self._prof is not None:
            self._range = record_function(name)
            self._range.__enter__()

    def _close(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def on_step_start(self, step: Any) -> None:
        self._close()

    def on_zero_grad(self, micro: int, phase: str | None) -> None:
        self._open("zero_grad")

    def on_forward(self, micro: int, phase: str | None, batch: Any) -> None:
        self._open("forward")

    def on_after_forward(self, micro: int, phase: str | None, real: bool) -> None:
        self._close()

    def on_loss(self, micro: int, phase: str | None, batch: Any) -> None:
        self._open("loss")

    def on_after_loss(self, micro: int, phase: str | None, loss: Any, outputs: Any) -> None:
        self._close()

    def on_backward(self, micro: int, phase: str | None) -> None:
        self._open("backward")

    def on_after_backward(self, phase: str | None) -> None:
        self._close()

    def on_optimizer_step(self, phase: str | None) -> None:
        self._open("optimizer_step")

    def on_after_optimizer_step(self, applied: bool, phase: str | None) -> None:
        self._close()

    def on_step_end(self, record: dict[str, Any]) -> None:
        self._close()
        if self.steps is None:
            return
        done, (start, stop) = self._step(), self.steps
        if self._prof is not None and done == stop:
            self._finish()
            return
        if self._prof is not None:
            self._prof.step()  # (ProfilerStep#done begins: the wait for its data is in it)
        elif done == start:
            self._start()
        self._open("data_wait")

    def on_validation_start(self) -> None:
        self._open("validation")

    def on_validation_end(self, module: Any, metrics: dict[str, float]) -> None:
        self._open("data_wait")

    def on_checkpoint_start(self) -> None:
        self._open("checkpoint")

    def on_checkpoint_end(self) -> None:
        self._open("data_wait")

    def on_epoch_start(self) -> None:
        self._open("data_wait")

    def on_epoch_end(self, metrics: dict[str, float]) -> None:
        self._close()


def _cuda(fit: Fit) -> bool:
    return fit.rt.device.type == "cuda"


def summary(averages: Any, cuda: bool = False, top: int = TOP_OPS) -> str:
    """The end-of-range table from ``torch.profiler``'s ``key_averages()``: each range of :data:`RANGES`
    (calls, total ms, ms per step, share of the steps' time), then the ``top`` ops by self time (on CUDA,
    device self time). Rank 0 prints ``summary(prof.key_averages())`` at the end of the range.
    """
    by_key = {e.key: e for e in averages}
    steps = [e for e in averages if e.key.startswith("ProfilerStep")]
    n_steps = sum(e.count for e in steps) or 1
    step_us = sum(e.cpu_time_total for e in steps) or 1.0
    row = "{:<40}{:>7}{:>11}{:>10}{:>8}"
    lines = [row.format("range (CPU time)", "calls", "total ms", "ms/step", "share")]
    ranged = 0.0
    for name in RANGES:
        e = by_key.get(name)
        if e is not None:
            ms, ranged = e.cpu_time_total / 1e3, ranged + e.cpu_time_total
            lines.append(
                row.format(name, e.count, f"{ms:.2f}", f"{ms / n_steps:.3f}", f"{e.cpu_time_total / step_us:.1%}")
            )
    rest = max(step_us - ranged, 0.0) / 1e3  # (weighing the window, the train record, the loop's own Python)
    lines.append(
        row.format("(the rest of the steps)", "", f"{rest:.2f}", f"{rest / n_steps:.3f}", f"{rest * 1e3 / step_us:.1%}")
    )
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in averages if e.key not in RANGES and not e.key.startswith("ProfilerStep")]
    ops.sort(key=lambda e: getattr(e, self_time), reverse=True)
    total = sum(getattr(e, self_time) for e in ops) or 1.0
    lines.append(
        row.format(f"top ops (self {'device' if cuda else 'CPU'} time)", "calls", "self ms", "ms/step", "share")
    )
    for e in ops[:top]:
        t = getattr(e, self_time)
        lines.append(row.format(e.key[:39], e.count, f"{t / 1e3:.2f}", f"{t / 1e3 / n_steps:.3f}", f"{t / total:.1%}"))
    return "\n".join(lines)
