"""A short run that tests/parallel/test_preemption.py stops with real signals, then resumes.

    python tests/scripts/preempt_run.py RUN_DIR OUT.pt [--sleep S] [--slow-val S] [--slow-save-step K --slow-save S]
        [--collective-timeout S] [--record STEPS.pt] [--slow-fit-end S [--slow-fit-end-rank R]] [--note-sigterm]
    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/preempt_run.py RUN_DIR OUT.pt ...

2 epochs of 20 optimizer steps (global batch 16), dropout, shuffling, AdamW and a cosine schedule;
validation at each epoch end, a checkpoint every 6 steps and at each epoch end, resume="auto" (the
same command continues a stopped run). The options only slow things down (they change no number),
so every variant ends at the same parameters as an uninterrupted run.

What it leaves in RUN_DIR for the test (each written atomically):
  pid-rank{R}          this rank's pid, written before fit (signal exactly one rank)
  start-rank{R}        the step rank R's fit starts at (after resume="auto" loaded a checkpoint)
  timeout-rank{R}      several processes: the process group's collective timeout, in seconds
  step                 rank 0's optimizer step, after each step (the test signals once training is under way)
  validating-rank{R}   --slow-val: rank R's validation started (its first eval forward)
  fit-end-rank{R}      --slow-fit-end: rank R is in on_fit_end (after fit's last agreement)
  saving-rank{R}       --slow-save-step K: rank R is inside the checkpoint save of step K (0: of any step)
  exit-rank{R}.json    {"code": the status this rank exits with (0, or the engine's SystemExit), "step": ...}
  error-rank{R}.txt    any other exception, as "TypeName: message"
  sigterm-rank{R}      --note-sigterm: a SIGTERM came while fit's handlers were not installed
OUT.pt (rank 0, only when fit returns): the final parameters; --record: those after every step, by step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import framework.checkpoint as ck
from framework import Callback, Engine, LoopModule

RANK = int(os.environ.get("RANK", "0"))


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Net(LoopModule):
    def __init__(self, run_dir: Path, slow_val: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        self.run_dir, self.slow_val = run_dir, slow_val

    def forward(self, x):
        # (validation runs under inference_mode; the doctor's first-step probe, also in eval mode, does not)
        if not self.training and self.slow_val and torch.is_inference_mode_enabled():
            marker = self.run_dir / f"validating-rank{RANK}"
            if not marker.exists():
                write(marker, "1")
            time.sleep(self.slow_val)
        return self.net(x)

    def compute_loss(self, out, y):
        return F.cross_entropy(out, y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)


class Pace(Callback):
    """Publishes rank 0's step and slows steps down, so a signal lands mid-run; with ``record``, keeps the
    parameters after every step (the reference run: the test compares each checkpoint with them)."""

    def __init__(self, run_dir: Path, seconds: float, record: bool, slow_end: float, slow_end_rank: int | None) -> None:
        self.run_dir, self.seconds, self.slow_end, self.slow_end_rank = run_dir, seconds, slow_end, slow_end_rank
        self.params: dict[int, dict[str, torch.Tensor]] | None = {} if record else None

    def on_fit_start(self, engine, module):
        write(self.run_dir / f"start-rank{RANK}", str(engine.step))  # (after resume: the step it resumed at)
        if torch.distributed.is_initialized():
            group = torch.distributed.distributed_c10d._get_default_group()
            seconds = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            write(self.run_dir / f"timeout-rank{RANK}", str(seconds))

    def on_step_end(self, engine, module, metrics):
        if self.params is not None:
            self.params[engine.step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if RANK == 0:
            write(self.run_dir / "step", str(engine.step))
        if self.seconds:
            time.sleep(self.seconds)

    def on_fit_end(self, engine, module):
        if self.slow_end and self.slow_end_rank in (None, RANK):  # (after fit's last agreement: an upload, say)
            write(self.run_dir / f"fit-end-rank{RANK}", "1")
            time.sleep(self.slow_end)


def slow_saves(run_dir: Path, at_step: int, seconds: float, engine: Engine) -> None:
    """Every rank sleeps inside the save of step ``at_step`` (0: every save), in writing its own RNG file, after
    a marker."""
    real = ck.CheckpointWriter.json

    def json(self, filename, obj):
        if filename == f"rng-rank{RANK}.json" and at_step in (0, engine.step):
            write(run_dir / f"saving-rank{RANK}", str(engine.step))
            time.sleep(seconds)
        return real(self, filename, obj)

    ck.CheckpointWriter.json = json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    p.add_argument("--slow-val", type=float, default=0.0, help="seconds per validation forward")
    p.add_argument("--slow-save-step", type=int, default=None)
    p.add_argument("--slow-save", type=float, default=0.0, help="seconds inside the save of --slow-save-step")
    p.add_argument("--collective-timeout", type=float, default=None)
    p.add_argument("--record", default=None, help="save the parameters after every step here (rank 0)")
    p.add_argument("--slow-fit-end", type=float, default=0.0, help="seconds in on_fit_end")
    p.add_argument("--slow-fit-end-rank", type=int, default=None, help="only on this rank")
    p.add_argument("--note-sigterm", action="store_true", help="a SIGTERM outside fit only writes sigterm-rank{R}")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"exit-rank{RANK}.json", f"error-rank{RANK}.txt", f"saving-rank{RANK}", f"validating-rank{RANK}"):
        (run_dir / name).unlink(missing_ok=True)  # (a resumed launch reports afresh)
    if a.note_sigterm:  # (a user's own handler, which fit restores: torchrun's SIGTERM cannot end this rank)
        signal.signal(signal.SIGTERM, lambda signum, frame: write(run_dir / f"sigterm-rank{RANK}", "1"))
    write(run_dir / f"pid-rank{RANK}", str(os.getpid()))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(384, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = Net(run_dir, a.slow_val)
    engine = Engine(
        max_epochs=2,
        batch_size=16,
        seed=0,
        run_dir=str(run_dir),
        checkpoint_every_n_steps=6,
        resume="auto",
        progress=False,
        log_every_n_steps=5,
        collective_timeout=a.collective_timeout,
        callbacks=[pace := Pace(run_dir, a.sleep, a.record is not None, a.slow_fit_end, a.slow_fit_end_rank)],
    )
    if a.slow_save_step is not None:
        slow_saves(run_dir, a.slow_save_step, a.slow_save, engine)
    try:
        engine.fit(model, (x[:320], y[:320]), (x[320:], y[320:]))
    except SystemExit as e:
        write(run_dir / f"exit-rank{RANK}.json", json.dumps({"code": e.code, "step": engine.step}))
        raise
    except BaseException as e:
        write(run_dir / f"error-rank{RANK}.txt", f"{type(e).__name__}: {e}")
        raise
    if RANK == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, a.out)
        if a.record is not None:
            torch.save(pace.params, a.record)
    write(run_dir / f"exit-rank{RANK}.json", json.dumps({"code": 0, "step": engine.step}))


if __name__ == "__main__":
    main()
