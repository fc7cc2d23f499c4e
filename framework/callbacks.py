"""Callbacks: read-only hooks around the step, never inside it.

A callback sees the engine and the metrics, and can ask the run to stop
(``engine.should_stop = True``); it cannot reorder the five canonical steps,
because it is only called between optimizer steps and around epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .module import LoopModule


class Callback:
    """Base class: override any of the eight events; the defaults do nothing.

    Events: ``on_fit_start``, ``on_fit_end``, ``on_epoch_start``, ``on_epoch_end``,
    ``on_step_end`` (after an applied or skipped optimizer step), ``on_validation_end``,
    ``on_checkpoint_save``, ``on_checkpoint_load``. State returned by ``state_dict``
    is stored in checkpoints (JSON-serialisable values only).

    Example::

        class PrintLR(Callback):
            def on_step_end(self, engine, module, metrics):
                if "lr" in metrics:
                    print(engine.step, metrics["lr"])

        Engine(max_steps=100, batch_size=32, callbacks=[PrintLR()])
    """

    def on_fit_start(self, engine: Engine, module: LoopModule) -> None:
        """Called once before the first step (after a resume, if any)."""

    def on_fit_end(self, engine: Engine, module: LoopModule) -> None:
        """Called once after the last step."""

    def on_epoch_start(self, engine: Engine, module: LoopModule) -> None:
        """Called at the start of each epoch (also a resumed, partial one)."""

    def on_epoch_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each epoch's validation; ``metrics`` holds ``val/...`` and ``epoch_time``."""

    def on_step_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each optimizer step; ``metrics`` is non-empty only on log steps."""

    def on_validation_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        """Called after each validation with ``{"val/loss": ..., "val/<metric>": ...}``."""

    def on_checkpoint_save(self, engine: Engine, path: str) -> None:
        """Called after a checkpoint was written completely to ``path``."""

    def on_checkpoint_load(self, engine: Engine, path: str) -> None:
        """Called after a checkpoint was loaded from ``path``."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to keep in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations.

    Example::

        Engine(max_epochs=100, batch_size=64,
               callbacks=[EarlyStopping(monitor="val/loss", patience=3)])
    """

    def __init__(self, monitor: str = "val/loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}); use 'min' or 'max'")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, engine: Engine, module: LoopModule, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping(monitor={self.monitor!r}) but validation logged {sorted(metrics)}; "
                "pick one of those names"
            )
        value = metrics[self.monitor]
        if self._improved(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                self.stopped_epoch = engine.epoch
                engine.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


def fire(callbacks: list[Callback], event: str, *args: Any) -> None:
    """Call ``event`` on every callback, in order."""
    for cb in callbacks:
        getattr(cb, event)(*args)
