"""Sharded training runs for tests/parallel/test_fsdp.py (launched on 1, 2 and 3 CPU processes).

    accelerate launch --config_file launch/cpu_fsdp.yaml tests/scripts/fsdp_run.py OUT_DIR [options]

Trains the token model of tests/scripts/exact_common.py (global batch 48, micro 8, clipping on) and
writes, on rank 0, OUT_DIR/result.pt: the whole final parameters, the strategy, each rank's local
shard sizes, validate() and predict() results, and (with --nan) the skipped steps. Options:

  --strategy S     Engine(strategy=S) (default "auto": what the launch config asks for)
  --resume         resume="auto" from OUT_DIR/run
  --kill-at K      SIGKILL rank 0 right after step K (a checkpoint is written every 4 steps)
  --nan            plant a NaN item at one global position (nan_policy="skip"): every rank skips that step
  --bf16           mixed_precision="bf16" (FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 reduction)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from framework import Callback, Engine
from tests.scripts.exact_common import TokenModel, token_data

NAN_TOKEN = 49  # an item whose first token is this makes the model's output NaN (--nan)
STEPS, EVERY = 12, 4


class NanTokenModel(TokenModel):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = super().forward(inputs)
        poisoned = (inputs[:, :1] == NAN_TOKEN).unsqueeze(-1)  # [B, 1, 1]
        return torch.where(poisoned, float("nan"), out)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, engine, module, metrics):
        if engine.step == self.step and engine.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def data(nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = token_data(600, seed=1)
    x[:, 0] = torch.where(x[:, 0] == NAN_TOKEN, 1, x[:, 0])
    if nan:
        x[100, 0] = NAN_TOKEN  # in window 2 (items 96..143), on whichever rank holds it
    return x, y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--nan", action="store_true")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    model = NanTokenModel() if args.nan else TokenModel()
    engine = Engine(
        max_steps=STEPS,
        batch_size=48,
        micro_batch_size=8,
        clip_grad_norm=0.3,
        seed=0,
        progress=False,
        doctor="off",
        strategy=args.strategy,
        run_dir=str(args.out / "run"),
        checkpoint_every_n_steps=EVERY,
        resume="auto" if args.resume else None,
        nan_policy="skip" if args.nan else "raise",
        mixed_precision="bf16" if args.bf16 else "no",
        callbacks=[KillAt(args.kill_at)] if args.kill_at else [],
    )
    val_x, val_y = token_data(61, seed=2)
    engine.fit(model, data(args.nan), (val_x, val_y))
    shards = {n: (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) for n, p in model.named_parameters()}
    gathered = [None] * engine.world_size
    if engine.world_size > 1:
        torch.distributed.all_gather_object(gathered, shards)
    else:
        gathered = [shards]
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    validated = engine.validate(model, (val_x, val_y))
    predicted = engine.predict(model, val_x)
    if engine.rank == 0:
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in full.items()},
                "strategy": engine._fit.strategy.name,
                "world_size": engine.world_size,
                "shards": gathered,
                "validate": validated,
                "predict": predicted.clone(),
                "skipped": engine.skipped_steps,
                "step": engine.step,
                "fit_val": {k: v for k, v in engine.metrics.items() if k.startswith("val/")},
            },
            args.out / "result.pt",
        )


if __name__ == "__main__":
    main()
