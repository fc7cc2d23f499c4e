"""The Engine: owns the training loop, in the canonical order.

For every optimizer step (every *window* of micro-batches), ``fit`` runs, in this order and no other:

1. zero gradients (once, before the window's first micro-batch)
2. forward                                 (per micro-batch)
3. loss                                    (per micro-batch)
4. backward, scaled by ``n_i * world_size / N`` (the exactness rule, docs/DESIGN.md)
5. optimizer step (:class:`framework.step.OptimizerStep`), then the per-step schedulers

With several optimizers they all step jointly in 5; with alternating phases (``compute_loss(...,
phase)``) steps 1, 3, 4 and 5 run once per phase, in order, on a forward shared by the phases.
The loop emits its events (:mod:`framework.events`) and never calls an observer itself: the doctor,
the callbacks and the trace subscribe. What one fit works on, and everything between its steps, is a
:class:`framework.fit.Fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callback, CallbackHooks
from .checkpoint import store
from .checkpoint.state import Counters
from .config import EngineConfig
from .data import Window
from .doctor import Doctor, LoopError, max_steps_override
from .evaluation import check_metrics, evaluate, predict
from .events import Event, Events, StepInfo, StopReason, Trace
from .fit import Fit, check_resume_path, prepare_fit, validation_source
from .guard import NonFiniteError
from .module import LoopModule, forward
from .observability import observers, run_info
from .optim import parse_optimizers, phase_is_required
from .parallel import Strategy, make_strategy
from .parallel.grads import zero_grad
from .parallel.runtime import Runtime, make_runtime
from .step import StepResult

__all__ = ["Engine", "NonFiniteError"]


class _Counter:
    """An Engine attribute that reads and writes the checkpointed :class:`framework.checkpoint.state.Counters`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        return self if engine is None else getattr(engine.counters, self.name)

    def __set__(self, engine: Any, value: Any) -> None:
        setattr(engine.counters, self.name, value)


