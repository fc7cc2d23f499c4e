"""Sharded layouts: FSDP, HSDP, tensor parallelism and their combinations on one ``DeviceMesh``
(:class:`Sharded`)."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import tp
from .build import checkpoint_blocks, materialize
from .grads import sharded_grad_norm
from .strategy import _NULL, Initial, Strategy, blocks_of

if TYPE_CHECKING:
    from .runtime import Runtime


class _NoGradientSync(contextlib.AbstractContextManager[None]):
    """FSDP2's no_sync: keep this micro-batch's gradients unsharded and unreduced, summed locally."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)


class Sharded(Strategy):
    """Every layout that splits parameters: FSDP (``dp_shard``), HSDP (``dp_replicate`` × ``dp_shard``), tensor
    parallelism (``tp``) and their combinations, with torch's FSDP2 (``fully_shard``) and
    ``parallelize_module`` on one ``DeviceMesh``; CPU processes (gloo) and GPUs (nccl) alike. Accelerate's FSDP
    plugin is not used (it does not shard on CPU).

    - ``prepare``: a module built in ``__init__`` goes to the device with rank 0's weights (broadcast); one built
      by ``configure_model`` is on the meta device. Then, in this order: the TP plan (``LoopModule.tp_plan()``,
      checked first, or ``LoopModule.parallelize(mesh)``) on the ``tp`` dim; activation checkpointing of each
      block; ``fully_shard`` of each block (:func:`default_blocks` or ``LoopModule.fsdp_blocks()``) and the root
      over the data-parallel dims (1-D ``dp_shard``, or 2-D ``(dp_replicate, dp_shard)`` for HSDP and DDP × TP);
      then only each rank's shards are materialised, with seeded initial values
      (:mod:`framework.parallel.build`).
    - ``mixed_precision="bf16"`` under ``fully_shard``: ``MixedPrecisionPolicy`` with bf16 parameters and compute,
      gradients reduced in fp32, outputs cast to fp32; no autocast. fp16 is refused (a sharded GradScaler).
    - Gradients are reduced over the data-parallel dims on each window's last micro-batch; the global norm is
      over every mesh dim (:func:`framework.parallel.grads.sharded_grad_norm`), so clipping and the NaN guard
      agree on every rank.
    - Every data-parallel rank runs as many forwards per window as the busiest (parameters are gathered
      inside forward, a collective); the ranks of a TP group run the same micro-batches.
    - Checkpoints: the shards are DTensors, written by torch.distributed.checkpoint and resharded on load, so
      a checkpoint of one layout resumes on another.

    ``prepare`` (the module itself, now split over the mesh) needs a process group: a launched run's, or the
    world of one that ``Engine(strategy="fsdp")`` creates in a plain process. Without one, the configuration:

    Example:

        >>> from framework.parallel import Sharded
        >>> from framework.parallel.runtime import make_runtime
        >>> strategy = Sharded(make_runtime())                   # strategy="fsdp" on one process: a world of one
        >>> strategy.name, strategy.summary()
        ('fsdp', 'strategy=fsdp (dp_replicate=1 dp_shard=1 tp=1; FSDP2 fully_shard units: the root only)')

    .. code-block:: bash

        accelerate launch --config_file launch/cpu_fsdp.yaml recipes/adder.py         # FSDP, 2 CPU processes
        accelerate launch --config_file launch/cpu_hsdp.yaml recipes/adder.py         # HSDP
        accelerate launch --config_file launch/cpu_2d.yaml recipes/hf_causal_lm.py    # FSDP x TP, 4 CPU processes
    """

    family = "fsdp"  # (parameters are DTensors: each rank holds pieces)
    can_skip_on_device = False  # (the deferred verdict is not implemented over sharded optimizer steps)

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        layout = rt.layout
        self.name = layout.name if layout.shards else "fsdp"  # (strategy="fsdp" on one process: a world of one)
        self.blocks: list[str] = []
        self.fully_sharded = layout.dp_size > 1 or not layout.shards

    def prepare(
        self,
        module: nn.Module,
        *,
        manual_sync: bool = False,
        checkpointing: bool = False,
        initial: Initial | None = None,
    ) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if manual_sync:
            raise ValueError(
                "alternating phases (compute_loss(..., phase)) run several backwards per forward, which a sharded "
                f"layout ({self.name}) does not support yet; use Engine(strategy='ddp') for them"
            )
        layout, device = self.rt.layout, self.rt.device
        if initial is None:
            module.to(device)
            self.rt.broadcast([*module.parameters(), *module.buffers()])  # (every rank shards the same weights)
        mesh = layout.mesh(device.type)
        blocks = blocks_of(module)
        if layout.tp > 1:
            self._tensor_parallel(module, mesh)
        if checkpointing:
            checkpoint_blocks(module, blocks)
        if self.fully_sharded:
            dp_mesh = mesh["dp_shard"] if layout.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
            if self.rt.mixed_precision == "bf16":
                mp = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32
                )
            else:
                mp = MixedPrecisionPolicy()
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "0", "no")
            names = {id(m): n for n, m in module.named_modules()}
            self.blocks = [names.get(id(b), type(b).__name__) for b in blocks]
            for block in blocks:
                fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
            fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        if initial is not None:
            materialize(module, device, initial.seed, initial.init)
        return module

    def _tensor_parallel(self, module: nn.Module, mesh: Any) -> None:
        """The module's TP plan on the ``tp`` dim, checked first; or its own ``parallelize(mesh)``."""
        size = self.rt.layout.tp
        plan = tp.plan_of(module, size)
        if plan:
            tp.apply(module, mesh["tp"], tp.resolve(module, plan, size))
        else:
            module.parallelize(mesh)  # type: ignore[operator]

    def forwards(self, window: Any) -> list[Any]:
        """As many forwards as the busiest rank runs (parameters are gathered inside forward, a collective):
        the missing ones are zero-weight fillers.

        Example:

            >>> from framework.data import Window
            >>> from framework.parallel.runtime import make_runtime
            >>> strategy = Sharded(make_runtime())
            >>> strategy.forwards(Window(0, ["batch 0"], filler="filler", forwards=3))   # the busiest rank runs 3
            ['batch 0', 'filler', 'filler']
            >>> strategy.forwards(Window(0, ["batch 0"], forwards=0))   # a self-sharded stream's window
            Traceback (most recent call last):
            ...
            ValueError: stream_sharded=True cannot run under a sharded layout: ...
        """
        if window.forwards <= 0:
            raise ValueError(
                "stream_sharded=True cannot run under a sharded layout: self-sharded streams cannot tell how many "
                "forwards the other ranks run; drop stream_sharded (every rank then reads the stream and keeps its share)"
            )
        batches = super().forwards(window)
        pad = window.filler if window.filler is not None else batches[0]
        return batches + [pad] * (window.forwards - len(batches))

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return _NULL if sync or not self.fully_sharded else _NoGradientSync(model)

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return sharded_grad_norm(grads)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # = clip_grads_with_norm_, on the local shards
        torch._foreach_mul_([_local(g) for g in grads], coef.to(_local(grads[0]).device) if grads else coef)

    def no_grad(self) -> contextlib.AbstractContextManager[Any]:
        # FSDP2 keeps its all-gather buffers from one forward to the next: made under inference mode (a
        # validation before the first training step, e.g. right after a resume at an epoch end), they could not
        # be written by training afterwards. no_grad tensors can.
        return torch.no_grad()

    def eval_model(self, module: nn.Module, model: nn.Module) -> nn.Module:
        return module

    def sync_buffers(self, module: nn.Module) -> None:
        self.rt.broadcast([b for b in module.buffers() if b.numel() and not _is_dtensor(b)])

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state: dict[str, torch.Tensor] = get_model_state_dict(module)  # type: ignore[assignment]
        return state

    def load_model_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Whole tensors (a checkpoint of a plain or DDP run): every rank keeps its own shard of them.
        full = not any(_is_dtensor(t) for t in state.values())
        values: Any = dict(state)
        set_model_state_dict(module, values, options=StateDictOptions(full_state_dict=full))

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer)

    def load_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        tensors = [v for st in state["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
        # Whole tensors (a plain run's checkpoint) are distributed; no tensor state at all (SGD without momentum)
        # needs nothing distributed.
        full = any(t.ndim for t in tensors) and not any(_is_dtensor(t) for t in tensors if t.ndim)
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=full))

    def summary(self) -> str:
        layout = self.rt.layout
        sizes = f"dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} tp={layout.tp}"
        if not self.fully_sharded:
            return f"strategy={self.name} ({sizes})"
        shown = ", ".join(self.blocks[:4]) + (f", ... ({len(self.blocks)} units)" if len(self.blocks) > 4 else "")
        return f"strategy={self.name} ({sizes}; FSDP2 fully_shard units: {shown or 'the root only'})"


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]
