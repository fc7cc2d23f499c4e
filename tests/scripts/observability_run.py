"""Count the FLOPs of an MLP per optimizer step, per process, at three layouts of 2 processes, and profile one fit
(tests/observability/test_ddp.py reads what it writes).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/observability_run.py OUT

Layouts: DDP with accumulation (a window of 48 items: 24 per process in 2 micro-batches of 12), FSDP (dp_shard 2,
24 items per process) and TP 2 (``up`` column-wise, ``down`` row-wise: each process runs every item through
half of each layer). Each rank writes ``OUT/flops-rank{R}.json`` ({layout: its FLOPs per step}); the DDP fit
also profiles steps 1..2, so each rank writes ``OUT/ddp/profile/rank{R}.trace.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework import Engine, LoopModule
from framework.observability.throughput import Throughput

SIZES = (16, 64, 16)  # in, hidden, out (classes)
BATCH = 48


class TwoLayers(LoopModule):
    def __init__(self, tp: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.up, self.down = nn.Linear(SIZES[0], SIZES[1]), nn.Linear(SIZES[1], SIZES[2])

    def forward(self, inputs):
        return self.down(torch.relu(self.up(inputs)))

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def tp_plan(self):
        return {"up": "colwise", "down": "rowwise"} if self.tp else None


def main() -> None:
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(4 * BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[2], (4 * BATCH,), generator=g))
    common = dict(batch_size=BATCH, max_steps=3, log_every_n_steps=1, seed=0, progress=False)
    layouts = {
        "ddp": dict(strategy="ddp", micro_batch_size=12, run_dir=str(out / "ddp"), profile_steps=(1, 3)),
        "fsdp": dict(dp_shard_size=2),
        "tp": dict(tp_size=2),
    }
    counted = {}
    for name, layout in layouts.items():
        torch.manual_seed(0)
        engine = Engine(**common, **layout)  # type: ignore[arg-type]
        engine.fit(TwoLayers(tp=name == "tp"), data)
        counted[name] = next(s for s in engine.events.subscribers if isinstance(s, Throughput)).flops_per_step
        counted[f"{name}/tflops_x_step_time"] = (
            engine.metrics["train/tflops"] * engine.metrics["train/step_time"] * 1e12
        )
    (out / f"flops-rank{engine.rank}.json").write_text(json.dumps(counted))


if __name__ == "__main__":
    main()
