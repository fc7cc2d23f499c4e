"""The input kinds: what a window is made of, and how it is prepared ahead of the step.

Each :class:`Source` makes host windows in ``_produce`` (fetch and collate, no device) and hands
them out through a stage of ``framework.data.prefetch`` chosen by the rule in ``framework.data``:

| data | made in | on a GPU |
|---|---|---|
| in-memory tensors | the training thread (one index op per tensor) | copied one window ahead, side stream |
| Dataset / IterableDataset, ``num_workers=0`` | a background thread, ``prefetch`` windows ahead; the training thread if its items take under 50 µs or it draws from a global RNG | copied by the thread / one window ahead |
| Dataset, ``num_workers > 0`` | worker processes (``framework.data.workers``) | copied one window ahead |
| a user DataLoader | its own iteration, in the training thread | copied one window ahead if it has workers |

The position within an epoch is just ``(epoch, windows done)`` (plus the items read, for
streams), so resuming is O(1) for map-style data: no batch is replayed.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .batching import Batching, Window, chunks, plan_windows, rank_share, split_window, windows_per_epoch
from .collate import collate, default_collate
from .device import DeviceCopier
from .prefetch import Background, Lookahead, Plain, Stage, WaitMeter
from .rng import ItemFetcher, describe_uses
from .workers import WorkerDataset, worker_batches

DEFAULT_PREFETCH = 2  # windows prepared ahead of the step (Engine(prefetch=...)); 0 = none
# Items faster than this (in-memory indexing) are made in the training thread: a thread's GIL hand-offs
# would cost more than the fetching it hides (benchmarks/overhead.py's Dataset rows: 2-10 us an item; the margin
# is for busy machines, where the first window measures slower).
THREAD_MIN_ITEM_S = 50e-6
WAIT_WARNING = 0.10  # the end-of-fit line names a fix above this fraction of step time spent waiting


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class Source:
    """Base of the input kinds; ``windows(epoch, start)`` yields this rank's :class:`Window` s.

    ``prefetch``: windows prepared ahead of the step (0: each is made when the step asks for it).
    ``drop_last``: leave out each epoch's partial last global batch. ``all_reduce`` (a sum over
    processes, in place) lets the ranks agree on how the data draws randomness; ``wait`` measures
    the time the step waited for input (``train/data_wait``). ``close()`` ends the threads and
    worker processes of every window iteration still open.

    Example:

        >>> from framework.data import Batching, make_source
        >>> source = make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True,
        ...                      to_device=lambda b: b)
        >>> [len(w.micro_batches[0][0]) for w in source.windows(epoch=0)]   # inputs per window
        [32, 32, 32]
        >>> type(source).__name__, source.num_windows()
        ('TensorSource', 3)
        >>> source.close()
    """

    batching: Batching
    rank: int
    seed: int
    shuffle: bool
    device: torch.device | None = None
    to_device: Callable[[Any], Any] = field(default=_identity)
    drop_last: bool = False
    prefetch: int = DEFAULT_PREFETCH
    all_reduce: Callable[[torch.Tensor], Any] | None = None
    wait: WaitMeter = field(default_factory=WaitMeter, init=False)

    def __post_init__(self) -> None:
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()  # window iterations not yet ended
        self._copier: DeviceCopier | None = None
        self._settled = False  # the ranks have agreed on the data's global RNG use (first window)
        self.global_rngs = 0  # bits of framework.data.rng: the global RNGs the data draws from
        self.stage = "plain"  # how windows were last prepared: "plain", "lookahead" or "thread" (the stages)

    # ---------------------------------------------------------------- what subclasses provide

    def _produce(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        """Host windows (fetched and collated, not yet on the device) of ``epoch`` from ``start``."""
        raise NotImplementedError

    def _window(self, w: int, micro: list[Any], filler: Any, n_items: int) -> Window:
        """Window ``w`` of indexed data (``n_items`` in it), which starts at item ``w * batch_size`` of the
        epoch's order."""
        assert self.batching.batch_size is not None
        return split_window(w, micro, filler, n_items, w * self.batching.batch_size, self.batching, self.rank)

    def _threaded(self) -> bool:
        """Whether a background thread may make this source's windows (see framework.data)."""
        return False

    def _lookahead(self) -> bool:
        """Whether a GPU copy one window ahead, from the training thread, is safe and useful."""
        return True

    def num_windows(self) -> int | None:
        """Windows per epoch, or None for a stream without a length.

        Example:

            >>> from framework.data import Batching, make_source
            >>> make_source(train_data, Batching(64, 64, 1, 1), rank=0, seed=0, shuffle=True,
            ...             to_device=lambda b: b).num_windows()   # 96 items: a full window and a partial one
            2
        """
        return None

    # ---------------------------------------------------------------- the iteration

    def windows(self, epoch: int, start: int = 0, items_read: int = 0) -> Iterator[Window]:
        """This rank's windows of ``epoch`` from window ``start`` (``items_read``: stream items consumed
        before it, for a resume), prepared ahead as ``prefetch`` and the data kind say.

        Example:

            >>> from framework.data import Batching, make_source
            >>> source = make_source(train_data, Batching(16, 16, 1, 1), rank=0, seed=0, shuffle=True,
            ...                      to_device=lambda b: b)
            >>> [w.index for w in source.windows(epoch=2, start=4)]   # a resume at window 4 of 6
            [4, 5]
        """
        iteration = self._iterate(epoch, start, items_read)
        self._open.add(iteration)
        return iteration

    def _iterate(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        meter = self.wait
        asked = time.perf_counter()
        produce = self._produce(epoch, start, items_read)
        stage: Stage | None = None
        try:
            first = next(produce, None)  # (in this thread: the probe of the data's randomness runs here)
            if first is None:
                return
            self._settle_randomness()
            stage = self._stage(produce, first)
            for window in stage:
                meter.record(asked, time.perf_counter())
                yield window
                asked = time.perf_counter()
        finally:
            meter.pause(time.perf_counter())
            if stage is not None:
                stage.close()
            else:
                produce.close()  # type: ignore[attr-defined]

    def _stage(self, produce: Iterator[Window], first: Window) -> Stage:
        copier = self._device_copier()
        if self.prefetch > 0 and self._threaded():
            self.stage = "thread"
            return Background(produce, first, self.prefetch, self._move, copier)
        if copier is not None and self._lookahead():
            self.stage = "lookahead"
            return Lookahead(produce, first, copier)
        self.stage = "plain"
        return Plain(produce, first, self._move)

    @property
    def in_training_thread(self) -> bool:
        """Whether the data's own code (``__getitem__``, a stream, a loader) runs in the training thread.

        Example:

            >>> from framework.data import Batching, make_source
            >>> make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True,
            ...             to_device=lambda b: b).in_training_thread   # in-memory tensors: always
            True
        """
        return self.stage != "thread" and not self._in_workers()

    def _in_workers(self) -> bool:
        return False

    @property
    def where(self) -> str:
        """Where windows are made, in words (the end-of-fit line says it).

        Example:

            >>> from framework.data import Batching, make_source
            >>> make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True,
            ...             to_device=lambda b: b).where
            'the training thread'
        """
        if self.stage == "thread":
            return f"a background thread, {self.prefetch} window(s) ahead"
        where = self._where()
        return where + (", copied to the GPU one window ahead" if self.stage == "lookahead" else "")

    def _where(self) -> str:
        return "the training thread"

    def _device_copier(self) -> DeviceCopier | None:
        """A side-stream copier for a CUDA device when preparing ahead, else None (``to_device`` instead)."""
        if self.prefetch <= 0 or self.device is None or self.device.type != "cuda":
            return None
        if self._copier is None:
            self._copier = DeviceCopier(self.device, self.to_device)
        return self._copier

    def _move(self, window: Window) -> Window:
        if self.device is not None and self.device.type == "cpu":
            return window  # (the engine's to_device does nothing on CPU: save the per-step calls)
        window.micro_batches = [self.to_device(b) for b in window.micro_batches]
        if window.filler is not None:
            window.filler = self.to_device(window.filler)
        return window

    def close(self) -> None:
        """End the threads and worker processes of every window iteration still open (idempotent; the
        source stays usable: a later ``windows()`` starts afresh).

        Example:

            >>> from framework.data import Batching, make_source
            >>> source = make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True,
            ...                      to_device=lambda b: b)
            >>> first = next(source.windows(epoch=0))   # an iteration left open (a fit that raised, say)
            >>> source.close()                           # ends it, and whatever thread or workers it had
            >>> next(source.windows(epoch=0)).index     # still usable
            0
            >>> source.close()
        """
        for iteration in list(self._open):
            try:
                iteration.close()  # (GeneratorExit at its yield: its finally ends it)
            except ValueError:  # (running: only a callback inside the iteration could get here)
                pass

    # ---------------------------------------------------------------- randomness and reporting

    def _fetchers(self) -> list[ItemFetcher]:
        return []

    def _seen_rngs(self) -> int:
        """The global RNGs this process saw the data draw from (after the first window)."""
        return 0

    def _settle_randomness(self) -> None:
        """After the first window: every rank adopts the union of the global RNGs any rank saw used, and
        a dataset that draws from them on some ranks but not others is warned about (once, rank 0)."""
        if self._settled:
            return
        self._settled = True
        mine = self._seen_rngs()
        uses = mine
        b = self.batching
        if b.world_size > 1 and self.all_reduce is not None and self._fetchers():
            flags = torch.zeros(b.world_size, dtype=torch.float64, device=self.device or torch.device("cpu"))
            flags[self.rank] = float(mine)
            self.all_reduce(flags)
            per_rank = [int(v) for v in flags.tolist()]
            users = [r for r, u in enumerate(per_rank) if u]
            for u in per_rank:
                uses |= u
            if users and len(users) < b.world_size and self.rank == 0:
                warnings.warn(
                    f"the data draws from the global {describe_uses(uses)} RNG on rank(s) {users} but not on the "
                    f"others ({b.world_size} processes); every rank now seeds those RNGs per item. If the "
                    "dataset's randomness depends on the rank, results differ between world sizes: draw "
                    "from framework.data.item_generator() instead",
                    stacklevel=4,
                )
        for fetcher in self._fetchers():
            fetcher.decide()
            fetcher.uses = (fetcher.uses or 0) | uses
        self.global_rngs = uses

    def report(self) -> str | None:
        """The end-of-fit line about input, or None when there is nothing to say: where windows were
        made, and, when the step waited for input more than 10% of the time, what to do about it.

        Example:

            >>> from framework.data import Batching, make_source
            >>> source = make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True,
            ...                      to_device=lambda b: b)
            >>> print(source.report())
            None
            >>> source.wait.record(asked=0.0, got=1.0)   # 1 s of waiting, then 0.5 s of step
            >>> source.wait.pause(now=1.5)
            >>> print(source.report())
            data: the step waited for input 67% of the time (windows made in the training thread); fix: in-memory
            tensors are one index op per step: the step itself is tiny; a larger batch_size helps
        """
        lines = []
        if self.global_rngs:
            lines.append(
                f"data: the dataset draws from the global {describe_uses(self.global_rngs)} RNG, so each item is "
                "seeded from (seed, epoch, index) before it is fetched"
                + (
                    ", in the training thread (a prefetch thread would race with dropout on the same "
                    "generator): draw from framework.data.item_generator() instead, or set num_workers > 0, "
                    "to prepare batches ahead"
                    if self.in_training_thread
                    else f", in {self.where}"
                )
            )
        waited = self.wait.fraction
        if waited > WAIT_WARNING:
            lines.append(
                f"data: the step waited for input {waited:.0%} of the time (windows made in {self.where}); "
                f"fix: {self._wait_fix()}"
            )
        return "\n".join(lines) or None

    def _wait_fix(self) -> str:
        return "cache the data in memory, or make loading it faster"


def _fast(fetcher: ItemFetcher) -> bool:
    """Whether the first window's items took under THREAD_MIN_ITEM_S each (the median, in the dataset's
    own code: robust to the odd item descheduled on a busy machine)."""
    times = fetcher.probe_item_seconds
    return bool(times) and statistics.median(times) < THREAD_MIN_ITEM_S


class TensorSource(Source):
    """In-memory tensors (a tuple, a TensorDataset or a dict of equal-length tensors): a micro-batch is
    one index op per tensor, no per-sample collate; a dict gives dict batches.

    Example:

        >>> from framework.data import Batching, TensorSource
        >>> x, y = train_data.tensors
        >>> source = TensorSource({"inputs": x, "labels": y}, batching=Batching(32, 16, 2, 1), rank=0, seed=0,
        ...                       shuffle=True)
        >>> batch = next(source.windows(epoch=0)).micro_batches[0]
        >>> sorted(batch), batch["labels"].shape
        (['inputs', 'labels'], torch.Size([16]))
        >>> source.close()
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...] | dict[str, torch.Tensor], **kw: Any) -> None:
        super().__init__(**kw)
        self.keys: tuple[str, ...] | None = tuple(tensors) if isinstance(tensors, dict) else None
        self.tensors = tuple(tensors.values()) if isinstance(tensors, dict) else tuple(tensors)
        self.length = len(self.tensors[0])
        # index_select is advanced indexing's fast path (same values, contiguous), for CPU strided tensors
        self._select = all(t.device.type == "cpu" and t.layout == torch.strided for t in self.tensors)

    def num_windows(self) -> int:
        assert self.batching.batch_size is not None
        return windows_per_epoch(self.length, self.batching.batch_size, self.drop_last)

    def fetch(self, idx: torch.Tensor) -> Any:
        """The batch of items ``idx``: a tuple of tensors (a dict for dict data).

        Example:

            >>> from framework.data import Batching, TensorSource
            >>> source = TensorSource(train_data.tensors, batching=Batching(32, 32, 1, 1), rank=0, seed=0,
            ...                       shuffle=False)
            >>> inputs, targets = source.fetch(torch.tensor([0, 5]))
            >>> inputs.shape, targets.shape
            (torch.Size([2, 8]), torch.Size([2]))
        """
        if self._select:
            parts = [t.index_select(0, idx) for t in self.tensors]
        else:
            parts = [t[idx] for t in self.tensors]
        return dict(zip(self.keys, parts, strict=True)) if self.keys is not None else tuple(parts)

    def _produce(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        plan = plan_windows(
            self.length, self.batching, self.rank, self.seed, epoch, self.shuffle, self.drop_last, start
        )
        for w, micro_idx, window in plan:
            micro = [self.fetch(i) for i in micro_idx]
            yield self._window(w, micro, None if micro else self.fetch(window[:1]), len(window))

    def _wait_fix(self) -> str:
        return "in-memory tensors are one index op per step: the step itself is tiny; a larger batch_size helps"


class MapSource(Source):
    """A generic map-style Dataset: in a background thread, the training thread or worker processes.

    Example:

        >>> from framework.data import Batching, MapSource
        >>> samples = [{"x": torch.full((2,), float(i)), "labels": torch.tensor(i % 3)} for i in range(10)]
        >>> source = MapSource(samples, collate_fn=None, num_workers=0, pin_memory=False,
        ...                    batching=Batching(4, 4, 1, 1), rank=0, seed=0, shuffle=False)
        >>> [w.micro_batches[0]["labels"].tolist() for w in source.windows(epoch=0)]
        [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]
    """

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
        self.collate_fn = collate_fn or default_collate  # what worker processes use (shared-memory output)
        self._collate = collate_fn or collate  # in this process: default_collate with fast paths
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._getitems = getattr(dataset, "__getitems__", None)
        self.fetcher = ItemFetcher(self.seed, probe_items=self.batching.batch_size)
        self._worker_rngs = 0  # the global RNGs worker processes reported the dataset draws from

    def num_windows(self) -> int:
        assert self.batching.batch_size is not None
        return windows_per_epoch(self.length, self.batching.batch_size, self.drop_last)

    def fetch(self, idx: torch.Tensor, epoch: int = 0) -> Any:
        """The collated batch of items ``idx`` of ``epoch``, fetched in this thread with per-item seeds.

        Example:

            >>> from framework.data import Batching, MapSource
            >>> samples = [{"x": torch.full((2,), float(i))} for i in range(10)]
            >>> source = MapSource(samples, collate_fn=None, num_workers=0, pin_memory=False,
            ...                    batching=Batching(4, 4, 1, 1), rank=0, seed=0, shuffle=False)
            >>> source.fetch(torch.tensor([3, 4]))["x"]
            tensor([[3., 3.],
                    [4., 4.]])
        """
        ids = idx.tolist()
        if self._getitems is not None:
            samples = self.fetcher.batch(epoch, ids, self._getitems)
        else:
            samples = self.fetcher.items(epoch, ids, self.dataset.__getitem__)
        return self._collate(samples)

    def _produce(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        plan = plan_windows(
            self.length, self.batching, self.rank, self.seed, epoch, self.shuffle, self.drop_last, start
        )
        if self.num_workers > 0:
            yield from self._from_workers(epoch, list(plan))
            return
        for w, micro_idx, window in plan:
            micro = [self.fetch(i, epoch) for i in micro_idx]
            yield self._window(w, micro, None if micro else self.fetch(window[:1], epoch), len(window))

    def _from_workers(self, epoch: int, plan: list[tuple[int, list[torch.Tensor], torch.Tensor]]) -> Iterator[Window]:
        # One task per micro-batch (a filler where a rank has none), in the order the windows need them.
        tasks = [(epoch, ids.tolist()) for _, micro, window in plan for ids in (micro or [window[:1]])]
        batches = worker_batches(
            # (after the first epoch the workers know how the dataset draws: they need not probe again)
            WorkerDataset(self.dataset, self.seed, self.collate_fn, self.global_rngs if self._settled else None),
            tasks,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            seed=self.seed + epoch,
            in_flight=max(2 * self.num_workers, self.prefetch * self.batching.accumulation),
        )
        try:
            for w, micro, window in plan:
                got = []
                for _ in range(len(micro) or 1):
                    uses, batch = next(batches)
                    self._worker_rngs |= uses
                    got.append(batch)
                yield self._window(w, got, None, len(window)) if micro else self._window(w, [], got[0], len(window))
        finally:
            batches.close()  # type: ignore[attr-defined]

    def _in_workers(self) -> bool:
        return self.num_workers > 0

    def _where(self) -> str:
        if self.num_workers:
            return f"{self.num_workers} worker process(es)"
        return "the training thread" + (" (items this fast need no thread)" if _fast(self.fetcher) else "")

    def _threaded(self) -> bool:
        # A thread must never run a dataset that draws from a global RNG: it would race with the
        # training thread's draws (dropout) on the same generator, and fork_rng is not thread-local.
        return self.num_workers == 0 and self.global_rngs == 0 and not _fast(self.fetcher)

    def _fetchers(self) -> list[ItemFetcher]:
        return [self.fetcher]

    def _seen_rngs(self) -> int:
        if self.num_workers > 0:
            return self._worker_rngs
        return self.fetcher.decide()

    def _wait_fix(self) -> str:
        if self.num_workers == 0:
            return (
                "set num_workers (now 0; e.g. Engine(num_workers=4)): a thread overlaps I/O but not Python "
                "work that holds the GIL; or cache decoded items in memory, or make __getitem__ faster"
            )
        return f"raise num_workers (now {self.num_workers}), cache decoded items in memory, or make __getitem__ faster"


class StreamSource(Source):
    """An IterableDataset: every rank reads the whole stream and keeps its share of each window.

    Cost: each rank reads every item (the price of exactness at any world size).
    The position is the number of items read. The stream is read in a background thread, or in the
    training thread when it draws from a global RNG; item ``k`` of an epoch is seeded as ``(seed,
    epoch, k)`` (see ``framework.data.rng``).

    ``sharded=True`` (``Engine(stream_sharded=True)``) is the opt-in for datasets
    that already yield only this rank's items: each rank then takes its
    ``micro_batch_size x accumulation`` items per window from its own stream. A
    rank whose stream ends first keeps joining steps with a zero-weight filler
    until every rank's stream has ended (the engine agrees on that with one small
    all-reduce per step). What each step sees is then defined by the dataset's
    sharding, so results match other world sizes only if its sharding does.

    Example:

        >>> from torch.utils.data import IterableDataset
        >>> from framework.data import Batching, StreamSource
        >>> class Count(IterableDataset):
        ...     def __iter__(self):
        ...         return iter(torch.arange(10.0))
        >>> source = StreamSource(Count(), collate_fn=None, batching=Batching(4, 2, 1, 2), rank=1, seed=0,
        ...                       shuffle=False)
        >>> [w.micro_batches[0].tolist() for w in source.windows(epoch=0)]   # rank 1's share of each window
        [[2.0, 3.0], [6.0, 7.0], [9.0]]
        >>> print(source.num_windows())                                      # a stream without a length
        None
    """

    SKIP_CHUNK = 4096  # items read per call while skipping to a resume position

    def __init__(
        self,
        dataset: IterableDataset[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        sharded: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.dataset = dataset
        self.collate_fn = collate_fn or collate
        self.sharded = sharded
        self.fetcher = ItemFetcher(self.seed, probe_items=self.batching.batch_size)

    def num_windows(self) -> int | None:
        if self.sharded:
            return None
        try:
            n = len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        assert self.batching.batch_size is not None
        return windows_per_epoch(n, self.batching.batch_size, self.drop_last)

    def _open_stream(self, epoch: int) -> Iterator[Any]:
        # Creating the iterator is seeded too (as "item" -1): a stream may draw its shuffle there.
        it: Iterator[Any] = self.fetcher.items(epoch, [-1], lambda _: iter(self.dataset))[0]
        return it

    def _produce(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        b = self.batching
        assert b.batch_size is not None and b.micro_batch_size is not None
        it = self._open_stream(epoch)
        # Skip what was consumed before a resume: read (with the same seeds), never run through the model.
        position = 0
        while position < items_read:
            skipped = self.fetcher.stream(epoch, it, position, min(self.SKIP_CHUNK, items_read - position))
            if not skipped:
                break
            position += len(skipped)
        if self.sharded:
            yield from self._own_shard(epoch, it, start, items_read)
            return
        w = start
        while True:
            items = self.fetcher.stream(epoch, it, items_read, b.batch_size)
            if not items or (self.drop_last and len(items) < b.batch_size):
                return
            first = items_read
            items_read += len(items)
            lo, hi = rank_share(len(items), b.world_size, self.rank)
            micro = [self.collate_fn(c) for c in chunks(items[lo:hi], b.micro_batch_size)]
            filler = None if micro else self.collate_fn(items[:1])
            yield split_window(w, micro, filler, len(items), first, b, self.rank, items_read=items_read)
            w += 1

    def _own_shard(self, epoch: int, it: Iterator[Any], w: int, items_read: int) -> Iterator[Window]:
        """Windows from a stream that holds only this rank's items; endless empty windows once it ends."""
        m = self.batching.micro_batch_size
        assert m is not None
        filler = None
        while True:
            items = self.fetcher.stream(epoch, it, items_read, self.per_rank)
            items_read += self.per_rank  # nominal: the same count on every rank, so one number resumes all
            if self.drop_last and len(items) < self.per_rank:
                items = []  # (this rank's partial last window is dropped: it has ended)
            if items:
                micro = [self.collate_fn(c) for c in chunks(items, m)]
                yield Window(w, micro, None, items_read)
            else:
                if filler is None:
                    first = self.fetcher.stream(epoch, self._open_stream(epoch), 0, 1)
                    if not first:
                        raise ValueError(
                            f"rank {self.rank}'s shard of the stream is empty; with stream_sharded=True every "
                            "rank's stream must yield at least one item"
                        )
                    filler = self.collate_fn(first)
                yield Window(w, [], filler, items_read, exhausted=True)
            w += 1

    @property
    def per_rank(self) -> int:
        """Items each rank takes from its own stream per window with ``sharded=True``: ``micro_batch_size ×
        accumulation``.

        Example:

            >>> from torch.utils.data import IterableDataset
            >>> from framework.data import Batching, StreamSource
            >>> class Shard(IterableDataset):            # yields this rank's items only
            ...     def __iter__(self):
            ...         return iter(range(100))
            >>> source = StreamSource(Shard(), collate_fn=None, sharded=True, batching=Batching(16, 4, 2, 2), rank=0,
            ...                       seed=0, shuffle=False)
            >>> source.per_rank                          # 16 items per window over 2 ranks
            8
        """
        b = self.batching
        assert b.micro_batch_size is not None
        return b.micro_batch_size * b.accumulation

    def _threaded(self) -> bool:
        return self.global_rngs == 0 and not _fast(self.fetcher)  # (see MapSource._threaded)

    def _fetchers(self) -> list[ItemFetcher]:
        return [self.fetcher]

    def _seen_rngs(self) -> int:
        return self.fetcher.decide()

    def _wait_fix(self) -> str:
        return "make the stream faster (its reading or decoding), or cache it in memory"