class Engine:
    """Runs ``fit``, ``validate`` and ``predict`` for a :class:`LoopModule`.

    Example:

        >>> engine = Engine(max_epochs=1, batch_size=32, seed=0, progress=False)
        >>> model = Classifier()
        >>> engine.fit(model, train_data, val_data).stop_reason.cause
        'max_epochs'
        >>> sorted(engine.validate(model, val_data))  # exact means over the set
        ['acc', 'loss']
        >>> engine.predict(model, val_data).shape  # one row per item, in data order
        torch.Size([32, 3])

    Every argument is keyword-only and optional; each is checked at construction, with a message that
    names it and the fix. They are documented once, in :mod:`framework.config` (``describe()`` lists
    them; the README's table is generated from it): when to stop (``max_epochs``, ``max_steps``,
    ``max_time``), global batches (``batch_size``, ``micro_batch_size``, ``shuffle``, ``drop_last``,
    data loading), precision and ``compile``, the optimizer step (clipping, ``nan_policy``,
    ``nan_check``, ``ema_decay``), the run dir and checkpoints, logging (with throughput and MFU:
    ``peak_tflops``; the profiler: ``profile_steps``, ``profile_memory``), the doctor, the strategy
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
        self.counters = Counters()
        self.doctor = Doctor(self.config.logging.doctor)
        # The loop's one event stream, and who listens, in order: the profiler and throughput first (their ranges
        # and FLOP count then hold the loop's own work, not the other subscribers'), the trace, the doctor, the
        # callbacks.
        self.events = Events()
        self._trace = Trace(self.counters) if self.config.logging.trace else None
        self._hooks = CallbackHooks(self, self.callbacks)
        # (doctor="off": every check returns at once, so it does not listen: a dozen calls a step fewer)
        doctor = self.doctor if not self.doctor.off else None
        for subscriber in (*observers(self.config), self._trace, doctor, self._hooks):
            if subscriber is not None:
                self.events.subscribe(subscriber)
        # The run dir: run_dir as given, or a fresh version of it (run_info.run_dir_for), decided here on every
        # rank alike (nothing that marks a run is written before every rank has joined the fit's first
        # collective), so that engine.run_dir is known before fit; rank 0's choice is agreed on at fit start.
        self._run_dir_given = self.config.checkpoint.run_dir
        self._run_dir_said = False
        if self._run_dir_given is not None:
            self._use_run_dir(run_info.run_dir_for(self._run_dir_given, self.config.checkpoint.resume))
        # FRAMEWORK_MAX_STEPS caps it: `python -m framework doctor` runs a recipe for a few steps.
        self.max_steps = max_steps_override(self.config.stop.max_steps)
        self.metrics: dict[str, float] = {}  # the last logged values
        self.last_step: StepResult | None = None  # what the last optimizer step did (applied, skipped, pending)
        self.fitting = False
        self._rt: Runtime | None = None
        self._fit: Fit | None = None

    def _use_run_dir(self, run_dir: str) -> None:
        ck = dataclasses.replace(self.config.checkpoint, run_dir=run_dir)
        self.config = dataclasses.replace(self.config, checkpoint=ck)

    @property
    def run_dir(self) -> str | None:
        """The run dir this engine writes to: ``run_dir`` as given, or, where that holds an earlier run, a fresh
        one beside it (``runs/digits-2``, ``-3``, ...; with ``resume="auto"`` the newest of them); known from
        construction (every rank agrees on rank 0's at fit start), printed by ``fit`` on rank 0. None without
        a run_dir.

        Example:

            >>> engine = Engine(max_epochs=1, batch_size=32, run_dir="runs/digits", progress=False)
            >>> engine.run_dir
            'runs/digits'
            >>> engine.fit(Classifier(), train_data).run_dir
            'runs/digits'
            >>> Engine(max_epochs=1, batch_size=32, run_dir="runs/digits").run_dir  # it holds a run now
            'runs/digits-2'
        """
        return self.config.checkpoint.run_dir

    @property
    def best_checkpoint(self) -> str | None:
        """The path of the best checkpoint kept (``keep_best``), ranked by ``monitor``/``mode`` as ``keep_best``
        ranks them (their manifests' ``monitor_value``); None without ``keep_best`` or before one is kept.

        Example:

            >>> engine = Engine(max_epochs=2, batch_size=32, run_dir="runs/digits", keep_best=1, progress=False)
            >>> engine.best_checkpoint is None  # before a fit
            True
            >>> engine.fit(Classifier(), train_data, val_data).best_checkpoint  # the epoch with the lowest val/loss
            'runs/digits/checkpoints/step-00000006'
            >>> model = framework.load_weights(Classifier(), engine.best_checkpoint)
        """
        ck = self.config.checkpoint
        if ck.run_dir is None or ck.keep_best == 0:
            return None
        best = store.best_checkpoint(Path(ck.run_dir) / "checkpoints", ck.mode)
        return None if best is None else str(best)

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the last fit stopped (:class:`framework.events.StopReason`: ``cause``, ``text``, ``step``, ``epoch``),
        or None before a fit ended. Also the fit's last line and the last record of ``metrics.jsonl``.

        Example:

            >>> engine = Engine(max_epochs=2, batch_size=32, progress=False)
            >>> engine.stop_reason is None  # before a fit
            True
            >>> print(engine.fit(Classifier(), train_data).stop_reason)
            max_epochs=2 reached
            >>> engine.stop_reason
            StopReason(cause='max_epochs', text='max_epochs=2 reached', step=6, epoch=2)
        """
        return self._fit.stop if self._fit is not None else None

    @property
    def trace(self) -> list[tuple[Any, ...]] | None:
        """With ``trace=True``: the step events ``(name, optimizer_step, micro[, phase])``
        (:class:`framework.events.Trace`); None without it. ``optimizer_step`` counts from 0; ``micro`` is the
        micro-batch's index in the window (for ``optimizer_step``, the window's micro-batch count).

        Example:

            >>> engine = Engine(max_steps=1, batch_size=32, micro_batch_size=16, trace=True, progress=False)
            >>> for event in engine.fit(Classifier(), train_data).trace:  # 2 micro-batches of 16 per step
            ...     print(event)
            ('zero_grad', 0, 0)
            ('forward', 0, 0)
            ('loss', 0, 0)
            ('backward', 0, 0)
            ('forward', 0, 1)
            ('loss', 0, 1)
            ('backward', 0, 1)
            ('optimizer_step', 0, 2)
        """
        return self._trace.events if self._trace is not None else None

    # ------------------------------------------------------------------ public API

    def fit(self, module: LoopModule, train_data: Any, val_data: Any = None) -> Engine:
        """Train ``module`` in place on ``train_data`` (Dataset, IterableDataset, DataLoader or tensors).

        Validates on ``val_data`` at each epoch end (or every ``val_every_n_steps``). Returns the engine.

        Example:

            >>> engine = Engine(max_epochs=2, batch_size=32, progress=False)
            >>> engine.fit(Classifier(), train_data, val_data) is engine
            True
            >>> engine.step, engine.epoch  # 96 items in batches of 32: 3 optimizer steps per epoch
            (6, 2)
            >>> sorted(engine.metrics)  # the last logged values
            ['epoch_time', 'lr', 'train/data_wait', 'train/items_per_sec', 'train/loss', 'val/acc', 'val/loss']
            >>> round(engine.metrics["val/loss"], 3)
            1.28
        """
        _check_module(module)
        if self.config.stop.max_epochs is None and self.max_steps is None:
            raise ValueError(
                "fit needs max_epochs or max_steps (or both), e.g. Engine(max_epochs=10, ...); "
                "max_time alone would train until the clock runs out"
            )
        check_resume_path(self.config)  # (before the lock: a typo leaves no new run dir behind)
        rt = self._runtime()
        if self._fit is None and self.config.checkpoint.run_dir is not None:
            self._agree_on_run_dir(rt)
        run_dir = self.config.checkpoint.run_dir
        with run_info.run_dir_lock(run_dir, rt):  # (one fit at a time writes a run dir)
            if self.config.checkpoint.resume is None and self._fit is None:  # (a later fit continues its run)
                run_info.refuse_earlier_run(run_dir)
            error: BaseException | None = None
            try:
                self._fit = run = prepare_fit(
                    self.config, self.counters, self.events, rt, module, train_data, val_data,
                    callbacks=self.callbacks, metrics=self.metrics, max_steps=self.max_steps,
                )  # fmt: skip
                run.stop_cause = self._hooks.stop_cause  # (why a callback stopped the fit, for its stop reason)
                self.fitting = True
                self._fit_loop(run)
            except BaseException as e:
                error = e  # (close's payload: the profiler dumps the memory history on a CUDA OOM)
                raise
            finally:
                self.fitting = False
                if self._fit is not None:
                    self._fit.close()
                self.events.emit(Event.CLOSE, error)
        return self

    def _agree_on_run_dir(self, rt: Runtime) -> None:
        """Every rank writes rank 0's run dir (one broadcast); rank 0 says which, once, whatever progress= is."""
        run_dir = self.config.checkpoint.run_dir
        assert run_dir is not None and self._run_dir_given is not None
        agreed = run_info.agree_on_run_dir(run_dir, rt)
        if agreed != run_dir:
            self._use_run_dir(agreed)
        if rt.is_main and not self._run_dir_said:
            self._run_dir_said = True
            line = run_info.describe_run_dir(str(self._run_dir_given), agreed, self.config.checkpoint.resume)
            print(line, file=sys.stderr, flush=True)

    def _fit_loop(self, run: Fit) -> None:
        """The fit loop: per window a train step (the five steps) and what follows it; per epoch validation."""
        run.events.emit(Event.FIT_START, run)
        with run.stops.installed():
            run.module.train()
            while not run.done():
                run.start_epoch()
                epoch_ended = True
                for window in run.epoch():
                    items = self._train_step(run, window)
                    run.after_step(window, items)
                    if run.done():
                        epoch_ended = run.epoch_ends_here
                        break
                if not epoch_ended:
                    break
                run.end_epoch()
            run.end()

    def _train_step(self, run: Fit, window: Window) -> Any:
        """One optimizer step: the five canonical steps, once per phase (one phase unless compute_loss takes
        ``phase``), on a forward per micro-batch that the phases share. Returns the window's item count."""
        module, model, rt, emit = run.module, run.model, run.rt, run.events.emit
        step = self.counters.step  # (read once: Engine.step is a descriptor over the counters)
        info = StepInfo(step, log_now=(step + 1) % self.config.logging.log_every_n_steps == 0)
        emit(Event.STEP_START, info)  # (the doctor may ask for this step's verdict at once)
        batches, weights, items, stop = run.weigh(window)  # one all-reduce: item counts (and stop flags)
        outputs_of: list[Any] = [None] * len(batches)  # the shared forwards (alternating phases)
        result = StepResult(False)
        for p, (phase, optimizer_step) in enumerate(run.steps):
            # 1. zero gradients: once per window (per phase), before its first micro-batch
            emit(Event.ZERO_GRAD, 0, phase)
            for optimizer in optimizer_step.optimizers:
                zero_grad(optimizer)  # = optimizer.zero_grad(set_to_none=True)
            window_loss: Any = None  # sum of the weighted micro-batch losses, on device
            for i, batch in enumerate(batches):
                inputs, targets = module.split_batch(batch)
                real, last = i < len(window.micro_batches), i == len(batches) - 1
                if not real:
                    module.eval()  # a zero-weight filler must not update BatchNorm stats or draw dropout
                with run.strategy.no_sync(model, sync=last):  # (gradients are reduced on the last one only)
                    with rt.autocast():
                        if outputs_of[i] is None:
                            # 2. forward (once per micro-batch: alternating phases share it)
                            emit(Event.FORWARD, i, phase, batch)
                            outputs = forward(module, model, inputs)  # (= model(inputs); a dict batch's error named)
                            if run.phased:
                                outputs_of[i] = outputs
                            emit(Event.AFTER_FORWARD, i, phase, real)
                        else:
                            outputs = outputs_of[i]
                        # 3. loss
                        emit(Event.LOSS, i, phase, batch)
                        # (with `phase` in alternating phases; what the micro-batch logged is weighed as its loss)
                        loss = run.compute_loss(outputs, targets, phase, weights[i] if real else None)
                        emit(Event.AFTER_LOSS, i, phase, loss, outputs)
                    # 4. backward, weighted so the window's gradient is the mean over all its items
                    #    (a weight of exactly 1.0, one micro-batch on one process, changes no bit: no op)
                    emit(Event.BACKWARD, i, phase)
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
            emit(Event.AFTER_BACKWARD, phase)  # (the doctor: trainable parameters that got no gradient)
            if step == run.first_step:
                run.strategy.check_unused(module, optimizer_step.params)  # DDP: idle parameters, named at step 1
            # 5. optimizer step (then the per-step schedulers and the EMA), unless the NaN policy drops it
            emit(Event.OPTIMIZER_STEP, phase)
            result = optimizer_step(
                window_loss, log_now=info.log_now, read_now=info.read_now, stop=stop if p == 0 else None,
                position=(step, self.counters.epoch, window.index), micro=len(batches),
            )  # fmt: skip
            emit(Event.AFTER_OPTIMIZER_STEP, result.applied, phase)
            run.losses[p].add(window_loss)  # (stays on the device: summed and read on log steps)
            run.grad_norms[p] = result.grad_norm
        self.last_step = result
        return items

    def save_checkpoint(self, path: str | os.PathLike[str]) -> str:
        """Save a complete checkpoint of the current fit into directory ``path`` (atomically).

        Call it during or after ``fit`` (e.g. from a callback); every process must call it.

        Example:

            >>> model = Classifier()
            >>> engine = Engine(max_steps=2, batch_size=32, progress=False).fit(model, train_data)
            >>> engine.save_checkpoint("exports/final")  # returns the absolute path
            '.../exports/final'
            >>> restored = framework.load_weights(Classifier(), "exports/final")
            >>> torch.equal(restored.net.weight, model.net.weight)
            True
        """
        if self._fit is None:
            raise RuntimeError("save_checkpoint needs a fit in progress or finished; call engine.fit(...) first")
        run = self._fit
        run.wait_for_checkpoints()
        target = Path(path)
        saver, run.saver = run.saver, None  # (a manual save is synchronous: on disk when it returns)
        try:
            return str(run.save(target.parent.resolve(), target.name, None, prune=False))
        finally:
            run.saver = saver

    def validate(self, module: LoopModule, data: Any) -> dict[str, float]:
        """Exact means over ``data``: ``{"loss": ..., <compute_metrics keys>: ..., <configure_metrics names>: ...}``.

        Runs in eval mode under ``torch.inference_mode()``; every item counts once, at any world size
        (no padding duplicates, none dropped). During or after a fit of ``module`` it uses that fit's
        model (EMA weights if ``ema_decay`` is set; ranks' buffers agreed). ``Engine(batch_size=...)`` is
        enough. Emits ``validation_end`` (callbacks' ``on_validation_end``). The module's mode is restored.

        Example:

            >>> metrics = Engine(batch_size=32).validate(Classifier(), val_data)
            >>> {name: round(value, 2) for name, value in sorted(metrics.items())}
            {'acc': 0.28, 'loss': 1.29}
        """
        _check_module(module)
        run, model, strategy = self._for_inference(module)
        rt = self._runtime()
        source = validation_source(self.config, rt, data)
        owner = f"{type(module).__name__}.configure_metrics"
        stateful = (
            run.metric_objects if run is not None else check_metrics(module.configure_metrics(), owner, rt.world_size)
        )
        with run.evaluating() if run is not None else contextlib.nullcontext(), contextlib.closing(source):
            val = evaluate(
                module, model, source, rt, self.events, self.config.data.limit_val_batches,
                stateful=stateful, forwards=strategy.forwards, no_grad=strategy.no_grad,
                phases=run.val_phases if run is not None else _phases(module),
            )  # fmt: skip
        self.events.emit(Event.VALIDATION_END, module, {f"val/{k}": v for k, v in val.items()})
        return val

    def predict(self, module: LoopModule, data: Any) -> Any:
        """The outputs of ``module.predict_step`` for every item of ``data``, in data order: one row per item,
        concatenated (tensors, or dicts/tuples of tensors leaf by leaf), identical on every rank.

        Eval mode, ``torch.inference_mode()``; batches without targets are fine (a bare tensor of inputs too).
        ``Engine(batch_size=...)`` is enough. During or after a fit of ``module`` it uses that fit's model
        (EMA weights if ``ema_decay`` is set).

        Example:

            >>> engine = Engine(batch_size=32)
            >>> engine.predict(Classifier(), val_data).shape  # [len(val_data), n_classes]
            torch.Size([32, 3])
            >>> engine.predict(Classifier(), torch.randn(5, 8)).shape  # bare inputs, no targets
            torch.Size([5, 3])
        """
        _check_module(module, need_loss=False)
        run, model, strategy = self._for_inference(module)
        rt = self._runtime()
        source = validation_source(self.config, rt, data, predicting=True)
        with run.evaluating() if run is not None else contextlib.nullcontext(), contextlib.closing(source):
            return predict(module, model, source, rt, forwards=strategy.forwards, no_grad=strategy.no_grad)

    def _for_inference(self, module: LoopModule) -> tuple[Fit | None, Any, Strategy]:
        """The fit of ``module`` if there is one (its eval model and strategy), else the module on this device."""
        run = self._fit if self._fit is not None and self._fit.module is module else None
        if run is not None:
            return run, run.eval_model, run.strategy
        rt = self._runtime()
        module.to(rt.device)
        return None, module, make_strategy(rt, self.config.distributed.strategy)

    def _runtime(self) -> Runtime:
        if self._rt is None:
            c = self.config
            d = c.distributed
            self._rt = make_runtime(
                c.precision.mixed_precision, c.logging.log_with, c.checkpoint.run_dir,
                strategy=d.strategy, timeout=d.collective_timeout, dp_replicate_size=d.dp_replicate_size,
                dp_shard_size=d.dp_shard_size, tp_size=d.tp_size,
            )  # fmt: skip
        return self._rt

    @property
    def world_size(self) -> int:
        """How many processes train (1 before the first fit/validate/predict). Under ``accelerate launch`` with
        several processes it is their number once the engine has run.

        Example:

            >>> Engine(max_steps=1, batch_size=32, progress=False).fit(Classifier(), train_data).world_size
            1
        """
        return self._rt.world_size if self._rt is not None else 1

    @property
    def rank(self) -> int:
        """This process's rank, from 0 (0 before the first fit/validate/predict, and in a plain process).

        Example:

            >>> Engine(batch_size=32).rank
            0
        """
        return self._rt.rank if self._rt is not None else 0

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that prints, and the one a callback should write files from.

        Example:

            >>> Engine(batch_size=32).is_main
            True
        """
        return self.rank == 0


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
    if not phase_is_required(module.compute_loss):
        return None
    return [o.name for o in parse_optimizers(module.configure_optimizers(), shared_ok=True)]
