"""Two processes, one launch (tests/scripts/loops_ddp.py): predict, stateful metrics, EMA and the
validation cadence give every rank the one-process result."""

from __future__ import annotations

import pytest
import torch

from framework import Engine

from .helpers import ROOT, launch
from .test_evaluation import BinaryNet, binary_data, sklearn_reference
from .test_predict import expected, items

pytestmark = pytest.mark.multiprocess


def test_predict_metrics_ema_and_cadence_on_two_processes(tmp_path):
    launch(ROOT / "tests" / "scripts" / "loops_ddp.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    x, y = binary_data()
    ref_metrics = sklearn_reference(BinaryNet(), x, y)
    for got in ranks:
        # predict: no filler row, no duplicate, nothing missing, in data order
        assert torch.equal(got["predict"], expected())
        assert torch.equal(got["predict_dict"]["value"], expected())
        assert torch.equal(got["predict_dict"]["is_even"], items() % 2 == 0)
        # F1 and AUROC over the whole 203-item set, as scikit-learn computes them on one process
        assert abs(got["metrics"]["f1"] - ref_metrics["f1"]) <= 1e-6
        assert abs(got["metrics"]["auroc"] - ref_metrics["auroc"]) <= 1e-6
        # an endless stream validates every 3 steps
        assert got["val_steps"] == [3, 6]
    # EMA: the same on both ranks, and the 1-process run's within float rounding
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ema"], ranks[1]["ema"], strict=True))
    torch.manual_seed(0)
    module = BinaryNet()
    engine = Engine(max_epochs=2, batch_size=32, ema_decay=0.9, progress=False, seed=0)
    engine.fit(module, (x, y))
    one = engine._fit.ema.shadow
    assert max(float((a - b).abs().max()) for a, b in zip(ranks[0]["ema"], one, strict=True)) <= 1e-5
