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

    Example:

        >>> from framework.data import Batching, make_source, one_item_batchnorm
        >>> x, y = train_data.tensors
        >>> source = make_source((x[:65], y[:65]), Batching(64, 64, 1, 1), rank=0, seed=0, shuffle=True,
        ...                      to_device=lambda b: b)
        >>> module = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        >>> print(one_item_batchnorm(module, source))
        Sequential has BatchNorm layer(s) in train mode (1), which fail on a 1-item micro-batch (...), and the
        last global batch of each epoch has 1 item(s) (65 items, batch_size=64, 1 process(es)), ... Fix:
        Engine(drop_last=True) to leave out the partial last batch, or a batch_size / micro_batch_size ...
        >>> print(one_item_batchnorm(module.eval(), source))
        None
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

    Example:

        >>> import warnings
        >>> from framework.data import Batching, make_source, warn_one_item_batches
        >>> x, y = train_data.tensors
        >>> source = make_source((x[:65], y[:65]), Batching(64, 64, 1, 1), rank=0, seed=0, shuffle=True,
        ...                      to_device=lambda b: b)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_one_item_batches(nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)), source)
        >>> str(caught[0].message)[:60]
        'Sequential has BatchNorm layer(s) in train mode (1), which f'
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
