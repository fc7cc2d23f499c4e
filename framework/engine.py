"""The Engine: owns the training loop, in the canonical order.

For every optimizer step (every *window* of micro-batches), ``fit`` runs, in this order and no other:

1. zero gradients (once, before the window's first micro-batch)
2. forward                                 (per micro-batch)
3. loss                                    (per micro-batch)
4. backward, scaled by ``n_i * world_size / N`` (the exactness rule, docs/DESIGN.md)
5. optimizer step (:class:`framework.step.OptimizerStep`), then the per-step schedulers

With several optimizers they all step jointly in 5; with alternating phases (``compute_loss(...,
phase)``) steps 1, 3, 4 and 5 run once per phase, in order, on a forward shared by the phases.
What one fit works on is built by :func:`framework.fit.prepare_fit`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callback, fire
from .checkpoint import state
from .config import EngineConfig
from .data import Window
from .doctor import Doctor, LoopError, max_steps_override
from .evaluation import check_metrics, evaluate, predict
from .fit import Fit, prepare_fit, validation_source
from .guard import NonFiniteError
from .module import LoopModule
from .observability import run_info
from .parallel import grads as gradient_ops
from .parallel import make_strategy
from .parallel.runtime import Runtime, make_runtime
from .step import StepResult

__all__ = ["Engine", "NonFiniteError"]


class _Counter:
    """An Engine attribute that reads and writes the checkpointed :class:`framework.state.Counters`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        return self if engine is None else getattr(engine.counters, self.name)

    def __set__(self, engine: Any, value: Any) -> None:
        setattr(engine.counters, self.name, value)


