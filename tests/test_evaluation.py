"""framework/evaluation.py: exact validation means and stateful metrics (torchmetrics), at any world size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import Callback, Engine, LoopModule
from framework.evaluation import check_metrics

torchmetrics = pytest.importorskip("torchmetrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

N_ITEMS = 203


class BinaryNet(LoopModule):
    """A binary classifier with torchmetrics' F1 and AUROC, fed the positive class's probability."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        with torch.no_grad():  # an informative start: the positive class's logit follows x[:, 0]
            self.net[0].weight[0] = torch.tensor([3.0, 0.0, 0.0, 0.0])
            self.net[2].weight[:, 0] = torch.tensor([-2.0, 2.0])

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def configure_metrics(self):
        return {"f1": torchmetrics.classification.BinaryF1Score(), "auroc": torchmetrics.classification.BinaryAUROC()}

    def update_metrics(self, metrics, outputs, targets):
        probs = outputs.softmax(-1)[:, 1]
        for metric in metrics.values():
            metric.update(probs, targets)


def binary_data(n: int = N_ITEMS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    y = ((x[:, 0] + 0.8 * torch.randn(n, generator=g)) > 0).long()  # noisy: F1 and AUROC well inside (0, 1)
    return x, y


def sklearn_reference(module: BinaryNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        probs = module(x).softmax(-1)[:, 1].numpy()
    return {
        "f1": float(sklearn_metrics.f1_score(y.numpy(), probs >= 0.5)),
        "auroc": float(sklearn_metrics.roc_auc_score(y.numpy(), probs)),
    }


def test_torchmetrics_over_the_whole_set_equal_scikit_learn_with_partial_batches():
    x, y = binary_data()
    module = BinaryNet()
    got = Engine(batch_size=32, progress=False).validate(module, (x, y))  # 203 = 6 x 32 + 11
    ref = sklearn_reference(module, x, y)
    assert 0.2 < ref["f1"] < 0.95 and 0.2 < ref["auroc"] < 0.95
    assert abs(got["f1"] - ref["f1"]) <= 1e-6 and abs(got["auroc"] - ref["auroc"]) <= 1e-6
    # A metric averaged over batches instead (what a per-batch compute would give) is measurably off.
    batch_f1 = []
    with torch.no_grad():
        for i in range(0, N_ITEMS, 32):
            p = module(x[i : i + 32]).softmax(-1)[:, 1].numpy()
            batch_f1.append(sklearn_metrics.f1_score(y[i : i + 32].numpy(), p >= 0.5))
    assert abs(sum(batch_f1) / len(batch_f1) - ref["f1"]) > 1e-6


def test_metrics_are_reset_for_every_validation_and_logged_as_val_names(tmp_path):
    x, y = binary_data()
    module = BinaryNet()
    engine = Engine(max_epochs=2, batch_size=32, progress=False, run_dir=str(tmp_path))
    engine.fit(module, (x[:150], y[:150]), (x[150:], y[150:]))
    ref = sklearn_reference(module, x[150:], y[150:])
    assert abs(engine.metrics["val/f1"] - ref["f1"]) <= 1e-6 and abs(engine.metrics["val/auroc"] - ref["auroc"]) <= 1e-6
    import json

    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val/f1" in line]
    assert len(epochs) == 2  # (a metric not reset between epochs would have its last value over both)


def test_validate_fires_on_validation_end_with_val_keys():
    seen = []

    class Seen(Callback):
        def on_validation_end(self, engine, module, metrics):
            seen.append(sorted(metrics))

    Engine(batch_size=32, progress=False, callbacks=[Seen()]).validate(BinaryNet(), binary_data())
    assert seen == [["val/auroc", "val/f1", "val/loss"]]


def test_metric_objects_are_checked_and_must_sync_under_several_processes():
    class Mean:
        def update(self, outputs, targets): ...
        def compute(self): ...
        def reset(self): ...

    assert check_metrics({"m": Mean()}, "Net.configure_metrics", world_size=1)
    with pytest.raises(TypeError, match=r"does not sync across processes.*torchmetrics"):
        check_metrics({"m": Mean()}, "Net.configure_metrics", world_size=2)
    Mean.syncs_across_processes = True  # an object that syncs itself says so
    assert check_metrics({"m": Mean()}, "Net.configure_metrics", world_size=2)
    with pytest.raises(TypeError, match=r"without \['update', 'compute', 'reset'\]"):
        check_metrics({"m": object()}, "Net.configure_metrics", world_size=1)
    with pytest.raises(TypeError, match="dict of name -> metric"):
        check_metrics([torchmetrics.classification.BinaryF1Score()], "Net.configure_metrics", world_size=1)
