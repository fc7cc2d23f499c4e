"""A recipe-shaped script for tests/doctor/test_cli.py: ``python -m framework doctor tests/scripts/doctor_recipe.py``.

``--bug NAME`` plants one loop mistake (see BUGS); the default trains a correct module.
Like a real recipe it parses its arguments, builds an Engine with a large max_steps
(the doctor CLI caps it), fits with validation data, then evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from framework import Engine, LoopModule, seed_everything

BUGS = ("none", "sum", "detach", "eval", "unused", "crash")


class Net(LoopModule):
    def __init__(self, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
        if bug == "unused":
            self.head = nn.Linear(3, 3)  # defined, never called

    def forward(self, inputs):
        if self.bug == "eval":
            self.eval()
        if self.bug == "crash":
            raise ValueError("a bug in forward that is not a loop mistake")
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets, reduction="sum" if self.bug == "sum" else "mean")
        return loss.detach() if self.bug == "detach" else loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bug", choices=BUGS, default="none")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    engine = Engine(max_steps=10_000, batch_size=32, progress=False, run_dir=args.run_dir)
    seed_everything(0)  # the same initial weights on every rank (the doctor checks it)
    module = Net(args.bug)
    engine.fit(module, (x[:192], y[:192]), (x[192:], y[192:]))
    print("steps", engine.step, "val", engine.validate(module, (x[192:], y[192:])))


if __name__ == "__main__":
    main()
