"""How the model is spread over the processes: one class per strategy, the one boundary the loop,
the checkpoint code and the doctor talk to.

- :class:`SingleProcess` (``"single"``): the module itself, on this process's device.
- :class:`DDP` (``"ddp"``): every process holds the whole model; gradients are averaged (torch's
  ``DistributedDataParallel``, or a bucketed all-reduce per phase for alternating optimizers).
- :class:`Sharded` (``"fsdp"``, ``"hsdp"``, ``"tp"``, ``"fsdp+tp"``, ...): every layout that splits parameters,
  on one ``DeviceMesh`` (:mod:`framework.parallel.layout`): FSDP2's ``fully_shard`` over the data-parallel dims,
  tensor parallelism (:mod:`framework.parallel.tp`) on the ``tp`` dim; checkpoints through
  ``torch.distributed.checkpoint``, so they reshard to any layout.

How a model is built for a layout (``configure_model`` on the meta device, seeded initial values,
activation checkpointing) is :mod:`framework.parallel.build`.

Each owns: wrapping (and ``no_sync``), the global gradient norm and clipping, the state to save
and load, the model used for evaluation and prediction, bringing the ranks' buffers into one
state (BatchNorm statistics) before validation and checkpoints, and whether the device can skip
a step. ``Engine(strategy="auto")`` picks one (:func:`make_strategy`).

Example:

    >>> from framework.parallel import make_strategy
    >>> from framework.parallel.runtime import make_runtime
    >>> strategy = make_strategy(make_runtime(), "auto")
    >>> module = Classifier()
    >>> strategy.prepare(module) is module                  # one process: the module itself
    True
    >>> strategy.name, strategy.summary()
    ('single', 'strategy=single')

The same script launched on several processes gets :class:`DDP` (``"ddp"``), or :class:`Sharded` under an
FSDP or 2-D launch config:

.. code-block:: bash

    accelerate launch --config_file launch/cpu_ddp.yaml recipes/digits.py          # "ddp": 2 CPU processes
    accelerate launch --config_file launch/cpu_fsdp.yaml recipes/adder.py          # "fsdp": 2 CPU processes
    accelerate launch --config_file launch/cpu_2d.yaml recipes/hf_causal_lm.py     # "fsdp+tp": 4 CPU processes
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .ddp import DDP
from .layout import Layout
from .runtime import wants_fsdp
from .sharded import Sharded
from .strategy import Initial, SingleProcess, Strategy, blocks_of, default_blocks

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "DDP",
    "Initial",
    "Layout",
    "Sharded",
    "SingleProcess",
    "Strategy",
    "blocks_of",
    "default_blocks",
    "make_strategy",
]


def make_strategy(rt: Runtime, strategy: str = "auto", find_unused_parameters: bool | None = None) -> Strategy:
    """The strategy for the runtime's layout (:class:`Layout`): one that splits parameters (FSDP, HSDP, TP, or
    ``strategy="fsdp"`` / a launch config asking for FSDP) is :class:`Sharded`; whole replicas on several
    processes (or ``strategy="ddp"``) are :class:`DDP`; one process is :class:`SingleProcess`.

    Example:

        >>> from framework.parallel import make_strategy
        >>> from framework.parallel.runtime import make_runtime
        >>> runtime = make_runtime()                          # one plain process
        >>> [type(make_strategy(runtime, s)).__name__ for s in ("auto", "ddp", "fsdp")]
        ['SingleProcess', 'DDP', 'Sharded']
    """
    if wants_fsdp(strategy) or rt.layout.shards:
        return Sharded(rt)
    if rt.layout.dp_replicate > 1 or strategy == "ddp":
        return DDP(rt, find_unused_parameters)
    return SingleProcess(rt)
