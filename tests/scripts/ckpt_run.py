"""A run with dropout, shuffling, AdamW and a cosine schedule, used by the checkpoint tests.

    python tests/scripts/ckpt_run.py RUN_DIR OUT.pt [--every N] [--sleep S] [--no-dropout]
    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/ckpt_run.py RUN_DIR OUT.pt

Resumes with resume="auto", so a killed run restarted with the same command
continues; writes final parameters and optimizer state to OUT.pt (rank 0).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from framework import Callback, Engine, LoopModule


class Net(LoopModule):
    def __init__(self, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, out, y):
        return F.cross_entropy(out, y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)


class Slow(Callback):
    """Slows steps down so a test can kill the run at a random moment mid-epoch."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_end(self, engine, module, metrics):
        time.sleep(self.seconds)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--no-dropout", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = Net(0.0 if a.no_dropout else 0.3)
    engine = Engine(
        max_epochs=a.epochs,
        batch_size=32,
        micro_batch_size=a.micro,
        seed=0,
        run_dir=a.run_dir,
        checkpoint_every_n_steps=a.every,
        resume="auto",
        progress=False,
        callbacks=[Slow(a.sleep)] if a.sleep else [],
    )
    engine.fit(model, (x, y), (x[:100], y[:100]))
    if engine._rt.is_main:
        opt = engine._fit.optimizers.first.optimizer
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": engine.step}, a.out)


if __name__ == "__main__":
    main()
