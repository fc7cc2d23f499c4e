"""The loop doctor: catches the classic training-loop mistakes and names the fix.

"Debug the loop before debugging the model." The engine calls a few
:class:`Doctor` methods from ``Engine.fit`` (the logic lives here, not in the loop):

- every step, at no cost: Python metadata only (the type and shape of what
  ``compute_loss`` and ``count_items`` return, the module's mode). These turn
  cryptic autograd errors into a message that names the fix.
- on *checked* steps: the first two optimizer steps of a fit, then steps 4, 8, ...,
  512, then every 1000th (``doctor="basic"``, the default), or every step
  (``doctor="full"``). These walk the autograd graph, watch the user's hooks for
  ``backward()`` / ``zero_grad()`` / ``optimizer.step()`` calls, and read device
  values (a host sync), which is why they are sparse.
- ``doctor="full"`` only: the costly probe that compares the loss of a batch
  with the losses of its two halves (sum reduction where a mean is expected).

Observation never steers: no check draws on the global RNG (the probe forks it),
touches a gradient, or changes a parameter or buffer, so ``"off"``, ``"basic"``
and ``"full"`` train to bitwise the same parameters. Errors raise
:class:`LoopError` before the optimizer step that would corrupt the parameters;
warnings (:class:`LoopWarning`) are emitted once per fit, never per step.

``python -m framework doctor recipe.py`` sets ``FRAMEWORK_DOCTOR=full`` and
``FRAMEWORK_MAX_STEPS`` (which every :class:`Doctor` / ``Engine`` honours) and
prints :meth:`Doctor.report` as a table.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
import textwrap
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class LoopError(RuntimeError):
    """A mistake in the user's loop code, with the fix in the message.

    ``check`` names the doctor check that found it (see :data:`CHECKS`), or is None.

    Example::

        try:
            engine.fit(model, data)
        except LoopError as e:
            print(e.check, e)
    """

    def __init__(self, message: str, check: str | None = None) -> None:
        super().__init__(message)
        self.check = check


class LoopWarning(UserWarning):
    """A likely mistake in the user's loop code; emitted once per fit.

    Example::

        warnings.simplefilter("error", LoopWarning)   # make the doctor's warnings fatal
    """

    check: str | None = None


# id -> (what the check establishes when it passes, the fix when it does not). The order is the report's.
CHECKS: dict[str, tuple[str, str]] = {
    "trainable": (
        "the module has trainable parameters",
        "create layers in __init__ as attributes; don't freeze all of them",
    ),
    "optimizer_coverage": (
        "every trainable parameter is in an optimizer param group",
        "build the optimizer from self.parameters(), or requires_grad_(False) what you freeze",
    ),
    "val_data": ("validation data is not the training data", "hold out a separate split for val_data"),
    "batchnorm": (
        "BatchNorm normalizes over the whole batch",
        "make micro_batch_size the per-process batch, use SyncBatchNorm, or GroupNorm/LayerNorm",
    ),
    "count_items": (
        "count_items returns a non-negative integer",
        "return the number of items compute_loss averages over",
    ),
    "loop_calls": (
        "forward/compute_loss leave backward, zero_grad and optimizer.step to the engine",
        "remove those calls; return the loss from compute_loss",
    ),
    "train_mode": ("the module stays in train mode while training", "remove .eval() from forward/compute_loss"),
    "loss_value": (
        "compute_loss returns a scalar tensor that requires grad",
        "return e.g. F.cross_entropy(outputs, targets)",
    ),
    "loss_graph": (
        "the loss is computed from this step's forward outputs",
        "compute the loss from `outputs` in compute_loss, every step; no torch.no_grad() in forward",
    ),
    "gradients": (
        "every trainable parameter receives a gradient",
        "use the parameter in forward, or requires_grad_(False) it",
    ),
    "updates": ("the first optimizer steps change every trainable parameter", "check lr, param groups and gradients"),
    "finite": ("the loss and the gradients are finite", "lower the lr, set clip_grad_norm, check the data"),
    "loss_scaling": (
        "the loss is a mean over items, not a sum (doctor='full')",
        "use reduction='mean', or divide by count_items(batch)",
    ),
    "eval_mode": (
        "the module stays in eval mode during validation",
        "remove .train() from forward/compute_loss/compute_metrics",
    ),
}


@dataclass
class Finding:
    """One problem the doctor found: the check's id, ``"error"`` or ``"warning"``, and the message.

    Example::

        for f in engine.doctor.findings:
            print(f.severity, f.check, f.message)
    """

    check: str
    severity: str
    message: str


# Snapshots of parameters for the `updates` check are exact copies up to this many elements in
# total (1 GiB of fp32); beyond it, a float64 sum and norm per parameter stand in for the copy.
_SNAPSHOT_ELEMENTS = 1 << 28
_GRAPH_NODES = 200_000  # give up (no finding) on an autograd graph walk beyond this many nodes
_NULL = contextlib.nullcontext()
_collectors: list[list[Doctor]] = []


@contextlib.contextmanager
def collect() -> Iterator[list[Doctor]]:
    """Collect every :class:`Doctor` created inside the block (``python -m framework doctor`` uses it).

    Example::

        with collect() as doctors:
            runpy.run_path("recipes/digits.py", run_name="__main__")
        findings = [f for d in doctors for f in d.findings]
    """
    found: list[Doctor] = []
    _collectors.append(found)
    try:
        yield found
    finally:
        _collectors.remove(found)


def max_steps_override(max_steps: int | None) -> int | None:
    """``max_steps`` capped by the environment variable ``FRAMEWORK_MAX_STEPS`` (the doctor CLI sets it).

    Example::

        os.environ["FRAMEWORK_MAX_STEPS"] = "3"
        max_steps_override(None)  # -> 3;  max_steps_override(2) -> 2
    """
    cap = os.environ.get("FRAMEWORK_MAX_STEPS")
    if not cap:
        return max_steps
    return int(cap) if max_steps is None else min(max_steps, int(cap))


class Doctor:
    """Checks run by the engine; ``level`` is "basic" (default), "full" or "off".

    The environment variable ``FRAMEWORK_DOCTOR`` overrides ``level`` (that is how
    ``python -m framework doctor`` turns on every check in a recipe it runs).
    After a fit, :attr:`findings` holds what was found and :meth:`report` the table.

    Example::

        engine = Engine(max_steps=100, batch_size=32, doctor="full")  # every check, every step
        engine.fit(model, data)
        print(engine.doctor.format_report())
    """

    def __init__(self, level: str = "basic") -> None:
        level = os.environ.get("FRAMEWORK_DOCTOR") or level
        if level not in ("basic", "full", "off"):
            raise ValueError(f'doctor={level!r}; use "basic", "full" or "off"')
        self.level = level
        self.off = level == "off"
        self.full = level == "full"
        self.findings: list[Finding] = []
        self.ran: set[str] = set()  # checks that ran at least once (the report's "ok" rows)
        self.not_run: dict[str, str] = {}  # why a check could not run, for the report
        self.checking = False  # is the current optimizer step a checked one?
        self.nonfinite_detail = ""  # what diagnose_nonfinite found, for the engine's NonFiniteError
        self.context: dict[str, Any] = {}  # module, optimizer, data of the last fit (only while collected)
        self._warned: set[str] = set()
        self._reset()
        for found in _collectors:
            found.append(self)

    def _reset(self) -> None:
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: dict[int, str] = {}  # id(parameter) -> its name in the module
        self._module_names: dict[int, str] = {}  # id(submodule) -> its name
        self._stepped: list[tuple[str, nn.Parameter]] = []  # trainable and in the optimizer
        self._stepped_ids: set[int] = set()
        self._is_main = True
        self._fsdp = False
        self._batching: Any = None
        self._windows = 0  # optimizer steps started in this fit
        self._applied = 0  # optimizer steps applied in this fit
        self._grad_seen: set[int] = set()
        self._grad_checks = 0
        self._grads_decided = False
        self._no_grad_ids: set[int] = set()  # reported by "gradients"; not reported again by "updates"
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_exact = True  # copies (True) or fingerprints (False)
        self._updates_decided = False
        self._probe_done = False
        self._bn_done = False
        # Set inside watch() only:
        self._phase: str | None = None
        self._batch: Any = None
        self._modes: list[tuple[nn.Module, bool]] = []
        self._grads: list[tuple[nn.Parameter, torch.Tensor | None, int]] = []

    # -- findings -------------------------------------------------------------------

    def _name(self, module: nn.Module) -> str:
        return type(module).__name__

    def fail(self, check: str, message: str) -> None:
        """Record an error finding and raise :class:`LoopError` (the run stops here).

        Example::

            doctor.fail("loss_value", "Net.compute_loss returned ...; fix: ...")
        """
        self.ran.add(check)
        self.findings.append(Finding(check, "error", message))
        raise LoopError(message, check)

    def warn(self, check: str, message: str, key: str | None = None) -> None:
        """Record a warning finding and emit it as a :class:`LoopWarning`, once per fit per ``key``.

        Example::

            doctor.warn("gradients", "2 trainable parameter(s) of Net received no gradient: ...")
        """
        key = key or check
        self.ran.add(check)
        if key in self._warned:
            return
        self._warned.add(key)
        self.findings.append(Finding(check, "warning", message))
        if self._is_main:  # one process speaks for all; every rank records the finding
            w = LoopWarning(message)
            w.check = check
            warnings.warn(w, stacklevel=_user_stacklevel())

    # -- once, at fit start -----------------------------------------------------------

    def start_fit(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        batching: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        *,
        is_main: bool = True,
        fsdp: bool = False,
    ) -> None:
        """Reset per-fit state and run the setup checks (parameters, optimizer, data).

        Example::

            doctor.start_fit(module, optimizer, batching, train_data, val_data)
        """
        self._reset()
        self._warned.clear()
        if self.off:
            return
        self._module, self._optimizer = module, optimizer
        self._is_main, self._fsdp, self._batching = is_main, fsdp, batching
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._module_names = {id(m): (n or type(m).__name__) for n, m in module.named_modules()}
        if _collectors:
            self.context = {"module": module, "val_data": val_data, "batching": batching}
        self.check_setup(module, optimizer)
        self._check_val_data(train_data, val_data)

    def check_setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Trainable parameters exist, and every one of them is in an optimizer param group.

        Example::

            doctor.check_setup(module, optimizer)   # LoopError if nothing is trainable
        """
        if self.off:
            return
        name = self._name(module)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.ran.add("trainable")
        if not trainable:
            self.fail(
                "trainable",
                f"{name} has no trainable parameters (none with requires_grad=True); create layers in "
                "__init__ as attributes and don't freeze all of them",
            )
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._stepped = [(n, p) for n, p in trainable if id(p) in in_opt]
        self._stepped_ids = {id(p) for _, p in self._stepped}
        if self._fsdp:  # FSDP flattens parameters: names and identities no longer match the optimizer's
            self.not_run["optimizer_coverage"] = "not checked under FSDP"
            return
        self.ran.add("optimizer_coverage")
        missing = [n for n, p in trainable if id(p) not in in_opt]
        if missing:
            self.warn(
                "optimizer_coverage",
                f"{len(missing)} trainable parameter(s) of {name} are in no param group of the optimizer "
                f"from {name}.configure_optimizers, so they get gradients but never change: {_names(missing)}. "
                "Fix: build the optimizer from self.parameters() (or add a param group for them), or call "
                "requires_grad_(False) on the ones you mean to freeze",
            )

    def _check_val_data(self, train_data: Any, val_data: Any) -> None:
        if val_data is None:
            self.not_run["val_data"] = "no val_data"
            return
        self.ran.add("val_data")
        if _same_data(train_data, val_data):
            self.warn(
                "val_data",
                "val_data is the same data as train_data, so validation measures memorisation, not "
                "generalisation. Fix: pass a held-out split, e.g. train, val = torch.utils.data.random_split("
                "dataset, [0.9, 0.1], generator=torch.Generator().manual_seed(0))",
            )

    def _check_batchnorm(self, module: nn.Module) -> None:
        """BatchNorm layers that normalize (train mode) over micro-batches smaller than the global batch."""
        self._bn_done = True
        b = self._batching
        if b is None:
            return
        self.ran.add("batchnorm")
        accumulation, world = getattr(b, "accumulation", 1), getattr(b, "world_size", 1)
        if accumulation <= 1 and world <= 1:
            return
        # SyncBatchNorm already normalizes over all processes; only accumulation splits it then.
        bns = [
            self._module_names.get(id(m), type(m).__name__)
            for m in module.modules()
            if isinstance(m, _BatchNorm) and m.training and (accumulation > 1 or not isinstance(m, nn.SyncBatchNorm))
        ]
        if bns:
            micro = getattr(b, "micro_batch_size", None)
            self.warn(
                "batchnorm",
                f"{self._name(module)} has BatchNorm layers ({_names(bns)}) and each forward sees a micro-batch of "
                f"{micro} items, not the global batch of {b.batch_size} ({accumulation} accumulation step(s) x "
                f"{world} process(es)): their statistics are per micro-batch, so results depend on how the batch "
                "is split. Fix: set micro_batch_size to batch_size / world_size, convert with "
                "nn.SyncBatchNorm.convert_sync_batchnorm for several processes, or use GroupNorm/LayerNorm",
            )

    # -- per optimizer step -------------------------------------------------------------

    def start_step(self) -> None:
        """Decide whether this optimizer step is a checked one. Call once per step, before zero_grad.

        Example::

            doctor.start_step()
            if doctor.checking: ...
        """
        if self.off:
            return
        k = self._windows
        self._windows += 1
        self.checking = self.full or k < 2 or k % 1000 == 0 or (k < 1000 and k & (k - 1) == 0)
        if self.checking and self._snapshot is None and not self._updates_decided and self._applied == 0:
            self._snapshot = self._take_snapshot()

    def watch(self, module: nn.Module, batch: Any) -> contextlib.AbstractContextManager[Any]:
        """Wrap the user's ``forward`` and ``compute_loss``: on checked steps, catch their calls to
        ``backward()``, ``zero_grad()`` and ``optimizer.step()``, and snapshot the modes; a no-op otherwise.

        Example::

            with doctor.watch(module, batch):
                outputs = model(inputs)
                doctor.check_train_mode(module, "forward")
                loss = module.compute_loss(outputs, targets)
                doctor.check_loss(module, loss, outputs)
        """
        if self.off or not self.checking:
            return _NULL
        return self._watching(module, batch)

    @contextlib.contextmanager
    def _watching(self, module: nn.Module, batch: Any) -> Iterator[None]:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        if not self._bn_done:
            self._check_batchnorm(module)
        self._phase, self._batch = "forward", batch
        self._modes = [(m, m.training) for m in module.modules()]
        self._grads = [] if self._fsdp else [(p, p.grad, _version(p.grad)) for _, p in self._stepped]
        self.ran.add("loop_calls")
        patched: list[tuple[Any, Any]] = []
        for owner in (module, self._optimizer):
            if owner is not None:
                patched.append((owner, owner.__dict__.get("zero_grad", _MISSING)))
                owner.__dict__["zero_grad"] = self._user_zero_grad
        hook = register_optimizer_step_pre_hook(self._user_optimizer_step)
        try:
            yield
        finally:
            hook.remove()
            for owner, previous in patched:
                if previous is _MISSING:
                    owner.__dict__.pop("zero_grad", None)
                else:
                    owner.__dict__["zero_grad"] = previous
            self._phase, self._batch, self._modes, self._grads = None, None, [], []

    def _user_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        # Raised at the call, so the traceback points at the user's line.
        self.fail(
            "loop_calls",
            f"{self._where()} called zero_grad(): the engine zeroes the gradients once per optimizer step, "
            "before the first micro-batch; zeroing them again in forward/compute_loss throws away the "
            "gradients of the earlier micro-batches. Fix: remove the zero_grad() call",
        )

    def _user_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._phase is None:
            return
        # An inner-loop optimizer over other tensors (meta-learning, test-time training) is legitimate;
        # one that steps this module's parameters runs step 5 before the batch's gradient is complete.
        if not any(id(p) in self._stepped_ids for g in optimizer.param_groups for p in g["params"]):
            return
        self.fail(
            "loop_calls",
            f"{self._where()} called optimizer.step(): the engine steps the optimizer once per optimizer step, "
            "after the backward of every micro-batch; stepping inside forward/compute_loss updates the "
            "parameters from an incomplete (or stale) gradient. The step was blocked, the parameters are "
            "unchanged. Fix: remove the optimizer.step() call",
        )

    def _where(self) -> str:
        return f"{self._name(self._module) if self._module is not None else 'the module'}.{self._phase or 'forward'}"

    def _check_grads_untouched(self) -> None:
        """Did the user's code just run backward() or zero_grad()? Compares each gradient's identity and
        version counter with the snapshot: metadata only, no device read."""
        for p, g, version in self._grads:
            now = p.grad
            if now is g and _version(now) == version:
                continue
            if g is None:
                what = "backward() (gradients appeared)"
            elif now is None:
                what = "zero_grad() (gradients were set to None)"
            else:
                what = "backward() or zero_grad(set_to_none=False) (gradients changed)"
            self.fail(
                "loop_calls",
                f"{self._where()} called {what}, e.g. on {self._names.get(id(p), 'a parameter')}: the engine runs "
                "backward once per micro-batch, scaled so the step's gradient is the mean over the whole batch, "
                "and zeroes gradients once per step; doing it again in forward/compute_loss counts gradients "
                "twice or drops them. Fix: remove the call and return the loss from compute_loss",
            )

    def _check_modes(self, module: nn.Module) -> None:
        switched = [m for m, was in self._modes if was and not m.training]
        if switched:
            names = _names([self._module_names.get(id(m), type(m).__name__) for m in switched])
            self.fail(
                "train_mode",
                f"{self._where()} switched {names} to eval mode during training (dropout off, BatchNorm "
                "frozen); remove the .eval() call: the engine sets train mode for training and eval mode for "
                "validation",
            )

    def check_train_mode(self, module: nn.Module, where: str) -> None:
        """After forward: the module is still in train mode (every step; submodules on checked steps).

        Example::

            outputs = model(inputs)
            doctor.check_train_mode(module, "forward")
        """
        if self.off:
            return
        self.ran.add("train_mode")
        if not module.training:
            self.fail(
                "train_mode",
                f"{self._name(module)} switched itself to eval mode during training (in {where}); "
                "remove the .eval() call: the engine sets train mode for training and eval mode for validation",
            )
        if self._phase is not None:
            self._check_grads_untouched()
            self._check_modes(module)
            self._phase = "compute_loss"

    def check_loss(self, module: nn.Module, loss: Any, outputs: Any = None) -> None:
        """``compute_loss`` must return a differentiable scalar tensor computed from this step's outputs.

        The type checks run every step (metadata only); the graph walk on checked steps.

        Example::

            loss = module.compute_loss(outputs, targets)
            doctor.check_loss(module, loss, outputs)
        """
        if self.off:
            return
        if self._phase is not None:
            self._phase = "compute_loss"
            self._check_grads_untouched()
        self.ran.add("loss_value")
        if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad and self._phase is None:
            return  # an unchecked step with a good loss: done, at the cost of three attribute reads
        name = self._name(module)
        if not isinstance(loss, torch.Tensor):
            self.fail(
                "loss_value",
                f"{name}.compute_loss returned a {type(loss).__name__} ({loss!r:.40}); return a scalar tensor, "
                "the mean loss over the batch's items, e.g. F.cross_entropy(outputs, targets) "
                "(a Python number has no gradient: no .item(), float() or math.* on the loss)",
            )
        if loss.ndim != 0:
            self.fail(
                "loss_value",
                f"{name}.compute_loss returned a tensor of shape {list(loss.shape)}; return a scalar "
                "(mean over items), e.g. loss.mean() or F.cross_entropy(..., reduction='mean')",
            )
        if not loss.requires_grad:
            outs = _tensors(outputs) if outputs is not None else []  # the error path only: cost is no concern
            if any(t.requires_grad for t in outs):
                self.fail(
                    "loss_value",
                    f"{name}.compute_loss returned a loss that does not require grad although forward's outputs "
                    "do: compute_loss detached it (.detach(), .item(), torch.tensor(...), .numpy(), or a "
                    "non-differentiable op such as argmax). Fix: compute the loss from `outputs` with "
                    "differentiable torch ops, e.g. F.cross_entropy(outputs, targets)",
                )
            if outs:
                self.fail(
                    "loss_graph",
                    f"{name}.forward returned outputs that do not require grad: forward ran under "
                    "torch.no_grad()/torch.inference_mode() or detached its result, so nothing in forward can "
                    "learn. Fix: remove the no_grad/inference_mode/.detach() from forward (the engine already "
                    "runs validation without gradients)",
                )
            self.fail(
                "loss_value",
                f"{name}.compute_loss returned a loss that does not require grad: it is detached "
                "(.detach(), .item(), torch.tensor(...)) or forward ran under torch.no_grad()/inference_mode(); "
                "compute the loss from forward's outputs with differentiable torch ops",
            )
        if self._phase is not None:
            if outputs is not None:
                self._check_graph(module, loss, outputs)
            self._check_modes(module)
            if self.full and not self._probe_done and self._batch is not None:
                self._probe_done = True
                self._probe_scaling(module, self._batch)

    def _check_graph(self, module: nn.Module, loss: torch.Tensor, outputs: Any) -> None:
        """Walk ``loss.grad_fn`` back to this step's outputs (pure Python over autograd nodes, no device work)."""
        name = self._name(module)
        self.ran.add("loss_graph")
        outs = [t for t in _tensors(outputs) if t.requires_grad]
        if not _tensors(outputs):
            return  # outputs hold no tensor we can find (a custom object): nothing to compare against
        if not outs:
            self.fail(
                "loss_graph",
                f"{name}.forward returned outputs that do not require grad (forward ran under torch.no_grad()/"
                f"inference_mode() or detached them), yet {name}.compute_loss returned a loss that does: the loss "
                "does not come from this step's forward. Fix: remove the no_grad/.detach() from forward and "
                "compute the loss from `outputs`",
            )
        connected = _reaches(loss, outs)
        if connected is False:
            self.fail(
                "loss_graph",
                f"{name}.compute_loss returned a loss that is not computed from this step's forward outputs: a "
                "stale loss kept from an earlier step (e.g. self.last_loss), or one computed from something "
                "else. Its gradient would not be this batch's. Fix: compute the loss from `outputs` inside "
                "compute_loss, every step",
            )

    def _probe_scaling(self, module: Any, batch: Any) -> None:  # a LoopModule
        """``doctor="full"``: does the loss of a batch equal the mean (by count_items) of its halves' losses,
        or their sum? Eval mode, no grad, forked RNG, restored modes: nothing of training changes."""
        name = self._name(module)
        if self._fsdp:
            self.not_run["loss_scaling"] = "not run under FSDP (needs the unsharded module)"
            return
        halves = _halves(batch)
        if halves is None:
            self.not_run["loss_scaling"] = "the batch could not be split in two (fewer than 2 items, or no tensors)"
            return
        modes = [(m, m.training) for m in module.modules()]
        device = next((t.device for t in _tensors(batch)), torch.device("cpu"))
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for m, _ in modes:  # attribute, not .eval(): a user's train() override must not run
                    m.training = False
                losses, counts = [], []
                for b in (batch, *halves):
                    inputs, targets = module.split_batch(b)
                    losses.append(float(module.compute_loss(module(inputs), targets)))
                    counts.append(float(module.count_items(b)))
        except LoopError:
            raise
        except Exception as e:  # the probe is optional: a module that cannot take half a batch is not wrong
            self.not_run["loss_scaling"] = f"the probe failed: {type(e).__name__}: {e}"[:200]
            return
        finally:
            for m, was in modes:
                m.training = was
        self.ran.add("loss_scaling")
        full, a, b = losses
        n_a, n_b = counts[1], counts[2]
        if not all(map(_finite, (full, a, b))) or n_a + n_b <= 0:
            return
        scale = max(abs(full), 1e-12)
        err_mean = abs(full - (n_a * a + n_b * b) / (n_a + n_b))
        err_sum = abs(full - (a + b))
        if err_sum <= 0.05 * scale and err_mean >= 0.25 * scale:
            self.warn(
                "loss_scaling",
                f"{name}.compute_loss scales with the batch size, like a sum: on a batch of {counts[0]:g} items it "
                f"returned {full:.4g}, and {a:.4g} + {b:.4g} on its two halves. The engine weighs each micro-batch "
                "by count_items, which is exact only for a mean over items; a sum multiplies the learning rate by "
                "the batch size. Fix: use reduction='mean' (the default), or divide the sum by count_items(batch)",
            )

    def check_count(self, module: nn.Module, n: Any) -> None:
        """``count_items`` must be a non-negative integer (int or integer tensor); tensor values are read on
        checked steps only (a host sync).

        Example::

            doctor.check_count(module, module.count_items(batch))
        """
        if self.off:
            return
        self.ran.add("count_items")
        if type(n) is int and n > 0:
            return  # the common case, first and at no cost
        name = self._name(module)
        if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.Tensor)):
            self.fail(
                "count_items",
                f"{name}.count_items returned {type(n).__name__} {n!r:.40}; return an int (or an integer "
                "tensor): the number of items compute_loss averages over",
            )
        if isinstance(n, torch.Tensor):
            if n.ndim != 0 or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
                self.fail(
                    "count_items",
                    f"{name}.count_items returned a {n.dtype} tensor of shape {list(n.shape)}; return an "
                    "integer scalar, e.g. (targets != -100).sum()",
                )
            if not self.checking:
                return
            n = int(n)  # a host sync: checked steps only
        if n < 0:
            self.fail(
                "count_items",
                f"{name}.count_items returned {n}; return the (non-negative) number of items in the batch",
            )
        if n == 0:
            self.warn(
                "count_items",
                f"{name}.count_items returned 0 for a batch, so it adds nothing to the gradient; if that is "
                "not intended, count the items compute_loss averages over (e.g. the non-padding tokens)",
                key="count_zero",
            )

    def after_backward(self) -> None:
        """After the step's last backward, before the optimizer step: which trainable parameters got no
        gradient (metadata only). Decided over the first two checked steps, so a parameter that is
        legitimately idle on one batch (a routed expert) is not reported; under DDP after the first.

        Example::

            loss.backward()
            doctor.after_backward()
        """
        if self.off or not self.checking or self._grads_decided or self._fsdp:
            return
        self.ran.add("gradients")
        self._grad_seen.update(id(p) for _, p in self._stepped if p.grad is not None)
        self._grad_checks += 1
        # Under DDP an unused parameter makes the next forward fail (DDP's "Expected to have finished
        # reduction" error, which names parameter indices): name them now, before that happens.
        if self._grad_checks >= (1 if getattr(self._batching, "world_size", 1) > 1 else 2):
            self._decide_gradients()

    def _decide_gradients(self) -> None:
        self._grads_decided = True
        missing = [n for n, p in self._stepped if id(p) not in self._grad_seen]
        self._no_grad_ids = {id(p) for _, p in self._stepped if id(p) not in self._grad_seen}
        if missing and self._module is not None:
            name = self._name(self._module)
            self.warn(
                "gradients",
                f"{len(missing)} trainable parameter(s) of {name} received no gradient: {_names(missing)}. "
                f"{name}.forward does not use them (or the loss does not depend on them), so they never train. "
                "Fix: use them in forward, remove them, or call requires_grad_(False) on them if frozen by design",
            )

    def after_optimizer_step(self, applied: bool) -> None:
        """After step 5: were the parameters changed? Decided after the second applied step (so an lr that
        warms up from 0 is not reported), on a checked step.

        Example::

            optimizer.step()
            doctor.after_optimizer_step(applied=True)
        """
        if self.off:
            return
        self.ran.add("finite")  # the engine's non-finite guard ran before this step
        if applied:
            self._applied += 1
        if self.checking and self._applied >= 2 and self._snapshot is not None:
            self._decide_updates()

    def end_fit(self) -> None:
        """Decide what is still pending at the end of a short fit.

        Example::

            doctor.end_fit()   # e.g. gradients after a 1-step fit
        """
        if self.off:
            return
        if not self._grads_decided and self._grad_checks:
            self._decide_gradients()
        if self._snapshot is not None:
            if self._applied >= 2:
                self._decide_updates()
            else:
                self.not_run["updates"] = "fewer than 2 optimizer steps were applied"
        self._snapshot = None
        self.checking = False

    def _take_snapshot(self) -> list[torch.Tensor] | None:
        if self._fsdp or not self._stepped:
            return None
        params = [p for _, p in self._stepped]
        self._snapshot_exact = sum(p.numel() for p in params) <= _SNAPSHOT_ELEMENTS
        if self._snapshot_exact:
            return [p.detach().clone() for p in params]
        return [_fingerprint(p) for p in params]

    def _decide_updates(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        self._updates_decided = True
        if snapshot is None or self._optimizer is None or self._module is None:
            return
        self.ran.add("updates")
        params = [p for _, p in self._stepped]
        now = [p.detach() if self._snapshot_exact else _fingerprint(p) for p in params]
        # One host read for all parameters: changed?, and is its gradient all zero?
        flags = torch.stack(
            [torch.ne(s, q).any() for s, q in zip(snapshot, now, strict=True)]
            + [
                (p.grad.count_nonzero() == 0) if p.grad is not None else torch.tensor(True, device=p.device)
                for p in params
            ]
        ).tolist()
        changed, zero_grad = flags[: len(params)], flags[len(params) :]
        unchanged = [i for i, c in enumerate(changed) if not c and id(params[i]) not in self._no_grad_ids]
        if not unchanged:
            return
        group_of = {id(p): i for i, g in enumerate(self._optimizer.param_groups) for p in g["params"]}
        groups = self._optimizer.param_groups
        reasons: dict[str, list[str]] = {}
        for i in unchanged:
            p = params[i]
            gi = group_of.get(id(p), 0)
            lr = groups[gi].get("lr", None)
            if lr is not None and float(lr) == 0.0:
                why = f"param group {gi} has lr=0"
            elif p.grad is None:
                why = "no gradient"
            elif zero_grad[i]:
                why = "zero gradient"
            else:
                why = f"the optimizer left them unchanged (param group {gi})"
            reasons.setdefault(why, []).append(self._stepped[i][0])
        detail = "; ".join(f"{why}: {_names(names)}" for why, names in reasons.items())
        name = self._name(self._module)
        self.warn(
            "updates",
            f"{len(unchanged)} trainable parameter(s) of {name} did not change in the first {self._applied} "
            f"optimizer steps ({detail}). Fix: give every param group of {name}.configure_optimizers a non-zero "
            "lr, check that the loss depends on these parameters, or call requires_grad_(False) on parameters "
            "you mean to freeze",
        )

    def diagnose_nonfinite(self, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
        """Name what went non-finite (the loss, which parameters' gradients) before the engine drops the
        gradients; sets :attr:`nonfinite_detail`. Only called on a bad step, so its host reads cost nothing
        on the healthy path.

        Example::

            doctor.diagnose_nonfinite(window_loss, params)   # -> ": the loss is nan (...)"
        """
        self.nonfinite_detail = ""
        if self.off:
            return ""
        name = self._name(self._module) if self._module is not None else "the module"
        with_grad = [(p, p.grad) for p in params if p.grad is not None]
        flags = torch.stack([~torch.isfinite(loss).all()] + [~torch.isfinite(g).all() for _, g in with_grad]).tolist()
        parts = []
        if flags[0]:
            parts.append(
                f"{name}.compute_loss returned {float(loss.detach().float()):g} (check the inputs and "
                "targets of that batch, and log()/division by zero in the loss)"
            )
        bad = [self._names.get(id(p), "?") for (p, _), f in zip(with_grad, flags[1:], strict=True) if f]
        if bad:
            parts.append(f"non-finite gradients in {_names(bad)}")
        self.nonfinite_detail = (": " + "; ".join(parts)) if parts else ""
        self.ran.add("finite")
        self.findings.append(
            Finding(
                "finite",
                "error",
                f"non-finite loss or gradient{self.nonfinite_detail}; fix: lower the learning "
                "rate, set clip_grad_norm, or check that batch's data",
            )
        )
        return self.nonfinite_detail

    # -- validation ---------------------------------------------------------------------

    def check_eval_mode(self, module: nn.Module) -> None:
        """During validation the module is still in eval mode (every batch, metadata only).

        Example::

            outputs = model(inputs)
            doctor.check_eval_mode(module)
        """
        if self.off:
            return
        self.ran.add("eval_mode")
        if module.training:
            self.fail(
                "eval_mode",
                f"{self._name(module)} switched itself to train mode during validation; remove the "
                ".train() call from forward/compute_loss/compute_metrics: the engine sets the modes",
            )

    # -- the report ---------------------------------------------------------------------

    def report(self) -> list[tuple[str, str, str, str]]:
        """One row per check: ``(check id, what it establishes, status, detail)``; status is
        ``"ok"``, ``"warning"``, ``"error"`` or ``"not run"``.

        Example::

            for check, title, status, detail in engine.doctor.report():
                print(status, title)
        """
        return report_rows(self.findings, self.ran, self.not_run)

    def format_report(self) -> str:
        """The report as a table (what ``python -m framework doctor`` prints).

        Example::

            print(engine.doctor.format_report())
        """
        return format_table(self.report())


def report_rows(findings: list[Finding], ran: set[str], not_run: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """Merge findings into one row per check of :data:`CHECKS` (see :meth:`Doctor.report`).

    Example::

        rows = report_rows(doctor.findings, doctor.ran, doctor.not_run)
    """
    rows = []
    for check, (title, _fix) in CHECKS.items():
        mine = [f for f in findings if f.check == check]
        if any(f.severity == "error" for f in mine):
            status = "error"
        elif mine:
            status = "warning"
        elif check in ran:
            status = "ok"
        else:
            status = "not run"
        if mine:
            seen: list[str] = []
            for f in mine:
                if f.message not in seen:
                    seen.append(f.message)
            detail = "\n".join(seen)
        elif status == "not run":
            detail = not_run.get(check, "not reached in this run")
        else:
            detail = ""
        rows.append((check, title, status, detail))
    return rows


def format_table(rows: list[tuple[str, str, str, str]], width: int = 100) -> str:
    """Render report rows: status, what was checked, and (for problems) the message with its fix.

    Example::

        print(format_table(engine.doctor.report()))
    """
    lines = [f"{'status':<9} check", f"{'-' * 9} {'-' * (width - 10)}"]
    for _, title, status, detail in rows:
        label = status.upper() if status in ("error", "warning") else status
        lines.append(f"{label:<9} {title}")
        for para in detail.splitlines() if detail else []:
            lines.extend(textwrap.wrap(para, width, initial_indent=" " * 10 + "-> ", subsequent_indent=" " * 13))
    counts = {s: sum(r[2] == s for r in rows) for s in ("ok", "warning", "error", "not run")}
    lines.append(f"{'-' * 9} {'-' * (width - 10)}")
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------------

_MISSING = object()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside this package (and the
    contextlib frames of ``watch``): the user's ``engine.fit(...)`` line, not the doctor's internals."""
    frame: types.FrameType | None = sys._getframe(2)
    level = 2  # level 1 is Doctor.warn itself
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def _version(t: torch.Tensor | None) -> int:
    return -1 if t is None else t._version


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    """A float64 (sum, norm) of ``p`` for a parameter too large to copy; reductions upcast on the fly."""
    d = p.detach()
    return torch.stack([d.sum(dtype=torch.float64), torch.linalg.vector_norm(d, dtype=torch.float64)])


def _tensors(obj: Any, depth: int = 0, limit: int = 64) -> list[torch.Tensor]:
    """The tensors inside ``obj`` (tensor, list/tuple, dict, dataclass-like ModelOutput), up to ``limit``."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 4:
        return []
    out: list[torch.Tensor] = []
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dataclass_fields__"):
        items = (getattr(obj, f, None) for f in obj.__dataclass_fields__)
    else:
        return []
    for x in items:
        out.extend(_tensors(x, depth + 1, limit))
        if len(out) >= limit:
            break
    return out[:limit]


def _reaches(loss: torch.Tensor, outputs: list[torch.Tensor]) -> bool | None:
    """Does the autograd graph behind ``loss`` contain one of ``outputs``? None when undecided (too big)."""
    fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
    leaves = {id(t) for t in outputs if t.grad_fn is None}
    start = loss.grad_fn
    if start is None:
        return id(loss) in leaves
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if node in fns:
            return True
        if leaves and id(getattr(node, "variable", None)) in leaves:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                if len(seen) >= _GRAPH_NODES:
                    return None
                seen.add(nxt)
                stack.append(nxt)
    return False


def _batch_len(batch: Any) -> int | None:
    ts = [t for t in _tensors(batch) if t.ndim > 0]
    return ts[0].shape[0] if ts else None


def _halves(batch: Any) -> tuple[Any, Any] | None:
    """``batch`` cut in two along dim 0 of every tensor whose dim 0 is the batch size; None if it cannot be."""
    n = _batch_len(batch)
    if n is None or n < 2:
        return None
    k = n // 2
    return _slice(batch, 0, k, n), _slice(batch, k, n, n)


def _slice(obj: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_slice(x, lo, hi, n) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(x, lo, hi, n) for x in obj)
    if isinstance(obj, Mapping):
        sliced = {k: _slice(v, lo, hi, n) for k, v in obj.items()}
        mapping_type: Any = type(obj)  # dict, OrderedDict, a ModelOutput-like dict subclass
        try:
            return mapping_type(sliced)
        except Exception:
            return sliced
    return obj


def _same_data(train: Any, val: Any) -> bool:
    """Cheap identity tests: the same object, the same dataset behind two DataLoaders, the same Subset, or
    the same tensors (shared storage, or equal contents when the shapes match)."""
    from torch.utils.data import DataLoader, Subset

    from .data import as_tensors

    if train is None or val is None:
        return False
    if train is val:
        return True
    a = train.dataset if isinstance(train, DataLoader) else train
    b = val.dataset if isinstance(val, DataLoader) else val
    if a is b:
        return True
    if isinstance(a, Subset) and isinstance(b, Subset):
        return a.dataset is b.dataset and list(a.indices) == list(b.indices)
    try:
        ta, tb = as_tensors(a), as_tensors(b)
    except Exception:
        return False
    if not ta or not tb or len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            return False
        same_storage = x.data_ptr() == y.data_ptr() and x.stride() == y.stride()
        if not same_storage and not torch.equal(x, y):
            return False
    return True
