"""Checks of the data against the module, before training: a 1-item micro-batch into BatchNorm."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .sources import Source


def one_item_batchnorm(module: nn.Module, source: Source, windows: int | None = None) -> str | None:
    """The warning for a module with BatchNorm layers in train mode whose data gives some rank a
    1-item micro-batch (BatchNorm in train mode then fails: "Expected more than 1 value per channel
    when training"), or None. Only where the sizes are known before training (map-style data, tensors,
    a stream with a length); ``windows`` limits the epoch to its first windows (debug limits).

    Example::

        message = one_item_batchnorm(module, source)   # e.g. 129 items, batch_size=64 -> a warning
    """
    from .batching import micro_batch_sizes

    layers = [name or type(module).__name__ for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
    if not layers or not module.training:
        return None
    n = _length(source)
    b = source.batching
    if n is None or b.batch_size is None or b.micro_batch_size is None:
        return None
    if 1 not in micro_batch_sizes(n, b, source.drop_last, windows):
        return None
    last = n % b.batch_size
    where = (
        f"micro_batch_size={b.micro_batch_size} gives 1-item micro-batches"
        if b.micro_batch_size == 1
        else f"the last global batch of each epoch has {last} item(s) ({n} items, batch_size={b.batch_size}, "
        f"{b.world_size} process(es)), which leaves a rank a 1-item micro-batch"
    )
    return (
        f"{type(module).__name__} has BatchNorm layer(s) in train mode ({', '.join(layers[:4])}), which fail on a "
        f"1-item micro-batch ('Expected more than 1 value per channel when training'), and {where}. Fix: "
        "Engine(drop_last=True) to leave out the partial last batch, or a batch_size / micro_batch_size "
        "that leaves at least 2 items per micro-batch"
    )


def warn_one_item_batches(module: nn.Module, source: Source, windows: int | None = None) -> None:
    """Warn (once per call) with :func:`one_item_batchnorm`'s message, if it has one.

    Example::

        warn_one_item_batches(module, source, windows=engine.limit_train_batches)
    """
    message = one_item_batchnorm(module, source, windows)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)


def _length(source: Source) -> int | None:
    from .sources import StreamSource

    n = getattr(source, "length", None)
    if isinstance(n, int):
        return n
    if isinstance(source, StreamSource) and not source.sharded:
        try:
            return len(source.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None
