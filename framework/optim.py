"""The optimizers of a fit: what ``configure_optimizers`` returns, parsed (one or several named optimizers, each
with its scheduler), and the :class:`EMA` of the parameters that steps with them.

Accepted forms:

- an optimizer; ``(optimizer, scheduler)``; ``{"optimizer": opt, "scheduler": sched, "interval": "step" | "epoch"}``;
- a dict of named optimizers, each value one of the forms above:
  ``{"muon": Muon(matrices), "adamw": AdamW(rest)}`` or ``{"discriminator": opt_d, "generator": opt_g}``.

Several optimizers step *jointly* (one backward, then each steps on its own parameters, with its own
scheduler), or, when ``compute_loss`` takes a ``phase`` argument, as alternating *phases* in the
dict's order (:mod:`framework.step`).

Example:

    >>> d, g = nn.Linear(4, 1), nn.Linear(2, 4)
    >>> opts = parse_optimizers({"d": torch.optim.Adam(d.parameters()), "g": torch.optim.Adam(g.parameters())})
    >>> [o.name for o in opts], opts.named
    (['d', 'g'], True)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_SINGLE_KEYS = {"optimizer", "scheduler", "interval"}


@dataclass
class Optimization:
    """One named optimizer, its optional LR scheduler, and when the scheduler steps ("step" | "epoch")."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    interval: str = "step"
    name: str = "optimizer"

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters this optimizer holds, in param-group order."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def step_scheduler(self) -> Any:
        """The scheduler if it steps per optimizer step, else None."""
        return self.scheduler if self.interval == "step" else None


class Optimizers:
    """The optimizers of a fit, in order; iterate for :class:`Optimization` s.

    ``named`` is False for the single-optimizer forms (checkpoints and logs then use the plain names
    ``optimizer``, ``lr``), True for a dict of named optimizers.

    Example:

        >>> opts = parse_optimizers(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
        >>> type(opts.first.optimizer).__name__, len(opts), opts.named, opts.lrs()
        ('SGD', 1, False, {'lr': 0.1})
    """

    def __init__(self, items: list[Optimization], named: bool) -> None:
        self.items, self.named = items, named

    def __iter__(self) -> Iterator[Optimization]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def first(self) -> Optimization:
        return self.items[0]

    @property
    def params(self) -> list[torch.Tensor]:
        """Every parameter of every optimizer (each once: a parameter in two optimizers is refused)."""
        return [p for o in self.items for p in o.params]

    def lrs(self) -> dict[str, float]:
        """The logged learning rates: ``lr`` (the first param group of the first optimizer) and, with several
        named optimizers, ``lr/<name>`` for each."""
        out = {"lr": _lr(self.first.optimizer)}
        if self.named:
            out.update({f"lr/{o.name}": _lr(o.optimizer) for o in self.items})
        return out


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def fused_on_gpu(params: Iterable[torch.Tensor]) -> bool | None:
    """``fused=`` for a torch optimizer: True where every parameter is a floating-point CUDA tensor,
    else None (torch's default). A fused optimizer can skip a non-finite step on the device, so the
    engine's NaN guard needs no host sync per step (``Engine(nan_check="auto")``).

    Example:

        >>> model = nn.Linear(2, 2)  # on the CPU: torch's default
        >>> print(fused_on_gpu(model.parameters()))
        None
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=fused_on_gpu(model.parameters()))
    """
    params = list(params)
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def takes_phase(compute_loss: Any) -> bool:
    """Does ``compute_loss`` take a ``phase`` argument (alternating phases, one per optimizer)?

    Example:

        >>> def compute_loss(outputs, targets, phase): ...
        >>> takes_phase(compute_loss), takes_phase(F.cross_entropy)
        (True, False)
    """
    try:
        return "phase" in inspect.signature(compute_loss).parameters
    except (TypeError, ValueError):  # (a builtin or C callable: no phases)
        return False


