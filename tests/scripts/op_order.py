"""The real operations of each step, recorded on 2 DDP processes for tests/test_architecture.py.

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/op_order.py OUT_DIR

Writes OUT_DIR/events-{rank}.txt (one optimizer, accumulation, a short last window) and
OUT_DIR/phased-{rank}.txt (alternating phases), one event per line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests`

from framework import Engine
from tests.helpers import classification_data
from tests.test_architecture import Phased, Recorded


def main(out: Path) -> None:
    x, y = classification_data(100)
    module = Recorded()
    engine = Engine(max_epochs=1, batch_size=32, micro_batch_size=8, progress=False, doctor="off", seed=0)
    engine.fit(module, (x, y))
    (out / f"events-{engine.rank}.txt").write_text("\n".join(module.events))
    phased = Phased("two")
    Engine(max_epochs=1, batch_size=32, micro_batch_size=8, progress=False, doctor="off", seed=0).fit(phased, (x, y))
    (out / f"phased-{engine.rank}.txt").write_text("\n".join(phased.events))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
