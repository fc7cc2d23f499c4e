"""What a run records about itself: the resolved config (``config.json``) and the model summary; and
whether a run dir already holds another run, or is in use by one right now."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint import files
from ..checkpoint.store import list_checkpoints
from ..data import Batching
from ..optim import Optimizers
from ..parallel.runtime import Runtime

if TYPE_CHECKING:
    from ..config import EngineConfig


def earlier_run(run_dir: str | os.PathLike[str]) -> str | None:
    """What in ``run_dir`` shows that a run used it (its checkpoints, or its metrics.jsonl), or None.

    Example::

        earlier_run("runs/digits")   # "checkpoints up to step-00000270", or None for a new dir
    """
    root = Path(run_dir)
    found = list_checkpoints(root / "checkpoints")
    if found:
        return f"checkpoints up to {found[-1].path.name}"
    metrics = root / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics.jsonl"
    return None


def refuse_earlier_run(run_dir: str | os.PathLike[str] | None) -> None:
    """Raise if a fresh run (no ``resume``) would start in a run dir that holds another run.

    Its checkpoints there would be pruned as older than the earlier run's higher-numbered ones,
    ``resume="auto"`` would then continue the earlier run, and ``metrics.jsonl`` would mix both.

    Example::

        refuse_earlier_run("runs/digits")   # ValueError if runs/digits/checkpoints/step-* exist
    """
    what = earlier_run(run_dir) if run_dir is not None else None
    if what is not None:
        raise ValueError(
            f"run_dir={str(run_dir)!r} already holds an earlier run ({what}); a fresh run there would mix its "
            "checkpoints and metrics with that run's (keep_last would prune the new checkpoints first, and "
            "resume='auto' would pick the old ones). Fix: pass resume='auto' to continue that run, or use a "
            "new run_dir (or delete the old one)"
        )


class RunDirInUse(RuntimeError):
    """Another process is running a fit that writes to this run dir."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike[str] | None, rt: Runtime) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while a fit writes to ``run_dir``. Raise on every process, before anything
    is written, if another fit holds it (:class:`RunDirInUse`, naming the holder) or the main process
    cannot create it (its ``OSError``; the other processes raise :class:`RunDirInUse`).

    Two runs writing one run dir would interleave their checkpoints (``keep_last`` pruning each
    other's) and ``metrics.jsonl`` lines, and both pass :func:`refuse_earlier_run` if they start
    together. The lock is an OS file lock (``flock``) taken by the main process: the OS releases
    it when that process dies, so a killed run never leaves a stale lock behind, and
    ``resume="auto"`` after a crash just works. The file itself stays (it names the last holder).

    Example::

        with run_dir_lock("runs/exp1", runtime):
            ...   # write checkpoints and metrics
    """
    fd: int | None = None
    error: Exception | None = None
    if run_dir is not None and rt.is_main:
        try:
            fd, holder = _try_lock(Path(run_dir))
        except OSError as e:  # (the run dir cannot be created or opened: the error says why)
            error = e
        else:
            if holder is not None:
                error = RunDirInUse(
                    f"run_dir={str(run_dir)!r} is in use by {holder}: two runs would interleave their checkpoints "
                    "and metrics.jsonl. Fix: wait for that run to end (or stop it), or give this run its own run_dir"
                )
    if rt.world_size > 1:  # every rank raises (rank 0 alone would leave the others waiting in a collective)
        failed = rt.all_reduce_sum(torch.tensor([float(error is not None)], device=rt.device))
        if error is None and failed.item() > 0:
            error = RunDirInUse(f"the main process could not lock run_dir={str(run_dir)!r}; see its error")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if fd is not None and fd >= 0:
            _unlock(fd)


def _try_lock(run_dir: Path) -> tuple[int | None, str | None]:
    """(open lock fd, or -1 where the filesystem has no flock; who holds the lock, or None)."""
    try:
        import fcntl
    except ImportError:  # (not POSIX: no flock)
        return -1, None
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = files.open_lock(run_dir / ".lock")  # (never through a planted link: SymlinkError, an OSError)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    except OSError as e:  # some network filesystems do not implement flock
        os.close(fd)
        warnings.warn(
            f"could not lock {run_dir / '.lock'} ({e}); two runs started into this run_dir would not be "
            "stopped from mixing their checkpoints",
            stacklevel=4,
        )
        return -1, None
    try:
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"the fit of pid {os.getpid()} on host {socket.gethostname()} (started {started})".encode(), 0)
    except OSError:  # (a full disk, say: do not keep the lock of a fit that will not run)
        _unlock(fd)
        raise
    return fd, None


def _unlock(fd: int) -> None:
    import fcntl

    # Unlock explicitly: closing alone would not release it while a process forked during the fit
    # (a DataLoader worker, persistent_workers=True) still shares the open file.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def next_free_run_dir(base: str) -> str:
    """``base`` if no run has used it, else the first of ``base-2``, ``base-3``, ... that none has: a
    default run dir for recipes, so that running a command again starts a new run beside the old one.

    Example::

        next_free_run_dir("runs/digits-mlp")   # "runs/digits-mlp", then "runs/digits-mlp-2", ...
    """
    candidate, n = base, 1
    while earlier_run(candidate) is not None:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def recipe_run_dir(explicit: str | None, default: str, resume: str | None) -> str:
    """The run dir a recipe writes to, refused before it writes anything there (its own config
    included) where a fresh run would land in another run's dir: ``explicit`` if given, else
    ``default`` to resume, else the first free of ``default``, ``default-2``, ...

    Example::

        run_dir = recipe_run_dir(cfg.run_dir, "runs/adder", cfg.resume)
    """
    if explicit is None:
        return default if resume else next_free_run_dir(default)
    if not resume:
        refuse_earlier_run(explicit)
    return explicit


def write_config(
    config: EngineConfig, callbacks: list[Any], max_steps: int | None, module: nn.Module, optimizers: Optimizers,
    batching: Batching, rt: Runtime, strategy: str,
) -> dict[str, Any]:  # fmt: skip
    """Write ``config.json`` (rank 0, with a run_dir): the validated arguments
    (:meth:`framework.config.EngineConfig.to_json`, by their Engine names) and, under ``"resolved"``, what the
    run made of them (world size, accumulation, micro-batch, precision, device, strategy, ...); return it
    (trackers get it too).

    Example::

        written = write_config(engine.config, [], None, module, optimizers, batching, runtime, "single")
        written["batch_size"], written["resolved"]["accumulation"]
    """
    written = config.to_json()  # the arguments, as validated
    written["resolved"] = {  # what the run made of them
        "callbacks": [type(cb).__name__ for cb in callbacks],
        "module": type(module).__name__,
        "optimizers": {o.name: type(o.optimizer).__name__ for o in optimizers},
        "schedulers": {o.name: type(o.scheduler).__name__ for o in optimizers if o.scheduler is not None},
        "world_size": rt.world_size,
        "accumulation": batching.accumulation,
        "global_batch": batching.batch_size,
        "micro_batch_size": batching.micro_batch_size,
        "mixed_precision": rt.mixed_precision,
        "device": str(rt.device),
        "strategy": strategy,
        "max_steps": max_steps,
    }
    run_dir = config.checkpoint.run_dir
    if run_dir is None or not rt.is_main:
        return written
    os.makedirs(run_dir, exist_ok=True)
    # (atomic and never through a planted link: a symlinked config.json would overwrite another file)
    files.write_atomic(Path(run_dir) / "config.json", json.dumps(written, indent=2).encode())
    return written


def summary(module: nn.Module, rt: Runtime, batching: Batching, nan_check: str = "step", strategy: str = "") -> str:
    """The model summary printed at fit start: parameters per top-level child, precision, world, batching,
    and when the NaN guard's verdict is read (``nan_check``: "step" or "deferred").

    Example::

        print(summary(module, runtime, batching, nan_check="step"))
    """
    lines = [f"{type(module).__name__}: parameters (total / trainable) per top-level child"]
    for name, child in module.named_children():
        total = sum(p.numel() for p in child.parameters())
        train = sum(p.numel() for p in child.parameters() if p.requires_grad)
        lines.append(f"  {name:<20} {total:>12,} {train:>12,}")
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    lines.append(f"  {'total':<20} {total:>12,} {train:>12,}")
    lines.append(
        f"precision={rt.mixed_precision} world_size={rt.world_size} device={rt.device} "
        f"global_batch={batching.batch_size} micro_batch={batching.micro_batch_size} "
        f"accumulation={batching.accumulation} nan_check={nan_check}" + (f" {strategy}" if strategy else "")
    )
    return "\n".join(lines)