class LoaderSource(Source):
    """A user DataLoader, used as given: each of its batches is one micro-batch.

    Windows are ``accumulation x world_size`` consecutive loader batches, dealt
    round-robin to the ranks. Under several processes every rank iterates the
    whole loader (its shuffling must not depend on the rank, which holds for a
    seeded RandomSampler) and keeps its own batches. The loader is iterated in the
    training thread, when the step asks (its workers, if any, load ahead); on a GPU a
    loader with workers has its batches copied one window ahead.

    Example:

        >>> from torch.utils.data import DataLoader
        >>> from framework.data import Batching, LoaderSource
        >>> source = LoaderSource(DataLoader(train_data, batch_size=16), batching=Batching(32, 16, 2, 1), rank=0,
        ...                       seed=0, shuffle=False)
        >>> [len(w.micro_batches) for w in source.windows(epoch=0)], source.num_windows()
        ([2, 2, 2], 3)
    """

    def __init__(self, loader: DataLoader[Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.loader = loader
        # A shuffling DataLoader draws its order from the global RNG when its
        # iterator is created; checkpoints keep that state so a resumed run
        # rebuilds the same order (see checkpoint.save_engine / load_engine).
        self.epoch_rng: torch.Tensor | None = None
        self.resume_rng: torch.Tensor | None = None

    def num_windows(self) -> int | None:
        try:
            n = len(self.loader)
        except TypeError:
            return None
        return math.ceil(n / (self.batching.accumulation * self.batching.world_size))

    def _where(self) -> str:
        return "your DataLoader, iterated in the training thread"

    def _lookahead(self) -> bool:
        # With num_workers=0 the loader's __getitem__ runs when it is iterated, and a dataset drawing
        # from the global RNG would then draw before the step instead of after it: leave it as given.
        return self.loader.num_workers > 0

    def _iterate_loader(self, skip: int) -> Iterator[Any]:
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

    def _produce(self, epoch: int, start: int, items_read: int) -> Iterator[Window]:
        b = self.batching
        per_window = b.accumulation * b.world_size
        it = self._iterate_loader(start * per_window)
        w = start
        while True:
            group = list(itertools.islice(it, per_window))
            if not group:
                return
            mine = group[self.rank :: b.world_size]
            first = w * per_window + self.rank
            order = range(first, first + len(mine) * b.world_size, b.world_size)
            forwards = -(-len(group) // b.world_size)  # (the most any rank has: rank 0's count)
            yield Window(w, mine, None if mine else group[0], forwards=forwards, order=order)
            w += 1

    def _wait_fix(self) -> str:
        return (
            f"give your DataLoader more workers (now num_workers={self.loader.num_workers}), or pass the Dataset "
            "itself to fit (the engine then prepares batches ahead)"
        )


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
    drop_last: bool = False,
    prefetch: int = DEFAULT_PREFETCH,
    device: torch.device | None = None,
    all_reduce: Callable[[torch.Tensor], Any] | None = None,
) -> Source:
    """Pick the input kind for ``data`` (DataLoader, tensors — a tuple, TensorDataset or dict of
    tensors —, IterableDataset, or a Dataset, e.g. a list of per-item dicts).

    ``device`` (the training device) decides whether windows are copied ahead on a side CUDA stream;
    ``all_reduce`` lets the ranks agree on the data's randomness (see :class:`Source`).

    Example:

        >>> from framework.data import Batching, make_source
        >>> source = make_source(train_data, Batching(32, 16, 2, 1), rank=0, seed=0, shuffle=True,
        ...                      to_device=lambda b: b)
        >>> type(source).__name__, next(source.windows(epoch=0)).micro_batches[0][0].shape
        ('TensorSource', torch.Size([16, 8]))
        >>> source.close()
        >>> make_source(train_data, Batching(32, 32, 1, 1), rank=0, seed=0, shuffle=True, to_device=lambda b: b,
        ...             prefetch=-1)
        Traceback (most recent call last):
        ...
        ValueError: prefetch=-1; use a number of windows >= 0 (default 2; 0: none)
    """
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r}; use a number of windows >= 0 (default {DEFAULT_PREFETCH}; 0: none)")
    kw: dict[str, Any] = dict(
        batching=batching,
        rank=rank,
        seed=seed,
        shuffle=shuffle,
        to_device=to_device,
        drop_last=drop_last,
        prefetch=prefetch,
        device=device,
        all_reduce=all_reduce,
    )
    if isinstance(data, DataLoader):
        if drop_last:
            raise ValueError(
                "Engine(drop_last=True) drops the partial last global batch of a Dataset, tensors or a stream; a "
                "DataLoader makes its own batches: pass DataLoader(..., drop_last=True) and leave Engine's "
                "drop_last off"
            )
        return LoaderSource(data, **kw)
    tensors = tensor_data(data)
    if tensors is not None and collate_fn is None:
        source: Source = TensorSource(tensors, **kw)
    elif isinstance(data, IterableDataset):
        if num_workers > 0:
            warnings.warn(
                f"num_workers={num_workers} applies to map-style Datasets; an IterableDataset is read by one "
                "background thread of the training process. To read a stream in parallel, shard it yourself "
                "and pass a DataLoader(stream, num_workers=...)",
                stacklevel=3,
            )
        source = StreamSource(data, collate_fn, sharded=stream_sharded, **kw)
    elif isinstance(data, dict):
        raise TypeError(
            "dict data must map names to tensors with one row per item, e.g. {'input_ids': ids, 'labels': "
            f"labels}}; got values of type {sorted({type(v).__name__ for v in data.values()})}: convert them with "
            "torch.as_tensor, or pass a list of per-item dicts"
        )
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        source = MapSource(data, collate_fn, num_workers, pin_memory, **kw)
    else:
        raise TypeError(
            f"training data of type {type(data).__name__} is not supported; pass a torch Dataset, an "
            "IterableDataset, a DataLoader, a tuple of equal-length tensors, a dict of them, or a list of samples"
        )
    if source.num_windows() == 0:
        n = getattr(source, "length", 0)
        if drop_last and n:
            raise ValueError(
                f"drop_last=True leaves no batch: the data has {n} items, fewer than batch_size="
                f"{batching.batch_size}; lower batch_size or use drop_last=False"
            )
        raise ValueError("the dataset is empty (0 items); pass a dataset with at least one item")
    return source


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors behind in-memory data (a TensorDataset or a tuple of tensors), else None.

    Example:

        >>> len(as_tensors((torch.zeros(4, 2), torch.zeros(4))))
        2
    """
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


def tensor_data(data: Any) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor] | None:
    """In-memory data as :class:`TensorSource` takes it: :func:`as_tensors`, or a dict of equal-length
    tensors (one row per item, like a TensorDataset with names), else None.

    Example:

        >>> sorted(tensor_data({"input_ids": torch.zeros(4, 3), "labels": torch.zeros(4)}))
        ['input_ids', 'labels']
    """
    if isinstance(data, dict) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
        lengths = {k: (len(t) if t.dim() else "a 0-dim tensor") for k, t in data.items()}
        if len(set(lengths.values())) != 1 or any(t.dim() == 0 for t in data.values()):
            raise ValueError(f"dict data with tensors of lengths {lengths}; give every tensor one row per item")
        return dict(data)
    return as_tensors(data)
