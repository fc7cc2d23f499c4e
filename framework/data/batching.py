"""Global batches: the same items per optimizer step at any world size and micro-batch size.

A *window* is everything that feeds one optimizer step: ``batch_size`` items
across all processes (fewer for the last window of an epoch, unless
``drop_last``). Every rank computes the same global order from ``(seed, epoch)``,
cuts it into the same windows, and keeps its own share, split into micro-batches
of at most ``micro_batch_size`` items. So the set of items behind each optimizer
step does not depend on how the work is split, which is what makes the exactness
rule in DESIGN.md hold across world sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


@dataclass
class Window:
    """This rank's micro-batches for one optimizer step.

    ``micro_batches`` may be empty on some ranks in the last window of an epoch;
    ``filler`` is then a real batch that the engine runs with zero weight, so
    the rank still joins the gradient all-reduce (no hang, no duplicate sample).

    Example:

        >>> from framework.data import Batching, make_source
        >>> source = make_source(train_data, Batching(32, 16, 2, 1), rank=0, seed=0, shuffle=False,
        ...                      to_device=lambda b: b)
        >>> window = next(source.windows(epoch=0))
        >>> window.index, len(window.micro_batches), list(window.order)
        (0, 2, [0, 16])
        >>> source.close()

        33 items on 2 processes: the last window's 1 item goes to rank 1, and rank 0 runs a filler:

        >>> x, y = train_data.tensors
        >>> source = make_source((x[:33], y[:33]), Batching(32, 16, 1, 2), rank=0, seed=0, shuffle=False,
        ...                      to_device=lambda b: b)
        >>> last = list(source.windows(epoch=0))[-1]
        >>> last.micro_batches, last.filler[0].shape
        ([], torch.Size([1, 8]))
    """

    index: int
    micro_batches: list[Any]
    filler: Any = None
    items_read: int = 0  # stream items consumed up to the end of this window (streams only)
    exhausted: bool = False  # a self-sharded stream on this rank has ended (see StreamSource)
    forwards: int = 0  # the most micro-batches any rank has in this window (FSDP runs that many on every rank)
    order: Sequence[int] = ()  # each micro-batch's place in the epoch's global order (a range: no list per step)


@dataclass
class Batching:
    """Resolved sizes: global items per step, per-forward items, accumulation steps (:func:`resolve_batching`
    works them out from the Engine's arguments).

    Example:

        >>> b = Batching(batch_size=64, micro_batch_size=16, accumulation=2, world_size=2)
        >>> b.micro_batch_size * b.accumulation * b.world_size == b.batch_size
        True
    """

    batch_size: int | None  # global items per optimizer step (None for a DataLoader without batch_size)
    micro_batch_size: int | None
    accumulation: int
    world_size: int


def resolve_batching(data: Any, batch_size: int | None, micro_batch_size: int | None, world_size: int) -> Batching:
    """Work out the accumulation steps, with an error that names values that would work.

    Example:

        >>> resolve_batching(train_data, batch_size=64, micro_batch_size=16, world_size=2)
        Batching(batch_size=64, micro_batch_size=16, accumulation=2, world_size=2)
        >>> resolve_batching(train_data, batch_size=64, micro_batch_size=24, world_size=2)
        Traceback (most recent call last):
        ...
        ValueError: batch_size=64 is not a whole number of micro_batch_size=24 x 2 process(es) = 48; ...
        Use batch_size=96 or a micro_batch_size in [1, 2, 4, 8, 16, 32]
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

    Example:

        >>> epoch_order(5, seed=0, epoch=0, shuffle=False)
        tensor([0, 1, 2, 3, 4])
        >>> torch.equal(epoch_order(5, seed=0, epoch=1, shuffle=True), epoch_order(5, seed=0, epoch=1, shuffle=True))
        True
    """
    if not shuffle:
        return torch.arange(n)
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))


def rank_share(n_items: int, world_size: int, rank: int) -> tuple[int, int]:
    """Bounds ``[lo, hi)`` of this rank's contiguous share of a window of ``n_items``.

    Shares differ by at most one item, so the last, partial window is balanced.

    Example:

        >>> rank_share(5, world_size=2, rank=1)
        (2, 5)
    """
    return rank * n_items // world_size, (rank + 1) * n_items // world_size


def most_chunks(n_items: int, world_size: int, size: int) -> int:
    """The most micro-batches of ``size`` items any rank gets from a window of ``n_items`` (see :func:`rank_share`).

    Example:

        >>> most_chunks(5, world_size=2, size=2)
        2
    """
    largest = -(-n_items // world_size)  # (rank_share's largest share: ceil(n / world_size))
    return -(-largest // size)


def split_window(
    w: int, micro: list[Any], filler: Any, n_items: int, first: int, batching: Batching, rank: int, **extra: Any
) -> Window:
    """Window ``w`` of a contiguous split (:func:`rank_share`): ``first`` is the global position of the
    window's first item, which gives each micro-batch its place in the epoch's order.

    Example:

        >>> list(split_window(0, ["a", "b"], None, 8, 0, Batching(8, 2, 2, 2), rank=1).order)
        [4, 6]
    """
    m, world = batching.micro_batch_size, batching.world_size
    assert m is not None
    start = first + rank * n_items // world  # (this rank's share starts there: rank_share)
    largest = -(-n_items // world)  # (most_chunks, inline: this runs every step)
    forwards = -(-largest // m)
    return Window(w, micro, filler, forwards=forwards, order=range(start, start + len(micro) * m, m), **extra)


def windows_per_epoch(n_items: int, batch_size: int, drop_last: bool) -> int:
    """Global batches in an epoch of ``n_items``; ``drop_last`` leaves out a partial last one.

    Example:

        >>> windows_per_epoch(1000, 64, drop_last=False), windows_per_epoch(1000, 64, drop_last=True)
        (16, 15)
    """
    return n_items // batch_size if drop_last else math.ceil(n_items / batch_size)


def chunks(seq: Any, size: int) -> list[Any]:
    """``seq`` cut into pieces of at most ``size`` (one piece, uncopied, when it fits).

    Example:

        >>> chunks([1, 2, 3], 2)
        [[1, 2], [3]]
    """
    if 0 < len(seq) <= size:  # one micro-batch: no copy (a slice is a tensor op)
        return [seq]
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def plan_windows(
    n_items: int, batching: Batching, rank: int, seed: int, epoch: int, shuffle: bool, drop_last: bool, start: int = 0
) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor]]:
    """(window index, this rank's micro-batch indices, the whole window's indices) per window of an epoch
    of map-style data, from window ``start`` on.

    Example:

        >>> w, micro, window = next(plan_windows(10, Batching(4, 2, 1, 2), rank=1, seed=0, epoch=0,
        ...                                      shuffle=False, drop_last=False))
        >>> micro, window
        ([tensor([2, 3])], tensor([0, 1, 2, 3]))
    """
    b = batching
    assert b.batch_size is not None and b.micro_batch_size is not None
    order = epoch_order(n_items, seed, epoch, shuffle)
    for w in range(start, windows_per_epoch(n_items, b.batch_size, drop_last)):
        window = order[w * b.batch_size : (w + 1) * b.batch_size]
        lo, hi = rank_share(len(window), b.world_size, rank)
        yield w, chunks(window[lo:hi] if b.world_size > 1 else window, b.micro_batch_size), window


def micro_batch_sizes(n_items: int, batching: Batching, drop_last: bool, windows: int | None = None) -> set[int]:
    """Every micro-batch size any rank gets in an epoch of ``n_items`` (over its first ``windows``).

    Example:

        >>> sorted(micro_batch_sizes(129, Batching(64, 32, 1, 2), drop_last=False))
        [0, 1, 32]
    """
    b = batching
    assert b.batch_size is not None and b.micro_batch_size is not None
    total = windows_per_epoch(n_items, b.batch_size, drop_last)
    used = total if windows is None else min(total, windows)
    sizes: set[int] = set()
    if used == 0:
        return sizes
    full = [b.batch_size] * (used - 1)
    last = min(b.batch_size, n_items - (used - 1) * b.batch_size)
    for n in {*full, last}:
        for r in range(b.world_size):
            lo, hi = rank_share(n, b.world_size, r)
            share = hi - lo
            if share == 0:
                sizes.add(0)
            sizes.update(len(c) for c in chunks(range(share), b.micro_batch_size))
    return sizes
