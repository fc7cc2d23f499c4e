"""Check ``count_items``: it returns a non-negative integer (an int or an integer tensor).

Every step, at no cost for an int; a tensor's value is read on checked steps only (a host sync).
Whether the count is the *right* one is the halves probe's question (:mod:`framework.doctor.probe`).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from .context import Context


class CountItems:
    """``count_items``. A :class:`LoopError` for ``-3``, ``2.5`` or a float tensor; a warning for 0."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_count(self, module: nn.Module, n: Any) -> None:
        record = self.ctx.record
        record.ran.add("count_items")
        if type(n) is int and n > 0:
            return  # the common case, first and at no cost
        name = type(module).__name__
        if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.Tensor)):
            record.fail(
                "count_items",
                f"{name}.count_items returned {type(n).__name__} {n!r:.40}; return an int (or an integer "
                "tensor): the number of items compute_loss averages over",
            )
        if isinstance(n, torch.Tensor):
            if n.ndim != 0 or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
                record.fail(
                    "count_items",
                    f"{name}.count_items returned a {n.dtype} tensor of shape {list(n.shape)}; return an "
                    "integer scalar, e.g. (targets != -100).sum()",
                )
            if not self.ctx.checking:
                return
            n = int(n)  # a host sync: checked steps only
        if n < 0:
            record.fail(
                "count_items",
                f"{name}.count_items returned {n}; return the (non-negative) number of items in the batch",
            )
        if n == 0:
            record.warn(
                "count_items",
                f"{name}.count_items returned 0 for a batch, so it adds nothing to the gradient; if that is "
                "not intended, count the items compute_loss averages over (e.g. the non-padding tokens)",
                key="count_zero",
            )
