"""A run that publishes a checkpoint every optimizer step and keeps only the newest (keep_last=1): what a
reader polling the run dir races against (tests/checkpoint/test_store.py).

    python tests/scripts/keep_last_run.py RUN_DIR STEPS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

import torch
import torch.nn.functional as F
from torch import nn

from framework import Engine, LoopModule


class Wide(LoopModule):
    """About 0.5 MB of weights (1.5 MB with AdamW's moments): a checkpoint takes a moment to hash."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128))

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)


def main() -> None:
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 128, generator=g)
    engine = Engine(
        max_steps=steps, batch_size=16, keep_last=1, checkpoint_every_n_steps=1, run_dir=run_dir, progress=False,
        doctor="off", log_every_n_steps=1000,
    )  # fmt: skip
    engine.fit(Wide(), (x, x.flip(-1)))


if __name__ == "__main__":
    main()
