"""Shared by the issue-4 tests (precision, clipping, schedulers, NaN policy, compile) and their
2-process script: a tiny classifier whose optimizer, scheduler and NaN injection are configurable,
and data whose chosen windows hold NaN inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopModule

N_FEATURES, N_CLASSES = 8, 3


class Net(LoopModule):
    """8 -> 16 -> 3 classifier, the same initial weights for a given ``seed``.

    - ``optimizer``: "sgd" (plain SGD: the update is exactly ``-lr * grad``) or "adamw"
      (has per-parameter state, so a step that should not have happened shows up in it).
    - ``scheduler``: None, "lambda" (a LambdaLR whose every call is recorded in
      ``lambda_calls``) or "lambda_epoch" (the same, with ``interval="epoch"``).
    - ``poison_call`` / ``poison``: on the ``poison_call``-th training forward (0-based),
      make the loss NaN ("loss") or keep the loss finite but make the gradient NaN ("grad").
    - ``fused``: the optimizer's fused kernel, which can skip a step on the device.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 1.0,
        scheduler: str | None = None,
        poison_call: int | None = None,
        poison: str = "loss",
        seed: int = 0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))
        self.optimizer_name, self.lr, self.scheduler_name = optimizer, lr, scheduler
        self.poison_call, self.poison = poison_call, poison
        self.fused = fused  # torch's fused kernels: they can skip a step on the device (nan_check="deferred")
        self.train_forwards = 0
        self.lambda_calls: list[int] = []
        self.opt: torch.optim.Optimizer | None = None
        self.sched: Any = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.net(inputs)
        if self.training:
            if self.train_forwards == self.poison_call:
                if self.poison == "loss":
                    out = out * float("nan")
                else:
                    # sqrt(0) = 0 leaves the output (and the loss) finite, but its derivative
                    # is inf, and inf * 0 = nan flows back into every parameter's gradient.
                    out = out + torch.sqrt(out * 0)
            self.train_forwards += 1
        return out

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def _lr_lambda(self, step: int) -> float:
        self.lambda_calls.append(step)
        return 1.0 / (1.0 + step)  # changes every step, so a wrong step count changes the parameters

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            self.opt = torch.optim.SGD(self.parameters(), lr=self.lr, fused=self.fused or None)
        else:
            self.opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01, fused=self.fused or None)
        if self.scheduler_name is None:
            return self.opt
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_lambda)
        interval = "epoch" if self.scheduler_name == "lambda_epoch" else "step"
        return {"optimizer": self.opt, "scheduler": self.sched, "interval": interval}


def data(n: int = 96, seed: int = 0, nan_items: list[int] | tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` items; the rows in ``nan_items`` hold NaN inputs (so their loss is NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0).long()) % N_CLASSES
    x[list(nan_items)] = float("nan")
    return x, y


def without_windows(tensors: tuple[torch.Tensor, ...], windows: list[int], batch_size: int) -> tuple[torch.Tensor, ...]:
    """The same data with whole windows removed (valid for shuffle=False and full windows)."""
    keep = torch.ones(len(tensors[0]), dtype=torch.bool)
    for w in windows:
        keep[w * batch_size : (w + 1) * batch_size] = False
    return tuple(t[keep] for t in tensors)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]
