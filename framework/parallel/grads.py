"""Gradient helpers for the optimizer step: reset, the non-finite check, norms, packing.

They do what ``optimizer.zero_grad(set_to_none=True)`` and ``torch.nn.utils.get_total_norm``
do, minus per-call Python overhead that shows on small models (the engine's step is
measured against a hand-written loop in ``benchmarks/overhead.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# torch leaves these untyped (strict mypy refuses a call to them): one flat buffer for a list of tensors
# of one dtype, and back (the bucketing DDP does for its all-reduce).
flatten_dense: Any = _flatten_dense_tensors
unflatten_dense: Any = _unflatten_dense_tensors


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``. For an optimizer that keeps torch's own ``zero_grad``,
    the same loop without the per-call dynamo and profiler wrappers around it (5-10 µs a step)."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad or "zero_grad" in optimizer.__dict__:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def values_of(grad: torch.Tensor) -> torch.Tensor:
    """A gradient's values as a dense tensor: itself, or for a sparse gradient (``nn.Embedding(sparse=True)``)
    its coalesced values (coalescing sums the duplicate indices a backward leaves), which most kernels
    (norms, isfinite, count_nonzero) have no sparse version for.

    Example:

        >>> values_of(torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, 4.0], (4,), check_invariants=True))
        tensor([3., 4.])
    """
    return grad.coalesce().values() if grad.layout == torch.sparse_coo else grad


class NonFiniteCheck:
    """Is any element of these tensors NaN or ±inf? One fused op, read as a one-element float flag.

    It is the check GradScaler runs before every fp16 step, with an unscale factor of exactly 1
    (``x * 1.0`` changes no bit): one op over all tensors, where a norm per gradient and a stack are
    two (in a real CPU step about 5 µs against 10 µs on a tiny MLP). The op only ever raises the flag,
    so one flag tensor per device serves every step until it reads 1.0; :meth:`clear` lowers it.

    Example:

        >>> check = NonFiniteCheck()
        >>> check([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor([1.])
        >>> check.clear()
        >>> check([torch.ones(3)])
        tensor([0.])
    """

    def __init__(self) -> None:
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (flag, unit scale)

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        """The flag (1.0 where anything is non-finite), or None where the fused op does not apply (sparse
        or complex tensors, tensors on several devices): the caller measures norms instead."""
        device = tensors[0].device
        pair = self._flags.get(device)
        if pair is None:
            with torch.inference_mode(False):
                pair = self._flags[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
        flag, unit = pair
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, unit)
        except (RuntimeError, NotImplementedError):  # no kernel for this layout/dtype, or several devices
            return None
        return flag

    def clear(self) -> None:
        """Lower the flags after a check found something (until then they stay 0.0 and need no reset)."""
        for flag, _ in self._flags.values():
            flag.zero_()


def pack(scalars: list[torch.Tensor]) -> torch.Tensor:
    """Scalar tensors stacked into one, so that they are read in one go (one op)."""
    try:
        return torch.stack(scalars)
    except RuntimeError:  # on several devices (a model split over GPUs)
        return torch.stack([t.to(scalars[-1].device) for t in scalars])


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads, foreach=True)``: the same kernels and, for gradients of one
    device and dtype, the same bits, without its per-call Python grouping (about 15 µs a step on a
    small CPU model). Unlike it, sparse gradients (``nn.Embedding(sparse=True)``) count too.

    Example:

        >>> grad_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    try:
        return _total_norm(grads)
    except NotImplementedError:
        return _total_norm([values_of(g) for g in grads])  # sparse gradients have no norm kernel


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if grads[0].device.type not in ("cpu", "cuda"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    with torch.no_grad():
        norms = torch._foreach_norm(grads, 2.0)
        try:
            return torch.linalg.vector_norm(torch.stack(norms), 2.0)
        except RuntimeError:  # gradients on several devices (a model split over GPUs)
            return torch.nn.utils.get_total_norm(grads, foreach=True)


def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of gradients that are DTensors on any meshes (FSDP, TP, both) or plain tensors
    (a parameter every rank holds whole, e.g. a LayerNorm under TP alone): each DTensor's local shard is
    summed over the mesh dims it is split on (``_StridedShard`` included: every placement but Replicate);
    a plain gradient counts once. torch's ``get_total_norm`` refuses such a mix. Called on every rank (the
    reductions are collectives) with the gradients of every parameter that has one.
    """
    from torch.distributed.tensor import DTensor

    buckets: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            dims = tuple(i for i, placement in enumerate(g.placements) if not placement.is_replicate())
            buckets.setdefault((g.device_mesh, dims), []).append(g._local_tensor)
        else:
            buckets.setdefault(None, []).append(g)
    total: torch.Tensor | None = None
    for key, tensors in buckets.items():  # (the same order on every rank: the collectives match)
        squares = torch.stack([n.float() for n in torch._foreach_norm(tensors, 2.0)]).pow(2).sum()
        if key is not None:
            mesh, dims = key
            for d in dims:
                torch.distributed.all_reduce(squares, group=mesh.get_group(d))
        total = squares if total is None else total + squares
    assert total is not None
    return total.sqrt()
