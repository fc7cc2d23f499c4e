"""Global batches: the same items per optimizer step at any world size and micro-batch size.

A *window* is everything that feeds one optimizer step: ``batch_size`` items
across all processes (fewer for the last window of an epoch). Every rank
computes the same global order from ``(seed, epoch)``, cuts it into the same
windows, and keeps its own share, split into micro-batches of at most
``micro_batch_size`` items. So the set of items behind each optimizer step does
not depend on how the work is split, which is what makes the exactness rule in
docs/DESIGN.md hold across world sizes.

The position within an epoch is just ``(epoch, windows done)`` (plus the items
read, for streams), so resuming is O(1) for map-style data: no batch is
replayed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate


@dataclass
class Window:
    """This rank's micro-batches for one optimizer step.

    ``micro_batches`` may be empty on some ranks in the last window of an epoch;
    ``filler`` is then a real batch that the engine runs with zero weight, so
    the rank still joins the gradient all-reduce (no hang, no duplicate sample).
    """

    index: int
    micro_batches: list[Any]
    filler: Any = None
    items_read: int = 0  # stream items consumed up to the end of this window (streams only)
    exhausted: bool = False  # a self-sharded stream on this rank has ended (see StreamSource)
    forwards: int = 0  # the most micro-batches any rank has in this window (FSDP runs that many on every rank)
    order: list[int] = field(default_factory=list)  # each micro-batch's place in the epoch's global order


@dataclass
class Batching:
    """Resolved sizes: global items per step, per-forward items, accumulation steps."""

    batch_size: int | None  # global items per optimizer step (None for a DataLoader without batch_size)
    micro_batch_size: int | None
    accumulation: int
    world_size: int


def resolve_batching(data: Any, batch_size: int | None, micro_batch_size: int | None, world_size: int) -> Batching:
    """Work out the accumulation steps, with an error that names values that would work.

    Example::

        >>> resolve_batching(dataset, batch_size=64, micro_batch_size=16, world_size=2).accumulation
        2
    """
    if isinstance(data, DataLoader):
        micro = data.batch_size
        if micro is None:
            if batch_size is not None:
                raise ValueError(
                    "batch_size was given with a DataLoader that has no batch_size (a custom batch_sampler); "
                    "drop batch_size from Engine(...) (each of the loader's batches is one optimizer step "
                    "per process) or give the loader a batch_size"
                )
            return Batching(None, None, 1, world_size)
        if micro_batch_size is not None and micro_batch_size != micro:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} but the DataLoader's batch_size is {micro}; with a "
                "DataLoader input its batch_size is the micro-batch: drop micro_batch_size or change the loader"
            )
        micro_batch_size = micro
        if batch_size is None:
            batch_size = micro * world_size
    if batch_size is None:
        raise ValueError(
            "Engine(batch_size=...) is required for a Dataset input: the number of items per optimizer "
            "step across all processes, e.g. Engine(batch_size=64)"
        )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if micro_batch_size is None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} cannot be split over {world_size} processes; "
                f"use a multiple of {world_size}, e.g. batch_size={_round_up(batch_size, world_size)}"
            )
        micro_batch_size = batch_size // world_size
    if not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        ok_micro = [m for m in range(1, batch_size // world_size + 1) if batch_size % (m * world_size) == 0]
        raise ValueError(
            f"batch_size={batch_size} is not a whole number of micro_batch_size={micro_batch_size} x "
            f"{world_size} process(es) = {per_step}; accumulation steps must be whole. Use batch_size="
            f"{_round_up(batch_size, per_step)} or a micro_batch_size in {ok_micro[-6:]}"
        )
    return Batching(batch_size, micro_batch_size, batch_size // per_step, world_size)


def _round_up(x: int, k: int) -> int:
    return max(k, -(-x // k) * k)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global order of items for one epoch: the same on every rank and at every world size.

    It uses its own generator, so it never consumes (or depends on) the global RNG.

    Example::

        >>> epoch_order(5, seed=0, epoch=0, shuffle=False)
        tensor([0, 1, 2, 3, 4])
    """
    if not shuffle:
        return torch.arange(n)
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))


