"""What a run records about itself: the resolved config (``config.json``) and the model summary; and
whether a run dir already holds another run, or is in use by one right now."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
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

    Example:

        >>> print(earlier_run("runs/digits"))
        None
        >>> _ = framework.Engine(max_steps=2, batch_size=32, run_dir="runs/digits", progress=False).fit(
        ...     Classifier(), train_data)
        >>> earlier_run("runs/digits")
        'checkpoints up to step-00000002'
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

    Example:

        >>> import os
        >>> refuse_earlier_run("runs/digits")                 # a new dir: fine
        >>> os.makedirs("runs/digits")
        >>> with open("runs/digits/metrics.jsonl", "w") as f:
        ...     print('{"step": 1, "epoch": 0}', file=f)
        >>> refuse_earlier_run("runs/digits")
        Traceback (most recent call last):
        ...
        ValueError: run_dir='runs/digits' already holds an earlier run (a metrics.jsonl); ... Fix: pass
        resume='auto' to continue that run, or build the Engine again (it then picks a fresh dir beside it)
    """
    what = earlier_run(run_dir) if run_dir is not None else None
    if what is not None:
        raise ValueError(
            f"run_dir={str(run_dir)!r} already holds an earlier run ({what}); a fresh run there would mix its "
            "checkpoints and metrics with that run's (keep_last would prune the new checkpoints first, and "
            "resume='auto' would pick the old ones). It started there after this Engine chose the dir. Fix: pass "
            "resume='auto' to continue that run, or build the Engine again (it then picks a fresh dir beside it)"
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

    Example:

        >>> from framework.parallel.runtime import make_runtime
        >>> runtime = make_runtime()
        >>> with run_dir_lock("runs/exp1", runtime):         # write checkpoints and metrics in here
        ...     with run_dir_lock("runs/exp1", runtime):     # a second fit into the same dir
        ...         pass
        Traceback (most recent call last):
        ...
        framework.observability.run_info.RunDirInUse: run_dir='runs/exp1' is in use by the fit of pid ... on host
        ...: two runs would interleave their checkpoints and metrics.jsonl. Fix: wait for that run to end ...
        >>> with run_dir_lock("runs/exp1", runtime):         # released: free again
        ...     pass
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


_VERSION = r"-([2-9]|[1-9][0-9]+)"  # base-2, base-3, ... (no leading zeros: base-02 is not a version)


def run_versions(base: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """The versions of ``base`` that hold a run (:func:`earlier_run`), oldest first: ``(1, base)`` for
    ``base`` itself, ``(n, base-n)`` for its siblings ``base-2``, ``base-3``, ...

    Example:

        >>> import os
        >>> for run in ("runs/digits", "runs/digits-2", "runs/digits-x"):
        ...     os.makedirs(run)
        ...     with open(f"{run}/metrics.jsonl", "w") as f:
        ...         print('{"step": 1, "epoch": 0}', file=f)
        >>> run_versions("runs/digits")
        [(1, 'runs/digits'), (2, 'runs/digits-2')]
    """
    root = Path(base)
    pattern = re.compile(re.escape(root.name) + _VERSION)
    found = [(1, str(base))] if earlier_run(root) is not None else []
    parent = root.parent
    if root.name and parent.is_dir():
        for entry in os.scandir(parent):
            m = pattern.fullmatch(entry.name)
            if m and entry.is_dir() and earlier_run(entry.path) is not None:
                found.append((int(m.group(1)), f"{base}-{m.group(1)}"))
    return sorted(found)


def run_dir_for(base: str | os.PathLike[str], resume: Any = None) -> str:
    """The run dir a run given ``run_dir=base`` uses: the one rule of the Engine and the recipes.

    - a fresh run (``resume=None``): ``base`` while no run has used it or a version of it, else
      ``base-(n+1)`` for the highest version ``base-n`` that holds a run (``base`` itself is version 1).
      So running a script twice works, and two runs never share a dir (Lightning's ``version_N``,
      as siblings: ``runs/digits``, ``runs/digits-2``, ...);
    - ``resume="auto"``: the newest run, i.e. the highest version that holds one (the last fresh run
      started from ``base``); ``base`` if none does (the run starts there);
    - ``resume=<a checkpoint path>``: ``base`` as given (the run continues or branches there).

    "Holds a run" means checkpoints or a non-empty ``metrics.jsonl`` (:func:`earlier_run`).

    Example:

        >>> import os
        >>> run_dir_for("runs/digits")
        'runs/digits'
        >>> os.makedirs("runs/digits")
        >>> with open("runs/digits/metrics.jsonl", "w") as f:    # a run used it
        ...     print('{"step": 1, "epoch": 0}', file=f)
        >>> run_dir_for("runs/digits"), run_dir_for("runs/digits", resume="auto")
        ('runs/digits-2', 'runs/digits')
    """
    base = str(base)
    if resume is not None and resume != "auto":
        return base
    used = run_versions(base)
    if resume == "auto":
        return used[-1][1] if used else base
    return f"{base}-{used[-1][0] + 1}" if used else base


def describe_run_dir(base: str, chosen: str, resume: Any) -> str:
    """The line a fit prints about its run dir (rank 0, whatever ``progress`` is).

    Example:

        >>> describe_run_dir("runs/digits", "runs/digits-2", None)
        'run_dir: runs/digits-2 (runs/digits holds an earlier run; a fresh run starts beside it, never in it)'
        >>> describe_run_dir("runs/digits", "runs/digits", "auto")
        'run_dir: runs/digits'
    """
    if chosen == base:
        return f"run_dir: {chosen}"
    if resume == "auto":
        return f"run_dir: {chosen} (the newest run of {base}; resume='auto' continues it)"
    return f"run_dir: {chosen} ({base} holds an earlier run; a fresh run starts beside it, never in it)"


def agree_on_run_dir(run_dir: str, rt: Runtime) -> str:
    """Rank 0's ``run_dir`` on every rank (one broadcast, once per engine; a no-op on one process): the ranks
    decide it alone when the Engine is built, and a run that another one started in between must still
    write one dir from every rank.

    Example:

        >>> from framework.parallel.runtime import make_runtime
        >>> agree_on_run_dir("runs/digits", make_runtime())     # one process: its own
        'runs/digits'
    """
    if rt.world_size == 1:
        return run_dir
    data = os.fsencode(run_dir)
    if len(data) > _MAX_PATH:
        raise ValueError(f"run_dir={run_dir!r} is longer than {_MAX_PATH} bytes; use a shorter path")
    buffer = torch.zeros(_MAX_PATH + 1, dtype=torch.int64, device=rt.device)
    buffer[0] = len(data)
    buffer[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.int64)
    rt.broadcast([buffer], src=0)
    values = buffer.tolist()
    return os.fsdecode(bytes(values[1 : 1 + values[0]]))


_MAX_PATH = 4096


def write_config(
    config: EngineConfig, callbacks: list[Any], max_steps: int | None, module: nn.Module, optimizers: Optimizers,
    batching: Batching, rt: Runtime, strategy: str,
) -> dict[str, Any]:  # fmt: skip
    """Write ``config.json`` (rank 0, with a run_dir): the validated arguments
    (:meth:`framework.config.EngineConfig.to_json`, by their Engine names) and, under ``"resolved"``, what the
    run made of them (world size, accumulation, micro-batch, precision, device, strategy, ...); return it
    (trackers get it too).

    Example:

        >>> import json
        >>> _ = framework.Engine(max_steps=2, batch_size=32, micro_batch_size=16, run_dir="runs/x",
        ...                      progress=False).fit(Classifier(), train_data)
        >>> written = json.load(open("runs/x/config.json"))
        >>> written["batch_size"], written["resolved"]["accumulation"], written["resolved"]["strategy"]
        (32, 2, 'single')
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
        # What two runs differ in, beyond the Engine's arguments: the optimizers' hyper-parameters per param
        # group, the schedulers' and the callbacks' settings.
        "optimizer_settings": {o.name: optimizer_settings(o.optimizer) for o in optimizers},
        "scheduler_settings": {o.name: settings_of(o.scheduler) for o in optimizers if o.scheduler is not None},
        "callback_settings": [{"class": type(cb).__name__, **settings_of(cb)} for cb in callbacks],
    }
    if rt.is_main and (config.checkpoint.run_dir is not None or config.logging.log_with):
        written["run"] = run_record()  # (a git call: only where something records it)
    run_dir = config.checkpoint.run_dir
    if run_dir is None or not rt.is_main:
        return written
    os.makedirs(run_dir, exist_ok=True)
    # (atomic and never through a planted link: a symlinked config.json would overwrite another file)
    files.write_atomic(Path(run_dir) / "config.json", json.dumps(written, indent=2).encode())
    return written


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's class and each param group's hyper-parameters (lr, betas, weight_decay, ...; the
    parameters by count), as ``config.json`` records them.

    Example:

        >>> settings = optimizer_settings(torch.optim.AdamW(Classifier().parameters(), lr=3e-4))
        >>> settings["class"], settings["param_groups"][0]["params"], settings["param_groups"][0]["betas"]
        ('AdamW', 2, [0.9, 0.999])
    """
    from ..config import jsonable

    def value(v: Any) -> Any:  # (a tensor lr, say, as its number: one read per fit)
        return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else jsonable(v)

    groups = [{"params": len(g["params"]), **{k: value(v) for k, v in g.items() if k != "params"}}
              for g in optimizer.param_groups]  # fmt: skip
    return {"class": type(optimizer).__name__, "param_groups": groups}


def settings_of(obj: Any) -> dict[str, Any]:
    """The settings of a scheduler or a callback: the attributes named like its ``__init__``'s parameters
    (all its public attributes where ``__init__`` takes none) whose values are numbers, strings, booleans,
    None or lists of them (an optimizer reference or a LambdaLR's functions are left out).

    Example:

        >>> from framework import EarlyStopping
        >>> settings_of(EarlyStopping(patience=5))
        {'monitor': 'val/loss', 'patience': 5, 'mode': 'min', 'min_delta': 0.0}
    """
    import inspect

    try:
        names = [n for n, p in inspect.signature(type(obj).__init__).parameters.items()
                 if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    except (TypeError, ValueError):  # (a builtin __init__ without a signature)
        names = []
    attributes = vars(obj) if hasattr(obj, "__dict__") else {}
    keys = [n for n in names if n in attributes] if names else [k for k in attributes if not k.startswith("_")]
    out: dict[str, Any] = {}
    for key in keys:
        value = attributes[key]
        if isinstance(value, (list, tuple)) and all(_plain(v) for v in value):
            out[key] = list(value)
        elif _plain(value):
            out[key] = value
    return out


def _plain(value: Any) -> bool:
    """JSON that every reader takes: no NaN or infinity."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def run_record() -> dict[str, Any]:
    """Where and how this run started: the versions of python, torch, accelerate and the framework, the host,
    the command line, the start time and, when the script lives in a git checkout, its commit (and whether the
    tree had uncommitted changes). Never fails: what cannot be found is None.

    Example:

        >>> record = run_record()        # e.g. record["git"]: {"commit": "4aef9da...", "dirty": False}
        >>> sorted(record), record["torch"] == torch.__version__
        (['accelerate', 'argv', 'cwd', 'framework', 'git', 'host', 'python', 'started', 'torch'], True)
    """
    import platform
    import sys
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": version("accelerate"),
        "framework": version("framework"),
        "git": git_state(Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] not in ("", "-c") else None),
    }


@functools.lru_cache(maxsize=8)  # (once per process and place: a notebook's fits do not call git again)
def git_state(where: Path | None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``where`` (the current directory if None), or None
    where there is none or no ``git`` (a few ms; a hung git is given up after 5 s), e.g.
    ``git_state(Path("recipes"))`` in this repository: ``{"commit": "4aef9da...", "dirty": True}``.
    """
    import subprocess

    cwd = str(where) if where is not None and where.is_dir() else None

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def summary(module: nn.Module, rt: Runtime, batching: Batching, nan_check: str = "step", strategy: str = "") -> str:
    """The model summary printed at fit start: parameters per top-level child, precision, world, batching,
    and when the NaN guard's verdict is read (``nan_check``: "step" or "deferred").

    Example:

        >>> from framework.data import Batching
        >>> from framework.parallel.runtime import make_runtime
        >>> print(summary(Classifier(), make_runtime(), Batching(32, 16, 2, 1), nan_check="step"))
        Classifier: parameters (total / trainable) per top-level child
          net                            27           27
          total                          27           27
        precision=no world_size=1 device=... global_batch=32 micro_batch=16 accumulation=2 nan_check=step
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
