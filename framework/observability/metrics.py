"""Run logging: ``metrics.jsonl`` records and trackers (rank 0 only), and the window losses between log steps.

Nothing here reads a device tensor: the engine hands over Python floats that it
read on log steps only, so logging never adds a host sync.

``metrics.jsonl`` holds one JSON object per line. Every record has ``step``
(optimizer steps done) and ``epoch``. There are two kinds:

- a *train* record every ``log_every_n_steps`` steps: ``train/loss`` (mean over
  the steps since the previous train record of each step's mean loss, leaving out steps whose
  loss was non-finite; NaN only if all were), ``lr`` (first param group),
  ``train/items_per_sec`` (global items per second of training since the
  previous train record; validation time excluded), ``train/grad_norm`` (global
  gradient norm of this step, before clipping) and ``train/skipped_steps`` once
  a step was skipped;
  and ``train/<name>`` for what the module logs (``self.log``, or the extras of
  a dict that ``compute_loss`` returns; :class:`LoggedValues`);
- an *epoch* record after each complete epoch: ``epoch_time`` (seconds of
  training in the epoch, validation excluded) and, with validation data,
  ``val/loss`` and one ``val/<name>`` per ``compute_metrics`` key;
- a *stop* record, the last one of a fit: ``stop`` (why it stopped: ``"max_steps"``,
  ``"max_epochs"``, ``"max_time"``, ``"early_stopping"``, ``"callback"``, ``"preempted"`` or
  ``"interrupted"``) and ``stop_reason`` (the sentence the fit printed).

Every record also has ``time``, the wall clock (seconds since the epoch) when it was written.

The learning rate is logged by default, so there is no LearningRateMonitor.

Example:

    >>> import json
    >>> engine = framework.Engine(max_steps=2, batch_size=32, log_every_n_steps=1, run_dir="runs/digits",
    ...                           progress=False)
    >>> _ = engine.fit(Classifier(), train_data)
    >>> records = [json.loads(line) for line in open("runs/digits/metrics.jsonl")]
    >>> [(r["step"], "train/loss" in r, r.get("stop")) for r in records]
    [(1, True, None), (2, True, None), (2, False, 'max_steps')]
    >>> sorted(k for k in records[0] if not k.startswith("train/"))
    ['epoch', 'lr', 'step', 'time']
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any, NoReturn

import torch

from ..checkpoint import files


class TrainLoss:
    """The window losses since the last train record, kept on the device (no host read per step).

    ``take`` gives ``(sum, count)`` over the steps whose loss was finite on every process, as device
    tensors for the caller to read on a log step: a step the NaN policy skipped does not turn the
    logged ``train/loss`` into NaN (``train/skipped_steps`` counts it instead). ``reduce`` sums a
    tensor over processes in place (``Runtime.all_reduce_sum``).

    Example:

        >>> losses = TrainLoss(reduce=lambda t: t, device=torch.device("cpu"))   # one process: nothing to sum
        >>> for loss in (0.5, float("nan"), 1.5):                                # every step
        ...     losses.add(torch.tensor(loss))
        >>> total, steps = losses.take()          # on a log step: train/loss = total / world_size / steps
        >>> total.item(), steps.item()            # the NaN step is left out
        (2.0, 2)
    """

    FOLD = 1024  # steps held at most before they are summed (long log intervals)

    def __init__(self, reduce: Any, device: Any, capacity: int = FOLD) -> None:
        import torch

        self._reduce = reduce
        self._capacity = max(1, min(capacity, self.FOLD))  # (the steps between log steps, say)
        # On a GPU the step's own loss tensors are kept: no kernel per step. On CPU each is copied
        # into a slot of one buffer instead (under 1 us): a small tensor kept alive per step,
        # allocated among the step's large freed activations, fragments glibc's heap (peak resident
        # memory of a 784-1024-1024-10 MLP grew from 1.0x to 1.1-1.3x the raw loop's over 200 steps).
        self._slots: list[Any] | None = None
        if device.type == "cpu":
            self._buffer = torch.empty(self._capacity, dtype=torch.float64, device=device)
            self._slots = list(self._buffer.unbind(0))  # (views made once: indexing per step costs 0.5 us)
        self._open: list[Any] = []
        self._n = 0
        self._folded: tuple[Any, Any] | None = None
        self._latest: Any = None

    def add(self, loss: Any) -> None:
        if self._slots is None:
            self._open.append(loss)
            self._latest = loss
        else:
            self._latest = self._slots[self._n]
            self._latest.copy_(loss)
        self._n += 1
        if self._n == self._capacity:
            self._fold()

    def latest(self) -> Any:
        """The loss of the step added last, on the device (None before the first): the progress bar's figure.

        Example:

            >>> losses = TrainLoss(reduce=lambda t: t, device=torch.device("cpu"))
            >>> print(losses.latest())
            None
            >>> losses.add(torch.tensor(0.25))
            >>> losses.latest()
            tensor(0.2500, dtype=torch.float64)
        """
        return self._latest

    @property
    def pending(self) -> bool:
        """Steps added since the last :meth:`take`.

        Example:

            >>> losses = TrainLoss(reduce=lambda t: t, device=torch.device("cpu"))
            >>> losses.add(torch.tensor(0.25))
            >>> losses.pending, losses.take() is not None, losses.pending
            (True, True, False)
        """
        return self._n > 0 or self._folded is not None

    def take(self) -> tuple[Any, Any]:
        self._fold()
        assert self._folded is not None, "take() needs at least one add() since the last take()"
        folded, self._folded = self._folded, None
        return folded

    def _fold(self) -> None:
        if not self._n:
            return
        import torch

        values = torch.stack(self._open) if self._slots is None else self._buffer[: self._n]
        self._open.clear()
        self._n = 0
        # Per step, summed over processes first: a step counts only if its loss is finite everywhere.
        per_step = self._reduce(values.double())
        ok = torch.isfinite(per_step)
        total, count = torch.where(ok, per_step, 0.0).sum(), ok.sum()
        if self._folded is not None:
            total, count = total + self._folded[0], count + self._folded[1]
        self._folded = (total, count)


class LoggedValues:
    """What the module logs (``self.log(name, value)`` in ``forward``/``compute_loss``, or the extras of a
    ``{"loss": ..., **extras}`` that ``compute_loss`` returns) since the last train record, kept on the device
    and weighted as ``train/loss`` is: ``train/<name>`` = over the steps since the last record, the mean of
    each step's value, which is the sum over the step's micro-batches and processes of
    ``value_i * n_i * world_size / N`` divided by ``world_size`` (the item-weighted mean over the global
    batch). A step whose value is not finite is left out of that name's mean (NaN only if all were).

    The names are fixed by the fit's first step: every real micro-batch logs the same names (per alternating
    phase; a name in one phase only), every process the same ones (checked with one collective at the first
    record). Nothing is read per step: :meth:`take` gives device tensors for the record's one host read.

    Example:

        >>> from framework.parallel.runtime import make_runtime
        >>> logged = LoggedValues(make_runtime())
        >>> for acc in (0.5, 1.0):                # two steps of one micro-batch each (weight 1: all the items)
        ...     logged.add(None, {"acc": torch.tensor(acc)}, weight=1.0, owner="Classifier")
        ...     logged.end_step()
        >>> names, total, count = logged.take()   # on a log step: train/acc = total / world_size / count
        >>> names, total.tolist(), count.tolist()
        (['acc'], [1.5], [2])
    """

    def __init__(self, rt: Any) -> None:
        self._rt = rt
        self._expected: dict[str | None, frozenset[str]] = {}  # the names each phase logs
        self._order: list[str] | None = None  # the names of the fit, sorted (fixed at its first step)
        self._window: dict[str, Any] = {}  # this step: sum of value * weight per name
        self._steps: list[Any] = []  # one [names] vector per step since the last take
        self._agreed = False
        self.active = False  # something was logged in this fit: every real micro-batch is checked from now on

    def add(self, phase: str | None, values: dict[str, Any], weight: Any, owner: str) -> None:
        """One real micro-batch's values (``weight``: its loss weight, ``n_i * world_size / N``)."""
        self.active = True
        expected = self._expected.get(phase)
        if expected is None:
            if self._order is not None:
                self._mismatch(owner, phase, values, frozenset(), "the fit's first step logged none there")
            expected = self._expected[phase] = frozenset(values)
        elif values.keys() != expected:
            self._mismatch(owner, phase, values, expected, "")
        window = self._window
        for name, value in values.items():
            part = (value.double() if isinstance(value, torch.Tensor) else value) * weight
            window[name] = part if name not in window else window[name] + part

    def _mismatch(
        self, owner: str, phase: str | None, values: dict[str, Any], expected: frozenset[str], why: str
    ) -> NoReturn:
        from ..doctor.findings import LoopError

        where = f" in phase {phase!r}" if phase is not None else ""
        raise LoopError(
            f"{owner} logged {sorted(values)}{where} (self.log or compute_loss's dict), but earlier micro-batches "
            f"logged {sorted(expected)}{'; ' + why if why else ''}. train/<name> is a mean over every item of "
            "every step, so log the same names on every micro-batch: compute the value each time (e.g. "
            "self.log('acc', acc) on every call, not only now and then)",
            "loss_value",
        )

    def end_step(self) -> None:
        """The step is over: keep its values (zeros on a rank whose micro-batches were all fillers)."""
        if self._order is not None and not self._order:
            return  # (a fit that logs nothing: the per-step cost is this check)
        window, self._window = self._window, {}
        if self._order is None:  # the fit's first step fixes the names
            self._order = sorted(window)
            seen: set[str] = set()
            for names in self._expected.values():
                if seen & names:
                    self._mismatch("compute_loss", None, dict.fromkeys(names), frozenset(seen),
                                   "a name is logged in one phase only")  # fmt: skip
                seen |= names
        if not self._order:
            return
        device = self._rt.device
        self._steps.append(torch.stack([
            t if isinstance(t := window.get(name, 0.0), torch.Tensor)
            else torch.full((), float(t), dtype=torch.float64, device=device)
            for name in self._order
        ]))  # fmt: skip

    def take(self) -> tuple[list[str], Any, Any] | None:
        """On a log step (every rank): ``(names, total, count)`` since the last take, summed over processes,
        as device tensors; None when the fit logs nothing."""
        if not self._agreed:
            self._agree()
        if not self._order or not self._steps:
            return None
        values = self._rt.all_reduce_sum(torch.stack(self._steps))  # [steps, names]: each step summed over ranks
        self._steps = []
        ok = torch.isfinite(values)
        return self._order, torch.where(ok, values, 0.0).sum(0), ok.sum(0)

    def _agree(self) -> None:
        """Every process logs the same names (one all-reduce, at the fit's first record; several processes)."""
        import zlib

        self._agreed = True
        rt = self._rt
        if rt.world_size == 1:
            return
        h = float(zlib.crc32("\0".join(self._order or []).encode()))
        both = rt.all_reduce_max(torch.tensor([h, -h], dtype=torch.float64, device=rt.device)).tolist()
        if both[0] != -both[1]:
            from ..doctor.findings import LoopError

            raise LoopError(
                f"the processes log different names with self.log (or compute_loss's dict): this one logs "
                f"{self._order or []}; log the same names on every rank (train/<name> is reduced over them)",
                "loss_value",
            )


