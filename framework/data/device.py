"""Copying a window to the GPU ahead of the step: pinned memory, ``non_blocking``, a side CUDA stream.

A copy on the training stream would queue behind the current step's kernels; on a
stream of its own it runs while they do. Two rules make that safe:

- the training stream waits for the copy (``wait_event`` on an event recorded after
  it) before it reads the batch, and
- each copied tensor is marked as used by the training stream (``record_stream``):
  the caching allocator gave its memory to the side stream, and without the mark it
  would hand that memory to the next copy as soon as the training thread drops the
  tensor, while kernels queued on the training stream may still read it.

The host side is pinned first (a plain memcpy into page-locked memory), which is what
lets ``non_blocking=True`` return at once; the pinned block goes back to torch's caching
host allocator, which keeps it until the copy that reads it has finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .batching import Window


class DeviceCopier:
    """Moves windows to one CUDA device on its own stream; ``start`` in any thread, ``finish`` in the
    training thread before the window is used: ``finish(start(window))`` is the window on the device, its
    copies queued on the side stream and waited for by the training stream, its tensors marked. Needs CUDA.
    """

    def __init__(self, device: torch.device, fallback: Callable[[Any], Any]) -> None:
        assert device.type == "cuda", device
        self.device = device
        self.fallback = fallback  # for what is neither a tensor nor a container of them (e.g. a BatchEncoding)
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def start(self, window: Window) -> tuple[Window, Any]:
        """Queue the window's host-to-device copies on the side stream; (window on device, its event)."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            micro = [self._copy(b) for b in window.micro_batches]
            filler = None if window.filler is None else self._copy(window.filler)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return dataclasses.replace(window, micro_batches=micro, filler=filler), event

    def finish(self, pending: tuple[Window, Any]) -> Window:
        """Make the training thread's current stream wait for the copies, and mark every tensor as used
        by it."""
        window, event = pending
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for batch in (*window.micro_batches, window.filler):
            _each_tensor(batch, lambda t: t.record_stream(stream) if t.is_cuda else None)
        if window.micro_batches and not _plain(window.micro_batches[0]):
            # Objects we could not copy on the side stream go the ordinary way, on this stream.
            window.micro_batches = [self.fallback(b) for b in window.micro_batches]
        if window.filler is not None and not _plain(window.filler):
            window.filler = self.fallback(window.filler)
        return window

    def _copy(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            if batch.device.type == "cpu" and not batch.is_pinned():
                batch = batch.pin_memory()
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*(self._copy(v) for v in batch))
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._copy(v) for v in batch)
        if isinstance(batch, Mapping):
            return type(batch)({k: self._copy(v) for k, v in batch.items()})  # type: ignore[call-arg]
        return batch  # (anything else: finish() hands it to the fallback, or leaves a plain value be)


def _each_tensor(batch: Any, fn: Callable[[torch.Tensor], Any]) -> None:
    if isinstance(batch, torch.Tensor):
        fn(batch)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _each_tensor(v, fn)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _each_tensor(v, fn)


def _plain(batch: Any) -> bool:
    """Only tensors, containers and values without a ``.to`` (nothing the fallback would move)."""
    if isinstance(batch, torch.Tensor):
        return True
    if isinstance(batch, (list, tuple)):
        return all(_plain(v) for v in batch)
    if isinstance(batch, Mapping):
        return all(_plain(v) for v in batch.values())
    return not callable(getattr(batch, "to", None))