def phase_is_required(compute_loss: Any) -> bool:
    """Does ``compute_loss``'s ``phase`` have no default (so validation must name each phase)?

    Example:

        >>> def compute_loss(outputs, targets, phase): ...
        >>> def compute_loss_with_default(outputs, targets, phase="generator"): ...
        >>> phase_is_required(compute_loss), phase_is_required(compute_loss_with_default)
        (True, False)
    """
    try:
        param = inspect.signature(compute_loss).parameters.get("phase")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "step") and hasattr(obj, "state_dict") and hasattr(obj, "optimizer")


def _check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, owner: str) -> None:
    # ReduceLROnPlateau.step needs a metric; the engine steps schedulers without one, so it would
    # fail with a TypeError only at the first scheduler step (after a whole epoch of training).
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            f"{owner} returned ReduceLROnPlateau, which steps on a metric the engine does not pass; "
            "return only the optimizer and step the scheduler yourself in a Callback, e.g. "
            'on_validation_end(self, engine, module, metrics): sched.step(metrics["val/loss"])'
        )
    if scheduler is not None and getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ValueError(f"{owner} returned a scheduler built on another optimizer; pair each scheduler with its own")


def _one(value: Any, owner: str, name: str) -> Optimization:
    """One optimizer in any of the single forms."""
    fix = (
        f"{owner} must return an optimizer, (optimizer, scheduler), or "
        '{"optimizer": opt, "scheduler": sched, "interval": "step" | "epoch"}; or a dict of named ones of these, '
        'e.g. {"muon": opt_a, "adamw": opt_b}'
    )
    if isinstance(value, torch.optim.Optimizer):
        return Optimization(value, name=name)
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and isinstance(value[0], torch.optim.Optimizer) and _is_scheduler(value[1]):
            _check_scheduler(value[1], value[0], owner)
            return Optimization(value[0], value[1], name=name)
        raise TypeError(f"{owner} returned a {type(value).__name__} of {[type(x).__name__ for x in value]}; {fix}")
    if isinstance(value, dict):
        unknown = set(value) - _SINGLE_KEYS
        if unknown or not isinstance(value.get("optimizer"), torch.optim.Optimizer):
            raise TypeError(f"{owner} returned a dict with keys {sorted(map(str, value))}; {fix}")
        scheduler = value.get("scheduler")
        if scheduler is not None and not _is_scheduler(scheduler):
            raise TypeError(f"{owner} returned scheduler={type(scheduler).__name__}, not an LR scheduler; {fix}")
        _check_scheduler(scheduler, value["optimizer"], owner)
        interval = value.get("interval", "step")
        if interval not in ("step", "epoch"):
            raise ValueError(f'{owner} returned interval={interval!r}; use "step" or "epoch"')
        return Optimization(value["optimizer"], scheduler, interval, name=name)
    raise TypeError(f"{owner} returned {type(value).__name__}; {fix}")


def _is_single_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("optimizer"), torch.optim.Optimizer)
        and set(value) <= _SINGLE_KEYS
    )


def parse_optimizers(returned: Any, owner: str = "configure_optimizers", shared_ok: bool = False) -> Optimizers:
    """Accept every form of the module docstring; refuse a parameter held by two optimizers that step jointly
    (``shared_ok``: alternating phases, where a shared part trained in two phases can be intended).

    Example:

        >>> model = nn.Linear(2, 2)
        >>> parse_optimizers(torch.optim.SGD(model.parameters(), lr=0.1)).first.interval
        'step'
        >>> shared = {"a": torch.optim.SGD(model.parameters(), lr=0.1), "b": torch.optim.Adam(model.parameters())}
        >>> parse_optimizers(shared)
        Traceback (most recent call last):
        ...
        ValueError: configure_optimizers: a parameter of shape [2, 2] is in both optimizers 'a' and 'b'; ...
    """
    if isinstance(returned, dict) and returned and not _is_single_dict(returned):
        for name in returned:
            if not isinstance(name, str) or not name or "/" in name:
                raise TypeError(
                    f"{owner} returned a dict with key {name!r}; name each optimizer with a str without '/'"
                )
        items = [_one(v, f"{owner}[{k!r}]", k) for k, v in returned.items()]
        named = True
    else:
        items, named = [_one(returned, owner, "optimizer")], False
    seen: dict[int, str] = {}
    for o in items:
        for p in o.params:
            if id(p) in seen and seen[id(p)] != o.name and not shared_ok:
                raise ValueError(
                    f"{owner}: a parameter of shape {list(p.shape)} is in both optimizers {seen[id(p)]!r} and "
                    f"{o.name!r}; give each parameter to one optimizer (e.g. split by p.ndim >= 2 for Muon + AdamW)"
                )
            seen[id(p)] = o.name
    return Optimizers(items, named)


