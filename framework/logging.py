"""Run logging: ``metrics.jsonl`` records, trackers and the progress display (rank 0 only).

Nothing here reads a device tensor: the engine hands over Python floats that
it read on log steps only, so logging never adds a host sync.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Any


class MetricsLog:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl``; also forwards to trackers.

    Example::

        log = MetricsLog("runs/x", is_main=True)
        log.write({"step": 10, "epoch": 0, "train/loss": 0.5})
    """

    def __init__(self, run_dir: str | None, is_main: bool, tracker: Any = None) -> None:
        self.is_main = is_main
        self.tracker = tracker  # an Accelerator with trackers, or None
        self._file: IO[str] | None = None
        if run_dir is not None and is_main:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        if self.tracker is not None:
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.tracker.log(values, step=record.get("step"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(record: dict[str, Any]) -> str:
    parts = []
    for key in ("train/loss", "val/loss", "lr", "train/items_per_sec"):
        if key in record:
            parts.append(f"{key.split('/')[-1]}={_num(record[key])}")
    parts += [f"{k}={_num(v)}" for k, v in record.items() if k.startswith("val/") and k != "val/loss"]
    return " ".join(parts)


def _num(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) and math.isfinite(v):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Rank-0 progress: a live tqdm bar per epoch on a terminal, one plain line per log step otherwise.

    Without a terminal (CI, log files) the output never contains carriage returns.

    Example::

        p = Progress(enabled=True, is_main=True)
        p.start_epoch(0, total=100)
        p.update(1, {"train/loss": 0.3})
    """

    def __init__(self, enabled: bool, is_main: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and is_main
        self.live = self.enabled and self.stream.isatty()
        self._bar: Any = None
        self._epoch = 0
        self._t0 = time.monotonic()

    def start_epoch(self, epoch: int, total: int | None, initial: int = 0) -> None:
        self._epoch = epoch
        if not self.live:
            return
        from tqdm.auto import tqdm  # lazy: only when a terminal is attached

        self.close()
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, steps: int, record: dict[str, Any] | None, step: int | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(steps)
            if record:
                self._bar.set_postfix_str(_fmt(record), refresh=False)
        elif record:
            self.stream.write(f"epoch {self._epoch} step {step}: {_fmt(record)}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