class MetricsLog:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl``, stamped with the wall-clock ``time``
    (seconds since the epoch) it was written at; also forwards the numbers to trackers.

    ``tracker`` is an ``accelerate.Accelerator`` whose trackers were started by
    :func:`start_trackers` (or anything with ``log(values, step=...)``); ``close``
    finishes its trackers. Only the main process writes. ``resumed_at=(step, epoch)``, the position
    of the checkpoint a run resumes from, first drops the records that run will log again
    (``dropped`` says how many).

    Example:

        >>> log = MetricsLog("runs/x", is_main=True)
        >>> log.write({"step": 10, "epoch": 0, "train/loss": 0.5})
        >>> log.close()
        >>> print(open("runs/x/metrics.jsonl").read(), end="")
        {"step": 10, "epoch": 0, "train/loss": 0.5, "time": ...}
    """

    def __init__(
        self, run_dir: str | None, is_main: bool, tracker: Any = None, resumed_at: tuple[int, int] | None = None
    ) -> None:
        self.is_main = is_main
        self.tracker = tracker if is_main else None
        self._file: IO[str] | None = None
        self.dropped = 0  # records that resumed_at cut off
        if run_dir is not None and is_main:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            if resumed_at is not None:
                self.dropped = _cut_after(path, *resumed_at)
            # Append: a resumed run continues the same file (never through a planted link).
            self._file = files.open_append(Path(path))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (needs ``step``) and send its numbers to the trackers, on the main process.

        Example:

            >>> log = MetricsLog("runs/x", is_main=True)
            >>> log.write({"step": 20, "epoch": 0, "val/loss": 0.41})
            >>> MetricsLog("runs/x", is_main=False).write({"step": 20, "epoch": 0, "val/loss": 0.5})  # rank 1: no-op
            >>> log.close()
            >>> len(open("runs/x/metrics.jsonl").readlines())
            1
        """
        if not self.is_main:
            return
        if self._file is not None:
            stamped = {**record, "time": round(time.time(), 3)} if "time" not in record else record
            self._file.write(json.dumps(stamped, allow_nan=True) + "\n")
            self._file.flush()  # a crash (or a kill) loses nothing that was logged
        if self.tracker is not None:
            values = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
            self.tracker.log(values, step=record.get("step"))

    def close(self) -> None:
        """Close the file and finish the trackers (idempotent).

        Example:

            >>> log = MetricsLog("runs/x", is_main=True)
            >>> log.close()
            >>> log.close()                           # idempotent
            >>> log.write({"step": 1, "epoch": 0})    # after close: not written
            >>> open("runs/x/metrics.jsonl").read()
            ''
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tracker is not None:
            finish_trackers(self.tracker)
            self.tracker = None


def _cut_after(path: str, step: int, epoch: int) -> int:
    """Drop the records of ``path`` that a run resumed at (``step``, ``epoch``) logs again: records of
    later steps, epoch records of ``epoch`` or later (that epoch had not ended at the checkpoint),
    a stop record from that step on (the run did not stop there after all) and a line a kill cut
    short. Returns how many went.

    Otherwise the killed run's records of those steps would appear twice. Rewritten atomically, so a
    crash here leaves the old file whole.
    """
    files.refuse_symlink(Path(path))  # (it is read, then replaced: a link would hide another run's log)
    if not os.path.isfile(path):
        return 0
    dropped, mended = 0, False
    tmp = f"{path}.tmp"
    # (line by line: a long run's log can be large; the temp file is never opened through a link)
    with open(path) as src, files.open_rewrite(Path(tmp)) as dst:
        for line in src:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # (only a write the kill interrupted is not a whole JSON line)
                continue
            later = record.get("step", 0) > step or ("epoch_time" in record and record.get("epoch", 0) >= epoch)
            if later or ("stop" in record and record.get("step", 0) >= step):  # (the run goes on from there)
                dropped += 1
                continue
            if not line.endswith("\n"):  # (the next record would be appended to this line)
                line, mended = line + "\n", True
            dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())  # (renamed over the log below: it must be on disk first)
    if dropped or mended:
        os.replace(tmp, path)
    else:
        os.remove(tmp)
    return dropped


def start_trackers(
    accelerator: Any, log_with: Any, run_dir: str | None, config: dict[str, Any], resumed_at: int | None = None
) -> Any:
    """Start the Accelerate trackers named in ``log_with`` (main process only); return what to log to.

    Returns ``accelerator`` on the main process when trackers were asked for,
    else None. The project name is the run directory's name, so TensorBoard
    writes its event files under ``RUN_DIR/<name>/`` (view them with
    ``tensorboard --logdir RUN_DIR``). ``config`` is logged as hyperparameters,
    flattened to the scalar types every tracker accepts. A run resumed at step
    ``resumed_at`` has TensorBoard hide the events that the run it resumes logged
    after that step (``purge_step``), as ``metrics.jsonl`` drops them: the resumed
    run logs those steps again.

    Raises ImportError on every process when a named tracker's package is
    missing: Accelerate would drop it with only a debug message, and a run that
    was meant to be tracked would go untracked.

    The Engine does it for ``Engine(log_with=["tensorboard"], run_dir="runs/x")``: ``start_trackers(rt.accelerator,
    ["tensorboard"], "runs/x", config)`` becomes the ``tracker`` of :class:`MetricsLog`.
    """
    if not log_with:
        return None
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import LoggerType

    requested = [log_with] if isinstance(log_with, (str, LoggerType, GeneralTracker)) else list(log_with)
    names = [str(t) for t in requested if isinstance(t, (str, LoggerType)) and str(t) != "all"]
    active = {str(t) for t in accelerator.log_with}
    missing = [n for n in names if n not in active]
    if missing:
        raise ImportError(
            f"log_with={names} but {missing} is not installed (Accelerate would silently skip it); "
            f"pip install {' '.join(missing)}, or drop it from log_with"
        )
    if not accelerator.is_main_process:
        return None
    project = os.path.basename(os.path.abspath(run_dir)) if run_dir else "framework"
    if run_dir is not None:  # (the run dir actually used: a fresh version of the Engine's run_dir, say)
        accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = run_dir
    init_kwargs = {"tensorboard": {"purge_step": resumed_at + 1}} if resumed_at is not None else None
    accelerator.init_trackers(project, config=tracker_config(config), init_kwargs=init_kwargs)
    return accelerator


def finish_trackers(accelerator: Any) -> None:
    """Close the trackers that :func:`start_trackers` started, keeping the process group alive.

    Why not ``accelerator.end_training()``: it also destroys the process group,
    so under DDP a later ``engine.validate`` or a second ``fit`` would fail.
    """
    trackers = getattr(accelerator, "trackers", None)
    if not trackers:
        return
    for tracker in trackers:
        tracker.finish()
    trackers.clear()  # a second fit on the same engine starts fresh ones


def tracker_config(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """``config`` with only the value types trackers accept (TensorBoard's hparams refuse lists and None).

    Example:

        >>> tracker_config({"lr": 0.1, "log_with": ["tensorboard"], "max_time": None})
        {'lr': 0.1, 'log_with': "['tensorboard']"}
    """
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):  # (config.json's "resolved" part: resolved/world_size, ...)
            out.update({f"{key}/{k}": v for k, v in tracker_config(value).items()})
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out
