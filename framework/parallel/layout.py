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

Example::

    layout = Layout.resolve(world_size=4, tp_size=2)          # dp_shard 2 x tp 2 (FSDP where the model is sharded)
    layout.dp_size, layout.dp_rank(rank=3), layout.shards     # (2, 1, True)
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

    Example::

        Layout(1, 2, 2).dp_size   # 2
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    _mesh: list[Any] = field(default_factory=list, compare=False, repr=False)  # (built once, on first use)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """How many data-parallel ranks read distinct data (a TP group counts once)."""
        return self.dp_replicate * self.dp_shard

    @property
    def shards(self) -> bool:
        """Does a parameter live in pieces on several ranks (FSDP, HSDP or TP)? Then the model is built on the
        meta device where it can be (``LoopModule.configure_model``) and checkpoints go through DCP."""
        return self.dp_shard > 1 or self.tp > 1

    @property
    def name(self) -> str:
        """``single``, ``ddp``, ``fsdp``, ``hsdp``, ``tp``, or a combination such as ``fsdp+tp``."""
        if self.dp_shard > 1:
            dp = "hsdp" if self.dp_replicate > 1 else "fsdp"
        else:
            dp = "ddp" if self.dp_replicate > 1 else ""
        tp = "tp" if self.tp > 1 else ""
        return "+".join(p for p in (dp, tp) if p) or "single"

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank``: which share of each global batch it reads (TP is innermost)."""
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def reads_for_its_group(self, rank: int) -> bool:
        """Is ``rank`` the one rank of its TP group that counts its group's items in reductions over every
        rank (validation sums, stateful metrics, predictions)? Its TP peers hold the same values."""
        return self.tp_rank(rank) == 0

    def mesh(self, device_type: str) -> Any:
        """The ``DeviceMesh`` of the processes, dims ``("dp_replicate", "dp_shard", "tp")``, with ``"dp"`` (the
        two data-parallel dims flattened) available as ``layout.dp_mesh``. Built once (collective)."""
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

        Example::

            Layout.resolve(4, dp_replicate_size=2, dp_shard_size=2).name   # "hsdp"
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
            rep = dp // shard if shard and dp % shard == 0 else 0
        elif shard is None:
            shard = dp // rep if dp % rep == 0 else 0
        layout = cls(rep or 0, shard or 0, tp)
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
