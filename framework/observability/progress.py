"""The progress display on rank 0: a live bar on a terminal, one plain line per log step elsewhere.

What a run must say whatever ``progress`` is (the run dir it uses, that it resumed, why it stopped) goes
through :meth:`Progress.notice`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

_SHORT = {
    "train/loss": "loss",
    "val/loss": "val_loss",
    "lr": "lr",
    "train/items_per_sec": "items/s",
    "train/mfu": "mfu",
}


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"{short}={_num(record[key], short)}" for key, short in _SHORT.items() if key in record]
    parts += [f"{k}={_num(v)}" for k, v in record.items() if k.startswith("val/") and k != "val/loss"]
    return " ".join(parts)


def _num(v: Any, short: str = "") -> str:
    if short == "mfu" and isinstance(v, float):
        return f"{v * 100:.3g}%"  # mfu=41.2%
    if isinstance(v, float):
        if math.isfinite(v) and 1e3 <= abs(v) < 1e9:
            return f"{v:.0f}"  # throughputs: items/s=48194, not 4.819e+04
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e9) and math.isfinite(v):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Rank-0 progress: a live tqdm bar per epoch on a terminal, one plain line per log step otherwise.

    On a terminal the bar shows steps, ETA, the loss of the latest window (optimizer step) and, from the
    last log step, lr, items/s and MFU (where the peak is known). Without one (CI, log files) the output is one
    line per log step (its ``loss`` is the record's: the mean since the previous log step) and never contains a
    carriage return. ``enabled=False`` prints nothing but :meth:`notice` lines.

    The latest window's loss is read without a host sync: ``latest`` (set by the fit) returns the window loss
    tensor still on the device; at most every :attr:`PEEK_EVERY` seconds it is copied to host memory without
    blocking, and the bar shows the last copy that has arrived (:class:`Peek`), so the figure may trail
    the bar by one refresh, never the step by a sync.

    Example:

        >>> import io
        >>> out = io.StringIO()                                   # not a terminal: plain lines
        >>> progress = Progress(enabled=True, is_main=True, stream=out)
        >>> progress.start_epoch(0, total=100)
        >>> progress.update(1, {"train/loss": 0.3, "lr": 0.001, "train/mfu": 0.412}, step=1)
        >>> progress.close()
        >>> print(out.getvalue(), end="")
        epoch 0 step 1: loss=0.3 lr=0.001 mfu=41.2%
    """

    PEEK_EVERY = 0.5  # seconds between two looks at the latest window's loss (the bar redraws about that often)

    def __init__(self, enabled: bool, is_main: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.is_main = is_main
        self.enabled = enabled and is_main
        self.live = self.enabled and _isatty(self.stream)
        self._bar: Any = None
        self._epoch = 0
        self.latest: Callable[[], Any] | None = None  # the latest window's loss, a device tensor (or None)
        self._peek = Peek()
        self._figures = ""  # the last log step's figures (lr, items/s, val/...), shown after the latest loss
        self._peeked_at = 0.0

    def start_epoch(self, epoch: int, total: int | None, initial: int = 0) -> None:
        """Begin epoch ``epoch`` of ``total`` steps (None: unknown), ``initial`` already done after a resume."""
        self._epoch = epoch
        if not self.live:
            return
        from tqdm import tqdm  # lazy: only when a terminal is attached (a notebook is not one: it gets plain lines)

        self.close()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch}",
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, steps: int, record: dict[str, Any] | None, step: int | None = None) -> None:
        """Advance by ``steps``; ``record`` (non-empty on log steps only) refreshes the figures shown."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(steps)
            if record:
                self._figures = _fmt({k: v for k, v in record.items() if k != "train/loss"})
            now = time.monotonic()
            if record or now - self._peeked_at >= self.PEEK_EVERY:
                self._peeked_at = now
                loss = self._peek(self.latest() if self.latest is not None else None)
                shown = f"loss={_num(loss)} " if loss is not None else ""
                self._bar.set_postfix_str(shown + self._figures, refresh=False)  # drawn at tqdm's next refresh
        elif record:
            self.stream.write(f"epoch {self._epoch} step {step}: {_fmt(record)}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line (the model summary, an epoch's validation) without breaking the bar."""
        if not self.enabled:
            return
        bar = self._bar
        if bar is not None and bar.total is not None and bar.n >= bar.total:
            self.close()  # the epoch's bar is full: keep it as a finished line above the message
            bar = None
        if bar is not None:
            bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def notice(self, text: str) -> None:
        """Print a line on rank 0 whatever ``enabled`` is: what a run must say (the run dir it uses, that it
        resumed, why it stopped). On a terminal with a live bar it goes above the bar.

        Example:

            >>> import sys
            >>> Progress(enabled=False, is_main=True, stream=sys.stdout).notice("fit done at step 100")
            fit done at step 100
            >>> Progress(enabled=False, is_main=False, stream=sys.stdout).notice("fit done at step 100")  # rank 1
        """
        if self.enabled:
            self.message(text)
        elif self.is_main:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Finish the current bar, if any (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Peek:
    """The value of a scalar tensor, read without waiting for its device: a CPU tensor is read at once (host
    memory: no sync); a CUDA one is copied into pinned memory behind the work queued so far, with an event,
    and the value is taken on a later call once that event has passed (``None`` until then).

    Example:

        >>> peek = Peek()
        >>> print(peek(None))                        # nothing seen yet
        None
        >>> peek(torch.tensor(0.25)), peek(None)     # a CPU tensor is read at once; None: the last value
        (0.25, 0.25)
    """

    def __init__(self) -> None:
        self._host: Any = None
        self._event: Any = None
        self._value: float | None = None

    def __call__(self, tensor: Any) -> float | None:
        if tensor is None:
            return self._value
        if tensor.device.type == "cpu":
            self._value = float(tensor)
            return self._value
        import torch

        if self._event is not None and self._event.query():  # the copy issued last time has landed
            self._value = float(self._host)
            self._event = None
        if self._event is None:  # (one copy in flight at a time)
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float64, pin_memory=True)
            self._host.copy_(tensor.detach().reshape(()), non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        return self._value


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
