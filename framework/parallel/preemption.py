"""Stopping early, agreed by every rank: preemption signals, Ctrl-C and ``max_time``.

A signal only sets a flag on the process that received it (a handler must not run collectives or
touch the loop). The flags of every rank travel in the all-reduce each step already does (the item
counts of the window, :meth:`Stops.device_flags`) and come back with the NaN guard's verdict, so
every rank learns of a signal received by any of them at the same step boundary, with no new
collective per step. That is the one decision point: the run checkpoints there and exits on every
rank with the same status: 143 for SIGTERM/SIGUSR1 (preemption, a SLURM requeue), 130 for a first
Ctrl-C (SIGINT). A second Ctrl-C aborts at once (KeyboardInterrupt). A signal that arrives after
the last step (during the last validation or save) is caught by one final agreement at the end of
fit, so it never turns into a normal exit; one after that agreement (during ``on_fit_end``) is raised
again once fit's handlers are gone (by default: the process ends by that signal).

Per fit: ``with stops.installed():``, and each step folds ``stops.device_flags(device)`` into its all-reduce,
hands the summed values to ``stops.agree(...)`` (the same on every rank), and when ``stops.exit_code`` is set
checkpoints, then raises ``SystemExit(stops.exit_code)``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runtime import Runtime

PREEMPTED, INTERRUPTED = 143, 130


class Stops:
    """The early-stop flags of one fit (see the module docstring).

    ``time_up``, ``exit_code`` (143, 130 or None) and ``signal_name`` are the *agreed* values; a signal
    received here is local until :meth:`agree` (several processes) or :meth:`agree_locally` (one).

    Example:

        >>> stops = Stops(("SIGTERM", "SIGUSR1"), max_time=None)
        >>> stops.requested
        False
        >>> stops.agree([0.0, 1.0, 0.0])          # the flags summed over ranks: one of them got SIGTERM
        >>> stops.requested, stops.exit_code, stops.signal_name
        (True, 143, 'a preemption signal')
    """

    def __init__(self, signals: tuple[str, ...], max_time: float | None) -> None:
        self.signals, self.max_time = signals, max_time
        self.t0 = time.monotonic()
        self.received: int | None = None  # the first signal received by this process
        self.interrupts = 0
        self.time_up = False
        self.exit_code: int | None = None
        self.signal_name: str | None = None

    # -- local

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # a second Ctrl-C: abort at once, as without the engine
        if self.received is None or (self.received == signal.SIGINT and signum != signal.SIGINT):
            self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the preemption signals and SIGINT during the block (main thread only), then restore them.

        Leaving with the agreed stop (SystemExit 143/130), the preemption signals are left ignored, so the
        process exits with that status whatever preemption signal comes during its teardown. Leaving normally
        with a signal received too late for any agreement, that signal is raised again for the restored handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for name in {*self.signals, "SIGINT"}:
            signum = getattr(signal, name)
            previous[signum] = signal.signal(signum, self._on_signal)
        leaving = False
        try:
            yield
        except SystemExit:
            leaving = self.exit_code is not None  # the agreed stop: the process is on its way out with its status
            raise
        finally:
            for signum, handler in previous.items():
                # Leaving with 143/130, a later preemption signal (torchrun's SIGTERM to the ranks still exiting
                # once one has; the rest of a skewed SIGTERM) would kill this rank by signal during its teardown.
                # Ignored, not a Python handler: the interpreter's finalization resets those to the default.
                leave_ignored = leaving and signum != signal.SIGINT
                signal.signal(signum, signal.SIG_IGN if leave_ignored else handler)
        if self.received is not None and self.exit_code is None:
            # A signal after fit's final agreement (during on_fit_end, say) is not lost, nor a normal exit: the
            # handler just restored (by default: termination) gets it now.
            signal.raise_signal(self.received)

    def local_time_up(self) -> bool:
        return self.max_time is not None and time.monotonic() - self.t0 >= self.max_time

    def _local_values(self) -> list[float]:
        term = self.received is not None and self.received != signal.SIGINT
        return [float(self.local_time_up()), float(term), float(self.received == signal.SIGINT)]

    def device_flags(self, device: torch.device) -> torch.Tensor:
        """This rank's flags (time up, preemption signal, Ctrl-C), to sum over ranks in the step's all-reduce."""
        return torch.tensor(self._local_values(), device=device, dtype=torch.float64)

    # -- agreed

    def agree(self, values: list[float] | None) -> None:
        """Take the summed flags of every rank (read back with the step's verdict)."""
        if not values:
            return
        time_up, term, interrupt = values[:3]
        self.time_up |= time_up > 0
        if self.exit_code is None and (term > 0 or interrupt > 0):
            self.exit_code = PREEMPTED if term > 0 else INTERRUPTED
            self.signal_name = "a preemption signal" if term > 0 else "Ctrl-C"
        elif self.exit_code == INTERRUPTED and term > 0:
            self.exit_code, self.signal_name = PREEMPTED, "a preemption signal"

    def agree_locally(self) -> None:
        """One process: its own flags are the agreed ones."""
        if self.received is None and self.max_time is None:
            return  # (nothing to agree on: the per-step path of most runs)
        self.agree(self._local_values())

    def agree_now(self, rt: Runtime) -> None:
        """One extra all-reduce (several processes): used once at the end of a fit, so a signal that came
        after the last step still stops every rank with its status."""
        if rt.world_size == 1:
            self.agree_locally()
            return
        self.agree(rt.all_reduce_sum(self.device_flags(rt.device)).tolist())

    @property
    def requested(self) -> bool:
        """Stop at this step boundary (agreed)."""
        return self.time_up or self.exit_code is not None
