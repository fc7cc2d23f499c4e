"""Read-only looks into the user's objects for the loop doctor.

Find the tensors inside nested outputs, walk an autograd graph, cut a batch in two, tell whether
validation data is the training data, fingerprint a parameter. None of them changes what it looks at,
and none reads a device value except where its docstring says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_GRAPH_NODES = 200_000  # give up (no finding) on an autograd graph walk beyond this many nodes


def version_of(t: torch.Tensor | None) -> int:
    """The version counter of ``t`` (bumped by every in-place change), or -1 for None; metadata only."""
    return -1 if t is None else t._version


def is_finite(x: float) -> bool:
    """Neither nan nor ±inf."""
    return x == x and abs(x) != float("inf")


def fingerprint(p: torch.Tensor) -> torch.Tensor:
    """A float64 (sum, norm) of ``p`` for a parameter too large to copy; reductions upcast on the fly."""
    d = p.detach()
    return torch.stack([d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, dtype=torch.float64)])


def tensors_in(obj: Any, depth: int = 0, limit: int = 64) -> list[torch.Tensor]:
    """The tensors inside ``obj`` (tensor, list/tuple, dict, dataclass-like ModelOutput), up to ``limit``."""
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
    """Does the autograd graph behind ``loss`` contain one of ``outputs``? None when undecided (too big)."""
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
    """Dim 0 of the first tensor in ``batch`` that has one: the number of items, or None."""
    ts = [t for t in tensors_in(batch) if t.ndim > 0]
    return ts[0].shape[0] if ts else None


def split_halves(batch: Any) -> tuple[Any, Any] | None:
    """``batch`` cut in two along dim 0 of every tensor whose dim 0 is the batch size; None if it cannot be."""
    n = batch_len(batch)
    if n is None or n < 2:
        return None
    k = n // 2
    return slice_batch(batch, 0, k, n), slice_batch(batch, k, n, n)


def slice_batch(obj: Any, lo: int, hi: int, n: int) -> Any:
    """Items ``lo:hi`` of every tensor in ``obj`` whose dim 0 is ``n``; containers keep their type."""
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(slice_batch(x, lo, hi, n) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_batch(x, lo, hi, n) for x in obj)
    if isinstance(obj, Mapping):
        sliced = {k: slice_batch(v, lo, hi, n) for k, v in obj.items()}
        mapping_type: Any = type(obj)  # dict, OrderedDict, a ModelOutput-like dict subclass
        try:
            return mapping_type(sliced)
        except Exception:
            return sliced
    return obj


def same_data(train: Any, val: Any) -> bool:
    """Cheap identity tests: the same object, the same dataset behind two DataLoaders, the same Subset, or
    the same tensors (shared storage, or equal contents when the shapes match)."""
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
