"""framework/evaluation.py and Engine.predict: one row per item, in data order, the same on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from framework import Engine, LoopModule

from .helpers import TinyClassifier, classification_data

N_ITEMS = 203


class ItemNet(LoopModule):
    """Outputs that identify their item: row i is (i, 2i) for input i, so order and duplicates show."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, inputs):
        return inputs.float().reshape(-1, 1) * self.scale

    def compute_loss(self, outputs, targets):
        return outputs.sum() * 0.0


class DictOut(ItemNet):
    def predict_step(self, batch):
        out = self(batch[0])
        return {"value": out, "is_even": batch[0] % 2 == 0}


def items() -> torch.Tensor:
    return torch.arange(N_ITEMS)


def expected() -> torch.Tensor:
    x = items().float().reshape(-1, 1)
    return torch.cat([x, 2 * x], dim=1)


def test_one_process_returns_every_item_once_in_data_order_in_eval_mode_without_grad():
    module = ItemNet()
    module.train()
    out = Engine(batch_size=16, progress=False).predict(module, items())  # a bare tensor of inputs
    assert torch.equal(out, expected())
    assert not out.requires_grad and module.training  # inference; the mode is restored
    out.add_(1)  # an ordinary tensor, not an inference-mode one


def test_dict_and_tuple_outputs_are_concatenated_leaf_by_leaf_and_datasets_loaders_work():
    out = Engine(batch_size=10, progress=False).predict(DictOut(), TensorDataset(items()))
    assert torch.equal(out["value"], expected()) and torch.equal(out["is_even"], items() % 2 == 0)
    loader = DataLoader(TensorDataset(items()), batch_size=7)
    assert torch.equal(Engine(progress=False).predict(ItemNet(), loader), expected())


def test_the_default_predict_step_is_the_forward_of_the_inputs_of_a_labelled_batch():
    x, y = classification_data(50)
    module = TinyClassifier()
    out = Engine(batch_size=16, progress=False).predict(module, (x, y))
    with torch.no_grad():
        assert torch.allclose(out, module(x), atol=1e-6)


def test_a_prediction_without_rows_is_an_error_naming_predict_step():
    class Scalar(ItemNet):
        def predict_step(self, batch):
            return self(batch[0]).sum()

    with pytest.raises(TypeError, match=r"Scalar.predict_step returned a 0-dim tensor.*one row per item"):
        Engine(batch_size=8, progress=False).predict(Scalar(), items())


def test_predict_during_a_fit_uses_the_fit_and_needs_no_max_epochs():
    x, y = classification_data(64)
    module = TinyClassifier()
    engine = Engine(max_steps=2, batch_size=32, progress=False)
    engine.fit(module, (x, y))
    assert engine.predict(module, x).shape == (64, 3)
