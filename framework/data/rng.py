"""Data-side randomness: one random stream per (seed, epoch, item), whoever fetches the item.

A random augmentation that draws from a per-worker RNG changes the result with
``num_workers``, and one that draws from torch's global RNG in a background
thread races with the training thread's dropout on the same generator. So every
item the engine fetches gets its own seed, ``mix_seed(seed, epoch, index)``
(``index`` is the dataset index of a map-style item, the position in the epoch
of a stream's item), and the result is the same in the training thread, a
prefetch thread or any worker process.

Two ways to draw from it:

- **Ask for the item's generator** (recommended; costs nothing unless called)::

      from framework.data import item_generator

      class Augmented(Dataset):
          def __getitem__(self, i):
              g = item_generator()                      # this item's torch.Generator
              x = self.x[i] + 0.1 * torch.randn(self.x[i].shape, generator=g)
              return x, self.y[i]

  ``item_seed()`` gives the same seed as an int, for numpy (``np.random.default_rng(item_seed())``)
  or ``random.Random(item_seed())``. Outside an engine fetch (a dataset indexed by hand, a plain
  DataLoader) both fall back to torch's global RNG, so the dataset works as an ordinary one.

- **Or keep drawing from the global RNGs** (``torch.rand``, ``np.random.*``, ``random.*``): the engine
  notices it on the first window it fetches (:class:`ItemFetcher` compares the generators' states
  around each item) and from then on seeds the RNGs the dataset uses from the item's seed before each
  item, restoring the training RNGs afterwards. That costs a few microseconds per item, and in the
  training process it rules out the prefetch thread (see ``framework.data.sources``), so such a
  dataset is fetched in the training thread, or in worker processes with ``num_workers > 0``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

# The global RNGs a dataset may draw from, as bits of ItemFetcher.uses.
TORCH, NUMPY, PYTHON = 1, 2, 4
ALL = TORCH | NUMPY | PYTHON
RNG_NAMES = {TORCH: "torch", NUMPY: "numpy", PYTHON: "random"}

_MASK = (1 << 64) - 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python's ``random`` with ``seed``.

    Call it before building the model, so that two runs (and every DDP rank) start from the same
    weights; ``Engine(seed=...)`` seeds again at fit start (per rank, for dropout and augmentation),
    after the weights exist.

    Example:

        >>> framework.seed_everything(0)
        >>> first = Classifier()
        >>> framework.seed_everything(0)
        >>> torch.equal(Classifier().net.weight, first.net.weight)
        True
        >>> framework.seed_everything(-1)
        Traceback (most recent call last):
        ...
        ValueError: seed_everything(seed=-1); use a non-negative int, e.g. seed_everything(0)
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed_everything(seed={seed!r}); use a non-negative int, e.g. seed_everything(0)")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def item_seed(index: int | None = None) -> int:
    """This item's seed as an int (63 bits), for other generators: ``np.random.default_rng(item_seed())``,
    ``random.Random(item_seed())``. Same rules as :func:`item_generator`: inside a batched
    ``__getitems__`` pass the item's ``index``; outside an engine fetch it is drawn from torch's global
    RNG (like any dataset's randomness).

    Example:

        >>> import numpy as np
        >>> from torch.utils.data import Dataset
        >>> from framework.data import Batching, item_seed, make_source, mix_seed
        >>> class Scaled(Dataset):
        ...     def __len__(self):
        ...         return 4
        ...     def __getitem__(self, i):
        ...         rng = np.random.default_rng(item_seed())
        ...         return torch.tensor([float(i), rng.uniform(0.9, 1.1)]), torch.tensor(item_seed())
        >>> source = make_source(Scaled(), Batching(4, 4, 1, 1), rank=0, seed=0, shuffle=False, to_device=lambda b: b)
        >>> values, seeds = next(source.windows(epoch=0)).micro_batches[0]
        >>> source.close()
        >>> seeds[2].item() == mix_seed(0, 0, 2)      # seed 0, epoch 0, item 2
        True
    """
    ctx = _ctx
    if ctx.seed is None:
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return mix_seed(ctx.seed, ctx.epoch, _current_index(index, "item_seed"))


def mix_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index`` in ``epoch`` of a run seeded ``seed``: a 63-bit splitmix64 mix (under
    a microsecond, well spread for neighbouring indices). What :func:`item_seed` returns during a fetch.

    Example:

        >>> mix_seed(0, 0, 1) != mix_seed(0, 0, 2) != mix_seed(0, 1, 1)
        True
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0xBF58476D1CE4E5B9 + 1) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) >> 1


def item_generator(index: int | None = None) -> torch.Generator:
    """This item's own ``torch.Generator``, seeded from ``(seed, epoch, index)`` (CPU).

    Call it inside ``__getitem__`` (or a stream's iteration) when the engine fetches: the draws are
    then the same whatever fetches the item (training thread, prefetch thread, any worker process),
    so results do not change with ``num_workers`` or ``prefetch``, and a resumed run redraws them
    exactly. Calls for the same item return the same generator (its draws continue). Inside a
    batched ``__getitems__``, pass each item's ``index``. Outside an engine fetch it returns torch's
    global generator, so the dataset still works when indexed by hand. An item's draws do not depend on the
    window it lands in (below: the batch size).

    Example:

        >>> from torch.utils.data import Dataset
        >>> from framework.data import Batching, item_generator, make_source
        >>> class Noisy(Dataset):
        ...     def __len__(self):
        ...         return 4
        ...     def __getitem__(self, i):
        ...         return torch.randn(2, generator=item_generator())
        >>> def items(batch_size):
        ...     source = make_source(Noisy(), Batching(batch_size, batch_size, 1, 1), rank=0, seed=0,
        ...                          shuffle=False, to_device=lambda b: b)
        ...     try:
        ...         return torch.cat([w.micro_batches[0] for w in source.windows(epoch=0)])
        ...     finally:
        ...         source.close()
        >>> torch.equal(items(batch_size=4), items(batch_size=2))
        True
        >>> Noisy()[0].shape                          # indexed by hand: torch's global generator
        torch.Size([2])
    """
    ctx = _ctx
    if ctx.seed is None:
        return torch.default_generator
    i = _current_index(index, "item_generator")
    cache = ctx.generators
    g = cache.get(i)
    if g is None:
        g = cache[i] = torch.Generator().manual_seed(mix_seed(ctx.seed, ctx.epoch, i))
    return g


class _Context(threading.local):
    """What the current thread is fetching (thread-local: a prefetch thread and the training
    thread each have their own)."""

    seed: int | None = None  # None: no engine fetch in progress
    epoch: int = 0
    index: int | None = None  # the item being fetched; None inside a batched __getitems__
    generators: dict[int, torch.Generator]
    cancel: threading.Event | None = None  # set by the thread that owns this fetch: stop between items

    def __init__(self) -> None:
        self.generators = {}


_ctx = _Context()


def _current_index(index: int | None, name: str) -> int:
    if index is not None:
        return int(index)
    if _ctx.index is None:
        raise RuntimeError(f"{name}() inside a batched __getitems__ needs the item's index: {name}(i) for each item i")
    return _ctx.index


class Cancelled(Exception):
    """Raised between items when the thread fetching them was asked to stop (the source closed); the
    prefetch thread catches it and ends quietly."""


class ItemFetcher:
    """Fetches items with their per-item seeds in place, in whatever thread or process it runs.

    ``uses`` is the set of global RNGs (bits ``TORCH | NUMPY | PYTHON``) the dataset draws from,
    None while the fetcher still *probes*: until :meth:`decide` (or ``probe_items`` items), it seeds
    every global RNG before each item and compares the states after, so the probed items come out
    as they would in any mode. From then on an item is seeded only for the RNGs the dataset uses
    (none: only ``item_generator`` is set up, a few attribute writes). ``restore`` keeps the
    caller's own RNG streams (the training thread's dropout) as they were around each call; worker
    processes, whose RNGs serve nothing else, skip it.

    Example:

        >>> fetcher = ItemFetcher(seed=0)
        >>> fetcher.items(epoch=0, ids=[3, 1, 4], get=lambda i: 10 * i)
        [30, 10, 40]
        >>> fetcher.decide()                          # 0: the items drew from no global RNG
        0
    """

    def __init__(self, seed: int, restore: bool = True, probe_items: int | None = None) -> None:
        self.seed = seed
        self.restore = restore
        self.uses: int | None = None
        self._found = 0
        self._probe_left = probe_items
        # Seconds per item inside the dataset's own code during the probe (the thread rule in
        # framework.data uses their median, which a busy machine's descheduling barely moves).
        self.probe_item_seconds: list[float] = []

    def decide(self) -> int:
        """End the probe: from now on seed only the global RNGs it saw used. Returns them."""
        if self.uses is None:
            self.uses = self._found
        return self.uses

    def items(self, epoch: int, ids: list[int], get: Callable[[int], Any]) -> list[Any]:
        """``[get(i) for i in ids]``, each item seeded as its ``(seed, epoch, i)`` says."""
        return self._run(epoch, ids, get, stream=False)

    def batch(self, epoch: int, ids: list[int], get_many: Callable[[list[int]], Any]) -> Any:
        """``get_many(ids)`` (a dataset's ``__getitems__``): ``item_generator(i)`` works inside; the global
        RNGs, if used, are seeded once for the batch (from its first item)."""
        out: list[Any] = self._run(epoch, ids[:1], lambda _: get_many(ids), stream=False, batched=len(ids))
        return out[0]

    def stream(self, epoch: int, it: Iterator[Any], position: int, n: int) -> list[Any]:
        """Up to ``n`` items from a stream (fewer where it ends), the first at ``position`` in the epoch."""
        return self._run(epoch, range(position, position + n), lambda _: next(it), stream=True)

    def _run(
        self, epoch: int, keys: Iterable[int], call: Callable[[int], Any], stream: bool, batched: int = 0
    ) -> list[Any]:
        """``call(key)`` per key, seeded and probed as the fetcher's state says; ``batched``: the one call
        fetches that many items (a ``__getitems__``)."""
        ctx = _ctx
        ctx.seed, ctx.epoch = self.seed, epoch
        probing = self.uses is None
        seeded = ALL if probing else (self.uses or 0)
        saved = _states(seeded) if (seeded and self.restore) else None
        out: list[Any] = []
        # (read once: thread-local lookups per item add up over a window's items on a tiny model)
        cancel, generators = ctx.cancel, ctx.generators
        try:
            for key in keys:
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                ctx.index = None if batched else key
                if generators:
                    generators.clear()
                if seeded:
                    _seed(seeded, mix_seed(self.seed, epoch, key))
                    if probing:
                        before = _states(ALL)
                try:
                    if probing:
                        t = time.perf_counter()
                        out.append(call(key))
                        n = batched or 1
                        self.probe_item_seconds += [(time.perf_counter() - t) / n] * n
                    else:
                        out.append(call(key))
                except StopIteration:
                    if stream:
                        break
                    raise
                if probing:
                    self._found |= _changed(before)
                    if self._probe_left is not None:
                        self._probe_left -= 1
                        if self._probe_left <= 0:  # probed enough: the rest of this call as decided
                            probing, seeded = False, self.decide()
        finally:
            ctx.seed = ctx.index = None
            ctx.generators.clear()
            if saved is not None:
                _set_states(saved)
        return out


def _seed(which: int, s: int) -> None:
    if which & TORCH:
        # The CPU generator only: torch.manual_seed would also reseed every CUDA device's generator,
        # which the training thread's dropout draws from on a GPU.
        torch.default_generator.manual_seed(s)
    if which & NUMPY:
        np.random.seed(s & 0xFFFFFFFF)
    if which & PYTHON:
        random.seed(s)


def _states(which: int) -> tuple[Any, Any, Any]:
    return (
        torch.default_generator.get_state() if which & TORCH else None,
        np.random.get_state() if which & NUMPY else None,
        random.getstate() if which & PYTHON else None,
    )


def _set_states(states: tuple[Any, Any, Any]) -> None:
    t, n, p = states
    if t is not None:
        torch.default_generator.set_state(t)
    if n is not None:
        np.random.set_state(n)
    if p is not None:
        random.setstate(p)


def _changed(before: tuple[Any, Any, Any]) -> int:
    t, n, p = before
    changed = 0
    if not torch.equal(t, torch.default_generator.get_state()):
        changed |= TORCH
    now: Any = np.random.get_state()  # (legacy form: a tuple, position at [2], key words at [1])
    if n[2] != now[2] or not np.array_equal(n[1], now[1]):
        changed |= NUMPY
    if p != random.getstate():
        changed |= PYTHON
    return changed


def describe_uses(uses: int) -> str:
    """``"torch and numpy"``: the global RNGs named by the bits of ``uses``.

    Example:

        >>> describe_uses(TORCH | PYTHON)
        'torch and random'
    """
    names = [name for bit, name in RNG_NAMES.items() if uses & bit]
    return " and ".join(names) if names else "none"
