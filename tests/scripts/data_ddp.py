"""Run under 2 processes by tests/data/test_distributed.py (one launch covers every 2-process data check).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/data_ddp.py OUT_DIR

For each case of CASES (tests/scripts/data_common.py datasets, no dropout: per-rank dropout streams
cannot match one process), rank 0 writes OUT_DIR/<case>.pt with the final parameters and the step count.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

import torch

from tests.scripts.data_common import SLOW, Augmented, AugmentedStream, fit, flat

# name -> (data factory, Engine keyword arguments)
CASES = {
    "global_aug_training_thread": (lambda: Augmented("global"), {}),
    "generator_aug_prefetch_thread": (lambda: Augmented("generator", sleep=SLOW), {}),
    "global_aug_2_workers": (lambda: Augmented("global"), {"num_workers": 2}),
    "torch_aug_stream": (lambda: AugmentedStream("torch"), {}),
    "generator_aug_stream_thread": (lambda: AugmentedStream("generator", sleep=SLOW), {}),
    "drop_last": (lambda: Augmented("generator", n=250), {"drop_last": True}),
    "rank1_only": (lambda: Augmented("rank1"), {}),
}


def main() -> None:
    out = Path(sys.argv[1])
    for name, (data, kw) in CASES.items():
        engine, module = fit(data(), **kw)
        if engine._rt.is_main:
            torch.save({"params": flat(module), "step": engine.step}, out / f"{name}.pt")


if __name__ == "__main__":
    main()
