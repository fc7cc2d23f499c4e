"""How the model is spread over the processes: one class per strategy, the one boundary the loop,
the checkpoint code and the doctor talk to.

- :class:`SingleProcess` (``"single"``): the module itself, on this process's device.
- :class:`DDP` (``"ddp"``): every process holds the whole model; gradients are averaged (torch's
  ``DistributedDataParallel``, or a bucketed all-reduce per phase for alternating optimizers).
- :class:`FSDP` (``"fsdp"``): parameters, gradients and optimizer state are sharded over the
  processes (torch's FSDP2, ``fully_shard``), checkpoints written by ``torch.distributed.checkpoint``.

Each owns: wrapping (and ``no_sync``), the global gradient norm and clipping, the state to save
and load, the model used for evaluation and prediction, bringing the ranks' buffers into one
state (BatchNorm statistics) before validation and checkpoints, and whether the device can skip
a step. ``Engine(strategy="auto")`` picks one (:func:`make_strategy`).

Example::

    strategy = make_strategy(runtime, "auto")
    model = strategy.prepare(module)
    strategy.name   # "single" on one process, "ddp" under launch/cpu_ddp.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ddp import DDP
from .fsdp import FSDP, default_blocks
from .strategy import SingleProcess, Strategy

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["DDP", "FSDP", "SingleProcess", "Strategy", "default_blocks", "make_strategy"]


def make_strategy(rt: Runtime, strategy: str = "auto", find_unused_parameters: bool | None = None) -> Strategy:
    """The strategy for this run: ``"auto"`` is plain for one process, DDP for several, unless the launch
    config asks for FSDP (``distributed_type: FSDP``); ``"ddp"`` and ``"fsdp"`` force one.

    Example::

        make_strategy(make_runtime(), "auto").name   # "single"
    """
    from .runtime import wants_fsdp

    if wants_fsdp(strategy):
        return FSDP(rt)
    if rt.world_size > 1 or strategy == "ddp":
        return DDP(rt, find_unused_parameters)
    return SingleProcess(rt)
