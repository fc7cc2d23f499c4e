"""Preparing the next windows while the current step computes, and measuring what the step still waits.

Three stages, one per way a window can be made ready (``framework.data.sources`` picks one
per source; the rule is in ``framework.data``):

- :class:`Plain`: the window is made when the step asks for it (no overlap; also ``prefetch=0``);
- :class:`Lookahead`: the next window is made, and its GPU copy queued on a side stream, as soon
  as the current one is handed out (one window ahead, in the training thread: for what is cheap
  to make on the host but worth copying ahead);
- :class:`Background`: a thread makes up to ``depth`` windows ahead into a bounded queue (for
  ``__getitem__`` that waits on I/O or releases the GIL: file reads, image decoding, numpy, torch ops).

Each stage is an iterator of windows with a ``close()`` that ends whatever it started (the
thread, the workers behind its producer) and is safe to call twice; a failure in the producer
is raised in the training thread, with its traceback, when the window it was making is asked for.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from . import rng
from .batching import Window
from .device import DeviceCopier

JOIN_TIMEOUT_S = 30.0  # how long close() waits for a thread stuck inside the dataset before saying so


class WaitMeter:
    """How long the training thread waits for input, against the time it spends on everything else.

    A source records each window request (``record(asked, got)``); ``take()`` gives the fraction of
    the time since its previous call that was spent waiting (``train/data_wait`` on log steps), and
    ``fraction`` the same over the whole fit. Time between epochs (validation) is not counted.

    Example:

        >>> from framework.data import WaitMeter
        >>> meter = WaitMeter()
        >>> meter.record(asked=0.0, got=1.0)   # the first window: 1 s of waiting
        >>> meter.record(asked=3.0, got=3.5)   # 2 s of step, then 0.5 s of waiting
        >>> meter.pause(now=4.0)               # 0.5 s of step, then the epoch ends
        >>> meter.take()                       # 1.5 s of waiting in 4 s
        0.375
    """

    def __init__(self) -> None:
        self.waited = self.busy = 0.0  # since the last take()
        self.total_waited = self.total_busy = 0.0
        self._out_since: float | None = None  # when the last window was handed out (None: between epochs)

    def record(self, asked: float, got: float) -> None:
        """A window was asked for at ``asked`` and handed out at ``got`` (``time.perf_counter``).

        Example:

            >>> meter = WaitMeter()
            >>> meter.record(asked=0.0, got=0.25)
            >>> meter.record(asked=1.0, got=1.5)   # 0.75 s of step in between
            >>> meter.waited, meter.busy
            (0.75, 0.75)
        """
        if self._out_since is not None:
            self.busy += asked - self._out_since
        self.waited += got - asked
        self._out_since = got

    def pause(self, now: float) -> None:
        """The epoch's windows ended at ``now``: the time until the next epoch's first request is not a step's.

        Example:

            >>> meter = WaitMeter()
            >>> meter.record(asked=0.0, got=1.0)
            >>> meter.pause(now=3.0)               # the last step took 2 s
            >>> meter.record(asked=10.0, got=10.5)  # the next epoch: validation time in between is not counted
            >>> meter.waited, meter.busy
            (1.5, 2.0)
        """
        if self._out_since is not None:
            self.busy += now - self._out_since
        self._out_since = None

    def take(self) -> float:
        """The fraction of time spent waiting for input since the previous ``take()`` (0.0 if none passed).

        Example:

            >>> meter = WaitMeter()
            >>> meter.record(asked=0.0, got=1.0)
            >>> meter.pause(now=4.0)
            >>> meter.take(), meter.take()
            (0.25, 0.0)
        """
        if self._out_since is not None:
            now = time.perf_counter()
            self.busy += now - self._out_since
            self._out_since = now
        waited, total = self.waited, self.waited + self.busy
        self.total_waited += waited
        self.total_busy += self.busy
        self.waited = self.busy = 0.0
        return waited / total if total > 0 else 0.0

    @property
    def fraction(self) -> float:
        """The fraction of time spent waiting for input over everything recorded so far.

        Example:

            >>> meter = WaitMeter()
            >>> meter.record(asked=0.0, got=1.0)
            >>> meter.pause(now=4.0)
            >>> meter.take(), meter.fraction           # take() starts afresh; fraction keeps the whole fit
            (0.25, 0.25)
        """
        waited = self.total_waited + self.waited
        total = waited + self.total_busy + self.busy
        return waited / total if total > 0 else 0.0


class Stage:
    """Windows from ``produce`` (host windows), made ready for the step; see the module docstring.

    ``first`` is a window already taken from ``produce`` (the source makes the first window of a fit
    itself, to learn how its data draws randomness); it is handed out first. ``move`` puts a host
    window on the device where no ``copier`` does it (the identity on CPU). Iterate a stage inside
    ``try``/``finally: stage.close()``: a :class:`Background` stage's thread starts when it is built.
    """

    def __init__(
        self,
        produce: Iterator[Window],
        first: Window | None = None,
        move: Callable[[Window], Window] = lambda w: w,
        copier: DeviceCopier | None = None,
    ) -> None:
        self.produce = produce
        self.move = move
        self.copier = copier
        self._first = first
        self._ended = False

    def __iter__(self) -> Iterator[Window]:
        return self

    def __next__(self) -> Window:
        raise NotImplementedError

    def _next_host(self) -> Window | None:
        """The next host window (``first`` before the rest), or None at the end."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._ended:
            return None
        window = next(self.produce, None)
        self._ended = window is None
        return window

    def close(self) -> None:
        """End what this stage started: its producer (and the workers behind it), its thread."""
        self._ended = True
        close = getattr(self.produce, "close", None)
        if close is not None:
            close()


