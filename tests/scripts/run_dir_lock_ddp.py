"""A run dir in use, under 2 processes (run by tests/observability/test_run_info.py).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/run_dir_lock_ddp.py OUT_DIR

Rank 0 holds ``OUT_DIR/busy/.lock`` as a running fit would; then every rank tries a fit into
``OUT_DIR/busy`` and writes the error it got to ``OUT_DIR/busy-rank{R}.txt``. Only rank 0
checks the lock, yet every rank must raise: a rank left in a collective would hang the launch.
"""

import fcntl
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.helpers

from framework import Engine
from framework.observability.run_info import RunDirInUse
from tests.helpers import TinyClassifier, classification_data

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
busy = out / "busy"
if rank == 0:
    busy.mkdir(parents=True)
    holder = os.open(busy / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"the fit of pid 4242 on host node7")
try:
    Engine(max_epochs=1, batch_size=32, progress=False, run_dir=str(busy)).fit(
        TinyClassifier(), classification_data(64)
    )
    outcome = "fit ran"
except RunDirInUse as e:
    outcome = str(e)
(out / f"busy-rank{rank}.txt").write_text(outcome)
