"""What the checks share: the facts of the fit (:class:`FitInfo`) and where the loop is (:class:`Context`).

The :class:`~framework.doctor.Doctor` writes both; a check only reads them, keeps its own state on
itself, and records what it finds through ``ctx.record`` (a :class:`~framework.doctor.findings.Recorder`).
That is the whole coupling between the façade and its checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .findings import Recorder

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over all processes in place, returns it

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass
class FitInfo:
    """One fit as the checks see it: the module, its optimizers (one per phase when ``phases`` is set),
    the batching, the data, the strategy, and how to agree across processes (``reduce``, None on one).

    Derived once at the start of the fit: parameter and submodule names, the trainable parameters, which
    optimizers hold each parameter (``holders``), and the trainable parameters some optimizer holds
    (``stepped``: the ones the parameter checks watch).
    """

    module: nn.Module
    optimizers: list[torch.optim.Optimizer]
    batching: Any = None
    train_data: Any = None
    val_data: Any = None
    is_main: bool = True
    strategy: str = "single"
    device_type: str = "cpu"
    phases: list[str] | None = None
    reduce: Reduce | None = None
    nan_policy: str = "raise"  # what a non-finite loss does in training: "raise" or "skip" (the probe follows it)
    name: str = field(init=False)
    param_names: dict[int, str] = field(init=False)  # id(parameter) -> its name in the module
    module_names: dict[int, str] = field(init=False)  # id(submodule) -> its name
    trainable: list[tuple[str, nn.Parameter]] = field(init=False)
    holders: dict[int, list[int]] = field(init=False)  # id(parameter) -> indices of the optimizers holding it
    stepped: list[tuple[str, nn.Parameter]] = field(init=False)
    stepped_ids: set[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")
        if self.phases is not None and len(self.phases) != len(self.optimizers):
            raise ValueError(
                f"phases={self.phases!r} names {len(self.phases)} phase(s) for {len(self.optimizers)} optimizer(s); "
                "pass one optimizer per phase, in the phases' order"
            )
        self.name = type(self.module).__name__
        self.param_names = {id(p): n for n, p in self.module.named_parameters()}
        self.module_names = {id(m): (n or type(m).__name__) for n, m in self.module.named_modules()}
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.holders = {}
        for i, opt in enumerate(self.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    held = self.holders.setdefault(id(p), [])
                    if i not in held:
                        held.append(i)
        self.stepped = [(n, p) for n, p in self.trainable if id(p) in self.holders]
        self.stepped_ids = {id(p) for _, p in self.stepped}

    @property
    def world_size(self) -> int:
        """Processes in the run (from the batching; 1 without one), e.g. ``fit.world_size > 1`` under DDP."""
        return int(getattr(self.batching, "world_size", 1) or 1)

    @property
    def sharded(self) -> bool:
        """FSDP: parameters and gradients are DTensors; each rank holds a shard (``if fit.sharded: ...``)."""
        return self.strategy == "fsdp"

    def optimizer_label(self, i: int) -> str:
        """How a message names optimizer ``i``: its phase, or its place and type when there are several:
        "the generator optimizer", "optimizer 1 (AdamW)" or "the optimizer"."""
        if self.phases is not None:
            return f"the {self.phases[i]} optimizer"
        if len(self.optimizers) == 1:
            return "the optimizer"
        return f"optimizer {i} ({type(self.optimizers[i]).__name__})"

    def phase_keys(self) -> list[str | None]:
        """The phases of one optimizer step: ``[None]`` (joint: one loss, every optimizer steps) or the phases."""
        return [None] if self.phases is None else list(self.phases)

    def optimizer_indices(self, phase: str | None) -> list[int]:
        """The optimizers that step in ``phase`` (all of them for a joint step, phase None)."""
        if phase is None or self.phases is None:
            return list(range(len(self.optimizers)))
        if phase not in self.phases:
            raise ValueError(f"phase={phase!r} is not one of this fit's phases {self.phases}")
        return [self.phases.index(phase)]

    def params_of(self, phase: str | None) -> list[tuple[str, nn.Parameter]]:
        """The stepped parameters that ``phase``'s optimizer holds (all of them for a joint step)."""
        if phase is None or self.phases is None:
            return self.stepped
        i = self.optimizer_indices(phase)[0]
        return [(n, p) for n, p in self.stepped if i in self.holders[id(p)]]


class Context:
    """Where the loop is, for the checks: the fit, whether this optimizer step is a checked one, and,
    inside :meth:`~framework.doctor.Doctor.watch`, the user method running and its batch.
    """

    def __init__(self, record: Recorder, level: str) -> None:
        self.record = record
        self.full = level == "full"
        self.checking = False  # is the current optimizer step a checked one?
        self.step = 0  # optimizer steps started in this fit
        self.watching = False  # inside watch(): the user's forward/compute_loss is running
        self.where = "forward"  # the user method running inside watch()
        self.batch: Any = None  # the batch being watched
        self._fit: FitInfo | None = None

    @property
    def fit(self) -> FitInfo:
        """The current fit (set by ``Doctor.start_fit``), e.g. ``ctx.fit.stepped``."""
        if self._fit is None:
            raise RuntimeError("the doctor has no fit: call Doctor.start_fit(module, optimizers, ...) first")
        return self._fit

    @fit.setter
    def fit(self, fit: FitInfo) -> None:
        self._fit = fit

    @property
    def has_fit(self) -> bool:
        """Has a fit started (``Engine.validate`` alone runs the doctor without one)?"""
        return self._fit is not None

    def module_name(self, module: nn.Module | None = None) -> str:
        """The user's class name for messages, from ``module`` or the fit's module: ``ctx.module_name()  # "Net"``."""
        if module is not None:
            return type(module).__name__
        return self._fit.name if self._fit is not None else "the module"
