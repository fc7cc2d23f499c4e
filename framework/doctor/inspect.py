"""Read-only looks into the user's objects for the loop doctor.

Find the tensors inside nested outputs, walk an autograd graph, read the autograd clock, cut a batch
in two, tell whether validation data is the training data, fingerprint a parameter, see through a
DTensor to this rank's shard. None of them changes what it looks at, and none reads a device value
except where its docstring says so.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

_GRAPH_NODES = 200_000  # give up (no finding) on an autograd graph walk beyond this many nodes


def version_of(t: torch.Tensor | None) -> int:
    """The version counter of ``t`` (bumped by every in-place change), or -1 for None; metadata only.

    Example:

        >>> from framework.doctor.inspect import version_of
        >>> g = torch.zeros(3)
        >>> v = version_of(g)
        >>> _ = g.add_(1)
        >>> version_of(g) - v, version_of(None)
        (1, -1)
    """
    return -1 if t is None else t._version


def is_finite(x: float) -> bool:
    """Neither nan nor ±inf.

    Example:

        >>> from framework.doctor.inspect import is_finite
        >>> is_finite(1.0), is_finite(float("nan")), is_finite(float("-inf"))
        (True, False, False)
    """
    return x == x and abs(x) != float("inf")


def fingerprint(p: torch.Tensor) -> torch.Tensor:
    """A float64 (sum, norm) of ``p`` for a parameter too large to copy; reductions upcast on the fly.

    Example:

        >>> from framework.doctor.inspect import fingerprint
        >>> fingerprint(torch.ones(4))   # (sum, norm)
        tensor([4., 2.], dtype=torch.float64)
    """
    d = p.detach()
    return torch.stack([d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, dtype=torch.float64)])


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_CHUNK = 1 << 24  # elements summed at a time: bounds the int64 temporary of a large tensor


def bits_sum(t: torch.Tensor) -> torch.Tensor:
    """The int64 sum of ``t``'s bit patterns: an exact fingerprint (integer addition is associative, so
    no reduction order or thread count changes it; equal tensors give equal sums, bit for bit).

    Example:

        >>> from framework.doctor.inspect import bits_sum
        >>> bits_sum(torch.ones(3)) == 3 * 0x3F800000   # 1.0 in float32 is 0x3F800000
        tensor(True)
    """
    d = t.detach()
    if d.is_complex():
        d = torch.view_as_real(d)
    d = d.reshape(-1)
    if d.dtype == torch.bool:
        d = d.view(torch.uint8)
    elif d.element_size() in _INT_OF_SIZE and (d.is_floating_point() or d.dtype != _INT_OF_SIZE[d.element_size()]):
        d = d.view(_INT_OF_SIZE[d.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=d.device)
    for lo in range(0, d.numel(), _BITS_CHUNK):
        total += d[lo : lo + _BITS_CHUNK].sum(dtype=torch.int64)
    return total


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), or ``t`` itself.

    Cheap: without ``torch.distributed.tensor`` imported there is no DTensor to see through.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(t, dtensor.DTensor):
        return t.to_local()
    return t


def is_dtensor(t: torch.Tensor) -> bool:
    """Is ``t`` a DTensor (a parameter sharded by FSDP2's ``fully_shard``)?"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


_CLOCK_LEAF: list[torch.Tensor] = []


def autograd_clock() -> int | None:
    """The autograd clock now: the sequence number the next graph node made on this thread will exceed.

    Autograd numbers every node it creates from one per-thread counter (``Node._sequence_nr``), so a
    loss whose ``grad_fn`` is numbered below a reading taken before this step's forward was built before
    it: a stale loss. Reading the clock makes one throwaway view node (no device work). None where the
    private API is missing (the caller then falls back to walking the graph).

    Example:

        >>> from framework.doctor.inspect import autograd_clock, sequence_nr
        >>> mark = autograd_clock()
        >>> loss = nn.Linear(8, 1)(torch.randn(2, 8)).sum()
        >>> sequence_nr(loss) > mark   # made after the mark
        True
    """
    if not _CLOCK_LEAF:
        _CLOCK_LEAF.append(torch.zeros((), requires_grad=True))
    with torch.enable_grad():
        node = _CLOCK_LEAF[0].view(()).grad_fn
    try:
        return int(node._sequence_nr())  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None


def sequence_nr(t: torch.Tensor) -> int | None:
    """The autograd sequence number of ``t.grad_fn`` (see :func:`autograd_clock`), or None."""
    try:
        return int(t.grad_fn._sequence_nr())  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None


def tensors_in(obj: Any, depth: int = 0, limit: int = 64) -> list[torch.Tensor]:
    """The tensors inside ``obj`` (tensor, list/tuple, dict, dataclass-like ModelOutput), up to ``limit``.

    Example:

        >>> from framework.doctor.inspect import tensors_in
        >>> logits, h1, h2 = torch.zeros(2, 3), torch.zeros(2), torch.ones(2)
        >>> [t.shape for t in tensors_in({"logits": logits, "aux": [h1, h2], "name": "x"})]
        [torch.Size([2, 3]), torch.Size([2]), torch.Size([2])]
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 4:
        return []
    out: list[torch.Tensor] = []
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dataclass_fields__"):
        items = (getattr(obj, f, None) for f in obj.__dataclass_fields__)
    else:
        return []
    for x in items:
        out.extend(tensors_in(x, depth + 1, limit))
        if len(out) >= limit:
            break
    return out[:limit]


def reaches(loss: torch.Tensor, outputs: list[torch.Tensor]) -> bool | None:
    """Does the autograd graph behind ``loss`` contain one of ``outputs``? None when undecided (too big).

    Example:

        >>> from framework.doctor.inspect import reaches
        >>> net, y = nn.Linear(8, 3), torch.tensor([0, 1, 2, 0])
        >>> out = net(torch.randn(4, 8))
        >>> loss = F.cross_entropy(out, y)
        >>> next_out = net(torch.randn(4, 8))   # the next step's forward
        >>> reaches(loss, [out]), reaches(loss, [next_out])   # False: a loss kept from an earlier step
        (True, False)
    """
    fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
    leaves = {id(t) for t in outputs if t.grad_fn is None}
    start = loss.grad_fn
    if start is None:
        return id(loss) in leaves
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if node in fns:
            return True
        if leaves and id(getattr(node, "variable", None)) in leaves:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                if len(seen) >= _GRAPH_NODES:
                    return None
                seen.add(nxt)
                stack.append(nxt)
    return False


def batch_len(batch: Any) -> int | None:
    """Dim 0 of the first tensor in ``batch`` that has one: the number of items, or None.

    Example:

        >>> from framework.doctor.inspect import batch_len
        >>> batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "labels": torch.zeros(4, 16)}
        >>> batch_len(batch), batch_len([1, 2])
        (4, None)
    """
    ts = [t for t in tensors_in(batch) if t.ndim > 0]
    return ts[0].shape[0] if ts else None


def split_halves(batch: Any, order: torch.Tensor | None = None) -> tuple[Any, Any] | None:
    """``batch`` cut in two along dim 0 of every tensor whose dim 0 is the batch size; None if it cannot be.

    ``order`` (a permutation of the items) picks which items go to which half: the first half of
    ``order``, then the rest; by default the first and the second half of the batch.

    Example:

        >>> from framework.doctor.inspect import split_halves
        >>> x, y = torch.arange(6).reshape(3, 2), torch.arange(3)
        >>> first, second = split_halves((x, y))
        >>> first[1], second[1]
        (tensor([0]), tensor([1, 2]))
    """
    n = batch_len(batch)
    if n is None or n < 2:
        return None
    k = n // 2
    if order is None:
        return slice_batch(batch, slice(0, k), n), slice_batch(batch, slice(k, n), n)
    return slice_batch(batch, order[:k], n), slice_batch(batch, order[k:], n)


def slice_batch(obj: Any, items: slice | torch.Tensor, n: int) -> Any:
    """The ``items`` (a slice or an index tensor) of every tensor in ``obj`` whose dim 0 is ``n``;
    containers keep their type.

    Example:

        >>> from framework.doctor.inspect import slice_batch
        >>> x, y = torch.arange(8).reshape(4, 2), torch.arange(4)
        >>> slice_batch((x, y), torch.tensor([3, 0]), n=4)
        (tensor([[6, 7],
                [0, 1]]), tensor([3, 0]))
    """
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 or obj.shape[0] != n:
            return obj
        if isinstance(items, slice):
            return obj[items]
        return obj.index_select(0, items.to(obj.device))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(slice_batch(x, items, n) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_batch(x, items, n) for x in obj)
    if isinstance(obj, Mapping):
        sliced = {k: slice_batch(v, items, n) for k, v in obj.items()}
        mapping_type: Any = type(obj)  # dict, OrderedDict, a ModelOutput-like dict subclass
        try:
            return mapping_type(sliced)
        except Exception:
            return sliced
    return obj


def same_data(train: Any, val: Any) -> bool:
    """Cheap identity tests: the same object, the same dataset behind two DataLoaders, the same Subset, or
    the same tensors (shared storage, or equal contents when the shapes match).

    Example:

        >>> from torch.utils.data import TensorDataset
        >>> from framework.doctor.inspect import same_data
        >>> copy = TensorDataset(*[t.clone() for t in train_data.tensors])
        >>> same_data(train_data, copy), same_data(train_data, val_data)
        (True, False)
    """
    from torch.utils.data import DataLoader, Subset

    from ..data import as_tensors

    if train is None or val is None:
        return False
    if train is val:
        return True
    a = train.dataset if isinstance(train, DataLoader) else train
    b = val.dataset if isinstance(val, DataLoader) else val
    if a is b:
        return True
    if isinstance(a, Subset) and isinstance(b, Subset):
        return a.dataset is b.dataset and list(a.indices) == list(b.indices)
    try:
        ta, tb = as_tensors(a), as_tensors(b)
    except Exception:
        return False
    if not ta or not tb or len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            return False
        same_storage = x.data_ptr() == y.data_ptr() and x.stride() == y.stride()
        if not same_storage and not torch.equal(x, y):
            return False
    return True