class Plain(Stage):
    """The window is made when asked for, in the training thread."""

    def __next__(self) -> Window:
        window = self._next_host()
        if window is None:
            raise StopIteration
        if self.copier is not None:
            return self.copier.finish(self.copier.start(window))
        return self.move(window)


class Lookahead(Stage):
    """One window ahead in the training thread, its GPU copy queued on the copier's side stream: while the step
    computes on window k, window k+1's copy is already under way."""

    def __init__(self, produce: Iterator[Window], first: Window | None, copier: DeviceCopier) -> None:
        super().__init__(produce, first, copier=copier)
        self._copier = copier
        self._ready: tuple[Window, Any] | None = None

    def __next__(self) -> Window:
        if self._ready is None:  # the first request (or the end): nothing is ready yet
            window = self._next_host()
            if window is None:
                raise StopIteration
            self._ready = self._copier.start(window)
        current = self._copier.finish(self._ready)  # (the training stream waits for its copy)
        nxt = self._next_host()
        # The next window's copy runs on the side stream while `current` computes.
        self._ready = None if nxt is None else self._copier.start(nxt)
        return current


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Background(Stage):
    """A thread runs ``produce`` (and, on a GPU, the copier's ``start``) up to ``depth`` windows ahead.

    The queue is bounded, so at most ``depth`` finished windows wait, plus the one the thread is
    making. ``close()`` asks the thread to stop (it checks between items), drains the queue, joins
    it, and then closes ``produce``. The thread starts when the stage is built; ``next(stage)`` waits only
    if the thread is behind.
    """

    def __init__(
        self,
        produce: Iterator[Window],
        first: Window | None,
        depth: int,
        move: Callable[[Window], Window] = lambda w: w,
        copier: DeviceCopier | None = None,
    ) -> None:
        super().__init__(produce, first, move, copier)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="framework-data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng._ctx.cancel = self._stop  # (thread-local: item loops in this thread stop when asked)
        try:
            for window in self.produce:
                if not self._put(window if self.copier is None else self.copier.start(window)):
                    return
            self._put(_END)
        except rng.Cancelled:
            return
        except BaseException as error:  # (re-raised in the training thread, which decides what it means)
            self._put(_Failed(error))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Window:
        if self._first is not None:  # made by the source in the training thread; the thread makes the rest
            window, self._first = self._first, None
            return self.copier.finish(self.copier.start(window)) if self.copier is not None else self.move(window)
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError(
                        "the data prefetch thread ended without a window or an error; this is a bug in "
                        "framework.data, please report it (Engine(prefetch=0) works around it)"
                    ) from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        return self.copier.finish(item) if self.copier is not None else self.move(item)

    def close(self) -> None:
        self._done = True
        self._stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # (frees the thread if it is blocked on a full queue)
            self._thread.join(timeout=0.05)
        self._drain()
        if self._thread.is_alive():
            warnings.warn(
                f"the data prefetch thread is still inside the dataset after {JOIN_TIMEOUT_S:.0f} s (a __getitem__ "
                "or a stream that blocks); it is a daemon thread and ends when that call returns",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        super().close()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
