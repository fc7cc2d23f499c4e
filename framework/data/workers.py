"""Worker processes for a map-style Dataset (``num_workers > 0``): a DataLoader over this rank's plan.

torch's DataLoader runs the processes (start, result order, pinning, errors re-raised in the
training process with the worker's traceback, shutdown); what it is given makes the result
independent of how many there are:

- its batch sampler is the epoch's plan, one task ``(epoch, ids)`` per micro-batch (or filler),
  in the order the windows need them, so every worker count yields the same batches;
- each worker fetches through an :class:`~framework.data.rng.ItemFetcher`, so an item's random
  draws come from its own seed, not from the worker's (probed on the worker's first micro-batch
  of the fit's first epoch, seeded only where the dataset draws from a global RNG), and reports
  which global RNGs it saw used;
- workers ignore SIGTERM and SIGUSR1: a cluster that signals every process of a job (SLURM does)
  leaves preemption to the training process, which checkpoints and then ends its workers.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .rng import ItemFetcher


class WorkerDataset(Dataset[Any]):
    """What each worker process holds: the user's dataset, fetched per task with per-item seeds.

    ``__getitems__((epoch, ids))`` returns ``(global RNGs seen used, collated batch)``.

    Example:

        >>> from framework.data import default_collate
        >>> ds = WorkerDataset(train_data, seed=0, collate_fn=default_collate)
        >>> uses, (inputs, targets) = ds.__getitems__((0, [3, 1, 4]))
        >>> uses, inputs.shape
        (0, torch.Size([3, 8]))
    """

    def __init__(
        self, dataset: Dataset[Any], seed: int, collate_fn: Callable[[list[Any]], Any], uses: int | None = None
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.fetcher = ItemFetcher(seed, restore=False)  # (a worker's RNGs serve nothing else)
        self.fetcher.uses = uses  # known from an earlier epoch, else probed on each worker's first task
        self._getitems = getattr(dataset, "__getitems__", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, task: Any) -> Any:
        raise TypeError("WorkerDataset is read with __getitems__((epoch, ids)) by its DataLoader")

    def __getitems__(self, task: tuple[int, list[int]]) -> tuple[int, Any]:
        epoch, ids = task
        if self._getitems is not None:
            samples = self.fetcher.batch(epoch, ids, self._getitems)
        else:
            samples = self.fetcher.items(epoch, ids, self.dataset.__getitem__)
        return self.fetcher.decide(), self.collate_fn(samples)


def _unbatch(data: Any) -> Any:
    return data  # the batch is collated in __getitems__ already


def _worker_init(worker_id: int) -> None:
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def worker_batches(
    dataset: WorkerDataset,
    tasks: list[tuple[int, list[int]]],
    *,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    in_flight: int,
) -> Iterator[tuple[int, Any]]:
    """``(uses, batch)`` for each task, in order, fetched by ``num_workers`` processes that end when the
    iterator does (exhausted, closed or collected) — at most about ``in_flight`` batches ahead. Tasks
    ``[(0, [0, 1]), (0, [2, 3])]`` give two batches, items 0-1 and 2-3 of epoch 0, whatever ``num_workers`` is.
    """
    if not tasks:
        return
    loader = DataLoader(
        dataset,
        batch_sampler=tasks,  # type: ignore[arg-type]
        collate_fn=_unbatch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init,
        prefetch_factor=max(1, math.ceil(in_flight / num_workers)),
        # A dedicated generator: creating the loader's iterator draws its workers' base seed from
        # it, never from the global RNG the training thread's dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )
    it = iter(loader)
    try:
        yield from it
    finally:
        _shutdown(it)


def _shutdown(it: Any) -> None:
    """End the loader's workers now, not when the iterator is collected (an exception's traceback
    can keep it alive for long); kill any that did not end in time."""
    workers = list(getattr(it, "_workers", ()))
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():  # (stuck: torch's terminate() is a SIGTERM, which our workers ignore)
            w.kill()
            w.join(timeout=5)
        if not w.is_alive():
            w.close()  # (its sentinel pipe, else closed only when the Process object is collected)
    # torch closes the index queues but lets their feeder threads end in their own time, and leaves the
    # result queue's pipe to the garbage collector: end both now, so nothing outlives the fit.
    for q in getattr(it, "_index_queues", ()):
        feeder = getattr(q, "_thread", None)
        if feeder is not None:
            feeder.join(timeout=1.0)
    results = getattr(it, "_worker_result_queue", None)
    if results is not None:
        results.cancel_join_thread()
        results.close()
        # (Queue.close closes the pipe only where this process started a feeder thread, and the training
        # process never writes to this queue: close both ends of the pipe here.)
        for end in (getattr(results, "_reader", None), getattr(results, "_writer", None)):
            if end is not None:
                end.close()
