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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .doctor_findings import CHECKS, Finding, LoopError, LoopWarning, format_table, name_list, report_rows
from .doctor_inspect import is_finite, reaches, same_data, split_halves, tensors_in, version_of
from .doctor_params import ParameterChecks

__all__ = [
    "CHECKS",
    "Doctor",
    "Finding",
    "LoopError",
    "LoopWarning",
    "collect",
    "format_table",
    "max_steps_override",
    "report_rows",
]

_NULL = contextlib.nullcontext()
_MISSING = object()
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


class Doctor(ParameterChecks):
    """Checks run by the engine; ``level`` is "basic" (default), "full" or "off".

    The environment variable ``FRAMEWORK_DOCTOR`` overrides ``level`` (that is how
    ``python -m framework doctor`` turns on every check in a recipe it runs).
    After a fit, :attr:`findings` holds what was found and :meth:`report` the table.

    The checks of the user's code (``forward``, ``compute_loss``, ``count_items``, the modes) and of
    the data live here; the parameter checks in :class:`~framework.doctor_params.ParameterChecks`,
    the findings and the report in :class:`~framework.doctor_findings.Recorder`.

    Example::

        engine = Engine(max_steps=100, batch_size=32, doctor="full")  # every check, every step
        engine.fit(model, data)
        print(engine.doctor.format_report())
    """

    def __init__(self, level: str = "basic") -> None:
        level = os.environ.get("FRAMEWORK_DOCTOR") or level
        if level not in ("basic", "full", "off"):
            raise ValueError(f'doctor={level!r}; use "basic", "full" or "off"')
        super().__init__()
        self.level = level
        self.off = level == "off"
        self.full = level == "full"
        self.context: dict[str, Any] = {}  # module, optimizer, data of the last fit (only while collected)
        self._reset()
        for found in _collectors:
            found.append(self)

    def _reset(self) -> None:
        self._reset_parameters()
        self._module_names: dict[int, str] = {}  # id(submodule) -> its name
        self._is_main = True
        self._windows = 0  # optimizer steps started in this fit
        self._probe_done = False
        self._bn_done = False
        # Set inside watch() only:
        self._phase: str | None = None
        self._batch: Any = None
        self._modes: list[tuple[nn.Module, bool]] = []
        self._grads: list[tuple[nn.Parameter, torch.Tensor | None, int]] = []

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

    def _check_val_data(self, train_data: Any, val_data: Any) -> None:
        if val_data is None:
            self.not_run["val_data"] = "no val_data"
            return
        self.ran.add("val_data")
        if same_data(train_data, val_data):
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
                f"{self._name(module)} has BatchNorm layers ({name_list(bns)}) and each forward sees a micro-batch of "
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
        self._grads = [] if self._fsdp else [(p, p.grad, version_of(p.grad)) for _, p in self._stepped]
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
            if now is g and version_of(now) == version:
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
            names = name_list([self._module_names.get(id(m), type(m).__name__) for m in switched])
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

    def check_loss(self, module: nn.Module, loss: Any, outputs: Any = None, phase: str | None = None) -> None:
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
            outs = tensors_in(outputs) if outputs is not None else []  # the error path only: cost is no concern
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
            # (Not in alternating phases: a phase's loss may use only detached outputs, e.g. a GAN
            # discriminator's loss on fake.detach(), which the walk cannot tell from a stale loss.)
            if outputs is not None and phase is None:
                self._check_graph(module, loss, outputs)
            self._check_modes(module)
            if self.full and not self._probe_done and self._batch is not None:
                self._probe_done = True
                self._probe_scaling(module, self._batch)

    def _check_graph(self, module: nn.Module, loss: torch.Tensor, outputs: Any) -> None:
        """Walk ``loss.grad_fn`` back to this step's outputs (pure Python over autograd nodes, no device work)."""
        name = self._name(module)
        self.ran.add("loss_graph")
        outs = [t for t in tensors_in(outputs) if t.requires_grad]
        if not tensors_in(outputs):
            return  # outputs hold no tensor we can find (a custom object): nothing to compare against
        if not outs:
            self.fail(
                "loss_graph",
                f"{name}.forward returned outputs that do not require grad (forward ran under torch.no_grad()/"
                f"inference_mode() or detached them), yet {name}.compute_loss returned a loss that does: the loss "
                "does not come from this step's forward. Fix: remove the no_grad/.detach() from forward and "
                "compute the loss from `outputs`",
            )
        connected = reaches(loss, outs)
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
        halves = split_halves(batch)
        if halves is None:
            self.not_run["loss_scaling"] = "the batch could not be split in two (fewer than 2 items, or no tensors)"
            return
        modes = [(m, m.training) for m in module.modules()]
        device = next((t.device for t in tensors_in(batch)), torch.device("cpu"))
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
        if not all(map(is_finite, (full, a, b))) or n_a + n_b <= 0:
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
