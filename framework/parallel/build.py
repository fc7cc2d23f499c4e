"""Building the model for a layout: ``configure_model`` on the meta device, activation checkpointing, and
initial weights that are bitwise the same at every layout while no rank holds the whole model.

A :class:`~framework.LoopModule` that defines ``configure_model()`` builds its large layers there, not in
``__init__``. The engine calls it once: where the layout shards (FSDP, HSDP, TP) with every *parameter* on
the meta device (buffers stay real: they are small, and some are computed when built, like rotary
frequencies), so nothing is allocated; the strategy then applies the layout and only each rank's shards
are materialised; elsewhere on the real device.

Initial values come from ``LoopModule.init_weights()`` (default: each submodule's ``reset_parameters()``),
run once per *unit* (a submodule that holds parameters directly) on full-shape temporary tensors of that
unit alone, every other parameter standing in on the meta device, with the RNG seeded from
``(seed, unit path)``; each rank then keeps its own piece (``distribute_tensor(..., src_data_rank=None)``:
no communication). So the initial weights depend on the seed and the module's structure only: 1 process,
DDP, FSDP, HSDP, TP and 2-D start from the same bits, and the largest temporary is one unit.

Example:

    >>> from framework.parallel.build import build, materialize
    >>> class LM(framework.LoopModule):
    ...     def configure_model(self):
    ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
    >>> sharded, whole = LM(), LM()
    >>> build(sharded, torch.device("cpu"), on_meta=True)      # where the layout shards: nothing allocated
    >>> build(whole, torch.device("cpu"), on_meta=False)       # one process, DDP
    >>> sharded.blocks[0].weight.device.type
    'meta'
    >>> for module in (sharded, whole):
    ...     materialize(module, torch.device("cpu"), seed=0, init=module.init_weights)
    >>> torch.equal(sharded.blocks[1].weight, whole.blocks[1].weight)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_BUILT: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules whose configure_model has run (once each)


def builds_itself(module: nn.Module) -> bool:
    """Does ``module`` define ``configure_model`` (build its layers when the engine asks)?

    Example:

        >>> class LM(framework.LoopModule):
        ...     def configure_model(self):
        ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        >>> builds_itself(LM()), builds_itself(Classifier())
        (True, False)
    """
    hook = getattr(type(module), "configure_model", None)
    return hook is not None and not getattr(hook, "default_hook", False)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block is created on the meta device; buffers are not."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            self._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def needs_build(module: nn.Module) -> bool:
    """Does ``module`` define ``configure_model``, not run yet (a later fit goes on training what it built)?

    Example:

        >>> class LM(framework.LoopModule):
        ...     def configure_model(self):
        ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        >>> lm = LM()
        >>> needs_build(lm)
        True
        >>> build(lm, torch.device("cpu"), on_meta=False)
        >>> needs_build(lm)
        False
    """
    return builds_itself(module) and module not in _BUILT


def build(module: nn.Module, device: torch.device, on_meta: bool) -> None:
    """Call ``module.configure_model()``: parameters on the meta device (``on_meta``), else on ``device``."""
    _BUILT.add(module)
    configure: Callable[[], Any] = module.configure_model  # type: ignore[assignment]
    if on_meta:
        with parameters_on_meta():
            configure()
    else:
        with device:
            configure()


def unit_seed(seed: int, path: str) -> int:
    """The seed of one unit's initial values: a hash of ``(seed, unit path)``, the same at every layout.

    Example:

        >>> unit_seed(0, "blocks.0.up") == unit_seed(0, "blocks.0.up") != unit_seed(1, "blocks.0.up")
        True
    """
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Every (owner, name, parameter) registration in the tree, tied parameters at each of their places."""
    return [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items() if p is not None]


def _write_local(param: nn.Parameter, full: torch.Tensor) -> None:
    """``param``'s piece of ``full``, written in place (a DTensor keeps only its shard: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            local = param.to_local()
            piece = distribute_tensor(full.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
            local.copy_(piece.to_local())  # (in place: FSDP2's padded storage holds the local tensor as a view)
        else:
            param.copy_(full.to(param.device))


def seeded_init(module: nn.Module, seed: int, init: Callable[[], None]) -> None:
    """Initialise every parameter of ``module`` with ``init()`` (the module's ``init_weights``), one unit at a
    time on full-shape temporaries, seeded per unit (see the module docstring); the global RNG is left alone.

    Example:

        >>> a, b = Classifier(), Classifier()                    # two different random initialisations
        >>> seeded_init(a, seed=0, init=a.init_weights)
        >>> seeded_init(b, seed=0, init=b.init_weights)
        >>> torch.equal(a.net.weight, b.net.weight)
        True
    """
    slots = _slots(module)
    twins = {
        id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad) for *_, p in slots
    }
    done: set[int] = set()
    for path, unit in module.named_modules():
        mine = [p for p in unit._parameters.values() if p is not None and id(p) not in done]
        if not mine:
            continue
        full = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad) for p in mine}
        for owner, name, p in slots:  # this unit's parameters full-shape and real, every other one on meta
            owner._parameters[name] = full.get(id(p), twins[id(p)])
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(unit_seed(seed, path))
                init()
        finally:
            for owner, name, p in slots:
                owner._parameters[name] = p
        for p in mine:
            _write_local(p, full[id(p)].detach())
            done.add(id(p))


def materialize(module: nn.Module, device: torch.device, seed: int, init: Callable[[], None]) -> None:
    """Give the parameters of a module built by ``configure_model`` their memory on ``device`` (only each rank's
    shards, where the layout split them) and their seeded initial values; buffers keep theirs.

    Example:

        >>> with parameters_on_meta():                          # what build() does where the layout shards
        ...     norm = nn.BatchNorm1d(4)
        >>> norm.weight.device.type, norm.running_var.device.type   # buffers stay real
        ('meta', 'cpu')
        >>> materialize(norm, torch.device("cpu"), seed=0, init=norm.reset_parameters)
        >>> norm.weight.device.type, norm.weight.tolist()
        ('cpu', [1.0, 1.0, 1.0, 1.0])
    """
    if any(p.device.type == "meta" for p in module.parameters()):
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        module.to_empty(device=device)  # (every tensor: the buffers are put back below)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    seeded_init(module, seed, init)


def checkpoint_blocks(module: nn.Module, blocks: list[nn.Module]) -> None:
    """Activation checkpointing: each block's activations are recomputed in backward instead of kept (torch's
    composable ``checkpoint``, non-reentrant, RNG state preserved: the result changes no bit; parameter names
    stay as they are). What ``Engine(activation_checkpointing=True)`` applies to :func:`~framework.parallel.blocks_of`.

    Example:

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(4, 8)
        >>> before = torch.autograd.grad(model(x).sum(), model[0].weight)[0]
        >>> checkpoint_blocks(model, [model[0], model[2]])
        >>> torch.equal(torch.autograd.grad(model(x).sum(), model[0].weight)[0], before)
        True
        >>> [name for name, _ in model.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> checkpoint_blocks(nn.Linear(2, 2), [])
        Traceback (most recent call last):
        ...
        ValueError: activation_checkpointing=True found no blocks in Linear to recompute: define fsdp_blocks() ...
    """
    from torch.distributed._composable.checkpoint_activation import checkpoint

    if not blocks:
        raise ValueError(
            f"activation_checkpointing=True found no blocks in {type(module).__name__} to recompute: define "
            "fsdp_blocks() returning them (e.g. list(self.blocks)), or lower the size policy (fsdp_min_num_params)"
        )
    for block in blocks:
        checkpoint(block)
