"""Checkpoints written in the background: the training thread pays only for a copy of the state.

:class:`AsyncCheckpointer` hands out writers with :class:`~framework.checkpoint_io.CheckpointWriter`'s
interface. ``prepare`` runs at once (the caller's barrier follows it); ``json`` serialises at once;
``tensors`` copies the tensors at once into host buffers that are kept and reused from one save
to the next (no allocation, no page faults: about memory bandwidth; from a GPU, into pinned
memory with ``non_blocking`` copies ordered on the current stream, which the background thread
waits for). Everything else (serialising tensors, hashing, writing, fsync, the manifest, the
rename, ``latest``, pruning) runs in one background thread.

- At most one write is in flight: a new save first waits for the previous one.
- :meth:`AsyncCheckpointer.wait` blocks until it is on disk (at preemption and at the end of a
  fit); an error of the background thread is raised there, or at the next save, as a
  :class:`CheckpointError` naming the checkpoint.
- A kill during a background write leaves the previous checkpoint intact: the new one is still
  a staging dir, which the next save removes.
- The background thread is not a daemon: a process that exits normally finishes its write first.

Memory: one extra host copy of the saved tensors (model and optimizer state) while async
checkpointing is on.

Example::

    saver = AsyncCheckpointer()
    w = saver.writer(root, "step-00000120", rank=0, world_size=1, is_main=True)
    w.prepare()
    w.tensors("model.safetensors", model.state_dict())    # copied now
    w.commit()
    w.finalize(keep_last=3)                               # returns at once
    ...
    saver.wait()                                          # on disk
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import manifest, tensorfile
from .errors import CheckpointError
from .io import CheckpointWriter


class SnapshotPool:
    """Host buffers for copies of tensors, kept per (file, name) and reused while shape and dtype match.

    Example::

        pool = SnapshotPool()
        copy = pool.copy(("model.safetensors", "net.0.weight"), weight)
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._used: set[tuple[str, str]] = set()
        self.from_gpu = False  # whether a copy of this round came from a GPU (non_blocking)

    def copy(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` in the buffer kept for ``key`` (allocated on first use)."""
        t = t.detach()
        cuda = t.device.type == "cuda"
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (cuda and not buf.is_pinned()):
            # (pinned: a device-to-host copy into it is asynchronous and runs at full bandwidth)
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=cuda)
        self._used.add(key)
        self.from_gpu |= cuda
        return buf

    def end_round(self) -> Any:
        """Drop the buffers this save did not use; returns a CUDA event to wait on (None without GPU copies)."""
        for key in set(self._buffers) - self._used:
            del self._buffers[key]
        self._used = set()
        event = None
        if self.from_gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()  # (after every copy of this round, on the stream that issued them)
        self.from_gpu = False
        return event


class DeferredWriter:
    """A :class:`~framework.checkpoint_io.CheckpointWriter` whose writes run in the background; made by
    :meth:`AsyncCheckpointer.writer`. Same methods; ``finalize`` returns the checkpoint's path at once.

    Example::

        w = saver.writer(root, "step-00000120", rank=0, world_size=1, is_main=True)
    """

    def __init__(self, owner: AsyncCheckpointer, writer: CheckpointWriter) -> None:
        self._owner, self._writer = owner, writer
        self._ops: list[Callable[[], Any]] = []
        self.staging = writer.staging

    def prepare(self) -> None:
        """Now, on the calling thread (the caller's barrier follows it)."""
        self._writer.prepare()

    def json(self, filename: str, obj: Any) -> None:
        """Serialised now (a snapshot of ``obj``), written in the background."""
        self.json_bytes(filename, json.dumps(obj).encode())

    def json_bytes(self, filename: str, data: bytes) -> None:
        """Written in the background."""
        manifest.check_file_name(filename)  # (a bad name fails here, not later in the background)
        self._ops.append(lambda: self._writer.json_bytes(filename, data))

    def tensors(self, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Copied now into reused host buffers, written in the background."""
        manifest.check_file_name(filename)
        for name, t in tensors.items():  # (what the background write would refuse fails here, at the call)
            if t.dtype not in tensorfile.DTYPES:
                raise TypeError(f"cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file")
        snapshot = {name: self._owner.pool.copy((filename, name), t) for name, t in tensors.items()}
        meta = dict(metadata) if metadata is not None else None
        self._ops.append(lambda: self._writer.tensors(filename, snapshot, meta))

    def external(self, filename: str) -> None:
        """Hashed in the background (the file must be complete before the write is submitted)."""
        manifest.check_file_name(filename)
        self._ops.append(lambda: self._writer.external(filename))

    def commit(self) -> None:
        """Queued; on a process other than the main one this submits the write."""
        self._ops.append(self._writer.commit)
        if not self._writer.is_main:
            self._owner._submit(self._writer, self._ops)

    def abort(self, reason: str) -> None:
        """Now: record this rank's failure for the main process."""
        self._writer.abort(reason)

    def finalize(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int = 0,
        mode: str = "min",
        monitor_value: float | None = None,
    ) -> Path:
        """Main process: submit the write, manifest, rename, ``latest`` and prune; returns the path it will have."""
        if not self._writer.is_main:
            raise RuntimeError("CheckpointWriter.finalize runs on the main process only")
        w = self._writer

        def finalize() -> Path:
            return w.finalize(keep_last=keep_last, keep_best=keep_best, mode=mode, monitor_value=monitor_value)

        self._owner._submit(w, [*self._ops, finalize])
        return w.root / w.name


class AsyncCheckpointer:
    """Writes checkpoints in a background thread, one at a time.

    Example::

        saver = AsyncCheckpointer()
        w = saver.writer(root, name, rank=rank, world_size=world, is_main=is_main)
        ...                         # as with CheckpointWriter
        done = saver.wait()         # the path of the checkpoint just completed, or None
    """

    def __init__(self) -> None:
        self.pool = SnapshotPool()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._name = ""
        self._final: Path | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def writer(
        self, root: Path, name: str, *, rank: int = 0, world_size: int = 1, is_main: bool = True, timeout: float = 600.0
    ) -> DeferredWriter:
        """A writer for checkpoint ``root/name``, after the previous write finished (its error raised here).

        Example::

            w = saver.writer(Path("runs/x/checkpoints"), "step-00000120", rank=0, world_size=1, is_main=True)
        """
        self.wait()  # (also: the pool's buffers are free again only once the previous write is done)
        return DeferredWriter(self, CheckpointWriter(root, name, rank=rank, world_size=world_size,
                                                     is_main=is_main, timeout=timeout))  # fmt: skip

    def _submit(self, writer: CheckpointWriter, ops: list[Callable[[], Any]]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is already in flight; get each writer from AsyncCheckpointer.writer")
        event = self.pool.end_round()

        def run() -> None:
            try:
                if event is not None:
                    event.synchronize()  # (the device-to-host copies have landed)
                for op in ops:
                    op()
            except BaseException as e:  # (handed to the training thread at its next wait)
                self._error = e
                writer.abort(f"{type(e).__name__}: {e}")

        self._name, self._final = writer.name, writer.root / writer.name
        self._thread = threading.Thread(target=run, name=f"checkpoint-{writer.name}", daemon=False)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is done; returns that checkpoint's path (on the main
        process it is complete; on the others, their part is written), or None with none in flight.
        An error of that write is raised here.

        Example::

            saver.wait()   # before exiting on preemption, and at the end of a fit
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(
                f"the background write of checkpoint {self._name} failed ({type(error).__name__}: {error}); the "
                "previous checkpoint is intact"
            ) from error
        return self._final