def most_chunks(n_items: int, world_size: int, size: int) -> int:
    """The most micro-batches of ``size`` items any rank gets from a window of ``n_items`` (see :func:`rank_share`)."""
    return max(-(-(hi - lo) // size) for lo, hi in (rank_share(n_items, world_size, r) for r in range(world_size)))


def rank_share(n_items: int, world_size: int, rank: int) -> tuple[int, int]:
    """Bounds ``[lo, hi)`` of this rank's contiguous share of a window of ``n_items``.

    Shares differ by at most one item, so the last, partial window is balanced.
    """
    return rank * n_items // world_size, (rank + 1) * n_items // world_size


def _chunks(seq: Any, size: int) -> list[Any]:
    if 0 < len(seq) <= size:  # one micro-batch: no copy (a slice is a tensor op)
        return [seq]
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def collate(samples: list[Any]) -> Any:
    """``default_collate``, with a fast path for the commonest sample, a tuple of plain tensors: one
    ``torch.stack`` per field and the same list out, without default_collate's per-call type dispatch.

    Example::

        >>> xs, ys = collate([(torch.zeros(2), torch.tensor(0)), (torch.ones(2), torch.tensor(1))])
        >>> xs.shape, ys
        (torch.Size([2, 2]), tensor([0, 1]))
    """
    first = samples[0]
    if type(first) is tuple and all(_plain_tensor(t) for t in first):
        try:
            return [torch.stack(field) for field in zip(*samples, strict=True)]
        except (ValueError, TypeError, RuntimeError):
            pass  # samples of different lengths or kinds: default_collate says what is wrong
    return _default_collate(samples)


# Typed: torch leaves default_collate untyped, and strict mypy refuses a call to it.
_default_collate: Callable[[list[Any]], Any] = default_collate


def _plain_tensor(t: Any) -> bool:
    return type(t) is torch.Tensor and t.layout == torch.strided and not t.is_nested


@dataclass
class Source:
    """Base of the four input kinds; ``windows(epoch, start)`` yields this rank's :class:`Window` s."""

    batching: Batching
    rank: int
    seed: int
    shuffle: bool
    device: torch.device | None = None
    to_device: Callable[[Any], Any] = field(default=lambda b: b)

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        raise NotImplementedError

    def num_windows(self) -> int | None:
        """Windows per epoch, or None for a stream without a length."""
        return None

    @property
    def per_rank(self) -> int:
        b = self.batching
        assert b.micro_batch_size is not None
        return b.micro_batch_size * b.accumulation


class _IndexedSource(Source):
    """Map-style data (tensors or a Dataset): windows are slices of the epoch order."""

    length: int

    def num_windows(self) -> int:
        assert self.batching.batch_size is not None
        return math.ceil(self.length / self.batching.batch_size)

    def fetch(self, idx: torch.Tensor) -> Any:
        raise NotImplementedError

    def _plan(self, epoch: int, start: int) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor]]:
        """(window index, this rank's micro-batch indices, the whole window's indices) per window."""
        b = self.batching
        assert b.batch_size is not None and b.micro_batch_size is not None
        order = epoch_order(self.length, self.seed, epoch, self.shuffle)
        for w in range(start, self.num_windows()):
            window = order[w * b.batch_size : (w + 1) * b.batch_size]
            lo, hi = rank_share(len(window), b.world_size, self.rank)
            yield w, _chunks(window[lo:hi] if b.world_size > 1 else window, b.micro_batch_size), window

    def _window(self, w: int, micro: list[Any], window: torch.Tensor, filler: Any) -> Window:
        b = self.batching
        assert b.batch_size is not None and b.micro_batch_size is not None
        lo, _ = rank_share(len(window), b.world_size, self.rank)
        first = w * b.batch_size + lo
        order = [first + i * b.micro_batch_size for i in range(len(micro))]
        return Window(
            w, micro, filler, forwards=most_chunks(len(window), b.world_size, b.micro_batch_size), order=order
        )

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        for w, micro_idx, window in self._plan(epoch, start):
            micro = [self.to_device(self.fetch(i)) for i in micro_idx]
            filler = None if micro else self.to_device(self.fetch(window[:1]))
            yield self._window(w, micro, window, filler)


