"""What one fit works on, and what happens between its steps: :func:`prepare_fit` returns a :class:`Fit`.

A fit is given what it needs and nothing more: the validated config, the checkpointed counters, the
loop's event stream (:mod:`framework.events`), the runtime, the user's module and data, the callbacks
(whose state it checkpoints) and the engine's dict of last logged metrics. It never reaches back into
the :class:`~framework.engine.Engine`. It holds the strategy and the model it prepared, the optimizers
and one :class:`~framework.step.OptimizerStep` per group that steps together (all of them, or one per
alternating phase), the data sources, the train state registry, the EMA, the stateful metrics, the
logs and the stop flags. The engine's loop (:mod:`framework.engine`) runs the five steps; everything
between them (counters, records, validation, checkpoints, stops) is here: the engine builds one with
``prepare_fit(config, counters, events, runtime, module, train_data, val_data, callbacks=..., metrics=...)``
and iterates ``run.epoch()`` for its windows.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .checkpoint import state as train_state
from .config import EngineConfig
from .data import Batching, Source, Window, make_source, resolve_batching, warn_one_item_batches
from .data.rng import seed_everything
from .doctor.loss import split_loss
from .evaluation import check_metrics, evaluate
from .events import Event, Events, StopReason
from .guard import NanPolicy, why_not_deferred
from .module import LOGGED, LoopModule
from .observability import run_info
from .observability.metrics import LoggedValues, MetricsLog, TrainLoss, start_trackers
from .observability.progress import Progress
from .optim import EMA, Optimizers, parse_optimizers, phase_is_required, takes_phase
from .parallel import Initial, Strategy, make_strategy, tp
from .parallel.build import build, builds_itself, needs_build
from .parallel.preemption import Stops
from .parallel.runtime import Runtime
from .step import OptimizerStep


class DataPosition:
    """The data side of the train position that the counters do not hold: a user DataLoader's shuffling RNG.
    Registered in the train state as ``"data"``.
    """

    def __init__(self, source: Source) -> None:
        self.source = source

    def state_dict(self) -> dict[str, Any]:
        return {"loader_epoch_rng": getattr(self.source, "epoch_rng", None)}

    def check_state_dict(self, value: Any) -> None:
        if not isinstance(value, dict) or set(value) != {"loader_epoch_rng"}:
            raise KeyError("expected exactly {'loader_epoch_rng'}")
        rng = value["loader_epoch_rng"]
        if rng is not None and (not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8):
            raise TypeError("'loader_epoch_rng' must be a uint8 tensor or null")

    def load_state_dict(self, value: dict[str, Any]) -> None:
        if value["loader_epoch_rng"] is not None and hasattr(self.source, "resume_rng"):
            self.source.resume_rng = value["loader_epoch_rng"]


@dataclass
class Fit:
    """The objects of one fit (see the module docstring); the engine's loop calls its methods between steps."""

    config: EngineConfig
    counters: train_state.Counters
    events: Events
    rt: Runtime
    strategy: Strategy
    module: LoopModule
    model: nn.Module  # what training forwards run through (a DDP wrapper, a compiled model, the module)
    eval_model: nn.Module
    optimizers: Optimizers
    steps: list[tuple[str | None, OptimizerStep]]  # (phase name or None, its optimizer step), in order
    phases: list[str] | None  # the alternating phases, in order (None: one joint step)
    val_phases: list[str] | None  # phases whose loss validation reports (compute_loss requires `phase`)
    batching: Batching
    source: Source
    val_source: Source | None
    train_data: Any
    val_data: Any
    state: train_state.TrainState
    fingerprint: dict[str, Any]
    ema: EMA | None
    metric_objects: dict[str, Any]
    stops: Stops
    metrics: dict[str, float]  # the last logged values (the engine's dict)
    max_steps: int | None
    log: MetricsLog = field(init=False)
    progress: Progress = field(init=False)
    logged: LoggedValues = field(init=False)  # what the module logs (self.log, compute_loss's dict extras)
    losses: list[TrainLoss] = field(default_factory=list)
    grad_norms: list[torch.Tensor | None] = field(default_factory=list)
    items_sum: Any = 0
    t_log: float = 0.0
    t_epoch: float = 0.0
    n_windows: int | None = None
    first_step: int = 0
    restored: Path | None = None
    saved_step: int | None = None  # the step of the last checkpoint written or loaded
    defer: bool = False  # the NaN guard's verdict is read a step late (framework.guard)
    saver: checkpoint.AsyncCheckpointer | None = None  # with checkpoint_async
    stop: StopReason | None = None  # why the fit stopped, once it has
    stop_cause: Callable[[], tuple[str, str] | None] | None = None  # (cause, text) if a callback stopped it

    @property
    def phased(self) -> bool:
        return self.phases is not None

    # ---- when to stop

    def done(self) -> bool:
        """``max_steps`` or ``max_epochs`` reached, a stop agreed by every rank, or a callback's ``should_stop``."""
        c, max_epochs = self.counters, self.config.stop.max_epochs
        if self.max_steps is not None and c.step >= self.max_steps:
            return True
        if max_epochs is not None and c.epoch >= max_epochs:
            return True
        return self.stops.requested or c.should_stop

    def planned_steps(self) -> int | None:
        """The step count this fit ends at unless a stop comes first: ``max_steps``, or what ``max_epochs`` of
        windows leaves from the current position (None: neither is known, a stream without a length); e.g. 8
        for max_epochs=2 of 4 windows, from step 0.
        """
        c, max_epochs, n = self.counters, self.config.stop.max_epochs, self._epoch_windows()
        by_epochs = c.step - c.batch_in_epoch + (max_epochs - c.epoch) * n if max_epochs and n is not None else None
        known = [v for v in (self.max_steps, by_epochs) if v is not None]
        return min(known) if known else None

    # ---- per epoch and per step

    @property
    def epoch_ends_here(self) -> bool:
        """The step just taken was the epoch's last window."""
        return self.counters.batch_in_epoch == self.n_windows

    def start_epoch(self) -> None:
        self.t_epoch = time.monotonic()
        self.n_windows = self._epoch_windows()
        self.progress.start_epoch(self.counters.epoch, self.n_windows, self.counters.batch_in_epoch)
        self.events.emit(Event.EPOCH_START)

    def epoch(self) -> Iterator[Window]:
        """This epoch's windows from the current position, with the debug limits applied."""
        data, counters = self.config.data, self.counters
        limit = data.overfit_batches or data.limit_train_batches
        epoch = counters.epoch if not data.overfit_batches else 0
        empty = True
        for window in self.source.windows(epoch, counters.batch_in_epoch, counters.items_read):
            if limit is not None and window.index >= limit:
                return
            if data.stream_sharded and self._all_shards_ended(window.exhausted):
                return
            empty = False
            yield window
        if empty and counters.batch_in_epoch == 0:
            raise ValueError("the training data yielded no batches this epoch; pass a non-empty dataset")

    def _all_shards_ended(self, exhausted: bool) -> bool:
        """Self-sharded streams end at different points per rank; the epoch ends when all have.
        (One small all-reduce and host read per step, only with stream_sharded=True.)"""
        flag = self.rt.all_reduce_sum(torch.tensor([float(exhausted)], device=self.rt.device))
        return int(flag.item()) == self.rt.world_size

    def _epoch_windows(self) -> int | None:
        n = self.source.num_windows()
        data = self.config.data
        limit = data.overfit_batches or data.limit_train_batches
        return min(n, limit) if (n is not None and limit is not None) else (n if limit is None else limit)

    def weigh(self, window: Window) -> tuple[list[Any], list[Any], Any, torch.Tensor | None]:
        """This rank's forwards for ``window`` (real micro-batches, then zero-weight fillers: a rank with none
        left still joins the gradient all-reduce; under FSDP every rank runs as many as the busiest), the
        loss weights ``n_i * dp_size / N`` (one all-reduce for N, the window's item count over all
        data-parallel ranks; the ranks of a TP group read the same items and count once), N, and the stop flags of
        all ranks, folded into the same all-reduce (None on one process)."""
        rt, module = self.rt, self.module
        batches = self.strategy.forwards(window)
        counts: list[Any] = [module.count_items(b) for b in window.micro_batches]
        self.events.emit(Event.COUNTS, counts)  # (the doctor checks each is a non-negative integer)
        counts += [0] * (len(batches) - len(counts))
        if rt.world_size == 1 and all(isinstance(n, int) for n in counts):
            total = sum(counts)
            return batches, [n / max(total, 1) for n in counts], total, None
        local = sum(counts[1:], counts[0])
        packed = torch.as_tensor(local, device=rt.device).double().reshape(1)
        if rt.world_size > 1:
            packed = torch.cat([packed, self.stops.device_flags(rt.device)])
        rt.all_reduce_sum(packed)  # (over every rank: the stop flags must reach all of them)
        layout = rt.layout
        total = packed[0] / layout.tp  # the ranks of one TP group counted the same items
        scale = layout.dp_size / total.clamp(min=1)  # (the gradient reduction averages over the dp ranks)
        # The stop flags stay on the device; the optimizer step reads them with the NaN verdict in one go.
        return batches, [(n * scale).float() for n in counts], total, packed[1:] if rt.world_size > 1 else None

    def compute_loss(self, outputs: Any, targets: Any, phase: str | None, weight: Any = None) -> Any:
        """``module.compute_loss(outputs, targets)``, with ``phase=`` for alternating phases: the loss.

        Of a ``{"loss": ..., **extras}`` the loss; the extras are logged as ``self.log`` would. What this
        micro-batch logged goes to ``train/<name>`` with the loss's ``weight`` (None: a filler; nothing kept)."""
        module = self.module
        loss: Any
        if phase is None:
            loss = module.compute_loss(outputs, targets)
        else:
            loss_fn: Any = module.compute_loss  # (a signature with `phase`: checked at setup)
            loss = loss_fn(outputs, targets, phase=phase)
        if not isinstance(loss, torch.Tensor):  # (a dict; anything else is the doctor's to name)
            loss, extras = split_loss(loss, f"{type(module).__name__}.compute_loss")
            for name, value in extras.items():
                LoopModule.log(module, name, value)
        logged = module.__dict__.get(LOGGED)
        if logged or (self.logged.active and weight is not None):  # (a dict lookup per micro-batch otherwise)
            if weight is not None:
                self.logged.add(phase, logged or {}, weight, f"{type(module).__name__}.forward/compute_loss")
            if logged:
                logged.clear()
        return loss

    def poison_if_nonfinite(self, scaled: torch.Tensor, window_loss: torch.Tensor | None) -> torch.Tensor:
        """``scaled`` times 1.0, or NaN where this rank's window loss is non-finite: the last backward then
        carries a rank-local bad loss into the gradient all-reduce, so every rank's NaN guard sees it (no
        extra collective, no host read; 1.0 changes no bit)."""
        total = scaled.detach() if window_loss is None else window_loss + scaled.detach()
        return scaled * torch.where(torch.isfinite(total), 1.0, math.nan)

    def after_step(self, window: Window, items: Any) -> None:
        """Between steps: counters, the train record on log steps, ``step_end``, validation every n steps,
        checkpoints, the agreed stop. They only read state."""
        c, config = self.counters, self.config
        self.logged.end_step()
        c.step += 1
        step = c.step
        c.batch_in_epoch = window.index + 1
        c.items_read = window.items_read
        c.micro_steps += len(window.micro_batches)
        self.items_sum = self.items_sum + items
        record: dict[str, float] = {}
        if step % config.logging.log_every_n_steps == 0:
            record = self.train_record(step, c.epoch, c.skipped_steps)
            self.events.emit(Event.TRAIN_RECORD, record)  # (subscribers add keys: train/step_time, ...)
            self.metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
            self.log.write(record)
        self.progress.update(1, record, step)
        self.events.emit(Event.STEP_END, record)
        if self.rt.world_size == 1:
            self.stops.agree_locally()  # (several processes: agreed through the step's all-reduce)
        every, ck = config.val_every_n_steps, config.checkpoint
        if every and step % every == 0 and self.val_source is not None:
            metrics = self.validate()
            at_epoch_end = config.checkpoint_every_epoch and self.epoch_ends_here  # (saved there, once)
            if (config.checkpoint_every_epoch or ck.checkpoint_every_n_steps) and not at_epoch_end:
                self.checkpoint(monitor_value=metrics.get(ck.monitor))
        elif ck.checkpoint_every_n_steps and step % ck.checkpoint_every_n_steps == 0 and not self.epoch_ends_here:
            self.checkpoint()  # (the last window of an epoch is saved after its validation instead)
        if self.stops.exit_code is not None:
            self.preempt_exit()

    def end_epoch(self) -> None:
        """The epoch is complete: validate (unless by steps), step per-epoch schedulers, checkpoint."""
        self.settle()
        c, config = self.counters, self.config
        t_pause = time.monotonic()
        epoch_metrics: dict[str, float] = {"epoch_time": t_pause - self.t_epoch}
        if self.val_source is not None and not config.val_every_n_steps:
            epoch_metrics.update(self.validate(log=False))
        self.metrics.update(epoch_metrics)
        self.log.write({"step": c.step, "epoch": c.epoch, **epoch_metrics})
        self.progress.message(f"epoch {c.epoch} step {c.step}: " + fmt_metrics(epoch_metrics))
        for o in self.optimizers:
            if o.scheduler is not None and o.interval == "epoch":
                o.scheduler.step()
        self.events.emit(Event.EPOCH_END, epoch_metrics)
        self.t_log += time.monotonic() - t_pause  # train/items_per_sec measures training, not validation
        c.epoch += 1
        c.batch_in_epoch = c.items_read = 0
        if config.checkpoint_every_epoch:
            every = config.val_every_n_steps  # (by steps: the validation of this step, if any, ranks it)
            validated = epoch_metrics if not every else self.metrics if c.step % every == 0 else {}
            self.checkpoint(monitor_value=validated.get(config.checkpoint.monitor))
        if self.rt.world_size == 1:
            self.stops.agree_locally()
        if self.stops.exit_code is not None:
            self.preempt_exit()

    def end(self) -> None:
        """The fit is over: the final checkpoint, the agreed stop, the summary, ``fit_end``."""
        self.settle()  # the last step's verdict, if it is still on its way
        c, ck = self.counters, self.config.checkpoint
        checkpointing = self.config.checkpoint_every_epoch or ck.checkpoint_every_n_steps
        if ck.run_dir is not None and self.saved_step != c.step and checkpointing:
            self.checkpoint()  # the final state, so a longer run can resume from it
        self.wait_for_checkpoints()  # (a background write is on disk before fit returns)
        self.stops.agree_now(self.rt)  # (one collective per fit: a signal after the last step still stops)
        if self.stops.exit_code is not None:
            self.preempt_exit()
        if self.losses and self.losses[0].pending:  # the steps since the last log step: a short run shows its loss
            record = self.train_record(c.step, c.epoch, c.skipped_steps)
            self.metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
        data_note = self.source.report()  # where input was made; a fix if the step waited for it > 10% of the time
        if data_note is not None:
            self.progress.message(data_note)
        self.stop = self.stop_reason()
        self.log.write(self.stop.record())  # (the last record: why the run ended)
        self.events.emit(Event.STOP, self.stop)
        self.progress.notice(self.final_summary(c.step, self.metrics))  # (said whatever progress= is)
        self.close_logs()
        self.events.emit(Event.FIT_END)

    def stop_reason(self) -> StopReason:
        """Why the fit is over, at its end: ``max_steps`` or ``max_epochs`` reached, a callback's stop (which one,
        and why where it says: EarlyStopping's monitor, best value and step, patience), or ``max_time`` (at which
        step, of how many). Preemption is :meth:`preempt_exit`'s."""
        c, stop = self.counters, self.config.stop
        if self.max_steps is not None and c.step >= self.max_steps:
            cause, text = "max_steps", f"max_steps={self.max_steps} reached"
        elif stop.max_epochs is not None and c.epoch >= stop.max_epochs:
            cause, text = "max_epochs", f"max_epochs={stop.max_epochs} reached"
        elif c.should_stop:
            said = self.stop_cause() if self.stop_cause is not None else None
            cause, text = said or (
                "callback",
                "engine.should_stop was set (outside a callback, or before the resumed checkpoint)",
            )
        elif self.stops.time_up:
            limit = [f"max_steps={self.max_steps}"] if self.max_steps is not None else []
            limit += [f"max_epochs={stop.max_epochs}"] if stop.max_epochs is not None else []
            of = f" (before {' or '.join(limit)})" if limit else ""
            cause, text = "max_time", f"max_time={stop.max_time:g}s ran out at step {c.step}, epoch {c.epoch}{of}"
        else:  # (the loop ends only when done(): not reached)
            cause, text = "max_steps", "the fit ended"
        return StopReason(cause, text, c.step, c.epoch)

    def validate(self, log: bool = True) -> dict[str, float]:
        """Validation during fit: buffers agreed, EMA weights in, ``val/*`` checked against ``monitor``."""
        self.settle()
        t_pause = time.monotonic()
        assert self.val_source is not None
        self.events.emit(Event.VALIDATION_START)
        with self.evaluating():
            val = evaluate(
                self.module, self.eval_model, self.val_source, self.rt, self.events,
                self.config.data.limit_val_batches, stateful=self.metric_objects, forwards=self.strategy.forwards,
                phases=self.val_phases, no_grad=self.strategy.no_grad,
            )  # fmt: skip
        metrics = {f"val/{k}": v for k, v in val.items()}
        ck = self.config.checkpoint
        if ck.keep_best and ck.monitor not in metrics:
            raise ValueError(
                f"keep_best={ck.keep_best} ranks checkpoints by monitor={ck.monitor!r}, which validation does not "
                f"log; pick one of {sorted(metrics)}"
            )
        self.events.emit(Event.VALIDATION_END, self.module, metrics)
        if log:
            c = self.counters
            self.metrics.update(metrics)
            self.log.write({"step": c.step, "epoch": c.epoch, **metrics})
            self.progress.message(f"step {c.step}: " + fmt_metrics(metrics))
            self.t_log += time.monotonic() - t_pause
        return metrics

    def train_record(self, step: int, epoch: int, skipped: int) -> dict[str, float]:
        """The train record of a log step: every device value in one host read."""
        taken = [t for loss in self.losses for t in loss.take()]
        norms = [g for g in self.grad_norms if g is not None]
        logged = self.logged.take()  # (names, totals, finite steps) of what the module logs, or None
        scalars = [*taken, torch.as_tensor(self.items_sum, device=self.rt.device), *norms]
        values = torch.cat(
            [t.double().reshape(1) for t in scalars] + ([logged[1].double(), logged[2].double()] if logged else [])
        ).tolist()
        world, now = self.rt.world_size, time.monotonic()
        record: dict[str, float] = {"step": step, "epoch": epoch}
        for p, (phase, _) in enumerate(self.steps):
            total, finite_steps = values[2 * p], values[2 * p + 1]
            key = "train/loss" if phase is None else f"train/loss/{phase}"
            record[key] = total / world / finite_steps if finite_steps else math.nan
        record.update(self.optimizers.lrs())
        record["train/items_per_sec"] = values[2 * len(self.steps)] / max(now - self.t_log, 1e-9)
        named = [phase for (phase, _), g in zip(self.steps, self.grad_norms, strict=True) if g is not None]
        at = 2 * len(self.steps) + 1
        for phase, value in zip(named, values[at : at + len(norms)], strict=True):
            record["train/grad_norm" if phase is None else f"train/grad_norm/{phase}"] = value
        if logged:
            at, k = at + len(norms), len(logged[0])
            for name, total, steps in zip(logged[0], values[at : at + k], values[at + k : at + 2 * k], strict=True):
                record[f"train/{name}"] = total / world / steps if steps else math.nan
        if skipped:
            record["train/skipped_steps"] = skipped
        # The fraction of the time since the last log the step waited for input (measured by the data layer).
        record["train/data_wait"] = self.source.wait.take()
        self.items_sum, self.t_log = 0, now
        return record

    def settle(self) -> None:
        """Every deferred NaN verdict read (a checkpoint, a validation and the end hold settled state only)."""
        for _, optimizer_step in self.steps:
            optimizer_step.settle()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Validation and prediction during a fit: the ranks' buffers in rank 0's state, the EMA weights in."""
        self.strategy.sync_buffers(self.module)
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield

    # ---- checkpoints

    @property
    def checkpoints(self) -> Path:
        return Path(self.config.checkpoint.run_dir or ".") / "checkpoints"

    def checkpoint(self, monitor_value: float | None = None) -> None:
        """This step's checkpoint in the run dir (collective), between ``checkpoint_start`` and ``checkpoint_end``;
        ``checkpoint_save`` once it is on disk."""
        self.events.emit(Event.CHECKPOINT_START)
        self.wait_for_checkpoints()  # (checkpoint_async: one write in flight; its event fires once on disk)
        step = self.counters.step
        path = self.save(self.checkpoints, f"step-{step:08d}", monitor_value, prune=True)
        self.saved_step = step
        if self.saver is None:
            self.events.emit(Event.CHECKPOINT_SAVE, str(path))
        self.events.emit(Event.CHECKPOINT_END)

    def save(self, root: Path, name: str, monitor_value: float | None, prune: bool) -> Path:
        """A complete checkpoint of this fit (collective): settled state, buffers agreed."""
        self.settle()
        self.strategy.sync_buffers(self.module)
        ck = self.config.checkpoint
        rank, world, main = self.rt.rank, self.rt.world_size, self.rt.is_main
        # checkpoint_async: the state is copied now, written, fsynced and finalized in a background thread
        # (one write in flight: getting a writer waits for the previous one).
        writer: Any = (
            self.saver.writer(root, name, rank=rank, world_size=world, is_main=main)
            if self.saver is not None
            else checkpoint.CheckpointWriter(root, name, rank=rank, world_size=world, is_main=main)
        )
        return train_state.save(
            self.state, writer, root, name, strategy=self.strategy, rt=self.rt, fingerprint=self.fingerprint,
            monitor_value=monitor_value, keep_last=ck.keep_last if prune else None, keep_best=ck.keep_best,
            mode=ck.mode,
        )  # fmt: skip

    def wait_for_checkpoints(self) -> None:
        """The background checkpoint write in flight (``checkpoint_async``) is on disk: ``checkpoint_save``
        fires for it now (its error is raised here). Before exiting, at the end of fit, before a save."""
        done = self.saver.wait() if self.saver is not None else None
        if done is not None:
            self.events.emit(Event.CHECKPOINT_SAVE, str(done))

    def restore(self) -> Path | None:
        """Apply ``resume``: None (fresh); "auto" (the newest checkpoint that verifies and loads; one warning
        names any skipped; every rank must resume the same one), or a path (an error if it fails). A resume
        from an older checkpoint of this run dir starts a branch: the newer ones move to
        ``checkpoints/abandoned/``, so "auto" never returns to them. Returns the checkpoint loaded, or None."""
        resume, root = self.config.checkpoint.resume, self.checkpoints
        if resume is None:
            return None
        if resume == "auto":
            path = checkpoint.load_newest(root, self.load)
            self._agree_on_resume(path)
            if path is None:
                return None
        else:
            path = Path(resume)  # (a directory: Engine.fit checked it before taking the run dir's lock)
            self.load(path)
        self._branch_from(path, root)
        self.saved_step = self.counters.step
        self.events.emit(Event.CHECKPOINT_LOAD, str(path))
        return path

    def _agree_on_resume(self, path: Path | None) -> None:
        """Every rank resumed the same step ("auto" may skip a checkpoint that failed verification on some ranks
        only): one all-reduce of (step, step^2), -1 for none."""
        rt = self.rt
        if rt.world_size == 1:
            return
        s = float(self.counters.step if path is not None else -1)
        sums = rt.all_reduce_sum(torch.tensor([s, s * s], dtype=torch.float64, device=rt.device)).tolist()
        if sums != [s * rt.world_size, s * s * rt.world_size]:
            raise checkpoint.CheckpointError(
                f"the processes resumed different checkpoints (this one: {path.name if path else 'none'}); a "
                "checkpoint failed verification on some ranks only (see the warnings). Pass resume= the path of "
                "a checkpoint that verifies"
            )

    def _branch_from(self, path: Path, root: Path) -> None:
        if path.resolve().parent != root.resolve():
            return
        self.rt.barrier()  # (every rank has read its checkpoint before any dir moves)
        if self.rt.is_main:
            moved = checkpoint.abandon_newer(root, self.counters.step)
            if moved:  # (said whatever progress= is: it moved files)
                print(
                    f"resumed from {path.name}, older than this run dir's newest checkpoint: moved "
                    f"{', '.join(p.name for p in moved)} aside to {root / checkpoint.ABANDONED} (a new branch starts "
                    "here; resume='auto' continues it)",
                    file=sys.stderr,
                    flush=True,
                )

    def load(self, path: Path) -> None:
        """Read, verify and check a checkpoint, then apply it (nothing changes if it is refused)."""
        train_state.load(
            self.state,
            path,
            strategy=self.strategy,
            rt=self.rt,
            fingerprint=self.fingerprint,
            seed=self.config.seed,
        )  # fmt: skip  (verified there: every rank agrees it can use it before any collective read)
        self.restored = path

    def preempt_exit(self) -> None:
        """Every rank at the same step boundary: checkpoint (if a run dir), say where, exit 143 or 130."""
        self.settle()
        step = self.counters.step
        if self.config.checkpoint.run_dir is not None:
            if self.saved_step != step:
                self.checkpoint()
            where = f"checkpoint saved to {self.checkpoints / f'step-{step:08d}'}"
        else:
            where = "no checkpoint (no run_dir)"
        self.wait_for_checkpoints()  # (on disk before the process exits)
        code = self.stops.exit_code
        what = "interrupted (Ctrl-C)" if code == 130 else f"preempted ({self.stops.signal_name})"
        text = f"{what} at step {step}: {where}; resume with Engine(resume='auto', ...)"
        self.stop = StopReason("interrupted" if code == 130 else "preempted", text, step, self.counters.epoch)
        self.log.write(self.stop.record())
        self.events.emit(Event.STOP, self.stop)
        self.close_logs()
        if self.rt.is_main:
            print(text, file=sys.stderr, flush=True)
        raise SystemExit(code)

    # ---- the end

    def final_summary(self, step: int, metrics: dict[str, float]) -> str:
        """The fit's last line: where and why it stopped, and the last loss and validation values."""
        shown = {k: v for k, v in metrics.items() if k.startswith(("train/loss", "val/"))}
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        why = f": {self.stop}" if self.stop is not None else ""
        return f"fit done at step {step}{why}" + (f"; {text}" if text else "")

    def close_logs(self) -> None:
        self.progress.close()
        self.log.close()

    def close(self) -> None:
        """Release what the fit holds (logs, data workers), on every exit path."""
        self.close_logs()
        self.source.close()  # (no data thread or worker process outlives the fit, on any exit path)
        if self.val_source is not None:
            self.val_source.close()


