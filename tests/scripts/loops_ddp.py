"""Predict, stateful metrics, EMA and validation cadence on 2 processes (one launch), for
tests/test_predict.py, tests/test_evaluation.py, tests/test_ema.py and tests/test_cadence.py.

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/loops_ddp.py OUT_DIR

Writes OUT_DIR/rank{R}.pt with, per rank: predict's rows on the 203-item set (tensor and dict outputs),
validate's stateful F1/AUROC, the EMA-trained run's final parameters and EMA, and the steps at which an
endless stream validated.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests`

import torch

from framework import Callback, Engine
from tests.test_cadence import Endless, StepTagged
from tests.test_evaluation import BinaryNet, binary_data
from tests.test_predict import DictOut, ItemNet, items


class ValSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, engine, module, metrics):
        self.steps.append(engine.step)


def main(out: Path) -> None:
    result: dict[str, object] = {}
    # predict: 203 items over 2 ranks (the last window is partial: a filler on some rank)
    x = items()
    engine = Engine(batch_size=16, progress=False)
    result["predict"] = engine.predict(ItemNet(), x).clone()
    result["predict_dict"] = {k: v.clone() for k, v in engine.predict(DictOut(), x).items()}
    # stateful metrics: exact over the set at any world size
    bx, by = binary_data()
    result["metrics"] = Engine(batch_size=32, progress=False).validate(BinaryNet(), (bx, by))
    # EMA under DDP: every rank keeps the same average
    torch.manual_seed(0)
    module = BinaryNet()
    ema_engine = Engine(max_epochs=2, batch_size=32, ema_decay=0.9, progress=False, seed=0)
    ema_engine.fit(module, (bx, by))
    fit = ema_engine._fit
    assert fit is not None and fit.ema is not None
    result["ema"] = [t.detach().clone() for t in fit.ema.shadow]
    result["params"] = [p.detach().clone() for p in module.parameters()]
    # validation every 3 steps on an endless stream
    val_steps = ValSteps()
    Engine(max_steps=7, batch_size=8, val_every_n_steps=3, progress=False, callbacks=[val_steps]).fit(
        StepTagged(), Endless(), (bx[:16], by[:16])
    )
    result["val_steps"] = val_steps.steps
    torch.save(result, out / f"rank{engine.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
