"""The layout: how the processes split the work, ``dp_replicate × dp_shard × tp = world_size``.

One :class:`Layout` (torchtitan's ``ParallelDims``) answers every question the loop asks about the
processes: the data-parallel rank and size (which ranks read which data; the ranks of one tensor-parallel
group read the same micro-batches), whether the layout shards the model, and the ``DeviceMesh`` with its
named dims ``("dp_replicate", "dp_shard", "tp")``. Nothing else reads ``world_size`` to mean the
data-parallel degree.

- ``dp_replicate``: data-parallel groups that each hold the whole model (or, with ``dp_shard > 1``, one
  whole sharded copy): DDP, or across the nodes of HSDP.
- ``dp_shard``: data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2).
- ``tp``: ranks that split each planned layer (tensor parallelism); the innermost dim, so the ranks of a
  TP group are neighbours (one node).

The names and the rank order are Accelerate's ``ParallelismConfig``; an ``accelerate launch`` config's
``parallelism_config`` section sets the same sizes (``PARALLELISM_CONFIG_*_SIZE`` in the environment).

Example:

    >>> from framework.parallel import Layout
    >>> layout = Layout.resolve(world_size=4, tp_size=2)     # the data-parallel dim shards too (FSDP)
    >>> layout, layout.name
    (Layout(dp_replicate=1, dp_shard=2, tp=2), 'fsdp+tp')
    >>> [layout.dp_rank(rank) for rank in range(4)]          # ranks 0-1 read one share of each batch, 2-3 the other
    [0, 0, 1, 1]
    >>> layout.dp_size, layout.shards
    (2, True)

In a launched run the Engine's sizes (or the launch config's ``parallelism_config``) give the layout:

.. code-block:: bash

    accelerate launch --config_file launch/cpu_2d.yaml recipes/hf_causal_lm.py   # 4 CPU processes: dp_shard 2 x tp 2
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

_DIMS = ("dp_replicate", "dp_shard", "tp")
_ENV = {d: f"PARALLELISM_CONFIG_{d.upper()}_SIZE" for d in (*_DIMS, "cp")}


@dataclass(frozen=True)
class Layout:
    """``dp_replicate × dp_shard × tp`` processes (see the module docstring). Build it with :meth:`resolve`.

    Example:

        >>> from framework.parallel import Layout
        >>> layout = Layout(dp_replicate=2, dp_shard=2, tp=2)
        >>> layout.world_size, layout.dp_size, layout.name
        (8, 4, 'hsdp+tp')
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    _mesh: list[Any] = field(default_factory=list, compare=False, repr=False)  # (built once, on first use)

    @property
    def world_size(self) -> int:
        """The processes of the layout: ``dp_replicate × dp_shard × tp``.

        Example:

            >>> Layout(dp_replicate=1, dp_shard=2, tp=2).world_size
            4
        """
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """How many data-parallel ranks read distinct data (a TP group counts once).

        Example:

            >>> Layout(dp_replicate=1, dp_shard=2, tp=2).dp_size   # 4 processes, 2 distinct shares of each batch
            2
        """
        return self.dp_replicate * self.dp_shard

    @property
    def shards(self) -> bool:
        """Does a parameter live in pieces on several ranks (FSDP, HSDP or TP)? Then the model is built on the
        meta device where it can be (``LoopModule.configure_model``) and checkpoints go through DCP.

        Example:

            >>> Layout(dp_replicate=2).shards, Layout(dp_shard=2).shards, Layout(tp=2).shards
            (False, True, True)
        """
        return self.dp_shard > 1 or self.tp > 1

    @property
    def name(self) -> str:
        """``single``, ``ddp``, ``fsdp``, ``hsdp``, ``tp``, or a combination such as ``fsdp+tp``.

        Example:

            >>> [Layout(*sizes).name for sizes in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2)]]
            ['single', 'ddp', 'fsdp', 'hsdp', 'tp', 'ddp+tp']
        """
        if self.dp_shard > 1:
            dp = "hsdp" if self.dp_replicate > 1 else "fsdp"
        else:
            dp = "ddp" if self.dp_replicate > 1 else ""
        tp = "tp" if self.tp > 1 else ""
        return "+".join(p for p in (dp, tp) if p) or "single"

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank``: which share of each global batch it reads (TP is innermost).

        Example:

            >>> [Layout(dp_shard=2, tp=2).dp_rank(rank) for rank in range(4)]
            [0, 0, 1, 1]
        """
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        """The rank of global ``rank`` within its TP group (neighbouring ranks form a group).

        Example:

            >>> [Layout(dp_shard=2, tp=2).tp_rank(rank) for rank in range(4)]
            [0, 1, 0, 1]
        """
        return rank % self.tp

    def reads_for_its_group(self, rank: int) -> bool:
        """Is ``rank`` the one rank of its TP group that counts its group's items in reductions over every
        rank (validation sums, stateful metrics, predictions)? Its TP peers hold the same values.

        Example:

            >>> [Layout(dp_shard=2, tp=2).reads_for_its_group(rank) for rank in range(4)]
            [True, False, True, False]
        """
        return self.tp_rank(rank) == 0

    def mesh(self, device_type: str) -> Any:
        """The ``DeviceMesh`` of the processes, dims ``("dp_replicate", "dp_shard", "tp")``, with ``"dp"`` (the
        two data-parallel dims flattened) available as ``layout.dp_mesh``. Built once (collective), so only in
        a launched run, whose process group exists: every rank calls it, e.g. ``layout.mesh("cpu")["tp"]`` is
        this rank's TP group."""
        if not self._mesh:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=_DIMS)
            self._mesh.append(mesh)
            self._mesh.append(mesh["dp_replicate", "dp_shard"]._flatten("dp"))  # (keep it: slicing anew warns)
        return self._mesh[0]

    @property
    def dp_mesh(self) -> Any:
        """The flattened data-parallel mesh (after :meth:`mesh`): its group reduces what the dp ranks share."""
        return self._mesh[1]

    @classmethod
    def resolve(
        cls,
        world_size: int,
        *,
        dp_replicate_size: int | None = None,
        dp_shard_size: int | None = None,
        tp_size: int | None = None,
        strategy: str = "auto",
        launch_fsdp: bool = False,
    ) -> Layout:
        """The layout of ``world_size`` processes from the Engine's sizes, else the launch config's
        ``parallelism_config`` (``PARALLELISM_CONFIG_*_SIZE``), else the strategy: ``"ddp"`` is
        ``dp_replicate = world``, ``"fsdp"`` (or a launch config asking for FSDP) ``dp_shard = world``, ``"auto"``
        DDP for several processes. A size left out takes what the others leave (``tp`` defaults to 1). A
        layout that cannot work is a ValueError naming the fix.

        Example:

            >>> Layout.resolve(4, dp_replicate_size=2, dp_shard_size=2).name
            'hsdp'
            >>> Layout.resolve(4), Layout.resolve(4, strategy="fsdp")           # "auto": DDP
            (Layout(dp_replicate=4, dp_shard=1, tp=1), Layout(dp_replicate=1, dp_shard=4, tp=1))
            >>> Layout.resolve(4, tp_size=3)
            Traceback (most recent call last):
            ...
            ValueError: tp_size=3 does not divide the world size 4 (processes launched); launch a multiple of 3 ...
            >>> Layout.resolve(1, dp_replicate_size=1, dp_shard_size=2)        # one plain process
            Traceback (most recent call last):
            ...
            ValueError: the layout dp_replicate_size=1 x dp_shard_size=2 x tp_size=1 = 2 is not the world size 1
            (processes launched); choose sizes whose product is 1, e.g. dp_shard_size=1, tp_size=1, or launch 2
            processes
            >>> Layout.resolve(2, dp_shard_size=2, strategy="ddp")
            Traceback (most recent call last):
            ...
            ValueError: strategy="ddp" replicates the model, but dp_replicate_size=1 x dp_shard_size=2 x tp_size=1
            shards it; drop strategy or dp_shard_size
        """
        given = {"dp_replicate": dp_replicate_size, "dp_shard": dp_shard_size, "tp": tp_size}
        env = _from_environment()
        for dim, value in env.items():
            if given[dim] is not None and given[dim] != value:
                raise ValueError(
                    f"{dim}_size={given[dim]} but the launch config's parallelism_config says "
                    f"{dim.replace('_', '')} {value}; pass one of them (or the same size)"
                )
            given[dim] = value
        tp = given["tp"] or 1
        rep, shard = given["dp_replicate"], given["dp_shard"]
        if world_size % tp:
            raise ValueError(
                f"tp_size={tp} does not divide the world size {world_size} (processes launched); launch a multiple of "
                f"{tp} processes (e.g. accelerate launch --config_file launch/cpu_2d.yaml) or use a divisor of {world_size}"
            )
        dp = world_size // tp
        if rep is None and shard is None:
            if strategy == "ddp" and tp == 1:
                rep, shard = dp, 1
            elif strategy == "fsdp" or launch_fsdp or (tp > 1 and strategy != "ddp"):
                rep, shard = 1, dp  # (with TP the data-parallel dim shards too, unless DDP is asked for)
            else:
                rep, shard = dp, 1
        elif rep is None:
            rep = dp // shard if shard and dp % shard == 0 else 1  # (1: the error then names the processes to launch)
        elif shard is None:
            shard = dp // rep if rep and dp % rep == 0 else 1
        assert rep is not None and shard is not None  # (each branch above set the sizes left out)
        layout = cls(rep, shard, tp)
        layout._check(world_size, strategy)
        return layout

    def _check(self, world_size: int, strategy: str) -> None:
        sizes = f"dp_replicate_size={self.dp_replicate} x dp_shard_size={self.dp_shard} x tp_size={self.tp}"
        if min(self.dp_replicate, self.dp_shard, self.tp) < 1 or self.world_size != world_size:
            raise ValueError(
                f"the layout {sizes} = {self.world_size} is not the world size {world_size} (processes launched); "
                f"choose sizes whose product is {world_size}, e.g. dp_shard_size={world_size // self.tp}, "
                f"tp_size={self.tp}, or launch {self.world_size} processes"
            )
        if strategy == "ddp" and self.dp_shard > 1:
            raise ValueError(
                f'strategy="ddp" replicates the model, but {sizes} shards it; drop strategy or dp_shard_size'
            )
        if strategy == "fsdp" and self.dp_replicate > 1 and self.dp_shard == 1:
            raise ValueError(f'strategy="fsdp" shards the model, but {sizes} only replicates it; set dp_shard_size')


def _from_environment() -> dict[str, int]:
    """The sizes an ``accelerate launch`` config's ``parallelism_config`` section set (only those > 0)."""
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").strip().lower() not in ("1", "true", "yes", "on"):
        return {}
    out: dict[str, int] = {}
    for dim, var in _ENV.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{var}={raw!r} in the launch config; use a positive int")
        if dim == "cp":
            if int(raw) > 1:
                raise ValueError(
                    f"parallelism_config_cp_size={raw}: context parallelism is not supported; set it to 1 and use "
                    "dp_shard/tp"
                )
            continue
        out[dim] = int(raw)
    return out