def fmt_metrics(metrics: dict[str, float]) -> str:
    """``key=value`` pairs for a progress line (4 significant digits).

    Example:

        >>> fmt_metrics({"val/loss": 0.123456, "epoch_time": 2.0})
        'val/loss=0.1235 epoch_time=2'
    """
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}" for k, v in metrics.items()
    )


# ---------------------------------------------------------------- building it


def source_for(
    config: EngineConfig, rt: Runtime, data: Any, batching: Batching, shuffle: bool, training: bool
) -> Source:
    """A data source of ``data`` for this rank (training: ``stream_sharded`` and ``drop_last`` apply)."""
    d = config.data
    return make_source(
        data,
        batching,
        rank=rt.layout.dp_rank(rt.rank),  # (the ranks of one TP group read the same micro-batches)
        seed=config.seed,
        shuffle=shuffle,
        to_device=rt.to_device,
        collate_fn=d.collate_fn,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
        stream_sharded=d.stream_sharded and training,
        drop_last=d.drop_last and training,  # (validation and prediction see every item)
        prefetch=d.prefetch,
        device=rt.device,
        all_reduce=rt.all_reduce_sum,
    )


def validation_source(
    config: EngineConfig, rt: Runtime, data: Any, micro: int | None = None, predicting: bool = False
) -> Source:
    """Validation (or prediction) batches of ``micro`` items per process (a DataLoader keeps its own)."""
    from torch.utils.data import DataLoader

    if isinstance(data, torch.Tensor):
        data = (data,)  # (predict on bare inputs)
    d, dp = config.data, rt.layout.dp_size
    if micro is None:
        micro = d.micro_batch_size or (max(1, d.batch_size // dp) if d.batch_size else 64)
    if isinstance(data, DataLoader):
        batching = resolve_batching(data, None, None, dp)
    else:
        batching = Batching(micro * dp, micro, 1, dp)
    return source_for(config, rt, data, batching, shuffle=False, training=False)


def prepare_fit(
    config: EngineConfig,
    counters: train_state.Counters,
    events: Events,
    rt: Runtime,
    module: LoopModule,
    train_data: Any,
    val_data: Any,
    *,
    callbacks: list[Any],
    metrics: dict[str, float],
    max_steps: int | None = None,
) -> Fit:
    """Build the :class:`Fit` of ``engine.fit(module, train_data, val_data)``, apply ``resume`` and open the logs."""
    owner = type(module).__name__
    phased = takes_phase(module.compute_loss)
    layout = rt.layout
    tp.plan_of(module, layout.tp)  # (a plan without tp_size, or tp_size without a plan: refused before anything)
    strategy = make_strategy(rt, config.distributed.strategy, config.distributed.find_unused_parameters)
    initial = None
    if needs_build(module):
        # configure_model, once per module (a later fit goes on training it): on the meta device where the layout
        # shards, seeded values once the layout applied.
        build(module, rt.device, on_meta=layout.shards)
        initial = Initial(config.seed, module.init_weights)
    elif not builds_itself(module):
        events.emit(Event.BUILD, module, rt)  # (before the layout applies: the doctor compares initial weights)
    model = strategy.prepare(
        module, manual_sync=phased, checkpointing=config.distributed.activation_checkpointing, initial=initial
    )
    eval_model = strategy.eval_model(module, model)
    if config.precision.compile:
        model = eval_model = torch.compile(model)  # type: ignore[assignment]
    optimizers = parse_optimizers(module.configure_optimizers(), f"{owner}.configure_optimizers", shared_ok=phased)
    if phased and not optimizers.named:
        raise TypeError(
            f"{owner}.compute_loss takes `phase`, so each optimizer is a phase: configure_optimizers must return a "
            'dict of named optimizers, e.g. {"discriminator": opt_d, "generator": opt_g}'
        )
    batching = resolve_batching(train_data, config.data.batch_size, config.data.micro_batch_size, layout.dp_size)
    source = source_for(config, rt, train_data, batching, config.data.shuffle, training=True)
    warn_one_item_batches(module, source, config.data.overfit_batches or config.data.limit_train_batches)
    val_source = validation_source(config, rt, val_data, batching.micro_batch_size) if val_data is not None else None
    if val_source is not None and rt.is_main:
        _warn_if_validation_may_never_run(config, source, max_steps)
    metric_objects = check_metrics(module.configure_metrics(), f"{owner}.configure_metrics", rt.world_size)
    phases = [o.name for o in optimizers] if phased else None
    defer, why_not = _decide_deferral(config.step.nan_check, optimizers, rt, strategy, phased)
    ema = EMA(module, config.step.ema_decay) if config.step.ema_decay is not None else None
    policy = NanPolicy(config.step.nan_policy, config.step.max_consecutive_skips, counters)
    stops = Stops(tuple(config.distributed.preemption_signals), config.stop.max_time)
    groups = [[o] for o in optimizers] if phased else [list(optimizers)]
    steps = [
        (group[0].name if phased else None, OptimizerStep(
            group, strategy=strategy, rt=rt, config=config.step, policy=policy, events=events, stops=stops,
            defer=defer, ema=ema if i == len(groups) - 1 else None, labelled=phased or len(optimizers) > 1,
        ))
        for i, group in enumerate(groups)
    ]  # fmt: skip
    registry = _registry(counters, strategy, module, optimizers, source, ema, rt, callbacks, metrics)
    fingerprint = train_state.fingerprint(config, module, optimizers, batching.batch_size, rt.scaler is not None)
    run = Fit(
        config, counters, events, rt, strategy, module, model, eval_model, optimizers, steps, phases,
        phases if phased and phase_is_required(module.compute_loss) else None, batching, source, val_source,
        train_data, val_data, registry, fingerprint, ema, metric_objects, stops, metrics, max_steps,
    )  # fmt: skip
    # Seed every RNG (dropout, augmentation) per rank, like HF's Trainer; a resume then
    # replaces these states with the checkpoint's.
    seed_everything((config.seed + rt.rank) % 2**63)
    counters.should_stop = False  # a resumed run that had stopped early restores it (and ends at once)
    restored = run.restore()
    _open_logs(run, restored, why_not, defer, callbacks)
    run.losses = [TrainLoss(rt.all_reduce_sum, rt.device, config.logging.log_every_n_steps) for _ in steps]
    run.progress.latest = run.losses[0].latest  # (the bar's loss: the latest window's, read without a sync)
    run.logged = LoggedValues(rt)
    module.__dict__.pop(LOGGED, None)  # (values logged outside a training step, e.g. by a forward called by hand)
    run.grad_norms = [None] * len(steps)
    run.first_step = counters.step
    run.defer = defer
    if config.checkpoint.checkpoint_async:
        run.saver = checkpoint.AsyncCheckpointer()
    run.t_log = run.stops.t0 = time.monotonic()
    return run


def _decide_deferral(
    nan_check: str, optimizers: Optimizers, rt: Runtime, strategy: Strategy, phased: bool
) -> tuple[bool, str | None]:
    """(defer?, why not where it cannot). nan_check="auto": defer on a GPU where every optimizer can skip on the
    device; "deferred": also on CPU (where reading at once costs nothing), an error where it cannot."""
    if nan_check == "step":
        return False, None
    reason = next(
        (r for o in optimizers if (r := why_not_deferred(o.optimizer, o.scheduler, o.interval)) is not None), None
    )
    if reason is None and (rt.scaler is not None or not strategy.can_skip_on_device):
        reason = "fp16 (its GradScaler owns the skip) and FSDP read the verdict at once"
    if reason is None and phased:
        reason = "alternating phases read each phase's verdict at once"
    if nan_check == "deferred" and reason is not None:
        raise ValueError(f'nan_check="deferred": {reason}; or use nan_check="step"')
    return reason is None and (nan_check == "deferred" or rt.device.type == "cuda"), reason


def _registry(
    counters: train_state.Counters, strategy: Strategy, module: nn.Module, optimizers: Optimizers, source: Source,
    ema: EMA | None, rt: Runtime, callbacks: list[Any], metrics: dict[str, float],
) -> train_state.TrainState:  # fmt: skip
    """Every stateful object a checkpoint holds, each under its name: add a new one here."""
    registry = train_state.TrainState()
    registry.register("model", train_state.ModelWeights(strategy, module), file="model.safetensors")
    if ema is not None:
        registry.register("ema", ema, file="ema.safetensors")
    for o in optimizers:
        suffix = f"/{o.name}" if optimizers.named else ""
        registry.register(f"optimizer{suffix}", train_state.OptimizerState(strategy, module, o.optimizer))
        if o.scheduler is not None:
            registry.register(f"scheduler{suffix}", o.scheduler)
    if rt.scaler is not None:
        registry.register("scaler", rt.scaler)
    registry.register("data", DataPosition(source))
    registry.register("counters", counters, check=_position_check(source))
    registry.register("callbacks", train_state.CallbackStates(callbacks))
    registry.register("metrics", train_state.LoggedMetrics(metrics))
    return registry


def _warn_if_validation_may_never_run(config: EngineConfig, source: Source, max_steps: int | None) -> None:
    """Validation runs at epoch ends unless ``val_every_n_steps``: a stream without ``len()`` (an
    IterableDataset) whose run is ended by ``max_steps`` or ``max_time`` may never end an epoch, and would
    then validate 0 times. A finite stream is fine (its epoch ends where it does): hence a warning, not an
    error."""
    d = config.data
    if config.val_every_n_steps or config.stop.max_epochs is not None or source.num_windows() is not None:
        return
    if d.limit_train_batches or d.overfit_batches:  # (epochs of n windows: they end)
        return
    ends = f"max_steps={max_steps}" if max_steps is not None else "max_time"
    warnings.warn(
        f"val_data is validated at epoch ends, and the training data has no len() (a stream): if it is endless, "
        f"no epoch ends before {ends} stops the run and validation never runs. Pass val_every_n_steps=N to "
        "validate every N optimizer steps",
        stacklevel=4,
    )


def check_resume_path(config: EngineConfig) -> None:
    """An explicit ``resume=`` path must be a directory: checked by ``fit`` before it takes the run dir's
    lock, so a typo leaves nothing behind (not even a new run dir with its ``.lock``): a
    :class:`~framework.CheckpointError` such as ``resume='runs/x/step-9' does not exist; ...``.
    """
    resume = config.checkpoint.resume
    if resume is not None and resume != "auto" and not Path(resume).is_dir():
        raise checkpoint.CheckpointError(
            f"resume={resume!r} does not exist; pass an existing checkpoint directory or resume='auto'"
        )


def _position_check(source: Source) -> Any:
    """A checkpoint's position lies within an epoch of this data: a batch_in_epoch past the epoch's windows
    (10**9, say) would end the epoch at once and silently skip the rest of it."""

    def check(value: Any) -> None:
        n, done = source.num_windows(), value["batch_in_epoch"]  # (types checked by the counters' schema)
        if n is not None and done > n:
            raise ValueError(
                f"batch_in_epoch={done}, but an epoch of this data has {n} optimizer steps (windows); the "
                "checkpoint's position does not fit this data"
            )

    return check


def _open_logs(run: Fit, restored: Path | None, why_not: str | None, defer: bool, callbacks: list[Any]) -> None:
    """config.json, metrics.jsonl (cut back to a resumed checkpoint), trackers, progress, and the fit's first lines."""
    rt, config, c = run.rt, run.config, run.counters
    run_dir = config.checkpoint.run_dir
    written = run_info.write_config(
        config, callbacks, run.max_steps, run.module, run.optimizers, run.batching, rt, run.strategy.name
    )
    # A resumed run logs the steps after its checkpoint again: the records of them go first.
    resumed_at = (c.step, c.epoch) if config.checkpoint.resume is not None else None
    tracker = start_trackers(rt.accelerator, config.logging.log_with, run_dir, written, resumed_at and resumed_at[0])
    run.log = MetricsLog(run_dir, rt.is_main, tracker=tracker, resumed_at=resumed_at)
    run.progress = progress = Progress(config.logging.progress, rt.is_main)
    if restored is not None:  # (said whatever progress= is)
        progress.notice(f"resumed from {_short(restored)} (epoch {c.epoch}, step {c.step})")
    if run.log.dropped:
        if restored is not None:
            why = f"logged after step {c.step} by the run this one resumes from {restored.name}"
        elif c.step == 0:
            why = "of an earlier start of this run (resume='auto' found no checkpoint in run_dir, so the run "
            why += "starts again from step 0)"
        else:  # (a later fit of this engine, with no checkpoint to go back to)
            why = f"logged after step {c.step}, where this fit goes on"
        progress.message(f"metrics.jsonl: dropped {run.log.dropped} record(s) {why}; this run logs those steps again")
    progress.message(
        run_info.summary(run.module, rt, run.batching, "deferred" if defer else "step", run.strategy.summary())
    )
    if run.ema is not None:
        progress.message(f"validation uses the EMA weights (ema_decay={config.step.ema_decay})")
    if why_not is not None and rt.device.type == "cuda":
        progress.message(f"NaN guard: one host sync per step, as {why_not}")


def _short(path: Path) -> str:
    parts = path.parts
    return str(Path(*parts[-2:])) if len(parts) >= 2 else str(path)
