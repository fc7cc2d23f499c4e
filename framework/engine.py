"""The Engine: owns the training loop, in the canonical order.

For every optimizer step, ``fit`` runs, in this order and no other:

1. zero gradients (once, before the window's first micro-batch)
2. forward                                 (per micro-batch)
3. loss                                    (per micro-batch)
4. backward, scaled by ``n_i * world_size / N`` (the exactness rule, DESIGN.md)
5. optimizer step, then the LR scheduler if it is per-step
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, run_info
from . import grads as gradient_ops
from .callbacks import Callback, fire
from .data import DEFAULT_PREFETCH, Batching, Source, Window, make_source, resolve_batching, warn_one_item_batches
from .distributed import Runtime, make_runtime
from .doctor import Doctor, LoopError, max_steps_override
from .evaluation import evaluate
from .guard import NAN_CHECKS, Pending, read_later, step_unless_found, why_not_deferred
from .logging import MetricsLog, Progress, TrainLoss, start_trackers
from .module import LoopModule
from .optim import Optimization, parse_optimizers

_STEP_EVENTS = ("optimizer_step", "scheduler_step")  # what a skipped step does not have in the trace


@dataclass
class _Fit:
    """What one fit works on: the user's module, its (possibly wrapped) model, optimization, data."""

    module: LoopModule
    model: nn.Module
    opt: Optimization
    source: Source
    fingerprint: dict[str, Any]


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm under ``nan_policy="raise"``; parameters are left untouched."""


class Engine:
    """Runs ``fit`` and ``validate`` for a :class:`LoopModule`.

    Example::

        engine = Engine(max_epochs=10, batch_size=64, seed=0, run_dir="runs/digits")
        engine.fit(Classifier(), train_data, val_data)
        metrics = engine.validate(module, val_data)   # {"loss": ..., "acc": ...}

    Arguments (all optional, keyword-only):

    - ``max_epochs``, ``max_steps`` (optimizer steps), ``max_time`` (seconds): when to stop; set
      at least one of the first two.
    - ``batch_size``: items per optimizer step across all processes (Dataset inputs).
    - ``micro_batch_size``: items per forward on one device; accumulation steps are
      ``batch_size / (micro_batch_size * world_size)``. With a DataLoader, its batch size is the micro-batch.
    - ``shuffle`` (True; seeded, and the same global order at any world size), ``seed`` (0).
    - ``mixed_precision``: "no" | "bf16" | "fp16" (default: what ``accelerate launch`` set, else "no").
    - ``clip_grad_norm``, ``clip_grad_value``; ``nan_policy``: "raise" | "skip"; ``max_consecutive_skips``.
    - ``nan_check``: when the NaN guard's verdict is read: "step" (at once: one scalar read per step,
      a sync on a GPU), "deferred" (a step late, with the bad step skipped on the device: no sync;
      needs a fused optimizer, e.g. ``AdamW(..., fused=True)``; see :mod:`framework.guard`), or
      "auto" (default: "deferred" on a GPU where the optimizer allows it, else "step").
    - ``run_dir``: where ``metrics.jsonl`` and ``config.json`` go; ``log_every_n_steps`` (50);
      ``progress`` (True); ``log_with`` (Accelerate tracker names, e.g. ["tensorboard"]).
    - ``callbacks``; ``compile`` (torch.compile); ``doctor``: "basic" | "full" | "off";
      ``trace`` (record the step events in ``engine.trace``).
    - ``num_workers``, ``collate_fn``, ``pin_memory``: passed to data loading for Dataset inputs.
    - ``prefetch`` (2): windows (one optimizer step's input each) prepared while the step computes, by the
      rule in :mod:`framework.data` (0: none); ``drop_last`` (False): leave out each epoch's partial last
      global batch (Dataset, tensor and stream inputs; the same at any world size).
    - ``stream_sharded``: an IterableDataset already yields only this rank's items (opt-in; by default
      every rank reads the whole stream and keeps its share, which is exact at any world size).
    - Debug runs (they log, validate and checkpoint as usual):
      ``limit_train_batches=n``: each epoch trains on only its first n global batches (optimizer steps);
      ``limit_val_batches=n``: validation (also ``validate``) reads only the first n global batches;
      ``overfit_batches=n``: every epoch trains on the same n batches (the first n of epoch 0's
      order), to check that the model can fit them, e.g.
      ``Engine(max_epochs=200, batch_size=8, overfit_batches=1)`` should drive ``train/loss`` to ~0.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        max_time: float | None = None,
        batch_size: int | None = None,
        micro_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        mixed_precision: str | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        nan_policy: str = "raise",
        max_consecutive_skips: int = 10,
        nan_check: str = "auto",
        run_dir: str | None = None,
        log_every_n_steps: int = 50,
        progress: bool = True,
        log_with: Any = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        compile: bool = False,
        doctor: str = "basic",
        trace: bool = False,
        num_workers: int = 0,
        collate_fn: Any = None,
        pin_memory: bool = False,
        stream_sharded: bool = False,
        drop_last: bool = False,
        prefetch: int = DEFAULT_PREFETCH,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        overfit_batches: int | None = None,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_every_epoch: bool | None = None,
        keep_last: int = 3,
        keep_best: int = 0,
        monitor: str = "val/loss",
        mode: str = "min",
        resume: str | None = None,
        preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
    ) -> None:
        if max_epochs is None and max_steps is None:
            raise ValueError(
                "set max_epochs or max_steps (or both), e.g. Engine(max_epochs=10, ...); "
                "max_time alone would train until the clock runs out"
            )
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f'nan_policy={nan_policy!r}; use "raise" or "skip"')
        if nan_check not in NAN_CHECKS:
            raise ValueError(f'nan_check={nan_check!r}; use "auto", "step" or "deferred"')
        # A clip threshold <= 0 would zero (or, for the norm, flip) every gradient: silent non-training.
        for name, clip in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
                raise ValueError(
                    f"{name}={clip!r}; use a positive finite number (e.g. {name}=1.0) or None for no clipping"
                )
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r}; use a positive int (default 10)")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps}; use a positive int")
        self.max_epochs, self.max_time = max_epochs, max_time
        # FRAMEWORK_MAX_STEPS caps it: `python -m framework doctor` runs a recipe for a few steps.
        self.max_steps = max_steps_override(max_steps)
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.shuffle, self.seed = shuffle, seed
        self.mixed_precision = mixed_precision
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.nan_policy, self.max_consecutive_skips, self.nan_check = nan_policy, max_consecutive_skips, nan_check
        self.run_dir, self.log_every_n_steps, self.progress = run_dir, log_every_n_steps, progress
        self.log_with = log_with
        self.callbacks = list(callbacks)
        self.compile = compile
        self.doctor = Doctor(doctor)
        self.trace: list[tuple[str, int, int]] | None = [] if trace else None
        self.num_workers, self.collate_fn, self.pin_memory = num_workers, collate_fn, pin_memory
        self.stream_sharded = stream_sharded
        self.drop_last, self.prefetch = drop_last, prefetch
        self.limit_train_batches, self.limit_val_batches = limit_train_batches, limit_val_batches
        self.overfit_batches = overfit_batches
        if mode not in ("min", "max"):
            raise ValueError(f'mode={mode!r}; use "min" or "max"')
        if (checkpoint_every_n_steps or checkpoint_every_epoch or keep_best or resume) and run_dir is None:
            raise ValueError("checkpointing and resume need a run_dir, e.g. Engine(run_dir='runs/exp1', ...)")
        trackers = [log_with] if isinstance(log_with, str) else list(log_with or [])
        if "tensorboard" in trackers and run_dir is None:
            raise ValueError("log_with=['tensorboard'] writes its event files under run_dir; pass Engine(run_dir=...)")
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.checkpoint_every_epoch = run_dir is not None if checkpoint_every_epoch is None else checkpoint_every_epoch
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.resume = resume
        self.preemption_signals = tuple(preemption_signals)

        # Position and counters (what a checkpoint stores).
        self.step = 0  # optimizer steps taken (windows done), skipped ones included
        self.epoch = 0
        self.batch_in_epoch = 0  # windows done in the current epoch
        self.items_read = 0  # stream items read in the current epoch (IterableDataset only)
        self.micro_steps = 0  # micro-batches consumed on this rank
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.should_stop = False  # callbacks may set it; checked between steps
        self.metrics: dict[str, float] = {}  # the last logged values

        self._rt: Runtime | None = None
        self._stop_requested = False  # set by max_time (and signals)
        self._preempted = False  # set by a preemption signal: checkpoint, then exit 143
        self._fit: _Fit | None = None
        self._saved_step: int | None = None
        self._t0 = time.monotonic()
        self._finite_check = gradient_ops.NonFiniteCheck()  # the per-step NaN guard's fused check
        self._defer = False  # read the guard's verdict a step late (framework.guard), decided per fit
        self._pending: Pending | None = None  # the step whose verdict is on its way
        self._open_sources: list[Source] = []  # the fit's data sources: closed (threads, workers) when it ends

    # ------------------------------------------------------------------ public API

    def fit(self, module: LoopModule, train_data: Any, val_data: Any = None) -> Engine:
        """Train ``module`` in place on ``train_data`` (Dataset, IterableDataset, DataLoader or tensors).

        Validates on ``val_data`` at each epoch end. Returns the engine.

        Example::

            engine = Engine(max_epochs=5, batch_size=64)
            engine.fit(model, train_ds, val_ds)
            print(engine.metrics["val/loss"])
        """
        _check_module(module)
        rt = self._runtime()
        with run_info.run_dir_lock(self.run_dir, rt):  # (one fit at a time writes a run dir)
            if self.resume is None and self._fit is None:  # (a later fit of this engine continues its run)
                run_info.refuse_earlier_run(self.run_dir)
            try:
                self._fit_loop(rt, module, train_data, val_data)
            finally:  # (also on an error, SystemExit(143) or Ctrl-C: no data thread or worker outlives the fit)
                for open_source in self._open_sources:
                    open_source.close()
        return self

    def _fit_loop(self, rt: Runtime, module: LoopModule, train_data: Any, val_data: Any) -> None:
        """The fit loop: setup, then per window the five steps in order, then per epoch validation."""
        model = rt.wrap(module)
        if self.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        opt = parse_optimizers(module.configure_optimizers(), f"{type(module).__name__}.configure_optimizers")
        batching = resolve_batching(train_data, self.batch_size, self.micro_batch_size, rt.world_size)
        source = self._source(train_data, batching, self.shuffle)
        val_source = (
            self._val_source(val_data, batching.micro_batch_size, rt.world_size) if val_data is not None else None
        )
        self._open_sources = [s for s in (source, val_source) if s is not None]
        warn_one_item_batches(module, source, self.overfit_batches or self.limit_train_batches)
        self.doctor.start_fit(module, opt.optimizer, batching, train_data, val_data, is_main=rt.is_main, fsdp=rt.fsdp)
        params = [p for g in opt.optimizer.param_groups for p in g["params"]]
        self._defer, why_not = self._decide_deferral(opt, rt)
        self._pending = None  # (none left from a fit that raised)
        self._fit = fit = _Fit(
            module, model, opt, source, checkpoint.fingerprint(self, module, opt.optimizer, batching.batch_size)
        )
        # Seed every RNG (dropout, augmentation) per rank, like HF's Trainer; a resume then
        # replaces these states with the checkpoint's.
        checkpoint.seed_everything(self.seed + rt.rank)
        self.should_stop = False  # a resumed run that had stopped early restores it (and ends at once)
        restored = self._restore(fit)
        config = run_info.write_config(self, module, opt, batching, rt)
        # A resumed run logs the steps after its checkpoint again: the records of them go first.
        resumed_at = (self.step, self.epoch) if self.resume is not None else None
        resumed_step = None if resumed_at is None else resumed_at[0]
        # Trackers (log_with) start on rank 0 and finish in log.close(); not accelerator.end_training(),
        # which would also destroy the process group that a later validate() or fit() needs.
        log = MetricsLog(
            self.run_dir,
            rt.is_main,
            tracker=start_trackers(rt.accelerator, self.log_with, self.run_dir, config, resumed_step),
            resumed_at=resumed_at,
        )
        progress = Progress(self.progress, rt.is_main)
        if log.dropped:
            if restored is not None:
                why = f"logged after step {self.step} by the run this one resumes from {restored.name}"
            elif self.step == 0:
                why = "of an earlier start of this run (resume='auto' found no checkpoint in run_dir, so the run "
                why += "starts again from step 0)"
            else:  # (a later fit of this engine, with no checkpoint to go back to)
                why = f"logged after step {self.step}, where this fit goes on"
            progress.message(f"metrics.jsonl: dropped {log.dropped} record(s) {why}; this run logs those steps again")
        progress.message(run_info.summary(module, rt, batching, nan_check="deferred" if self._defer else "step"))
        if why_not is not None and rt.device.type == "cuda":
            progress.message(f"NaN guard: one host sync per step, as {why_not}")

        fire(self.callbacks, "on_fit_start", self, module)
        previous_handlers = self._install_signal_handlers()
        self._t0 = t_log = time.monotonic()
        losses = TrainLoss(rt.all_reduce_sum, rt.device, self.log_every_n_steps)  # window losses since the last log
        items_sum: Any = 0
        module.train()
        while not self._done():
            fire(self.callbacks, "on_epoch_start", self, module)
            t_epoch = time.monotonic()
            n_windows = self._epoch_windows(source)
            progress.start_epoch(self.epoch, n_windows, self.batch_in_epoch)
            epoch_ended = True
            for window in self._epoch(source):
                self.doctor.start_step()  # checked step or not (sparse under "basic": no host sync otherwise)
                # 1. zero gradients: once per window, before its first micro-batch
                self._record("zero_grad", 0)
                gradient_ops.zero_grad(opt.optimizer)  # = opt.optimizer.zero_grad(set_to_none=True)
                weights, items, stop = self._item_weights(module, window)
                window_loss: Any = None  # sum of the weighted micro-batch losses, on device
                batches = window.micro_batches or [window.filler]
                for i, batch in enumerate(batches):
                    inputs, targets = module.split_batch(batch)
                    if not window.micro_batches:
                        module.eval()  # the zero-weight filler must not update BatchNorm stats or draw dropout
                    with rt.no_sync(model, sync=i == len(batches) - 1):
                        # (the doctor's watch catches backward/step/zero_grad called from user code)
                        with rt.autocast(), self.doctor.watch(module, batch):
                            # 2. forward
                            self._record("forward", i)
                            outputs = model(inputs)
                            if window.micro_batches:
                                self.doctor.check_train_mode(module, "forward")
                            # 3. loss
                            self._record("loss", i)
                            loss = module.compute_loss(outputs, targets)
                            self.doctor.check_loss(module, loss, outputs)
                        # 4. backward, weighted so the window's gradient is the mean over all its items
                        #    (a weight of exactly 1.0, one micro-batch on one process, changes no bit: no op)
                        self._record("backward", i)
                        weight = weights[i]
                        scaled = loss if isinstance(weight, float) and weight == 1.0 else loss * weight
                        (rt.scaler.scale(scaled) if rt.scaler is not None else scaled).backward()
                    part = scaled.detach()
                    if part.dtype != torch.float32:
                        part = part.float()  # the window's loss sums in fp32 (a bf16 loss would round)
                    window_loss = part if window_loss is None else window_loss + part
                if not window.micro_batches or not module.training:
                    module.train()  # back from the filler's eval mode (a whole-tree walk: not every step)
                self.doctor.after_backward()  # trainable parameters that got no gradient (checked steps)
                # 5. optimizer step (then a per-step scheduler), unless the NaN policy drops it
                log_now = (self.step + 1) % self.log_every_n_steps == 0
                applied, grad_norm, stop = self._optimizer_step(model, opt, params, window, window_loss, log_now, stop)
                self.doctor.after_optimizer_step(applied)  # parameters that did not change (checked steps)
                if applied:
                    self._record("optimizer_step", len(batches))
                    if opt.scheduler is not None and opt.interval == "step":
                        self._record("scheduler_step", len(batches))
                        opt.scheduler.step()

                # Between steps: counters, logging, callbacks. They only read state.
                self.step += 1
                self.batch_in_epoch = window.index + 1
                self.items_read = window.items_read
                self.micro_steps += len(window.micro_batches)
                losses.add(window_loss)  # (stays on the device: summed and read on log steps)
                items_sum = items_sum + items
                record: dict[str, float] = {}
                if log_now:
                    record = self._log_train(opt, losses, items_sum, grad_norm, t_log)
                    log.write(record)
                    items_sum, t_log = 0, time.monotonic()
                progress.update(1, record, self.step)
                fire(self.callbacks, "on_step_end", self, module, record)
                time_up, preempted = stop
                self._stop_requested |= time_up or preempted
                self._preempted |= preempted
                if (
                    self.checkpoint_every_n_steps
                    and self.step % self.checkpoint_every_n_steps == 0
                    and self.batch_in_epoch != n_windows
                ):
                    self._save()  # (the last window of an epoch is saved after validation instead)
                if self._preempted:
                    self._preempt_exit(progress, log, previous_handlers)
                if self._done():
                    epoch_ended = self.batch_in_epoch == n_windows
                    break
            if not epoch_ended:
                break
            # The epoch is complete: validate, then step a per-epoch scheduler.
            self._settle()
            t_pause = time.monotonic()
            epoch_metrics: dict[str, float] = {"epoch_time": t_pause - t_epoch}
            if val_source is not None:
                val = self._evaluate(module, model, val_source)
                epoch_metrics.update({f"val/{k}": v for k, v in val.items()})
                fire(self.callbacks, "on_validation_end", self, module, epoch_metrics)
            self.metrics.update(epoch_metrics)
            log.write({"step": self.step, "epoch": self.epoch, **epoch_metrics})
            progress.message(f"epoch {self.epoch} step {self.step}: " + _fmt_metrics(epoch_metrics))
            if opt.scheduler is not None and opt.interval == "epoch":
                opt.scheduler.step()
            fire(self.callbacks, "on_epoch_end", self, module, epoch_metrics)
            t_log += time.monotonic() - t_pause  # train/items_per_sec measures training, not validation
            self.epoch += 1
            self.batch_in_epoch = self.items_read = 0
            if self.checkpoint_every_epoch:
                self._save(monitor_value=epoch_metrics.get(self.monitor))
        self._settle()  # the last step's verdict, if it is still on its way
        if (
            self.run_dir is not None
            and self._saved_step != self.step
            and (self.checkpoint_every_epoch or self.checkpoint_every_n_steps)
        ):
            self._save()  # the final state, so a longer run can resume from it
        self._restore_signal_handlers(previous_handlers)
        data_note = source.report()  # where input was made, and a fix if the step waited for it > 10% of the time
        if data_note is not None:
            progress.message(data_note)
        progress.close()
        log.close()
        self.doctor.end_fit()  # decides the checks still pending after a short fit
        fire(self.callbacks, "on_fit_end", self, module)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> str:
        """Save a complete checkpoint of the current fit into directory ``path`` (atomically).

        Call it during or after ``fit`` (e.g. from a callback); every process must call it.

        Example::

            engine.fit(model, train_ds)
            engine.save_checkpoint("exports/final")
            framework.load_weights(Classifier(), "exports/final")
        """
        if self._fit is None:
            raise RuntimeError("save_checkpoint needs a fit in progress or finished; call engine.fit(...) first")
        target = Path(path)
        self._settle()  # a checkpoint holds settled state only
        return str(checkpoint.save_engine(self, self._fit, target.parent.resolve(), target.name))

    def validate(self, module: LoopModule, data: Any) -> dict[str, float]:
        """Exact means over ``data``: ``{"loss": ..., <compute_metrics keys>: ...}``.

        Runs in eval mode under ``torch.inference_mode()``; every item counts once,
        at any world size (no padding duplicates, none dropped). The module's mode
        is restored afterwards.

        Example::

            metrics = Engine(max_epochs=1, batch_size=64).validate(model, val_ds)
            print(metrics["loss"], metrics["acc"])
        """
        _check_module(module)
        rt = self._runtime()
        module.to(rt.device)
        micro = self.micro_batch_size or (max(1, self.batch_size // rt.world_size) if self.batch_size else 64)
        source = self._val_source(data, micro, rt.world_size)
        try:
            return self._evaluate(module, module, source)
        finally:
            source.close()

    # ------------------------------------------------------------------ the step's parts

    def _item_weights(self, module: LoopModule, window: Window) -> tuple[list[Any], Any, Any]:
        """Per-micro-batch loss weights ``n_i * world_size / N`` (one all-reduce for N), the item count N,
        and the stop flags (max_time up, preemption signal) of all ranks, folded into the same all-reduce."""
        rt = self._rt
        assert rt is not None
        if not window.micro_batches:  # this rank joins the all-reduce with an empty contribution
            counts: list[Any] = [0]
        else:
            counts = [module.count_items(b) for b in window.micro_batches]
            for n in counts:
                self.doctor.check_count(module, n)
        if rt.world_size == 1 and all(isinstance(n, int) for n in counts):
            total = sum(counts)
            return [n / max(total, 1) for n in counts], total, False
        local = sum(counts[1:], counts[0])
        flags = torch.tensor([float(self._time_up()), float(self._preempted)], device=rt.device, dtype=torch.float64)
        packed = torch.cat([torch.as_tensor(local, device=rt.device).double().reshape(1), flags])
        rt.all_reduce_sum(packed)
        total_t = packed[0].clamp(min=1)
        scale = rt.world_size / total_t
        weights = [(n * scale).float() for n in counts]
        # The stop flag stays on the device; _optimizer_step reads it with the NaN flag in one go.
        return weights, packed[0], packed[1:]

    def _optimizer_step(
        self,
        model: nn.Module,
        opt: Optimization,
        params: list[torch.Tensor],
        window: Window,
        window_loss: torch.Tensor,
        log_now: bool,
        stop: Any,
    ) -> tuple[bool, torch.Tensor | None, tuple[bool, bool]]:
        """Unscale, measure, clip, guard against non-finite values, then step. Returns
        (applied, pre-clip grad norm or None where nothing needs it (no clipping, not a log step),
        (max_time up on any rank, preemption signal on any rank))."""
        rt = self._rt
        assert rt is not None
        if self._pending is not None:
            self._settle()  # the previous step's verdict first, if it came a step late (before this step applies)
        scaler = rt.scaler
        if scaler is not None:
            scaler.unscale_(opt.optimizer)
        grad_norm: torch.Tensor | None = None
        flag: torch.Tensor | None = None  # 1.0 where a gradient or the loss is non-finite (the cheap check)
        if rt.fsdp:  # grads are sharded: only FSDP knows the global norm
            grad_norm = model.clip_grad_norm_(self.clip_grad_norm or math.inf)  # type: ignore[operator]
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not log_now and self.clip_grad_norm is None and rt.world_size == 1 and scaler is None:
                # Nothing reads the total norm this step, only whether something went non-finite:
                # one fused check tells that for half the cost of the norms.
                flag = self._finite_check([*grads, window_loss])
            if flag is None:
                grad_norm = gradient_ops.grad_norm(grads) if grads else torch.zeros((), device=rt.device)
                if self.clip_grad_norm is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, grad_norm, foreach=True)
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip_grad_value)
        if self._defer and not log_now and not self.doctor.checking:
            return self._step_deferred(opt, window, window_loss, flag, grad_norm, stop)

        # The one host read per step: did anything go non-finite, and does any rank want to stop?
        # Under fp16 the GradScaler owns overflowing gradients, so only the loss is checked here;
        # the overflow flag its unscale_ just computed joins the same read, so telling a skipped
        # step needs no GradScaler.get_scale() (a host sync each, before and after).
        overflow: list[torch.Tensor] = []
        if scaler is not None:
            found = scaler._found_inf_per_device(opt.optimizer).values()
            overflow = [sum(found, torch.zeros((), device=rt.device)).double().reshape(1)]
        if rt.world_size > 1:
            # After DDP's all-reduce the gradients are identical on every rank, so the norm
            # decides the same everywhere; a rank-local loss must not (ranks would disagree
            # and the next collective would hang). Under fp16 the scaler's verdict, taken on
            # those same reduced gradients, already agrees across ranks.
            assert grad_norm is not None  # (the fused check runs on one process only)
            bad = ~torch.isfinite(grad_norm) if scaler is None else torch.zeros((), dtype=torch.bool, device=rt.device)
            bad_f, time_f, preempt_f, *overflow_f = torch.cat([bad.double().reshape(1), stop, *overflow]).tolist()
            bad_host, stop_host = bool(bad_f), (time_f > 0, preempt_f > 0)
        elif scaler is None:
            if flag is not None:
                bad_host = flag.item() != 0.0  # the one read
                if bad_host:
                    self._finite_check.clear()
            else:
                assert grad_norm is not None
                bad_host = not all(map(math.isfinite, gradient_ops.pack([grad_norm, window_loss]).tolist()))
            overflow_f, stop_host = [], (self._time_up(), self._preempted)
        else:
            bad = ~torch.isfinite(window_loss)
            bad_f, *overflow_f = torch.cat([bad.double().reshape(1), *overflow]).tolist()
            bad_host, stop_host = bool(bad_f), (self._time_up(), self._preempted)
        if bad_host:
            if self.nan_policy == "raise":
                self.doctor.diagnose_nonfinite(window_loss, params)  # names the culprit while the gradients exist
            self._on_nonfinite(opt, (self.step, self.epoch, window.index))
            return False, grad_norm, stop_host
        self.consecutive_skips = 0
        if scaler is None:
            opt.optimizer.step()
            return True, grad_norm, stop_host
        # GradScaler.step calls optimizer.step() only without an overflow (the flag read above), and
        # update() then lowers the scale; an overflow-skipped step does not advance the scheduler.
        scaler.step(opt.optimizer)
        scaler.update()
        applied = not any(overflow_f)
        if not applied:
            self.skipped_steps += 1
        return applied, grad_norm, stop_host

    def _step_deferred(
        self,
        opt: Optimization,
        window: Window,
        window_loss: torch.Tensor,
        flag: torch.Tensor | None,
        grad_norm: torch.Tensor | None,
        stop: Any,
    ) -> tuple[bool, torch.Tensor | None, tuple[bool, bool]]:
        """Step with the guard's flag as the optimizer's own skip switch, and read the flag a step
        late (framework.guard): no host sync. Returns as an applied step; _settle undoes a bad one."""
        rt = self._rt
        assert rt is not None
        if flag is None:  # the total norm was measured (clipping, several processes)
            assert grad_norm is not None
            ok = torch.isfinite(grad_norm)
            if rt.world_size == 1:  # (under DDP only the all-reduced norm agrees across ranks)
                ok = ok & torch.isfinite(window_loss)
            flag = (~ok).float()
        found = flag.reshape(())
        flags = found.double().reshape(1) if rt.world_size == 1 else torch.cat([found.double().reshape(1), stop])
        self._pending = Pending.before_step(
            self.step, self.epoch, window.index, read_later(flags), opt.optimizer, self._step_scheduler(opt)
        )
        step_unless_found(opt.optimizer, found)
        return True, grad_norm, ((self._time_up(), self._preempted) if rt.world_size == 1 else (False, False))

    def _settle(self) -> None:
        """Read the verdict of a step taken with it pending; undo the host's part of it if it was bad."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        bad, *stop = pending.read()
        if stop:  # several processes: the stop flags came with the verdict
            self._stop_requested |= stop[0] > 0 or stop[1] > 0
            self._preempted |= stop[1] > 0
        if not bad:
            self.consecutive_skips = 0
            return
        assert self._fit is not None
        opt = self._fit.opt
        # The optimizer skipped that step on the device; undo what the host did for it.
        pending.undo(opt.optimizer, self._step_scheduler(opt))
        self._finite_check.clear()
        self.doctor.retract_applied()
        if self.trace is not None:
            self.trace[:] = [e for e in self.trace if not (e[1] == pending.step and e[0] in _STEP_EVENTS)]
        # The gradients of the step in progress are good; they go only if the run stops here.
        position = (pending.step, pending.epoch, pending.batch)
        self._on_nonfinite(opt, position, drop_gradients=self.nan_policy == "raise", deferred=True)

    def _step_scheduler(self, opt: Optimization) -> Any:
        return opt.scheduler if opt.interval == "step" else None

    def _decide_deferral(self, opt: Optimization, rt: Runtime) -> tuple[bool, str | None]:
        """(defer?, why not where it cannot). nan_check="auto": defer on a GPU where the optimizer can skip
        on the device; "deferred": also on CPU (where reading at once costs nothing), an error where it cannot."""
        if self.nan_check == "step":
            return False, None
        reason = why_not_deferred(opt.optimizer, opt.scheduler, opt.interval)
        if reason is None and (rt.scaler is not None or rt.fsdp):
            reason = "fp16 (its GradScaler owns the skip) and FSDP read the verdict at once"
        if self.nan_check == "deferred" and reason is not None:
            raise ValueError(f'nan_check="deferred": {reason}; or use nan_check="step"')
        return reason is None and (self.nan_check == "deferred" or rt.device.type == "cuda"), reason

    def _on_nonfinite(
        self, opt: Optimization, position: tuple[int, int, int], drop_gradients: bool = True, deferred: bool = False
    ) -> None:
        """Count or raise for a bad step at ``position`` = (optimizer step, epoch, batch)."""
        where = "optimizer step {} (epoch {}, batch {})".format(*position)
        if self._rt is not None and self._rt.scaler is not None:
            self._rt.scaler.update()  # the scaler must close its step even when we drop it
        if drop_gradients:
            gradient_ops.zero_grad(opt.optimizer)  # the bad gradients go before anything can step on them
        if self.nan_policy == "raise":
            late = " (read a step late, nan_check=deferred; nan_check='step' names the parameters)" if deferred else ""
            raise NonFiniteError(
                f"non-finite loss or gradient norm at {where}{self.doctor.nonfinite_detail}{late}; parameters and "
                "optimizer state are unchanged. Fix: lower the learning rate, set clip_grad_norm, check that batch's "
                'data, or use nan_policy="skip" to drop such steps'
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive non-finite steps up to {where} "
                f"(max_consecutive_skips={self.max_consecutive_skips}); training has diverged: lower the "
                "learning rate or set clip_grad_norm"
            )

    def _evaluate(self, module: LoopModule, model: nn.Module, source: Source) -> dict[str, float]:
        """Exact global means over ``source`` (see :func:`framework.evaluation.evaluate`)."""
        assert self._rt is not None
        return evaluate(module, model, source, self._rt, self.doctor, self.limit_val_batches, self.compile)

    # ------------------------------------------------------------------ checkpoints and preemption

    def _checkpoint_root(self) -> Path:
        assert self.run_dir is not None
        return Path(self.run_dir) / "checkpoints"

    def _save(self, monitor_value: float | None = None) -> None:
        assert self._fit is not None
        self._settle()  # a checkpoint holds settled state only
        path = checkpoint.save_engine(self, self._fit, self._checkpoint_root(), monitor_value=monitor_value)
        self._saved_step = self.step
        fire(self.callbacks, "on_checkpoint_save", self, str(path))

    def _restore(self, fit: _Fit) -> Path | None:
        """Apply ``resume``: None (fresh), "auto" (newest complete checkpoint, else fresh), or a path.
        Returns the checkpoint loaded, or None."""
        if self.resume is None:
            return None
        if self.resume == "auto":
            path = checkpoint.newest_complete(self._checkpoint_root())
            if path is None:
                return None
        else:
            path = Path(self.resume)
            if not path.is_dir():
                raise checkpoint.CheckpointError(
                    f"resume={self.resume!r} does not exist; pass an existing checkpoint directory or resume='auto'"
                )
        checkpoint.load_engine(self, fit, path)
        self._saved_step = self.step
        fire(self.callbacks, "on_checkpoint_load", self, str(path))
        return path

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Preemption signals only set a flag; the loop checkpoints at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for name in self.preemption_signals:
            signum = getattr(signal, name)
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._preempted = self._stop_requested = True

    def _preempt_exit(self, progress: Progress, log: MetricsLog, previous: dict[int, Any]) -> None:
        rt = self._rt
        assert rt is not None
        if self.run_dir is not None:
            if self._saved_step != self.step:
                self._save()
            where = f"checkpoint saved to {self._checkpoint_root() / f'step-{self.step:08d}'}"
        else:
            where = "no checkpoint (no run_dir)"
        progress.close()
        log.close()
        self._restore_signal_handlers(previous)
        if rt.is_main:
            print(
                f"preempted at step {self.step}: {where}; resume with Engine(resume='auto', ...)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(143)

    # ------------------------------------------------------------------ plumbing

    def _record(self, name: str, micro: int) -> None:
        if self.trace is not None:
            self.trace.append((name, self.step, micro))

    def _runtime(self) -> Runtime:
        if self._rt is None:
            self._rt = make_runtime(self.mixed_precision, self.log_with, self.run_dir)
        return self._rt

    def _source(self, data: Any, batching: Batching, shuffle: bool, training: bool = True) -> Source:
        rt = self._rt
        assert rt is not None
        return make_source(
            data,
            batching,
            rank=rt.rank,
            seed=self.seed,
            shuffle=shuffle,
            to_device=rt.to_device,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            stream_sharded=self.stream_sharded and training,
            drop_last=self.drop_last and training,  # (validation sees every item)
            prefetch=self.prefetch,
            device=rt.device,
            all_reduce=rt.all_reduce_sum,
        )

    def _val_source(self, data: Any, micro: int | None, world_size: int) -> Source:
        """Validation batches of ``micro`` items per process (a DataLoader keeps its own batch size)."""
        from torch.utils.data import DataLoader

        if isinstance(data, DataLoader) or micro is None:
            batching = resolve_batching(data, None, None, world_size)
        else:
            batching = Batching(micro * world_size, micro, 1, world_size)
        return self._source(data, batching, shuffle=False, training=False)

    def _epoch(self, source: Source) -> Any:
        """This epoch's windows from the current position, with the debug limits applied."""
        epoch = 0 if self.overfit_batches else self.epoch
        limit = self.overfit_batches or self.limit_train_batches
        empty = True
        for window in source.windows(epoch, self.batch_in_epoch, self.items_read):
            if limit is not None and window.index >= limit:
                return
            if self.stream_sharded and self._all_shards_ended(window.exhausted):
                return
            empty = False
            yield window
        if empty and self.batch_in_epoch == 0:
            raise ValueError("the training data yielded no batches this epoch; pass a non-empty dataset")

    def _all_shards_ended(self, exhausted: bool) -> bool:
        """Self-sharded streams end at different points per rank; the epoch ends when all have.
        (One small all-reduce and host read per step, only with stream_sharded=True.)"""
        rt = self._rt
        assert rt is not None
        flag = rt.all_reduce_sum(torch.tensor([float(exhausted)], device=rt.device))
        return int(flag.item()) == rt.world_size

    def _epoch_windows(self, source: Source) -> int | None:
        n = source.num_windows()
        limit = self.overfit_batches or self.limit_train_batches
        return min(n, limit) if (n is not None and limit is not None) else (n if limit is None else limit)

    def _time_up(self) -> bool:
        return self.max_time is not None and time.monotonic() - self._t0 >= self.max_time

    def _done(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            return True
        return self._stop_requested or self.should_stop

    def _log_train(
        self, opt: Optimization, losses: TrainLoss, items: Any, grad_norm: Any, t_since: float
    ) -> dict[str, float]:
        rt = self._rt
        assert rt is not None
        # Log steps are the only place the loop reads device values (a host sync on GPU).
        # `items` is already global (it came out of the window's all-reduce); the losses are per rank
        # (each rank's window loss is its share of world_size x the step's mean loss).
        loss_total, finite_steps = losses.take()
        loss_total, finite_steps, n_items = torch.stack(
            [loss_total, finite_steps.double(), torch.as_tensor(items, device=rt.device).double()]
        ).tolist()
        elapsed = max(time.monotonic() - t_since, 1e-9)
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "train/loss": loss_total / rt.world_size / finite_steps if finite_steps else math.nan,
            "lr": float(opt.optimizer.param_groups[0]["lr"]),
            "train/items_per_sec": n_items / elapsed,
            # The fraction of the time since the last log the step waited for input (measured by the data layer).
            "train/data_wait": self._fit.source.wait.take() if self._fit is not None else 0.0,
        }
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        if self.skipped_steps:
            record["train/skipped_steps"] = self.skipped_steps
        self.metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
        return record


def _check_module(module: Any) -> None:
    if not isinstance(module, LoopModule):
        raise TypeError(
            f"Engine.fit/validate need a LoopModule, got {type(module).__name__}; subclass "
            "framework.LoopModule and define forward(inputs) and compute_loss(outputs, targets)"
        )
    if type(module).compute_loss is LoopModule.compute_loss:
        raise LoopError(
            f"{type(module).__name__} does not define compute_loss(outputs, targets); add it, returning "
            "the mean loss over the batch's items"
        )


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