class TensorSource(_IndexedSource):
    """In-memory tensors: a micro-batch is one index op per tensor, no per-sample collate."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], **kw: Any) -> None:
        super().__init__(**kw)
        self.tensors = tensors
        self.length = len(tensors[0])
        # index_select is advanced indexing's fast path (same values, contiguous), for CPU strided tensors
        self._select = all(t.device.type == "cpu" and t.layout == torch.strided for t in tensors)

    def fetch(self, idx: torch.Tensor) -> Any:
        if self._select:
            return tuple([t.index_select(0, idx) for t in self.tensors])
        return tuple(t[idx] for t in self.tensors)


class MapSource(_IndexedSource):
    """A generic map-style Dataset, collated in the main process or by DataLoader workers."""

    def __init__(
        self,
        dataset: Dataset[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        num_workers: int,
        pin_memory: bool,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.dataset = dataset
        self.length = len(dataset)  # type: ignore[arg-type]
        self.collate_fn = collate_fn or default_collate  # what DataLoader workers use
        self._collate = collate_fn or collate  # in this process: default_collate with a fast path
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._getitems = getattr(dataset, "__getitems__", None)

    def fetch(self, idx: torch.Tensor) -> Any:
        ids = idx.tolist()
        samples = self._getitems(ids) if self._getitems else [self.dataset[i] for i in ids]
        return self._collate(samples)

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        if self.num_workers == 0:
            yield from super().windows(epoch, start)
            return
        plan = list(self._plan(epoch, start))
        # Workers prefetch this rank's micro-batches in order; a dedicated
        # generator keeps the loader from drawing on the global RNG.
        loader = DataLoader(
            self.dataset,
            batch_sampler=[i.tolist() for _, micro, _ in plan for i in micro],
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        it = iter(loader)
        for w, micro_idx, window in plan:
            micro = [self.to_device(next(it)) for _ in micro_idx]
            filler = None if micro else self.to_device(self.fetch(window[:1]))
            yield self._window(w, micro, window, filler)


class StreamSource(Source):
    """An IterableDataset: every rank reads the whole stream and keeps its share of each window.

    Cost: each rank reads every item (the price of exactness at any world size).
    The position is the number of items read.

    ``sharded=True`` (``Engine(stream_sharded=True)``) is the opt-in for datasets
    that already yield only this rank's items: each rank then takes its
    ``micro_batch_size x accumulation`` items per window from its own stream. A
    rank whose stream ends first keeps joining steps with a zero-weight filler
    until every rank's stream has ended (the engine agrees on that with one small
    all-reduce per step). What each step sees is then defined by the dataset's
    sharding, so results match other world sizes only if its sharding does.
    """

    def __init__(
        self,
        dataset: IterableDataset[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        sharded: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.sharded = sharded

    def num_windows(self) -> int | None:
        if self.sharded:
            return None
        try:
            n = len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        assert self.batching.batch_size is not None
        return math.ceil(n / self.batching.batch_size)

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        b = self.batching
        assert b.batch_size is not None and b.micro_batch_size is not None
        it = iter(self.dataset)
        # Skip what was consumed before a resume: read, never run through the model.
        for _ in itertools.islice(it, items_read):
            pass
        if self.sharded:
            yield from self._own_shard(it, start, items_read)
            return
        w = start
        while True:
            items = list(itertools.islice(it, b.batch_size))
            if not items:
                return
            first = items_read
            items_read += len(items)
            lo, hi = rank_share(len(items), b.world_size, self.rank)
            micro = [self.to_device(self.collate_fn(c)) for c in _chunks(items[lo:hi], b.micro_batch_size)]
            filler = None if micro else self.to_device(self.collate_fn(items[:1]))
            forwards = most_chunks(len(items), b.world_size, b.micro_batch_size)
            order = [first + lo + i * b.micro_batch_size for i in range(len(micro))]
            yield Window(w, micro, filler, items_read, forwards=forwards, order=order)
            w += 1

    def _own_shard(self, it: Iterator[Any], w: int, items_read: int) -> Iterator[Window]:
        """Windows from a stream that holds only this rank's items; endless empty windows once it ends."""
        m = self.batching.micro_batch_size
        assert m is not None
        filler = None
        while True:
            items = list(itertools.islice(it, self.per_rank))
            items_read += self.per_rank  # nominal: the same count on every rank, so one number resumes all
            if items:
                micro = [self.to_device(self.collate_fn(c)) for c in _chunks(items, m)]
                yield Window(w, micro, None, items_read)
            else:
                if filler is None:
                    first = list(itertools.islice(iter(self.dataset), 1))
                    if not first:
                        raise ValueError(
                            f"rank {self.rank}'s shard of the stream is empty; with stream_sharded=True every "
                            "rank's stream must yield at least one item"
                        )
                    filler = self.to_device(self.collate_fn(first))
                yield Window(w, [], filler, items_read, exhausted=True)
            w += 1


