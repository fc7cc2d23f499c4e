"""The strategy interface, and its plain implementation: one process, the module itself."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .grads import grad_norm

if TYPE_CHECKING:
    from .runtime import Runtime

_NULL = contextlib.nullcontext()


class Strategy:
    """What the loop, the checkpoint code and the doctor ask of a strategy (see :mod:`framework.strategies`).

    ``can_skip_on_device``: a fused optimizer may skip a bad step on the device (the deferred NaN verdict).

    Example::

        model = strategy.prepare(module)
        with strategy.no_sync(model, sync=False):
            loss.backward()
    """

    name = "single"
    can_skip_on_device = True

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # ---- setup

    def prepare(self, module: nn.Module, *, manual_sync: bool = False) -> nn.Module:
        """Put ``module`` on the device and wrap it; returns the model to run forwards through.
        ``manual_sync``: alternating phases run several backwards per forward; gradients are then
        averaged by :meth:`reduce_gradients` rather than by a wrapper's hooks."""
        raise NotImplementedError

    # ---- the step

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient synchronisation for every micro-batch but the window's last."""
        return _NULL

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the processes where no wrapper did (manual sync)."""

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global 2-norm of the gradients (over every shard and process)."""
        return grad_norm(grads)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so their global norm is at most ``max_norm``, given their norm ``norm``."""
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)

    def forwards(self, window: Any) -> list[Any]:
        """The batches this rank runs for ``window``: its micro-batches, or a zero-weight filler when it has none
        (so it still joins the gradient all-reduce). The first ``len(window.micro_batches)`` are real."""
        return list(window.micro_batches) or [window.filler]

    def check_unused(self, module: nn.Module, params: list[torch.Tensor]) -> None:
        """After the first window's backward: stop on parameters the wrapper cannot handle (DDP)."""

    # ---- evaluation

    def eval_model(self, module: nn.Module, model: nn.Module) -> nn.Module:
        """The model validation and prediction run through (a compiled model, the sharded module, ...)."""
        return model

    def sync_buffers(self, module: nn.Module) -> None:
        """Bring every rank's buffers (BatchNorm statistics) into rank 0's state, before validation and
        checkpoints: then ``val/*`` describes the model that is saved."""

    # ---- state

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's weights to save (full tensors; shards under FSDP)."""
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(state)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict keyed by parameter name (not torch's position index), so that it
        resumes under another strategy: ``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``."""
        names = _names(module)
        sd = optimizer.state_dict()
        order = [p for g in optimizer.param_groups for p in g["params"]]  # (torch's indices follow this order)
        by_index = {i: names.get(id(p), f"<not in the module {i}>") for i, p in enumerate(order)}
        return {
            "state": {by_index[i]: st for i, st in sd["state"].items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in sd["param_groups"]],
        }

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        names = _names(module)
        order = [p for g in optimizer.param_groups for p in g["params"]]
        index = {names.get(id(p), f"<not in the module {i}>"): i for i, p in enumerate(order)}
        optimizer.load_state_dict(
            {
                "state": {index[n]: st for n, st in state["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
            }
        )

    def summary(self) -> str:
        """One line for the fit summary."""
        return f"strategy={self.name}"


class SingleProcess(Strategy):
    """One process: the module itself, on the runtime's device; no wrapper, no per-step cost.

    Example::

        model = SingleProcess(make_runtime()).prepare(module)   # module, moved to the device
    """

    def prepare(self, module: nn.Module, *, manual_sync: bool = False) -> nn.Module:
        return module.to(self.rt.device)


def _names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name (the first, for a parameter shared under two names)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    return names
