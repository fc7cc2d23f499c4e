"""Train the token model at several layouts in one launch (tests/parallel/test_layouts.py reads what it writes).

    accelerate launch --config_file launch/cpu_2d.yaml tests/scripts/layouts_run.py four OUT
    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/layouts_run.py two OUT

``four`` (4 processes): 2 x 2 (dp_shard x tp) with micro-batches of 8 (3 per window), its resume from its
step-3 checkpoint on the same layout, HSDP 2 x 2 (micro 12), the same with activation checkpointing, FSDP 4
resuming the 2 x 2 checkpoint, and 2 x 2 with a NaN planted in one sequence (nan_policy="skip").
``two`` (2 processes, after ``four``): TP 2 (micro 24, 2 per window), and TP 2 resuming the 2 x 2 checkpoint, and 2 x 2 with a NaN planted in one sequence (nan_policy="skip").
``one`` (one process): FSDP in a world of one with activation checkpointing (benchmarks/gpu_session.sh).
``preempt`` (4 processes): 2 x 2 with resume="auto", slowed down for a signal to land mid-run.
Every run: two optimizers, an EMA, clipping, validation each epoch, the default doctor; the initial weights
are saved at fit start (``OUT/<name>-init``), the final state by the run (``OUT/<name>/checkpoints``), and
predictions of the validation inputs at the end (``OUT/<name>-predict.pt``, rank 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework import Callback, Engine
from tests.scripts.layouts_common import GLOBAL_BATCH, TokenLM, token_data

COMMON = dict(
    batch_size=GLOBAL_BATCH, max_epochs=2, seed=0, progress=False, ema_decay=0.9, clip_grad_norm=0.2, shuffle=True
)


class SaveInit(Callback):
    """The initial weights as the fit starts (every rank joins the save: it is collective)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, engine, module):
        engine.save_checkpoint(self.path)


def run(out: Path, name: str, *, tp: bool, resume: str | None = None, poison: bool = False, **layout) -> None:
    train, val = token_data(poison=5 if poison else None), token_data(40, seed=1)
    module = TokenLM(tp=tp, two_optimizers=True)
    module.poisoned = poison
    if poison:  # (a NaN in one micro-batch: the step is skipped on every rank, at every layout)
        layout["nan_policy"] = "skip"
    callbacks = [] if resume else [SaveInit(out / f"{name}-init")]
    engine = Engine(**COMMON, **layout, run_dir=str(out / name), resume=resume, callbacks=callbacks)
    engine.fit(module, train, val)
    rows = engine.predict(module, val[0])
    if engine.is_main:
        torch.save(rows, out / f"{name}-predict.pt")
        report = {
            "strategy": engine._fit.strategy.name,
            "block_forwards": module.forward_calls,
            "metrics": engine.metrics,
            "skipped_steps": engine.skipped_steps,
        }
        (out / f"{name}.json").write_text(json.dumps(report))


class Pace(Callback):
    """Preemption: each rank's pid before the fit, rank 0's step after each step (slowed down, so a signal lands
    mid-run), and each rank's exit code (tests/procs.Run reads them)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.rank = run_dir, int(os.environ.get("RANK", "0"))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"pid-rank{self.rank}").write_text(str(os.getpid()))

    def on_step_end(self, engine, module, metrics):
        if self.rank == 0:
            tmp = self.run_dir / ".step.tmp"
            tmp.write_text(str(engine.step))
            os.replace(tmp, self.run_dir / "step")
        time.sleep(0.4)


def preempt(out: Path) -> None:
    """2 x 2 with resume="auto" in OUT/preempt: stopped by a signal, relaunched, it ends where "2x2" does."""
    run_dir = out / "preempt"
    pace = Pace(run_dir)
    engine = Engine(**COMMON, dp_shard_size=2, tp_size=2, micro_batch_size=8, run_dir=str(run_dir), resume="auto",
                    callbacks=[pace])  # fmt: skip
    code = 0
    try:
        engine.fit(TokenLM(tp=True, two_optimizers=True), token_data(), token_data(40, seed=1))
    except SystemExit as e:
        code = int(e.code or 0)
        raise
    finally:
        (run_dir / f"exit-rank{pace.rank}.json").write_text(json.dumps({"code": code, "step": engine.step}))


def main() -> None:
    plan, out = sys.argv[1], Path(sys.argv[2])
    step3 = str(out / "2x2" / "checkpoints" / "step-00000003")
    if plan == "four":
        run(out, "2x2", tp=True, dp_shard_size=2, tp_size=2, micro_batch_size=8)
        run(out, "2x2-resumed", tp=True, resume=step3, dp_shard_size=2, tp_size=2, micro_batch_size=8)
        run(out, "hsdp", tp=False, dp_replicate_size=2, dp_shard_size=2, micro_batch_size=12)
        run(out, "hsdp-ac", tp=False, dp_replicate_size=2, dp_shard_size=2, micro_batch_size=12,
            activation_checkpointing=True)  # fmt: skip
        run(out, "fsdp4-resumed", tp=False, resume=step3, dp_shard_size=4, micro_batch_size=12)
        run(out, "2x2-nan", tp=True, poison=True, dp_shard_size=2, tp_size=2, micro_batch_size=8)
    elif plan == "preempt":
        preempt(out)
    elif plan == "one":  # (one process, e.g. one GPU: meta-device build + activation checkpointing under FSDP)
        run(out, "fsdp1-ac", tp=False, strategy="fsdp", micro_batch_size=24, activation_checkpointing=True)
    elif plan == "two":
        run(out, "tp2", tp=True, tp_size=2, micro_batch_size=24)
        run(out, "tp2-resumed", tp=True, resume=step3, tp_size=2, micro_batch_size=24)
        run(out, "tp2-nan", tp=True, poison=True, tp_size=2, micro_batch_size=24)
    else:
        raise SystemExit(f"unknown plan {plan!r}")


if __name__ == "__main__":
    main()
