"""Checks ``train_mode`` and ``eval_mode``: the user's code leaves the modes to the engine.

Every step (an attribute read): the module is still in train mode after ``forward``, and still in eval
mode after each validation batch. On checked steps, inside :meth:`~framework.doctor.Doctor.watch`, no
submodule was switched to eval mode either (a ``self.dropout.eval()`` hidden in ``compute_loss``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .context import Context
from .findings import name_list


class TrainMode:
    """``train_mode``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._modes: list[tuple[nn.Module, bool]] = []

    def on_forward(self, module: nn.Module, where: str) -> None:
        self.ctx.record.ran.add("train_mode")
        if not module.training:
            self.ctx.record.fail(
                "train_mode",
                f"{type(module).__name__} switched itself to eval mode during training (in {where}); "
                "remove the .eval() call: the engine sets train mode for training and eval mode for validation",
            )

    def on_watch_enter(self, module: nn.Module) -> None:
        self._modes = [(m, m.training) for m in module.modules()]

    def on_watch_exit(self) -> None:
        self._modes = []

    def on_checked_forward(self, module: nn.Module) -> None:
        self._check_submodules()

    def on_checked_loss(self, module: nn.Module, loss: Any, outputs: Any, phase: str | None) -> None:
        if self.ctx.watching:
            self._check_submodules()

    def _check_submodules(self) -> None:
        switched = [m for m, was in self._modes if was and not m.training]
        if switched:
            names = self.ctx.fit.module_names
            listed = name_list([names.get(id(m), type(m).__name__) for m in switched])
            self.ctx.record.fail(
                "train_mode",
                f"{self.ctx.module_name()}.{self.ctx.where} switched {listed} to eval mode during training "
                "(dropout off, BatchNorm frozen); remove the .eval() call: the engine sets train mode for "
                "training and eval mode for validation",
            )


class EvalMode:
    """``eval_mode`` (also in ``Engine.validate``, outside any fit)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_eval(self, module: nn.Module) -> None:
        self.ctx.record.ran.add("eval_mode")
        if module.training:
            self.ctx.record.fail(
                "eval_mode",
                f"{type(module).__name__} switched itself to train mode during validation; remove the "
                ".train() call from forward/compute_loss/compute_metrics: the engine sets the modes",
            )
