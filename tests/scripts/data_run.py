"""A run with random augmentation, dropout, AdamW and checkpoints, used by the data pipeline tests.

    python tests/scripts/data_run.py RUN_DIR OUT.pt --kind global --workers 2 [--prefetch P] [--sleep S]

Resumes with resume="auto", so a killed run restarted with the same command continues; writes the
final parameters and optimizer state to OUT.pt (rank 0). ``--sleep`` slows each step (a callback),
so a test can kill it mid-epoch; ``--hang-after N`` makes step N's callback pause 2 s (signal tests signal it then).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

import torch

from framework import Callback, Engine
from tests.scripts.data_common import SLOW, Augmented, Net


class Slow(Callback):
    def __init__(self, seconds: float, hang_after: int | None) -> None:
        self.seconds, self.hang_after = seconds, hang_after

    def on_step_end(self, engine, module, metrics):
        time.sleep(self.seconds)
        if self.hang_after is not None and engine.step == self.hang_after:
            print("hanging", flush=True)
            time.sleep(2.0)  # (a signal test signals the run meanwhile)


def train(
    run_dir: str | None, kind: str, workers: int, prefetch: int, sleep: float = 0.0, hang_after: int | None = None,
    epochs: int = 3,
) -> tuple[Engine, Net]:  # fmt: skip
    """The run (tests call it in-process for the uninterrupted reference)."""
    torch.manual_seed(0)
    model = Net(dropout=0.3)
    engine = Engine(
        max_epochs=epochs,
        batch_size=32,
        seed=0,
        run_dir=run_dir,
        checkpoint_every_n_steps=2 if run_dir else None,
        resume="auto" if run_dir else None,
        progress=False,
        num_workers=workers,
        prefetch=prefetch,
        callbacks=[Slow(sleep, hang_after)] if (sleep or hang_after is not None) else [],
    )
    engine.fit(model, Augmented(kind, n=320, sleep=SLOW))  # (slow enough for the prefetch thread)
    return engine, model


def save(engine: Engine, model: Net, out: str) -> None:
    opt = engine._fit.optimizers.first.optimizer
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": engine.step}, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--kind", default="global")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--hang-after", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    run_dir = None if a.run_dir == "-" else a.run_dir
    engine, model = train(run_dir, a.kind, a.workers, a.prefetch, a.sleep, a.hang_after, a.epochs)
    if engine._rt.is_main and a.out != "-":
        save(engine, model, a.out)


if __name__ == "__main__":
    main()
