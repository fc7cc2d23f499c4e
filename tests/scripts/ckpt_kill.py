"""A run that SIGKILLs itself in the middle of writing its second checkpoint, used by the checkpoint tests.

    python tests/scripts/ckpt_kill.py RUN_DIR [--async] [--kill]

A 1M-parameter model with AdamW (about 13 MB of checkpoint) checkpoints every step, resuming with
resume="auto". With --kill, a watcher thread waits until step-00000001 is complete and the
staging dir of step-00000002 has a file in it (the save is under way: in the training thread,
or with --async in the background thread), then sends SIGKILL to its own process: a real kill
-9 mid-write, nothing of the framework replaced. Exits 3 if the run ended before the kill landed.
Without --kill it runs to the end (max_steps=4) and prints the step it resumed from.
"""

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from framework import Callback, Engine, LoopModule


class Wide(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 1))

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, out, y):
        return F.mse_loss(out, y)


class Resumed(Callback):
    def on_checkpoint_load(self, engine, path):
        print(f"resumed from {Path(path).name}", flush=True)


def kill_mid_save(root: Path) -> None:
    staging = root / ".tmp-step-00000002"
    while not (root / "step-00000001").is_dir():
        time.sleep(0.001)
    while True:
        try:
            if any(os.scandir(staging)):
                os.kill(os.getpid(), signal.SIGKILL)
        except FileNotFoundError:
            pass
        time.sleep(0.0002)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--async", dest="asynchronous", action="store_true")
    p.add_argument("--kill", action="store_true")
    a = p.parse_args()
    if a.kill:
        threading.Thread(target=kill_mid_save, args=(Path(a.run_dir) / "checkpoints",), daemon=True).start()
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    y = x[:, :1].clone()
    engine = Engine(
        max_steps=4,
        batch_size=16,
        run_dir=a.run_dir,
        checkpoint_every_n_steps=1,
        checkpoint_every_epoch=False,
        checkpoint_async=a.asynchronous,
        resume="auto",
        progress=False,
        doctor="off",
        callbacks=[Resumed()],
    )
    engine.fit(Wide(), (x, y))
    if a.kill:
        sys.exit(3)  # (the kill did not land: the test fails rather than pass without a kill)


if __name__ == "__main__":
    main()