class Engine:
    """Runs ``fit``, ``validate`` and ``predict`` for a :class:`LoopModule`.

    Example::

        engine = Engine(max_epochs=10, batch_size=64, seed=0, run_dir="runs/digits")
        engine.fit(Classifier(), train_data, val_data)
        metrics = engine.validate(module, val_data)   # {"loss": ..., "acc": ...}
        probs = engine.predict(module, test_inputs)   # one row per item, in data order

    Every argument is keyword-only and optional; each is checked at construction, with a message that
    names it and the fix. They are documented once, in :mod:`framework.config` (``describe()`` lists
    them; the README's table is generated from it): when to stop (``max_epochs``, ``max_steps``,
    ``max_time``), global batches (``batch_size``, ``micro_batch_size``, ``shuffle``, ``drop_last``,
    data loading), precision and ``compile``, the optimizer step (clipping, ``nan_policy``,
    ``nan_check``, ``ema_decay``), the run dir and checkpoints, logging, the doctor, the strategy
    (``"auto"`` | ``"ddp"`` | ``"fsdp"``) and preemption. ``callbacks`` is the one that is not config.
    """

    step = _Counter()  # optimizer steps taken (windows done), skipped ones included
    epoch = _Counter()
    batch_in_epoch = _Counter()  # windows done in the current epoch
    items_read = _Counter()  # stream items read in the current epoch (IterableDataset only)
    micro_steps = _Counter()  # micro-batches consumed on this rank
    skipped_steps = _Counter()
    consecutive_skips = _Counter()
    should_stop = _Counter()  # callbacks may set it; checked between steps

    def __init__(self, *, callbacks: list[Callback] | tuple[Callback, ...] = (), **options: Any) -> None:
        self.config = EngineConfig.from_options(**options)
        bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
        if bad:
            raise TypeError(f"callbacks must be framework.Callback instances; got {bad}: subclass framework.Callback")
        self.callbacks = list(callbacks)
        self.doctor = Doctor(self.config.logging.doctor)
        self.trace: list[tuple[Any, ...]] | None = [] if self.config.logging.trace else None
        # FRAMEWORK_MAX_STEPS caps it: `python -m framework doctor` runs a recipe for a few steps.
        self.max_steps = max_steps_override(self.config.stop.max_steps)
        self.counters = state.Counters()
        self.metrics: dict[str, float] = {}  # the last logged values
        self.last_step: StepResult | None = None  # what the last optimizer step did (applied, skipped, pending)
        self.fitting = False
        self._rt: Runtime | None = None
        self._fit: Fit | None = None
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ public API

    def fit(self, module: LoopModule, train_data: Any, val_data: Any = None) -> Engine:
        """Train ``module`` in place on ``train_data`` (Dataset, IterableDataset, DataLoader or tensors).

        Validates on ``val_data`` at each epoch end (or every ``val_every_n_steps``). Returns the engine.

        Example::

            engine = Engine(max_epochs=5, batch_size=64)
            engine.fit(model, train_ds, val_ds)
            print(engine.metrics["val/loss"])
        """
        _check_module(module)
        if self.config.stop.max_epochs is None and self.max_steps is None:
            raise ValueError(
                "fit needs max_epochs or max_steps (or both), e.g. Engine(max_epochs=10, ...); "
                "max_time alone would train until the clock runs out"
            )
        rt = self._runtime()
        run_dir = self.config.checkpoint.run_dir
        with run_info.run_dir_lock(run_dir, rt):  # (one fit at a time writes a run dir)
            if self.config.checkpoint.resume is None and self._fit is None:  # (a later fit continues its run)
                run_info.refuse_earlier_run(run_dir)
            self._fit = run = prepare_fit(self, rt, module, train_data, val_data)
            self.fitting = True
            try:
                self._fit_loop(run)
            finally:
                self.fitting = False
                run.close()
        return self

    def _fit_loop(self, run: Fit) -> None:
        """The fit loop: per window a train step (the five steps) and what follows it; per epoch validation."""
        fire(self.callbacks, "on_fit_start", self, run.module)
        with run.stops.installed():
            run.module.train()
            while not self._done(run):
                fire(self.callbacks, "on_epoch_start", self, run.module)
                run.start_epoch(self.epoch, self.batch_in_epoch)
                epoch_ended = True
                for window in run.epoch(self.epoch if not self.config.data.overfit_batches else 0, self.counters):
                    items = self._train_step(run, window)
                    self._after_step(run, window, items)
                    if self._done(run):
                        epoch_ended = self.batch_in_epoch == run.n_windows
                        break
                if not epoch_ended:
                    break
                self._end_epoch(run)
            self._end_fit(run)

    def _train_step(self, run: Fit, window: Window) -> Any:
        """One optimizer step: the five canonical steps, once per phase (one phase unless compute_loss takes
        ``phase``), on a forward per micro-batch that the phases share. Returns the window's item count."""
        module, model, rt = run.module, run.model, run.rt
        self.doctor.start_step()  # checked step or not (sparse under "basic": no host sync otherwise)
        batches, weights, items, stop = run.weigh(window)  # one all-reduce: item counts (and stop flags)
        outputs_of: list[Any] = [None] * len(batches)  # the shared forwards (alternating phases)
        step = self.counters.step  # (read once: Engine.step is a descriptor over the counters)
        log_now = (step + 1) % self.config.logging.log_every_n_steps == 0
        result = StepResult(False)
        for p, (phase, optimizer_step) in enumerate(run.steps):
            # 1. zero gradients: once per window (per phase), before its first micro-batch
            self._record("zero_grad", 0, phase)
            for optimizer in optimizer_step.optimizers:
                gradient_ops.zero_grad(optimizer)  # = optimizer.zero_grad(set_to_none=True)
            window_loss: Any = None  # sum of the weighted micro-batch losses, on device
            for i, batch in enumerate(batches):
                inputs, targets = module.split_batch(batch)
                real, last = i < len(window.micro_batches), i == len(batches) - 1
                if not real:
                    module.eval()  # a zero-weight filler must not update BatchNorm stats or draw dropout
                with run.strategy.no_sync(model, sync=last):
                    # (the doctor's watch catches backward/step/zero_grad called from user code)
                    with rt.autocast(), self.doctor.watch(module, batch, "forward" if p == 0 else "compute_loss"):
                        if outputs_of[i] is None:
                            # 2. forward (once per micro-batch: alternating phases share it)
                            self._record("forward", i, phase)
                            outputs = model(inputs)
                            if run.phased:
                                outputs_of[i] = outputs
                            if real:
                                self.doctor.check_train_mode(module, "forward")
                        else:
                            outputs = outputs_of[i]
                        # 3. loss
                        self._record("loss", i, phase)
                        loss = run.compute_loss(outputs, targets, phase)  # (with `phase` in alternating phases)
                        self.doctor.check_loss(module, loss, outputs, phase=phase)
                    # 4. backward, weighted so the window's gradient is the mean over all its items
                    #    (a weight of exactly 1.0, one micro-batch on one process, changes no bit: no op)
                    self._record("backward", i, phase)
                    weight = weights[i]
                    scaled = loss if isinstance(weight, float) and weight == 1.0 else loss * weight
                    backward = scaled
                    if last and rt.world_size > 1 and window.micro_batches:  # (the window's loss keeps its value)
                        backward = run.poison_if_nonfinite(scaled, window_loss)
                    retain = run.phased and p < len(run.steps) - 1  # (later phases backward through the forward)
                    (rt.scaler.scale(backward) if rt.scaler is not None else backward).backward(retain_graph=retain)
                part = scaled.detach()
                if part.dtype != torch.float32:
                    part = part.float()  # the window's loss sums in fp32 (a bf16 loss would round)
                window_loss = part if window_loss is None else window_loss + part
            if len(batches) > len(window.micro_batches) or not module.training:
                module.train()  # back from the filler's eval mode (a whole-tree walk: not every step)
            self.doctor.after_backward(phase)  # trainable parameters that got no gradient (checked steps)
            if step == run.first_step:
                run.strategy.check_unused(module, optimizer_step.params)  # DDP: idle parameters, named at step 1
            # 5. optimizer step (then the per-step schedulers and the EMA), unless the NaN policy drops it
            position = (step, self.counters.epoch, window.index)
            result = optimizer_step(
                window_loss, log_now=log_now, stop=stop if p == 0 else None, position=position, micro=len(batches)
            )
            self.doctor.after_optimizer_step(result.applied, phase)
            run.losses[p].add(window_loss)  # (stays on the device: summed and read on log steps)
            run.grad_norms[p] = result.grad_norm
        self.last_step = result
        return items

    def _after_step(self, run: Fit, window: Window, items: Any) -> None:
        """Between steps: counters, logging, callbacks, validation, checkpoints, stops. They only read state."""
        c = self.counters  # (Engine.step etc. read and write these; direct access in the per-step path)
        c.step += 1
        step = c.step
        c.batch_in_epoch = window.index + 1
        c.items_read = window.items_read
        c.micro_steps += len(window.micro_batches)
        run.items_sum = run.items_sum + items
        record: dict[str, float] = {}
        if step % self.config.logging.log_every_n_steps == 0:
            record = run.train_record(step, c.epoch, c.skipped_steps)
            self.metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
            run.log.write(record)
        run.progress.update(1, record, step)
        fire(self.callbacks, "on_step_end", self, run.module, record)
        if run.rt.world_size == 1:
            run.stops.agree_locally()  # (several processes: agreed through the step's all-reduce)
        every = self.config.val_every_n_steps
        ck = self.config.checkpoint
        if every and step % every == 0 and run.val_source is not None:
            metrics = self._validate_in_fit(run)
            at_epoch_end = self.config.checkpoint_every_epoch and run.epoch_ends_here  # (saved there, once)
            if (self.config.checkpoint_every_epoch or ck.checkpoint_every_n_steps) and not at_epoch_end:
                self._save(monitor_value=metrics.get(ck.monitor))
        elif ck.checkpoint_every_n_steps and step % ck.checkpoint_every_n_steps == 0 and not run.epoch_ends_here:
            self._save()  # (the last window of an epoch is saved after its validation instead)
        if run.stops.exit_code is not None:
            self._preempt_exit(run)

    def _end_epoch(self, run: Fit) -> None:
        """The epoch is complete: validate (unless by steps), step per-epoch schedulers, checkpoint."""
        run.settle()
        t_pause = time.monotonic()
        epoch_metrics: dict[str, float] = {"epoch_time": t_pause - run.t_epoch}
        if run.val_source is not None and not self.config.val_every_n_steps:
            epoch_metrics.update(self._validate_in_fit(run, log=False))
        self.metrics.update(epoch_metrics)
        run.log.write({"step": self.step, "epoch": self.epoch, **epoch_metrics})
        run.progress.message(f"epoch {self.epoch} step {self.step}: " + _fmt_metrics(epoch_metrics))
        for o in run.optimizers:
            if o.scheduler is not None and o.interval == "epoch":
                o.scheduler.step()
        fire(self.callbacks, "on_epoch_end", self, run.module, epoch_metrics)
        run.t_log += time.monotonic() - t_pause  # train/items_per_sec measures training, not validation
        self.epoch += 1
        self.batch_in_epoch = self.items_read = 0
        if self.config.checkpoint_every_epoch:
            every = self.config.val_every_n_steps  # (by steps: the validation of this step, if any, ranks it)
            validated = epoch_metrics if not every else self.metrics if self.step % every == 0 else {}
            self._save(monitor_value=validated.get(self.config.checkpoint.monitor))
        if run.rt.world_size == 1:
            run.stops.agree_locally()
        if run.stops.exit_code is not None:
            self._preempt_exit(run)

    def _end_fit(self, run: Fit) -> None:
        run.settle()  # the last step's verdict, if it is still on its way
        ck = self.config.checkpoint
        checkpointing = self.config.checkpoint_every_epoch or ck.checkpoint_every_n_steps
        if ck.run_dir is not None and self._saved_step != self.step and checkpointing:
            self._save()  # the final state, so a longer run can resume from it
        self._wait_for_checkpoints()  # (a background write is on disk before fit returns)
        run.stops.agree_now(run.rt)  # (one collective per fit: a signal after the last step still stops)
        if run.stops.exit_code is not None:
            self._preempt_exit(run)
        if run.losses and run.losses[0].pending:  # the steps since the last log step: a short run shows its loss
            record = run.train_record(self.step, self.epoch, self.counters.skipped_steps)
            self.metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
        data_note = run.source.report()  # where input was made; a fix if the step waited for it > 10% of the time
        if data_note is not None:
            run.progress.message(data_note)
        run.progress.message(run.final_summary(self.step, self.metrics))  # (metrics.jsonl keeps its cadence)
        run.close_logs()
        self.doctor.end_fit()  # decides the checks still pending after a short fit
        fire(self.callbacks, "on_fit_end", self, run.module)

    def _validate_in_fit(self, run: Fit, log: bool = True) -> dict[str, float]:
        """Validation during fit: buffers agreed, EMA weights in, ``val/*`` checked against ``monitor``."""
        run.settle()
        t_pause = time.monotonic()
        assert run.val_source is not None
        with run.evaluating():
            val = evaluate(
                run.module, run.eval_model, run.val_source, run.rt, self.doctor, self.config.data.limit_val_batches,
                stateful=run.metric_objects, forwards=run.strategy.forwards, phases=run.val_phases,
            )  # fmt: skip
        metrics = {f"val/{k}": v for k, v in val.items()}
        ck = self.config.checkpoint
        if ck.keep_best and ck.monitor not in metrics:
            raise ValueError(
                f"keep_best={ck.keep_best} ranks checkpoints by monitor={ck.monitor!r}, which validation does not "
                f"log; pick one of {sorted(metrics)}"
            )
        fire(self.callbacks, "on_validation_end", self, run.module, metrics)
        if log:
            self.metrics.update(metrics)
            run.log.write({"step": self.step, "epoch": self.epoch, **metrics})
            run.progress.message(f"step {self.step}: " + _fmt_metrics(metrics))
            run.t_log += time.monotonic() - t_pause
        return metrics

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
        self._wait_for_checkpoints()
        target = Path(path)
        saver, self._fit.saver = self._fit.saver, None  # (a manual save is synchronous: on disk when it returns)
        try:
            return str(self._fit.save(target.parent.resolve(), target.name, None, prune=False))
        finally:
            self._fit.saver = saver

    def validate(self, module: LoopModule, data: Any) -> dict[str, float]:
        """Exact means over ``data``: ``{"loss": ..., <compute_metrics keys>: ..., <configure_metrics names>: ...}``.

        Runs in eval mode under ``torch.inference_mode()``; every item counts once, at any world size
        (no padding duplicates, none dropped). During or after a fit of ``module`` it uses that fit's
        model (EMA weights if ``ema_decay`` is set; ranks' buffers agreed). ``Engine(batch_size=...)`` is
        enough. Fires ``on_validation_end``. The module's mode is restored.

        Example::

            metrics = Engine(batch_size=64).validate(model, val_ds)
            print(metrics["loss"], metrics["acc"])
        """
        _check_module(module)
        run, model, strategy = self._for_inference(module)
        rt = self._runtime()
        source = validation_source(self, rt, data)
        owner = f"{type(module).__name__}.configure_metrics"
        stateful = (
            run.metric_objects if run is not None else check_metrics(module.configure_metrics(), owner, rt.world_size)
        )
        with run.evaluating() if run is not None else _NullContext(), contextlib.closing(source):
            val = evaluate(
                module, model, source, rt, self.doctor, self.config.data.limit_val_batches,
                stateful=stateful, forwards=strategy.forwards,
                phases=run.val_phases if run is not None else _phases(module),
            )  # fmt: skip
        fire(self.callbacks, "on_validation_end", self, module, {f"val/{k}": v for k, v in val.items()})
        return val

    def predict(self, module: LoopModule, data: Any) -> Any:
        """The outputs of ``module.predict_step`` for every item of ``data``, in data order: one row per item,
        concatenated (tensors, or dicts/tuples of tensors leaf by leaf), identical on every rank.

        Eval mode, ``torch.inference_mode()``; batches without targets are fine (a bare tensor of inputs too).
        ``Engine(batch_size=...)`` is enough. During or after a fit of ``module`` it uses that fit's model
        (EMA weights if ``ema_decay`` is set).

        Example::

            probs = Engine(batch_size=256).predict(model, test_x)   # shape [len(test_x), n_classes]
        """
        _check_module(module, need_loss=False)
        run, model, strategy = self._for_inference(module)
        rt = self._runtime()
        source = validation_source(self, rt, data, predicting=True)
        with run.evaluating() if run is not None else _NullContext(), contextlib.closing(source):
            return predict(module, model, source, rt, forwards=strategy.forwards)

    def _for_inference(self, module: LoopModule) -> tuple[Fit | None, Any, Any]:
        """The fit of ``module`` if there is one (its eval model and strategy), else the module on this device."""
        run = self._fit if self._fit is not None and self._fit.module is module else None
        if run is not None:
            return run, run.eval_model, run.strategy
        rt = self._runtime()
        module.to(rt.device)
        return None, module, make_strategy(rt, self.config.distributed.strategy)

    # ------------------------------------------------------------------ checkpoints and preemption

    def _save(self, monitor_value: float | None = None) -> None:
        assert self._fit is not None
        self._wait_for_checkpoints()  # (checkpoint_async: one write in flight; its callback fires once on disk)
        root = Path(self.config.checkpoint.run_dir or ".") / "checkpoints"
        path = self._fit.save(root, f"step-{self.step:08d}", monitor_value, prune=True)
        self._saved_step = self.step
        if self._fit.saver is None:
            fire(self.callbacks, "on_checkpoint_save", self, str(path))

    def _wait_for_checkpoints(self) -> None:
        """A background write (checkpoint_async) finished: its on_checkpoint_save fires now."""
        done = self._fit.wait_for_checkpoints() if self._fit is not None else None
        if done is not None:
            fire(self.callbacks, "on_checkpoint_save", self, str(done))

    def _restore(self, run: Fit) -> Path | None:
        """Apply ``resume`` (:meth:`framework.fit.Fit.restore`); returns the checkpoint loaded, or None.
        Called by :func:`framework.fit.prepare_fit`."""
        path = run.restore(self.config.checkpoint.resume, Path(self.config.checkpoint.run_dir or ".") / "checkpoints")
        if path is not None:
            self._saved_step = self.step
            fire(self.callbacks, "on_checkpoint_load", self, str(path))
        return path

    def _preempt_exit(self, run: Fit) -> None:
        """Every rank at the same step boundary: checkpoint (if a run dir), say where, exit 143 or 130."""
        run.settle()
        if self.config.checkpoint.run_dir is not None:
            if self._saved_step != self.step:
                self._save()
            root = Path(self.config.checkpoint.run_dir) / "checkpoints"
            where = f"checkpoint saved to {root / f'step-{self.step:08d}'}"
        else:
            where = "no checkpoint (no run_dir)"
        self._wait_for_checkpoints()  # (on disk before the process exits)
        run.close_logs()
        code = run.stops.exit_code
        if run.rt.is_main:
            what = "interrupted (Ctrl-C)" if code == 130 else f"preempted ({run.stops.signal_name})"
            print(
                f"{what} at step {self.step}: {where}; resume with Engine(resume='auto', ...)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(code)

    # ------------------------------------------------------------------ plumbing

    def _record(self, name: str, micro: int, label: str | None = None) -> None:
        if self.trace is not None:
            self.trace.append((name, self.step, micro) if label is None else (name, self.step, micro, label))

    def _runtime(self) -> Runtime:
        if self._rt is None:
            c = self.config
            self._rt = make_runtime(
                c.precision.mixed_precision, c.logging.log_with, c.checkpoint.run_dir,
                strategy=c.distributed.strategy, timeout=c.distributed.collective_timeout,
            )  # fmt: skip
        return self._rt

    def _done(self, run: Fit) -> bool:
        c, max_epochs = self.counters, self.config.stop.max_epochs
        if self.max_steps is not None and c.step >= self.max_steps:
            return True
        if max_epochs is not None and c.epoch >= max_epochs:
            return True
        return run.stops.requested or c.should_stop

    @property
    def world_size(self) -> int:
        """How many processes train (1 before the first fit/validate/predict)."""
        return self._rt.world_size if self._rt is not None else 1

    @property
    def rank(self) -> int:
        return self._rt.rank if self._rt is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _check_module(module: Any, need_loss: bool = True) -> None:
    if not isinstance(module, LoopModule):
        raise TypeError(
            f"Engine.fit/validate/predict need a LoopModule, got {type(module).__name__}; subclass "
            "framework.LoopModule and define forward(inputs) and compute_loss(outputs, targets)"
        )
    if need_loss and type(module).compute_loss is LoopModule.compute_loss:
        raise LoopError(
            f"{type(module).__name__} does not define compute_loss(outputs, targets); add it, returning "
            "the mean loss over the batch's items"
        )


def _phases(module: LoopModule) -> list[str] | None:
    """The phases a standalone validation reports a loss for (a compute_loss that requires ``phase``)."""
    from .optim import parse_optimizers, phase_is_required

    if not phase_is_required(module.compute_loss):
        return None
    return [o.name for o in parse_optimizers(module.configure_optimizers(), shared_ok=True)]


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}" for k, v in metrics.items()
    )
