"""Shared by the data pipeline tests and their scripts: datasets with random augmentation, drawn in
the ways users write it, a small model, and a fit helper.

Items are fast (microseconds) unless given ``sleep``; a test that needs the prefetch thread gives
them SLOW seconds each, as the engine makes in-memory-fast items in the training thread.

Augmentation kinds (``Augmented(kind=...)``):
  "global"      torch.randn + np.random + random, all from the global RNGs (the common way)
  "torch"       torch.randn from the global RNG only
  "generator"   torch.randn from framework.data.item_generator() (the recommended way)
  "per_worker"  a generator seeded per worker process: the result changes with num_workers
                (what the determinism tests must be able to tell apart)
  "rank1"       "torch" on rank 1, none elsewhere (the cross-rank warning)
  "none"        no augmentation
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from framework import Engine, LoopModule
from framework.data import item_generator

SLOW = 100e-6  # an item's sleep where a test needs the prefetch thread (over THREAD_MIN_ITEM_S)


def make_xy(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def augment(x: torch.Tensor, kind: str, index: int, rank: int = 0) -> torch.Tensor:
    if kind == "none" or (kind == "rank1" and rank != 1):
        return x
    if kind in ("torch", "rank1"):
        return x + 0.5 * torch.randn(x.shape)
    if kind == "global":
        return x * float(np.random.uniform(0.8, 1.2)) + 0.5 * torch.randn(x.shape) + 0.1 * random.random()
    if kind == "generator":
        return x + 0.5 * torch.randn(x.shape, generator=item_generator())
    if kind == "per_worker":
        info = get_worker_info()
        wid = -1 if info is None else info.id
        g = _PER_WORKER.setdefault(wid, torch.Generator().manual_seed(1000 + wid))
        return x + 0.5 * torch.randn(x.shape, generator=g)
    raise ValueError(kind)


_PER_WORKER: dict[int, torch.Generator] = {}


class Augmented(Dataset):
    """``(augment(x[i]), y[i])``; ``sleep`` seconds per item (I/O-like); ``fail_at``: raise at that index."""

    def __init__(self, kind: str, n: int = 240, sleep: float = 0.0, fail_at: int | None = None) -> None:
        self.x, self.y = make_xy(n)
        self.kind, self.sleep, self.fail_at = kind, sleep, fail_at
        self.rank = int(os.environ.get("RANK", "0"))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        if i == self.fail_at:
            raise ValueError(f"corrupt item {i}")
        return augment(self.x[i], self.kind, i, self.rank), self.y[i]


class AugmentedStream(IterableDataset):
    """The same items as a stream, in order; ``sleep`` seconds per item."""

    def __init__(self, kind: str, n: int = 240, sleep: float = 0.0) -> None:
        self.x, self.y = make_xy(n)
        self.kind, self.sleep = kind, sleep
        self.rank = int(os.environ.get("RANK", "0"))

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Any:
        for i in range(len(self.x)):
            if self.sleep:
                time.sleep(self.sleep)
            yield augment(self.x[i], self.kind, i, self.rank), self.y[i]


class Net(LoopModule):
    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(8, 32), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))

    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            inputs = inputs["inputs"]
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def fit(data: Any, dropout: float = 0.0, **kw: Any) -> tuple[Engine, Net]:
    """2 epochs, global batch 32, AdamW; the model seeded with 0."""
    kw.setdefault("max_epochs", 2)
    kw.setdefault("batch_size", 32)
    kw.setdefault("progress", False)
    torch.manual_seed(0)
    module = Net(dropout)
    engine = Engine(seed=0, **kw)
    engine.fit(module, data)
    return engine, module
