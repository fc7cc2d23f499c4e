"""The strategy interface, and its plain implementation: one process, the module itself."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .grads import grad_norm

if TYPE_CHECKING:
    from .runtime import Runtime

_NULL = contextlib.nullcontext()


@dataclass(frozen=True)
class Initial:
    """A module built by ``LoopModule.configure_model``: its parameters get seeded initial values from
    ``init()`` (the module's ``init_weights``) after the layout applied (:func:`framework.parallel.build.materialize`).

    Example::

        strategy.prepare(module, initial=Initial(seed=0, init=module.init_weights))
    """

    seed: int
    init: Callable[[], None]


_DEFAULT_MIN_PARAMS = 100_000


def default_blocks(module: nn.Module, min_params: int | None = None) -> list[nn.Module]:
    """The submodules FSDP shards as units of their own (each gathered only while it runs), before the root.

    The default policy: every element of an ``nn.ModuleList`` or ``nn.Sequential``, at any depth, that holds
    at least ``min_params`` parameters (a transformer's blocks, an MLP's large layers); an element below
    the threshold is searched for such containers in turn. ``min_params`` comes from the launch config
    (``fsdp_min_num_params``), else 100,000. With ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` and
    ``fsdp_transformer_layer_cls_to_wrap: GPT2Block,...``, the modules of those classes instead;
    ``NO_WRAP``: none (the root is one unit). A module overrides all of it with
    ``LoopModule.fsdp_blocks()``.

    Example::

        [type(b).__name__ for b in default_blocks(gpt2_module)]   # ["GPT2Block", "GPT2Block", ...]
    """
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP").strip().upper()
    if policy == "NO_WRAP":
        return []
    if policy == "TRANSFORMER_BASED_WRAP":
        names = {n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()}
        if not names:
            raise ValueError(
                "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP needs fsdp_transformer_layer_cls_to_wrap (the block "
                "class names, e.g. GPT2Block) in the launch config"
            )
        found: list[nn.Module] = []
        for m in module.modules():
            if type(m).__name__ in names and not any(_contains(f, m) for f in found):
                found.append(m)
        return found
    if min_params is None:
        min_params = int(os.environ.get("FSDP_MIN_NUM_PARAMS", _DEFAULT_MIN_PARAMS))
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                for element in child:
                    if sum(p.numel() for p in element.parameters()) >= min_params:
                        blocks.append(element)
                    else:
                        visit(element)
            else:
                visit(child)

    visit(module)
    return blocks


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The blocks of ``module``: ``LoopModule.fsdp_blocks()`` if it returns them, else :func:`default_blocks`.
    FSDP shards each as a unit; activation checkpointing recomputes each.

    Example::

        blocks_of(model)   # [model.blocks[0], model.blocks[1], ...]
    """
    declared = getattr(module, "fsdp_blocks", None)
    blocks = declared() if callable(declared) else None
    return list(blocks) if blocks is not None else default_blocks(module)


class Strategy:
    """What the loop, the checkpoint code and the doctor ask of a strategy (see :mod:`framework.strategies`).

    ``can_skip_on_device``: a fused optimizer may skip a bad step on the device (the deferred NaN verdict).

    Example::

        model = strategy.prepare(module)
        with strategy.no_sync(model, sync=False):
            loss.backward()
    """

    name = "single"
    family = "single"  # what the doctor needs to know: "single", "ddp" (whole replicas) or "fsdp" (DTensor pieces)
    can_skip_on_device = True

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # ---- setup

    def prepare(
        self,
        module: nn.Module,
        *,
        manual_sync: bool = False,
        checkpointing: bool = False,
        initial: Initial | None = None,
    ) -> nn.Module:
        """Put ``module`` on the device and wrap it; returns the model to run forwards through.
        ``manual_sync``: alternating phases run several backwards per forward; gradients are then
        averaged by :meth:`reduce_gradients` rather than by a wrapper's hooks. ``checkpointing``: recompute
        each block in backward. ``initial``: the module was built by ``configure_model``; give it seeded
        initial values (the same at every layout)."""
        raise NotImplementedError

    def _on_device(self, module: nn.Module, checkpointing: bool, initial: Initial | None) -> None:
        """Whole-model strategies: the module on this device, its seeded initial values, its blocks checkpointed."""
        from .build import checkpoint_blocks, seeded_init

        module.to(self.rt.device)
        if initial is not None:
            seeded_init(module, initial.seed, initial.init)
        if checkpointing:
            checkpoint_blocks(module, blocks_of(module))

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

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        """What validation and prediction run under: ``torch.inference_mode()`` (the cheapest)."""
        return torch.inference_mode()

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

    def prepare(
        self,
        module: nn.Module,
        *,
        manual_sync: bool = False,
        checkpointing: bool = False,
        initial: Initial | None = None,
    ) -> nn.Module:
        self._on_device(module, checkpointing, initial)
        return module


def _names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name (the first, for a parameter shared under two names)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    return names
