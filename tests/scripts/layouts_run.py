"""Train the token model at several layouts in one launch (tests/parallel/test_layouts.py reads what it writes).

    accelerate launch --config_file launch/cpu_2d.yaml tests/scripts/layouts_run.py four OUT
    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/layouts_run.py two OUT

``four`` (4 processes): 2 x 2 (dp_shard x tp) with micro-batches of 8 (3 per window), its resume from its
step-3 checkpoint on the same layout, HSDP 2 x 2 (micro 12), the same with activation checkpointing, FSDP 4
resuming the 2 x 2 checkpoint.
``two`` (2 processes, after ``four``): TP 2 (micro 24, 2 per window), and TP 2 resuming the 2 x 2 checkpoint.
Every run: two optimizers, an EMA, clipping, validation each epoch, the default doctor; the initial weights
are saved at fit start (``OUT/<name>-init``), the final state by the run (``OUT/<name>/checkpoints``), and
predictions of the validation inputs at the end (``OUT/<name>-predict.pt``, rank 0).
"""

from __future__ import annotations

import json
import sys
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


def run(out: Path, name: str, *, tp: bool, resume: str | None = None, **layout) -> None:
    train, val = token_data(), token_data(40, seed=1)
    module = TokenLM(tp=tp, two_optimizers=True)
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
        }
        (out / f"{name}.json").write_text(json.dumps(report))


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
    elif plan == "two":
        run(out, "tp2", tp=True, tp_size=2, micro_batch_size=24)
        run(out, "tp2-resumed", tp=True, resume=step3, tp_size=2, micro_batch_size=24)
    else:
        raise SystemExit(f"unknown plan {plan!r}")


if __name__ == "__main__":
    main()
