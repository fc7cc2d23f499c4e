"""Repository-wide pytest settings: the sandbox that the docstring examples run in.

``pytest`` collects every ``>>>`` example under ``framework/`` (``--doctest-modules`` in
pyproject.toml). Each example runs in a fresh temporary working directory, so one that writes
``runs/digits`` leaves nothing in the checkout, with torch seeded and single-threaded. The names
below are what a reader of the docs is assumed to have: ``torch``, ``nn``, ``F``, ``framework``, a
small ``Classifier`` (8 features, 3 classes) and two datasets for it, ``train_data`` (96 items) and
``val_data`` (32 items).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import framework


class Classifier(framework.LoopModule):
    """The docs' example model: one linear layer over 8 features, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (outputs.argmax(-1) == targets).float()}  # one value per item: exact means


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x[:, :3].argmax(-1))  # learnable: the class is the largest of 3 features


@pytest.fixture(autouse=True)
def _doctest_sandbox(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    monkeypatch.chdir(tmp_path)
    # An example may seed or set global state (seed_everything, an environment variable); the tests that
    # share this worker process must not see it.
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), dict(os.environ),
              torch.get_default_dtype(), torch.get_num_threads())  # fmt: skip
    torch.manual_seed(0)
    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(torch=torch, nn=nn, F=F, framework=framework, Classifier=Classifier,
                     train_data=_dataset(96, 0), val_data=_dataset(32, 1))  # fmt: skip
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    os.environ.clear()
    os.environ.update(states[3])
    torch.set_default_dtype(states[4])
    torch.set_num_threads(states[5])