# ---------------------------------------------------------------- the EMA of the parameters


class EMA:
    """An exponential moving average of ``module``'s parameters (``Engine(ema_decay=0.999)``).

    After every applied optimizer step, ``ema = decay * ema + (1 - decay) * param`` (a ``lerp``, on the
    device, no host sync), starting from the weights at fit start. With several optimizers stepping
    jointly that is once per step, after all of them; with alternating phases it is once per global
    batch, after the *last* phase's step (a GAN's generator), over every parameter: a skipped last
    phase skips the update, a skipped earlier phase does not. Validation (and ``predict`` and
    ``validate`` during a fit) runs with the EMA weights swapped in; buffers (BatchNorm statistics) are
    the model's own. Checkpoints hold the EMA (``ema.safetensors``, parameter names as in
    ``model.safetensors``); ``framework.load_weights(module, path, ema=True)`` loads it. Under DDP every
    rank holds the same average of the same parameters; under FSDP each rank averages its own shards.
    Under ``nan_check="deferred"`` the update is skipped on the device together with the step.

    Example:

        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(model.weight)
        >>> ema = EMA(model, decay=0.75)  # starts from the weights it is given: 0
        >>> _ = nn.init.ones_(model.weight)  # as an optimizer step would: the weight is 1 now
        >>> ema.update()
        >>> with ema.applied():
        ...     print(model.weight.item())  # 0.75 * 0 + 0.25 * 1
        0.25
        >>> model.weight.item()  # the trained weight is back
        1.0
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r}; use a float strictly between 0 and 1, e.g. 0.999")
        self.decay = decay
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, found: torch.Tensor | None = None) -> None:
        """One step of the average; ``found`` (a 0-dim tensor, 1.0 for a step the optimizer skipped on the
        device) turns it into a no-op without a host read."""
        params, shadow = _locals(self.params), _locals(self.shadow)
        if found is None:
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
            return
        weight = (1.0 - found.to(shadow[0].dtype if shadow else torch.float32)) * (1.0 - self.decay)
        lerp: Any = torch._foreach_lerp_  # (a 0-dim tensor weight: skipped on the device, no host read)
        lerp(shadow, params, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run a block with the EMA weights in the parameters, then put the trained ones back."""
        with torch.no_grad():
            params = _locals(self.params)
            trained = [p.clone() for p in params]
            torch._foreach_copy_(params, _locals(self.shadow))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(_locals(self.params), trained)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its average (what ``ema.safetensors`` holds)."""
        return dict(zip(self.names, self.shadow, strict=True))

    def check_state_dict(self, state: object) -> None:
        if not isinstance(state, dict) or sorted(state) != sorted(self.names):
            raise KeyError("the EMA's parameter names do not match the module's")
        for name, value in zip(self.names, self.shadow, strict=True):
            got = state[name]
            if not isinstance(got, torch.Tensor) or got.shape != value.shape:
                raise ValueError(f"EMA {name!r} has the wrong shape")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, value in zip(self.names, self.shadow, strict=True):
            saved = state[name]
            if isinstance(value, DTensor) and not isinstance(saved, DTensor):  # (whole tensors into shards)
                saved = distribute_tensor(
                    saved.to(value.device), value.device_mesh, value.placements, src_data_rank=None
                )
            value.copy_(saved)


def _locals(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local values, detached: a DTensor's own shard (in place through it changes the parameter;
    foreach ops run on shards of any meshes, which DTensors of several meshes cannot)."""
    from torch.distributed.tensor import DTensor

    return [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]  # type: ignore[attr-defined]
