"""Rank-0-only logging under several processes (run by tests/observability/test_metrics.py).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/issue7_ddp_logging.py OUT_DIR

Each rank sends its stderr to ``OUT_DIR/stderr-rank{R}.txt`` and its pid to
``OUT_DIR/pid-rank{R}.txt``, then trains 2 epochs x 7 steps with progress on,
``log_every_n_steps=2`` and TensorBoard into ``OUT_DIR/run``. After fit it
validates once more (the process group must still be alive) and rank 0 writes
the result to ``OUT_DIR/after_fit.json``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.helpers

import torch

from framework import Engine
from tests.helpers import TinyClassifier, classification_data

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
out.mkdir(parents=True, exist_ok=True)
(out / f"pid-rank{rank}.txt").write_text(str(os.getpid()))
# fd-level redirect, so everything this rank prints (Python or C++) lands in its own file.
err = open(out / f"stderr-rank{rank}.txt", "w")  # noqa: SIM115 (open for the whole run)
os.dup2(err.fileno(), 2)

x, y = classification_data(200)
torch.manual_seed(0)
module = TinyClassifier()
engine = Engine(
    max_epochs=2,
    batch_size=32,
    seed=0,
    log_every_n_steps=2,
    progress=True,
    log_with=["tensorboard"],
    run_dir=str(out / "run"),
)
engine.fit(module, (x, y), (x[:64], y[:64]))
after = engine.validate(module, (x[:64], y[:64]))
if rank == 0:
    (out / "after_fit.json").write_text(json.dumps({"validate": after, "val/loss": engine.metrics["val/loss"]}))
