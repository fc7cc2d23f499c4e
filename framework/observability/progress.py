"""The progress display on rank 0: a live bar on a terminal, one plain line per log step elsewhere.

Example::

    p = Progress(enabled=True, is_main=True)
    p.start_epoch(0, total=100)
    p.update(1, {"train/loss": 0.3}, step=1)
    p.close()
"""

from __future__ import annotations

import math
import sys
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

    On a terminal the bar shows steps, ETA and, from the last log step, loss,
    lr, items/s and MFU (where the peak is known). Without one (CI, log files)
    the output is one line per log step and never contains a carriage return.
    ``enabled=False`` prints nothing.

    Example::

        p = Progress(enabled=True, is_main=True)
        p.start_epoch(0, total=100)
        p.update(1, {"train/loss": 0.3}, step=1)
        p.close()
    """

    def __init__(self, enabled: bool, is_main: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and is_main
        self.live = self.enabled and _isatty(self.stream)
        self._bar: Any = None
        self._epoch = 0

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
                self._bar.set_postfix_str(_fmt(record), refresh=False)  # drawn at tqdm's next refresh
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

    def close(self) -> None:
        """Finish the current bar, if any (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
