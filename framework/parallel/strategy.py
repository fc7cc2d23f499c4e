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

    Example:

        >>> from framework.parallel import Initial, SingleProcess
        >>> from framework.parallel.runtime import make_runtime
        >>> strategy = SingleProcess(make_runtime())
        >>> a, b = Classifier(), Classifier()                    # two different random initialisations
        >>> for module in (a, b):
        ...     _ = strategy.prepare(module, initial=Initial(seed=0, init=module.init_weights))
        >>> torch.equal(a.net.weight, b.net.weight)
        True
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

    Example:

        >>> from framework.parallel import default_blocks
        >>> model = nn.ModuleDict({"embed": nn.Embedding(100, 16),
        ...                        "blocks": nn.ModuleList(nn.Linear(16, 16) for _ in range(3))})
        >>> blocks = default_blocks(model, min_params=200)       # each block: 16 * 16 + 16 = 272 parameters
        >>> [name for name, m in model.named_modules() if any(m is b for b in blocks)]
        ['blocks.0', 'blocks.1', 'blocks.2']
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

    Example:

        >>> from framework.parallel import blocks_of
        >>> class Net(framework.LoopModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        ...     def fsdp_blocks(self):
        ...         return list(self.blocks)
        >>> net = Net()
        >>> blocks_of(net) == list(net.blocks)
        True
        >>> blocks_of(Classifier())       # no fsdp_blocks(), no large ModuleList element: none
        []
    """
    declared = getattr(module, "fsdp_blocks", None)
    blocks = declared() if callable(declared) else None
    return list(blocks) if blocks is not None else default_blocks(module)


class Strategy:
    """What the loop, the checkpoint code and the doctor ask of a strategy (see :mod:`framework.strategies`).

    ``can_skip_on_device``: a fused optimizer may skip a bad step on the device (the deferred NaN verdict).
    Below, :class:`SingleProcess`, the strategy of one process (the others need a launched run).

    Example:

        >>> from framework.parallel import SingleProcess
        >>> from framework.parallel.runtime import make_runtime
        >>> strategy = SingleProcess(make_runtime())
        >>> model = strategy.prepare(Classifier())
        >>> inputs, targets = train_data[:32]
        >>> with strategy.no_sync(model, sync=False):
        ...     F.cross_entropy(model(inputs), targets).backward()
        >>> norm = strategy.grad_norm([p.grad for p in model.parameters()])
        >>> norm.shape, bool(norm > 0)
        (torch.Size([]), True)
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
        initial values (the same at every layout).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> module = Classifier()
            >>> model = strategy.prepare(module)
            >>> model is module                           # one process: no wrapper
            True
        """
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
        """Skip the gradient synchronisation for every micro-batch but the window's last.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> model = strategy.prepare(Classifier())
            >>> inputs, targets = train_data[:32]
            >>> for micro, last in ((slice(0, 16), False), (slice(16, 32), True)):
            ...     with strategy.no_sync(model, sync=last):  # (one process: nothing to synchronise)
            ...         F.cross_entropy(model(inputs[micro]), targets[micro]).backward()
            >>> model.net.weight.grad.shape
            torch.Size([3, 8])
        """
        return _NULL

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over the processes where no wrapper did (manual sync).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> p = nn.Parameter(torch.zeros(2))
            >>> p.grad = torch.tensor([1.0, 2.0])
            >>> strategy.reduce_gradients([p])                # one process: the mean is the gradient itself
            >>> p.grad
            tensor([1., 2.])
        """

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global 2-norm of the gradients (over every shard and process).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> strategy.grad_norm([torch.tensor([3.0]), torch.tensor([4.0])])
            tensor(5.)
        """
        return grad_norm(grads)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so their global norm is at most ``max_norm``, given their norm ``norm``.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> p = nn.Parameter(torch.zeros(2))
            >>> p.grad = torch.tensor([3.0, 4.0])
            >>> strategy.clip_grad_norm([p], max_norm=1.0, norm=strategy.grad_norm([p.grad]))
            >>> p.grad
            tensor([0.6000, 0.8000])
        """
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)

    def forwards(self, window: Any) -> list[Any]:
        """The batches this rank runs for ``window``: its micro-batches, or a zero-weight filler when it has none
        (so it still joins the gradient all-reduce). The first ``len(window.micro_batches)`` are real.

        Example:

            >>> from framework.data import Window
            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> strategy.forwards(Window(0, ["batch 0", "batch 1"])), strategy.forwards(Window(1, [], filler="filler"))
            (['batch 0', 'batch 1'], ['filler'])
        """
        return list(window.micro_batches) or [window.filler]

    def check_unused(self, module: nn.Module, params: list[torch.Tensor]) -> None:
        """After the first window's backward: stop on parameters the wrapper cannot handle (DDP: a parameter
        without a gradient is a :class:`~framework.LoopError` naming it). One process has nothing to check.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> module = Classifier()                         # no backward yet: no parameter has a gradient
            >>> print(strategy.check_unused(module, list(module.parameters())))
            None
        """

    # ---- evaluation

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        """What validation and prediction run under: ``torch.inference_mode()`` (the cheapest).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> with strategy.no_grad():
            ...     outputs = Classifier()(torch.zeros(4, 8))
            >>> outputs.requires_grad, torch.is_inference(outputs)
            (False, True)
        """
        return torch.inference_mode()

    def eval_model(self, module: nn.Module, model: nn.Module) -> nn.Module:
        """The model validation and prediction run through (a compiled model, the sharded module, ...).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> module = Classifier()
            >>> model = strategy.prepare(module)
            >>> strategy.eval_model(module, model) is model
            True
        """
        return model

    def sync_buffers(self, module: nn.Module) -> None:
        """Bring every rank's buffers (BatchNorm statistics) into rank 0's state, before validation and
        checkpoints: then ``val/*`` describes the model that is saved.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> norm = nn.BatchNorm1d(3)
            >>> _ = norm(torch.randn(8, 3))
            >>> before = norm.running_mean.clone()
            >>> strategy.sync_buffers(norm)                    # one process: its buffers are rank 0's
            >>> torch.equal(norm.running_mean, before)
            True
        """

    # ---- state

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's weights to save (full tensors; shards under FSDP).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> sorted(strategy.model_state(Classifier()))
            ['net.bias', 'net.weight']
        """
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load weights that :meth:`model_state` gave (of any strategy: whole tensors, or DCP-loaded shards).

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> a, b = Classifier(), Classifier()
            >>> strategy.load_model_state(b, strategy.model_state(a))
            >>> torch.equal(a.net.weight, b.net.weight)
            True
        """
        module.load_state_dict(state)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict keyed by parameter name (not torch's position index), so that it
        resumes under another strategy: ``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> module = Classifier()
            >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
            >>> module(torch.ones(1, 8)).sum().backward()
            >>> optimizer.step()
            >>> state = strategy.optimizer_state(module, optimizer)
            >>> sorted(state["state"]), state["param_groups"][0]["params"]
            (['net.bias', 'net.weight'], ['net.weight', 'net.bias'])
        """
        names = _names(module)
        sd = optimizer.state_dict()
        order = [p for g in optimizer.param_groups for p in g["params"]]  # (torch's indices follow this order)
        by_index = {i: names.get(id(p), f"<not in the module {i}>") for i, p in enumerate(order)}
        return {
            "state": {by_index[i]: st for i, st in sd["state"].items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in sd["param_groups"]],
        }

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load an optimizer state that :meth:`optimizer_state` gave, matching parameters by name.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> module = Classifier()
            >>> optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
            >>> module(torch.ones(1, 8)).sum().backward()
            >>> optimizer.step()
            >>> fresh = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
            >>> strategy.load_optimizer_state(module, fresh, strategy.optimizer_state(module, optimizer))
            >>> torch.equal(fresh.state[module.net.weight]["momentum_buffer"], module.net.weight.grad)
            True
        """
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
        """One line for the fit summary.

        Example:

            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = SingleProcess(make_runtime())
            >>> strategy.summary()
            'strategy=single'
        """
        return f"strategy={self.name}"


class SingleProcess(Strategy):
    """One process: the module itself, on the runtime's device; no wrapper, no per-step cost.

    Example:

        >>> from framework.parallel import SingleProcess
        >>> from framework.parallel.runtime import make_runtime
        >>> module = Classifier()
        >>> SingleProcess(make_runtime()).prepare(module) is module   # moved to the device, not wrapped
        True
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
