"""The loop doctor: catches the classic training-loop mistakes and names the fix.

"Debug the loop before debugging the model." The engine calls a :class:`Doctor` at fixed events
of the loop (the façade's methods below); the doctor dispatches each event to the checks that
subscribe to it, one object per check (or small family of checks), each in its own module:

==================  =====================================================================
module              checks
==================  =====================================================================
``coverage``        ``trainable``, ``optimizer_coverage`` (every parameter in one optimizer)
``initial_weights`` ``initial_weights`` (every process starts from the same weights)
``val_data``        ``val_data`` (validation data is not the training data)
``batchnorm``       ``batchnorm`` (statistics over the whole batch)
``counts``          ``count_items`` (a non-negative integer)
``probe``           ``count_weights`` (count_items counts what the loss averages over),
                    ``loss_scaling`` (a mean, not a sum: with accumulation or several
                    processes; always under ``"full"``)
``loop_calls``      ``loop_calls`` (no backward/zero_grad/step in the user's code)
``modes``           ``train_mode``, ``eval_mode``
``loss``            ``loss_value``, ``loss_graph`` (a fresh, differentiable scalar)
``gradients``       ``gradients`` (every parameter gets one, per phase)
``updates``         ``updates`` (the first steps change every parameter)
``finite``          ``finite`` (names the non-finite loss or gradients)
==================  =====================================================================

Cost: every step, only metadata (the type and shape of what ``compute_loss`` and ``count_items``
return, the module's mode), a few µs with no host sync. On *checked* steps (the first two optimizer
steps, then 4, 8, ..., 512, then every 1000th under ``"basic"``; every step under ``"full"``; see
:mod:`framework.doctor.schedule`) the checks also walk the autograd graph, watch the user's code for
``backward()`` / ``zero_grad()`` / ``optimizer.step()`` and read device values.

Observation never steers: no check draws on the global RNG (the probe forks it), touches a
gradient, or changes a parameter, buffer or mode, so ``"off"``, ``"basic"`` and ``"full"`` train to
bitwise the same parameters. Errors raise :class:`LoopError` before the optimizer step that would
corrupt the parameters; warnings (:class:`LoopWarning`) are emitted once per fit, on the main process
(every rank records them).

To add a check: write a class taking the :class:`~framework.doctor.context.Context` with the
``on_<event>`` methods it needs (see :data:`EVENTS`), add its id to :data:`CHECKS`, and list it in
:meth:`Doctor._make_checks`. The loop does not change.

``python -m framework doctor recipe.py`` (:mod:`framework.doctor.cli`) sets ``FRAMEWORK_DOCTOR=full``
and ``FRAMEWORK_MAX_STEPS`` (which every :class:`Doctor` / ``Engine`` honours) and prints
:meth:`Doctor.report` as a table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .batchnorm import BatchNorm
from .context import Context, FitInfo, Reduce
from .counts import CountItems
from .coverage import ParameterCoverage
from .findings import CHECKS, Finding, LoopError, LoopWarning, Recorder, format_table, report_rows
from .finite import Finite
from .gradients import Gradients
from .initial_weights import InitialWeights
from .loop_calls import LoopCalls
from .loss import LossGraph, LossValue, split_loss
from .modes import EvalMode, TrainMode
from .probe import HalvesProbe
from .schedule import is_checked, max_steps_override, resolve_level
from .updates import Updates
from .val_data import ValData

if TYPE_CHECKING:
    from ..events import StepInfo
    from ..fit import Fit
    from ..parallel.runtime import Runtime

__all__ = [
    "CHECKS",
    "EVENTS",
    "Doctor",
    "Finding",
    "LoopError",
    "LoopWarning",
    "collect",
    "format_table",
    "max_steps_override",
    "report_rows",
]

# The events a check may subscribe to, by defining ``on_<event>``. "checked_*" events come only on
# checked steps; the others on every step (keep those to metadata: they are the per-step cost).
EVENTS = (
    "fit_start",  # (fit: FitInfo): once, at the start of a fit: setup checks, per-fit reset
    "initial_weights",  # (module, reduce, is_rank0, device): before DDP/FSDP wraps the model
    "checked_step_start",  # (): a checked optimizer step begins (before zero_grad)
    "watch_enter",  # (module): the user's code is about to run (checked steps)
    "watch_exit",  # (): ... and has returned or raised
    "forward",  # (module, where): after forward, every step
    "checked_forward",  # (module): after forward, checked steps, inside watch
    "loss",  # (module, loss, outputs, phase): after compute_loss, every step
    "checked_loss",  # (module, loss, outputs, phase): after compute_loss, checked steps
    "count",  # (module, n): each count_items result, every step
    "checked_backward",  # (phase): after the last backward of a step (or phase), checked steps
    "optimizer_step",  # (applied, phase): after the optimizer step (or skip), every step
    "retract",  # (): the last step reported applied was skipped after all
    "eval",  # (module): after each validation forward
    "fit_end",  # (): the fit is over: decide what is pending
)

_NULL = contextlib.nullcontext()
_collectors: list[list[Doctor]] = []


@contextlib.contextmanager
def collect() -> Iterator[list[Doctor]]:
    """Collect every :class:`Doctor` created inside the block (``python -m framework doctor`` uses it).

    Example:

        >>> from framework import Engine
        >>> from framework.doctor import collect
        >>> with collect() as doctors:   # e.g. around runpy.run_path("recipes/digits.py", run_name="__main__")
        ...     engine = Engine(max_steps=1, batch_size=32, progress=False)
        >>> doctors == [engine.doctor]
        True
    """
    found: list[Doctor] = []
    _collectors.append(found)
    try:
        yield found
    finally:
        _collectors.remove(found)


class Doctor:
    """The checks the engine runs; ``level`` is "basic" (default), "full" or "off".

    The environment variable ``FRAMEWORK_DOCTOR`` overrides ``level`` (that is how
    ``python -m framework doctor`` turns on every check in a recipe it runs).
    After a fit, :attr:`findings` holds what was found and :meth:`report` the table.

    The engine calls, per fit: :meth:`check_initial_weights` (before wrapping the model),
    :meth:`start_fit`; per optimizer step :meth:`start_step`, then per micro-batch
    :meth:`watch` around the user's code with :meth:`check_train_mode` after ``forward`` and
    :meth:`check_loss` after ``compute_loss``, :meth:`check_count` for each ``count_items``; per step
    (or per phase) :meth:`after_backward` and :meth:`after_optimizer_step`; :meth:`end_fit`. In
    validation :meth:`check_eval_mode`; on a non-finite step :meth:`diagnose_nonfinite`. The ``on_*``
    methods subscribe the doctor to the loop's events (:mod:`framework.events`) and make those calls, so
    an ``Engine`` runs them (the example below); a custom loop makes the calls itself (the methods' examples).

    Example:

        >>> from framework import Engine
        >>> engine = Engine(max_epochs=1, batch_size=32, doctor="full", progress=False)  # every check, every step
        >>> engine.fit(Classifier(), train_data, val_data).doctor.level
        'full'
        >>> print(engine.doctor.format_report().splitlines()[-1])
        16 ok, 0 warning, 0 error, 0 not run
    """

    def __init__(self, level: str = "basic") -> None:
        self.level = resolve_level(level)
        self.off = self.level == "off"
        self.full = self.level == "full"
        self.checking = False  # is the current optimizer step a checked one?
        self.nonfinite_detail = ""  # what diagnose_nonfinite found, for the engine's NonFiniteError
        self.context: dict[str, Any] = {}  # module, val_data, batching of the last fit (only while collected)
        self._record = Recorder()
        self._ctx = Context(self._record, self.level)
        self._checks = self._make_checks(self._ctx)
        self._finite = next(c for c in self._checks if isinstance(c, Finite))
        self._module: nn.Module | None = None  # the module of the fit in progress (its events name no module)
        self._on: dict[str, tuple[Callable[..., Any], ...]] = {
            event: tuple(getattr(c, "on_" + event) for c in self._checks if hasattr(c, "on_" + event))
            for event in EVENTS
        }
        # The every-step events, bound once: they are the per-step cost.
        self._on_forward, self._on_loss = self._on["forward"], self._on["loss"]
        self._on_count, self._on_optimizer_step = self._on["count"], self._on["optimizer_step"]
        for found in _collectors:
            found.append(self)

    @staticmethod
    def _make_checks(ctx: Context) -> list[Any]:
        """The checks, in dispatch order (within an event, earlier checks speak first)."""
        gradients = Gradients(ctx)
        return [
            ParameterCoverage(ctx),
            InitialWeights(ctx),
            ValData(ctx),
            BatchNorm(ctx),
            CountItems(ctx),
            LoopCalls(ctx),
            TrainMode(ctx),
            LossValue(ctx),
            LossGraph(ctx),
            gradients,
            Updates(ctx, gradients),
            Finite(ctx),
            HalvesProbe(ctx),
            EvalMode(ctx),
        ]

    # -- what was found -------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Every problem found so far (errors and warnings), in the order found.

        Example:

            >>> from framework import Engine
            >>> class Unused(Classifier):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.extra = nn.Linear(8, 8)   # never used in forward
            >>> engine = Engine(max_steps=2, batch_size=32, progress=False).fit(Unused(), train_data)
            >>> [(f.check, f.severity) for f in engine.doctor.findings]
            [('gradients', 'warning')]
            >>> print(engine.doctor.findings[0].message)
            2 trainable parameter(s) of Unused received no gradient: extra.weight, extra.bias. ...
        """
        return self._record.findings

    @property
    def ran(self) -> set[str]:
        """The checks that ran at least once (the report's "ok" rows, unless they found something).

        Example:

            >>> from framework import Engine
            >>> engine = Engine(max_steps=1, batch_size=32, progress=False).fit(Classifier(), train_data)
            >>> sorted(engine.doctor.ran)[:4]
            ['batchnorm', 'count_items', 'count_weights', 'finite']
        """
        return self._record.ran

    @property
    def not_run(self) -> dict[str, str]:
        """Why a check could not run, by check id (the report's "not run" rows).

        Example:

            >>> from framework import Engine
            >>> engine = Engine(max_steps=1, batch_size=32, progress=False).fit(Classifier(), train_data)
            >>> sorted(engine.doctor.not_run)
            ['loss_scaling', 'updates', 'val_data']
            >>> engine.doctor.not_run["updates"]
            'fewer than 2 optimizer steps were applied'
        """
        return self._record.not_run

    def report(self) -> list[tuple[str, str, str, str]]:
        """One row per check: ``(check id, what it establishes, status, detail)``; status is
        ``"ok"``, ``"warning"``, ``"error"`` or ``"not run"``.

        Example:

            >>> from framework import Engine
            >>> engine = Engine(max_steps=1, batch_size=32, progress=False).fit(Classifier(), train_data)
            >>> for check, title, status, detail in engine.doctor.report()[-4:]:
            ...     print(f"{check}: {status} {detail}")
            updates: not run fewer than 2 optimizer steps were applied
            finite: ok
            loss_scaling: not run ...
            eval_mode: not run not reached in this run
        """
        return report_rows(self.findings, self.ran, self.not_run)

    def format_report(self) -> str:
        """The report as a table (what ``python -m framework doctor`` prints).

        Example:

            >>> from framework import Engine
            >>> engine = Engine(max_steps=1, batch_size=32, progress=False).fit(Classifier(), train_data)
            >>> print(engine.doctor.format_report())
            status    check
            --------- ---------------------------------------------------------------------------...
            ok        the module has trainable parameters
            ...
            not run   the first optimizer steps change every trainable parameter
                      -> fewer than 2 optimizer steps were applied
            ...
            12 ok, 0 warning, 0 error, 4 not run
        """
        return format_table(self.report())

    def _emit(self, event: str, *args: Any) -> None:
        for handler in self._on[event]:
            handler(*args)

    # -- once per fit ---------------------------------------------------------------------

    def check_initial_weights(
        self,
        module: nn.Module,
        *,
        reduce: Reduce | None = None,
        is_main: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Before DDP/FSDP wraps the model: warn once when the processes start from different weights
        (an exact fingerprint of every parameter and buffer, compared with rank 0's through ``reduce``).
        A no-op on one process.

        ``reduce`` (an in-place all-reduce sum), ``is_main`` (rank 0) and ``device`` (where the
        collective's tensors go; NCCL needs CUDA) default to what ``torch.distributed`` says.

        Under several processes a difference is a :class:`LoopWarning` naming the differing tensors and
        the fix (``framework.seed_everything`` before building the model).

        Example:

            >>> from framework.doctor import Doctor
            >>> doctor = Doctor()
            >>> doctor.check_initial_weights(Classifier())   # then wrap it for DDP/FSDP; one process here
            >>> sorted(doctor.ran), doctor.findings
            (['initial_weights'], [])
        """
        if self.off:
            return
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if reduce is None and initialized and dist.get_world_size() > 1:
            reduce = _all_reduce_sum
        if is_main is None:
            is_main = not initialized or dist.get_rank() == 0
        if device is None:
            cuda = initialized and "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if cuda
                else next((t.device for t in module.parameters()), torch.device("cpu"))
            )
        self._record.is_main = is_main
        self._emit("initial_weights", module, reduce, is_main, torch.device(device))

    def start_fit(
        self,
        module: nn.Module,
        optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...],
        batching: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        *,
        is_main: bool = True,
        strategy: str = "single",
        device_type: str = "cpu",
        phases: list[str] | None = None,
        reduce: Reduce | None = None,
        nan_policy: str = "raise",
    ) -> None:
        """Start a fit: reset the per-fit state and run the setup checks (parameters, optimizers, data).

        ``optimizers``: one optimizer or a list (joint: every optimizer steps each step; or one per
        phase, in the order of ``phases``, for alternating phases). ``strategy``: "single" | "ddp" |
        "fsdp" (FSDP2: parameters are DTensors). ``reduce``: None on one process, else an in-place
        all-reduce sum, for verdicts that must agree across ranks. ``nan_policy``: the fit's ("raise" or "skip"):
        a non-finite loss the probe sees raises or warns as training would.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> optimizer = torch.optim.SGD([module.net.weight], lr=0.1)   # forgets net.bias
            >>> doctor = Doctor()
            >>> doctor.start_fit(module, optimizer)   # GAN: start_fit(module, [opt_d, opt_g], phases=[...])
            >>> print(doctor.findings[0].message)
            1 trainable parameter(s) of Classifier are in no param group of the optimizer ... net.bias. Fix: ...
        """
        self.checking = False
        self.nonfinite_detail = ""
        if self.off:
            return
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        fit = FitInfo(
            module,
            opts,
            batching,
            train_data,
            val_data,
            is_main=is_main,
            strategy=strategy,
            device_type=device_type,
            phases=None if phases is None else list(phases),
            reduce=reduce,
            nan_policy=nan_policy,
        )
        self._ctx.fit = fit
        self._ctx.step, self._ctx.checking, self._ctx.watching = 0, False, False
        self._record.new_fit(is_main)
        if _collectors:
            self.context = {"module": module, "val_data": val_data, "batching": batching}
        self._emit("fit_start", fit)

    # -- per optimizer step -----------------------------------------------------------------

    def start_step(self) -> None:
        """Decide whether this optimizer step is a checked one. Call once per step, before zero_grad.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor("basic")
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> checked = []
            >>> for step in range(20):
            ...     doctor.start_step()
            ...     if doctor.checking:
            ...         checked.append(step)
            >>> checked
            [0, 1, 2, 4, 8, 16]
        """
        if self.off:
            return
        ctx = self._ctx
        self.checking = ctx.checking = is_checked(ctx.step, self.full)
        ctx.step += 1
        if self.checking:
            self._emit("checked_step_start")

    def watch(self, module: nn.Module, batch: Any, where: str = "forward") -> contextlib.AbstractContextManager[Any]:
        """Wrap the user's code, ``forward`` and ``compute_loss``: on checked steps, catch its calls to
        ``backward()``, ``zero_grad()`` and ``optimizer.step()`` and its mode switches; a no-op otherwise.

        Wrap only the user's code, never the engine's own zero_grad/backward/step. ``where`` names the
        user method the block starts with ("forward", or "compute_loss" for a block around the loss
        alone, e.g. one per phase); :meth:`check_train_mode` moves it on to "compute_loss".

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            >>> doctor = Doctor("full")
            >>> doctor.start_fit(module, optimizer)
            >>> doctor.start_step()
            >>> with doctor.watch(module, batch=None):   # the engine wraps forward and compute_loss
            ...     optimizer.step()   # a user's step inside forward
            Traceback (most recent call last):
            ...
            framework.doctor.findings.LoopError: Classifier.forward called optimizer.step(): ... unchanged. Fix: ...
        """
        if self.off or not self.checking:
            return _NULL
        return self._watching(module, batch, where)

    @contextlib.contextmanager
    def _watching(self, module: nn.Module, batch: Any, where: str) -> Iterator[None]:
        self._enter_watch(module, batch, where)
        try:
            yield
        finally:
            self._exit_watch()

    def _enter_watch(self, module: nn.Module, batch: Any, where: str) -> None:
        ctx = self._ctx
        ctx.watching, ctx.where, ctx.batch = True, where, batch
        self._emit("watch_enter", module)

    def _exit_watch(self) -> None:
        ctx = self._ctx
        if ctx.watching:
            self._emit("watch_exit")
            ctx.watching, ctx.where, ctx.batch = False, "forward", None

    def check_train_mode(self, module: nn.Module, where: str) -> None:
        """After forward: the module is still in train mode (every step; submodules on checked steps).

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor()
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> outputs = module.eval()(torch.randn(4, 8))   # a forward that calls self.eval()
            >>> doctor.check_train_mode(module, "forward")
            Traceback (most recent call last):
            ...
            framework.doctor.findings.LoopError: Classifier switched itself to eval mode during training (in forward)...
        """
        if self.off:
            return
        for handler in self._on_forward:
            handler(module, where)
        if self._ctx.watching:
            self._emit("checked_forward", module)
            self._ctx.where = "compute_loss"

    def check_loss(self, module: nn.Module, loss: Any, outputs: Any = None, phase: str | None = None) -> None:
        """``compute_loss`` must return a differentiable scalar tensor computed in this step (the type
        checks every step, metadata only; the graph checks on checked steps). ``phase``: the phase
        whose loss this is (alternating phases), or None.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor()
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> outputs = module(torch.randn(4, 8))
            >>> loss = module.compute_loss(outputs, torch.tensor([0, 1, 2, 0]))
            >>> doctor.check_loss(module, loss, outputs)   # a good loss: nothing to say
            >>> doctor.check_loss(module, loss.item(), outputs)
            Traceback (most recent call last):
            ...
            framework.doctor.findings.LoopError: Classifier.compute_loss returned a float (...); return a scalar...
        """
        if self.off:
            return
        if not isinstance(loss, torch.Tensor) and isinstance(loss, Mapping):  # {"loss": ..., **extras}: its loss
            try:
                loss = split_loss(loss, f"{type(module).__name__}.compute_loss")[0]
            except LoopError as e:
                self._record.fail("loss_value", str(e))
        for handler in self._on_loss:
            handler(module, loss, outputs, phase)
        if self.checking:
            if self._ctx.watching:
                self._ctx.where = "compute_loss"
            self._emit("checked_loss", module, loss, outputs, phase)

    def check_count(self, module: nn.Module, n: Any) -> None:
        """``count_items`` must be a non-negative integer (int or integer tensor); tensor values are read on
        checked steps only (a host sync).

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor()
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> doctor.check_count(module, 32)   # e.g. module.count_items(batch)
            >>> doctor.check_count(module, 2.5)
            Traceback (most recent call last):
            ...
            framework.doctor.findings.LoopError: Classifier.count_items returned float 2.5; return an int ...
        """
        if self.off:
            return
        for handler in self._on_count:
            handler(module, n)

    def after_backward(self, phase: str | None = None) -> None:
        """After the last backward of the step (or of ``phase``), before the optimizer step: which
        trainable parameters got no gradient (checked steps, metadata only).

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> module.extra = nn.Linear(8, 8)   # never used in forward
            >>> doctor = Doctor("full")
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> for _ in range(2):   # decided at the second checked step (or at end_fit)
            ...     doctor.start_step()
            ...     module.compute_loss(module(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
            ...     doctor.after_backward()
            >>> print(doctor.findings[0].message)
            2 trainable parameter(s) of Classifier received no gradient: extra.weight, extra.bias. ...
        """
        if self.off or not self.checking:
            return
        self._emit("checked_backward", phase)

    def after_optimizer_step(self, applied: bool, phase: str | None = None) -> None:
        """After the optimizer step (of ``phase``'s optimizer, or of all of them): ``applied`` is False
        for a step the NaN guard or the GradScaler skipped. Decides whether the parameters changed.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.0)   # lr=0: nothing moves
            >>> doctor = Doctor("full")
            >>> doctor.start_fit(module, optimizer)
            >>> for _ in range(2):
            ...     doctor.start_step()
            ...     optimizer.zero_grad()
            ...     module.compute_loss(module(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
            ...     optimizer.step()
            ...     doctor.after_optimizer_step(applied=True)
            >>> print(doctor.findings[0].message)
            2 trainable parameter(s) of Classifier did not change in the first 2 optimizer steps (... has lr=0: ...
        """
        if self.off:
            return
        for handler in self._on_optimizer_step:
            handler(applied, phase)

    def retract_applied(self) -> None:
        """A step reported applied turned out skipped (the engine read its NaN verdict a step late).

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor("full")
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> doctor.start_step()
            >>> doctor.after_optimizer_step(applied=True)
            >>> doctor.retract_applied()   # that step was skipped after all (a non-finite gradient)
            >>> doctor.start_step()
            >>> doctor.after_optimizer_step(applied=True)
            >>> doctor.end_fit()   # one applied step: too few to judge the updates
            >>> doctor.not_run["updates"]
            'fewer than 2 optimizer steps were applied'
        """
        if not self.off:
            self._emit("retract")

    def diagnose_nonfinite(self, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
        """Name what went non-finite (the loss, which parameters' gradients) before the engine drops the
        gradients; sets :attr:`nonfinite_detail`. Only called on a bad step, so its host reads cost nothing
        on the healthy path.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor()
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> doctor.diagnose_nonfinite(torch.tensor(float("nan")), list(module.parameters()))
            ': Classifier.compute_loss returned nan (check the inputs and targets of that batch, ...)'
            >>> [f.check for f in doctor.findings]
            ['finite']
        """
        self.nonfinite_detail = "" if self.off else self._finite.diagnose(loss, params)
        return self.nonfinite_detail

    def end_fit(self) -> None:
        """Decide what is still pending at the end of a short fit.

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier()
            >>> doctor = Doctor("full")
            >>> doctor.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
            >>> doctor.start_step()
            >>> doctor.after_optimizer_step(applied=True)
            >>> doctor.end_fit()   # a 1-step fit: the updates check needs two applied steps
            >>> doctor.not_run["updates"]
            'fewer than 2 optimizer steps were applied'
        """
        if self.off:
            return
        if self._ctx.has_fit:
            self._emit("fit_end")
        self.checking = self._ctx.checking = False

    # -- validation -------------------------------------------------------------------------

    def check_eval_mode(self, module: nn.Module) -> None:
        """During validation the module is still in eval mode (every batch, metadata only).

        Example:

            >>> from framework.doctor import Doctor
            >>> module = Classifier().eval()
            >>> doctor = Doctor()
            >>> outputs = module.train()(torch.randn(4, 8))   # a forward that calls self.train()
            >>> doctor.check_eval_mode(module)
            Traceback (most recent call last):
            ...
            framework.doctor.findings.LoopError: Classifier switched itself to train mode during validation; ...
        """
        if self.off:
            return
        for handler in self._on["eval"]:
            handler(module)

    # -- the loop's events (framework.events): the doctor is one subscriber of the stream ----------------

    @property
    def _fit_module(self) -> nn.Module:
        assert self._module is not None, "the loop's step events come after fit_start"
        return self._module

    def on_build(self, module: nn.Module, rt: Runtime) -> None:
        """The module as built, before the layout wraps or shards it: the processes' initial weights."""
        if rt.world_size > 1:
            self.check_initial_weights(module)  # (before the wrap broadcasts rank 0's weights)

    def on_fit_start(self, fit: Fit) -> None:
        opts = [o.optimizer for o in fit.optimizers]
        rt = fit.rt
        self.start_fit(
            fit.module, opts if len(opts) > 1 else opts[0], fit.batching, fit.train_data, fit.val_data,
            is_main=rt.is_main, strategy=fit.strategy.family, device_type=rt.device.type, phases=fit.phases,
            reduce=rt.all_reduce_sum if rt.world_size > 1 else None, nan_policy=fit.config.step.nan_policy,
        )  # fmt: skip
        self._module = fit.module

    def on_step_start(self, step: StepInfo) -> None:
        self.start_step()
        if self.checking:
            step.read_now = True  # (the update checks need to know at once whether the step applied)

    def on_counts(self, counts: list[Any]) -> None:
        for n in counts:
            self.check_count(self._fit_module, n)

    def on_forward(self, micro: int, phase: str | None, batch: Any) -> None:
        if not self.off and self.checking:
            self._enter_watch(self._fit_module, batch, "forward")

    def on_after_forward(self, micro: int, phase: str | None, real: bool) -> None:
        if real:
            self.check_train_mode(self._fit_module, "forward")

    def on_loss(self, micro: int, phase: str | None, batch: Any) -> None:
        if not self.off and self.checking and not self._ctx.watching:
            self._enter_watch(self._fit_module, batch, "compute_loss")  # (a later phase: the forward is shared)

    def on_after_loss(self, micro: int, phase: str | None, loss: Any, outputs: Any) -> None:
        try:
            self.check_loss(self._fit_module, loss, outputs, phase=phase)
        finally:
            self._exit_watch()

    def on_after_backward(self, phase: str | None) -> None:
        self.after_backward(phase)

    def on_nonfinite(self, loss: torch.Tensor, params: list[torch.Tensor], notes: list[str]) -> None:
        notes.append(self.diagnose_nonfinite(loss, params))

    def on_after_optimizer_step(self, applied: bool, phase: str | None) -> None:
        self.after_optimizer_step(applied, phase)

    def on_step_retracted(self, step: int) -> None:
        self.retract_applied()

    def on_eval_forward(self, module: nn.Module) -> None:
        self.check_eval_mode(module)

    def on_fit_end(self) -> None:
        self.end_fit()

    def on_close(self, error: BaseException | None) -> None:
        self._exit_watch()  # (the user's code raised inside a watch: its patches go)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t)
    return t