class LoaderSource(Source):
    """A user DataLoader, used as given: each of its batches is one micro-batch.

    Windows are ``accumulation x world_size`` consecutive loader batches, dealt
    round-robin to the ranks. Under several processes every rank iterates the
    whole loader (its shuffling must not depend on the rank, which holds for a
    seeded RandomSampler) and keeps its own batches.
    """

    def __init__(self, loader: DataLoader[Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.loader = loader
        # A shuffling DataLoader draws its order from the global RNG when its
        # iterator is created; checkpoints keep that state so a resumed run
        # rebuilds the same order (framework.fit.DataPosition keeps it in the train state).
        self.epoch_rng: torch.Tensor | None = None
        self.resume_rng: torch.Tensor | None = None

    def num_windows(self) -> int | None:
        try:
            n = len(self.loader)
        except TypeError:
            return None
        return math.ceil(n / (self.batching.accumulation * self.batching.world_size))

    def _iterate(self, skip: int) -> Iterator[Any]:
        """The loader's batches after the first ``skip``, skipping by index where the loader allows."""
        loader = self.loader
        if self.resume_rng is not None:
            now = torch.get_rng_state()
            torch.set_rng_state(self.resume_rng)
            it = self._iterate_from(loader, skip)
            # The sampler draws its seed lazily, at the first batch: take it under the epoch's RNG too.
            first = list(itertools.islice(it, 1))
            it = itertools.chain(first, it)
            torch.set_rng_state(now)
            self.epoch_rng, self.resume_rng = self.resume_rng, None
            return it
        self.epoch_rng = torch.get_rng_state()
        return self._iterate_from(loader, skip)

    @staticmethod
    def _iterate_from(loader: DataLoader[Any], skip: int) -> Iterator[Any]:
        if skip and loader.batch_sampler is not None and not isinstance(loader.dataset, IterableDataset):
            # Same sampler (same RNG draws, same order), but the skipped batches are
            # never loaded: O(index) work, not O(data).
            rebuilt = DataLoader(
                loader.dataset,
                batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                generator=loader.generator,
                prefetch_factor=loader.prefetch_factor,
                persistent_workers=loader.persistent_workers,
            )
            return iter(rebuilt)
        it = iter(loader)
        for _ in itertools.islice(it, skip):  # no index-level access: replay the loading, never the model
            pass
        return it

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        b = self.batching
        per_window = b.accumulation * b.world_size
        it = self._iterate(start * per_window)
        w = start
        while True:
            group = list(itertools.islice(it, per_window))
            if not group:
                return
            mine = group[self.rank :: b.world_size]
            micro = [self.to_device(x) for x in mine]
            filler = None if micro else self.to_device(group[0])
            order = [w * per_window + self.rank + k * b.world_size for k in range(len(micro))]
            yield Window(w, micro, filler, forwards=-(-len(group) // b.world_size), order=order)
            w += 1


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches (the sampler still runs, so RNG draws match)."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def make_source(
    data: Any,
    batching: Batching,
    *,
    rank: int,
    seed: int,
    shuffle: bool,
    to_device: Callable[[Any], Any],
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    stream_sharded: bool = False,
) -> Source:
    """Pick the input kind for ``data`` (DataLoader, tensors, IterableDataset or Dataset).

    Example::

        >>> src = make_source(TensorDataset(x, y), batching, rank=0, seed=0, shuffle=True, to_device=lambda b: b)
        >>> next(src.windows(epoch=0)).micro_batches[0][0].shape
        torch.Size([16, 64])
    """
    kw: dict[str, Any] = dict(batching=batching, rank=rank, seed=seed, shuffle=shuffle, to_device=to_device)
    if isinstance(data, DataLoader):
        return LoaderSource(data, **kw)
    tensors = as_tensors(data)
    if tensors is not None and collate_fn is None:
        source: Source = TensorSource(tensors, **kw)
    elif isinstance(data, IterableDataset):
        source = StreamSource(data, collate_fn, sharded=stream_sharded, **kw)
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        source = MapSource(data, collate_fn, num_workers, pin_memory, **kw)
    else:
        raise TypeError(
            f"training data of type {type(data).__name__} is not supported; pass a torch Dataset, an "
            "IterableDataset, a DataLoader, or a tuple of equal-length tensors"
        )
    n = source.num_windows()
    if n == 0:
        raise ValueError("the dataset is empty (0 items); pass a dataset with at least one item")
    return source


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors behind in-memory data (a TensorDataset or a tuple of tensors), else None."""
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        n = len(data[0])
        if any(len(t) != n for t in data):
            raise ValueError(
                f"tensors of different lengths {[len(t) for t in data]}; give every tensor one row per item"
            )
        return tuple(data)
    return None
