"""Collation: samples -> one batch, ``default_collate`` with fast paths for the common samples.

``default_collate`` is torch's own (``torch.utils.data.default_collate``), typed: what worker processes
use, and what :func:`collate` falls back to.

Example:

    >>> from framework.data import default_collate
    >>> xs, ys = default_collate([(torch.zeros(2), 0), (torch.ones(2), 1)])
    >>> xs.shape, ys
    (torch.Size([2, 2]), tensor([0, 1]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate as _torch_default_collate

# Typed: torch leaves default_collate untyped, and strict mypy refuses a call to it.
default_collate: Callable[[list[Any]], Any] = _torch_default_collate


def collate(samples: list[Any]) -> Any:
    """``default_collate``, with fast paths for the commonest samples — a tuple of plain tensors (one
    ``torch.stack`` per field, a list out) and a dict of plain tensors (one stack per key, a dict out) —
    without default_collate's per-call type dispatch. The result is the same as default_collate's.

    Example:

        >>> xs, ys = collate([(torch.zeros(2), torch.tensor(0)), (torch.ones(2), torch.tensor(1))])
        >>> xs.shape, ys
        (torch.Size([2, 2]), tensor([0, 1]))
        >>> collate([{"input_ids": torch.zeros(3)}, {"input_ids": torch.ones(3)}])["input_ids"].shape
        torch.Size([2, 3])
    """
    first = samples[0]
    try:
        if type(first) is tuple and all(_plain_tensor(t) for t in first):
            return [torch.stack(field) for field in zip(*samples, strict=True)]
        if type(first) is dict and all(_plain_tensor(t) for t in first.values()):
            return {k: torch.stack([s[k] for s in samples]) for k in first}
    except (ValueError, TypeError, RuntimeError, KeyError):
        pass  # samples of different lengths, keys or kinds: default_collate says what is wrong
    return default_collate(samples)


def _plain_tensor(t: Any) -> bool:
    return type(t) is torch.Tensor and t.layout == torch.strided and not t.is_nested
