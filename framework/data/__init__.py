"""Data: global batches that are the same at any world size, prepared while the step computes, with
randomness that does not depend on who prepares them.

- ``framework.data.batching``: the epoch's global order (seeded by ``(seed, epoch)``), cut into
  *windows* (one per optimizer step) and shared among ranks; ``drop_last``.
- ``framework.data.sources``: the input kinds (tensors, Dataset, IterableDataset, DataLoader) and
  :func:`make_source`, which picks one.
- ``framework.data.prefetch``: how the next windows are made ready while the step computes, and
  :class:`WaitMeter`, the time the step still waits (``train/data_wait``).
- ``framework.data.workers``: worker processes for ``num_workers > 0``.
- ``framework.data.device``: the copy to the GPU on a side stream (pinned, ``non_blocking``).
- ``framework.data.rng``: one random stream per item, :func:`item_generator`.

**The rule: where the next step's input is made** (``Engine(prefetch=2)`` windows ahead;
``prefetch=0`` makes each window when the step asks for it):

1. In-memory tensors (a tuple, a TensorDataset, a dict of tensors): in the training thread, one
   index op per tensor (microseconds: a thread would cost more than it saves).
2. A Dataset or IterableDataset with ``num_workers=0`` (the default): a background thread, up to
   ``prefetch`` windows ahead in a bounded queue. It overlaps what waits or releases the GIL
   (file and network reads, PIL / torchvision decoding, numpy and torch ops); Python code that holds
   the GIL does not overlap: use ``num_workers``. Two exceptions stay in the training thread:
   items that are in-memory fast (a median under 50 µs on the first window, ``THREAD_MIN_ITEM_S``: the
   thread's hand-offs would cost more than it hides), and data that draws from a global RNG
   (``torch.rand``, ``np.random``, ``random``; seen on the first window, whose items are fetched in
   the training thread with every global RNG seeded per item and compared), because in a thread its
   draws would race with the training thread's dropout on the same generator
   (``torch.random.fork_rng`` is not thread-local). The end-of-fit line says so.
3. A Dataset with ``num_workers > 0``: worker processes (one task per micro-batch, in order).
4. A user DataLoader: iterated as given, in the training thread.

On a GPU, windows are also copied ahead: pinned, ``non_blocking``, on a side CUDA stream (by the
thread in case 2, else one window ahead from the training thread; not for a DataLoader without
workers). **Randomness**: every item fetched is keyed by ``(seed, epoch, index)``;
:func:`item_generator` gives its generator, and a dataset drawing from the global RNGs has them
seeded per item. So final parameters are the same for any ``num_workers`` and ``prefetch``.

Example:

    >>> from torch.utils.data import Dataset
    >>> from framework.data import item_generator
    >>> class Jitter(Dataset):
    ...     def __init__(self, x, y):
    ...         self.x, self.y = x, y
    ...     def __len__(self):
    ...         return len(self.x)
    ...     def __getitem__(self, i):
    ...         noise = torch.randn(self.x[i].shape, generator=item_generator())
    ...         return self.x[i] + 0.1 * noise, self.y[i]
    >>> def train(prefetch):
    ...     framework.seed_everything(0)
    ...     module = Classifier()
    ...     engine = framework.Engine(max_epochs=1, batch_size=32, prefetch=prefetch, progress=False)
    ...     engine.fit(module, Jitter(*train_data.tensors))
    ...     return module.net.weight
    >>> torch.equal(train(prefetch=0), train(prefetch=2))
    True
"""

from .batching import (
    Batching,
    Window,
    chunks,
    epoch_order,
    micro_batch_sizes,
    most_chunks,
    plan_windows,
    rank_share,
    resolve_batching,
    split_window,
    windows_per_epoch,
)
from .checks import one_item_batchnorm, warn_one_item_batches
from .collate import collate, default_collate
from .prefetch import WaitMeter
from .rng import item_generator, item_seed, mix_seed
from .sources import (
    DEFAULT_PREFETCH,
    LoaderSource,
    MapSource,
    Source,
    StreamSource,
    TensorSource,
    as_tensors,
    make_source,
    tensor_data,
)

__all__ = [
    "DEFAULT_PREFETCH",
    "Batching",
    "LoaderSource",
    "MapSource",
    "Source",
    "StreamSource",
    "TensorSource",
    "WaitMeter",
    "Window",
    "as_tensors",
    "chunks",
    "collate",
    "default_collate",
    "epoch_order",
    "item_generator",
    "item_seed",
    "make_source",
    "micro_batch_sizes",
    "mix_seed",
    "most_chunks",
    "one_item_batchnorm",
    "plan_windows",
    "rank_share",
    "resolve_batching",
    "split_window",
    "tensor_data",
    "warn_one_item_batches",
    "windows_per_epoch",
]
