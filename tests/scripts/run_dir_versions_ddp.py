"""Running twice into one run_dir, under 2 processes (run by tests/observability/test_run_info.py).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/run_dir_versions_ddp.py OUT_DIR

Two fits with ``run_dir=OUT_DIR/run``: the second goes to ``OUT_DIR/run-2`` on every rank. Rank 1 is made to
have chosen another dir before its fit (as if another run had started between the ranks' choices): fit's
agreement makes it use rank 0's. Each rank writes what its engine chose and used to ``OUT_DIR/rank{R}.json``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.helpers

from framework import Engine
from tests.helpers import TinyClassifier, classification_data

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
data = classification_data(128)
for attempt in ("first", "second"):
    engine = Engine(max_epochs=1, batch_size=32, progress=False, run_dir=str(out / "run"))
    chosen = engine.run_dir
    if attempt == "second" and rank == 1:
        engine._use_run_dir(str(out / "elsewhere"))  # a rank whose choice differs from rank 0's
    engine.fit(TinyClassifier(), data)
    (out / f"rank{rank}-{attempt}.json").write_text(json.dumps({"chosen": chosen, "used": engine.run_dir}))
