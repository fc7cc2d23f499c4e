"""Gradient helpers for the optimizer step: reset, per-gradient norms, total norm, packing.

They do what ``optimizer.zero_grad(set_to_none=True)`` and ``torch.nn.utils.get_total_norm``
do, minus per-call Python overhead that shows on small models (the engine's step is
measured against a hand-written loop in ``benchmarks/overhead.py``).
"""

from __future__ import annotations

import torch


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``. For an optimizer that keeps torch's own ``zero_grad``,
    the same loop without the per-call dynamo and profiler wrappers around it (5-10 µs a step)."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad or "zero_grad" in optimizer.__dict__:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's 2-norm (one fused op on CPU and CUDA)."""
    with torch.no_grad():
        if grads[0].device.type in ("cpu", "cuda"):
            return list(torch._foreach_norm(grads, 2.0))
        return [torch.linalg.vector_norm(g, 2.0) for g in grads]


def pack(scalars: list[torch.Tensor]) -> torch.Tensor:
    """Scalar tensors stacked into one, so that they are read in one go (one op)."""
    try:
        return torch.stack(scalars)
    except RuntimeError:  # on several devices (a model split over GPUs)
        return torch.stack([t.to(scalars[-1].device) for t in scalars])


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads, foreach=True)``: the same kernels and, for gradients of one
    device and dtype, the same bits, without its per-call Python grouping (about 15 µs a step on a
    small CPU model)."""
    if grads[0].device.type not in ("cpu", "cuda"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    with torch.no_grad():
        norms = torch._foreach_norm(grads, 2.0)
        try:
            return torch.linalg.vector_norm(torch.stack(norms), 2.0)
        except RuntimeError:  # gradients on several devices (a model split over GPUs)
            return torch.nn.utils.get_total_norm(grads, foreach=True)
