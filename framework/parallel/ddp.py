"""DDP: every process holds the whole model; gradients are averaged over the processes."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .strategy import _NULL, Initial, Strategy

if TYPE_CHECKING:
    from .runtime import Runtime


class DDP(Strategy):
    """Several processes, each with the whole model (torch's ``DistributedDataParallel``).

    - Gradients are all-reduced (averaged) once per window, on its last micro-batch (``no_sync`` before).
    - ``find_unused_parameters``: DDP expects every parameter in the optimizer to get a gradient in every
      backward; ``True`` lets some go without (at a graph walk per forward). With the default (None), a
      parameter without a gradient stops the run at step 1 with an error naming it and this fix,
      before DDP's own "Expected to have finished reduction" error at step 2 (by then the ranks'
      parameters have already diverged: the stalled bucket was never averaged).
    - Alternating phases (several backwards per forward, some parameters idle in a phase) cannot run
      through DDP's hooks: the module is then not wrapped; its parameters and buffers are broadcast
      from rank 0 once (what DDP's constructor does) and each phase's gradients are averaged by one
      bucketed all-reduce per dtype (:meth:`reduce_gradients`), which also tells parameters that got no
      gradient on any rank (they keep ``grad=None``, as on one process).
    - Buffers (BatchNorm statistics): DDP broadcasts rank 0's at every forward, so rank 0's are the
      state training uses and the checkpoint saves; :meth:`sync_buffers` brings every rank to them
      before validation and checkpoints (an average of running variances would not be the variance
      of the pooled data either).

    ``prepare`` needs the process group of a launched run; what one process can show is the configuration:

    Example:

        >>> from framework.parallel import DDP
        >>> from framework.parallel.runtime import make_runtime
        >>> strategy = DDP(make_runtime(), find_unused_parameters=True)
        >>> strategy.name, strategy.summary()
        ('ddp', 'strategy=ddp find_unused_parameters=True')

    .. code-block:: bash

        accelerate launch --config_file launch/cpu_ddp.yaml recipes/digits.py   # 2 CPU processes (gloo)
    """

    name = "ddp"

    def __init__(self, rt: Runtime, find_unused_parameters: bool | None = None) -> None:
        super().__init__(rt)
        self.find_unused_parameters = find_unused_parameters
        self._manual = False

    family = "ddp"

    def prepare(
        self,
        module: nn.Module,
        *,
        manual_sync: bool = False,
        checkpointing: bool = False,
        initial: Initial | None = None,
    ) -> nn.Module:
        self._on_device(module, checkpointing, initial)
        if manual_sync:
            self._manual = True
            self.rt.broadcast([*module.parameters(), *module.buffers()])
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
        model = DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=bool(self.find_unused_parameters)
        )
        if self.rt.accelerator is not None:  # (its exit hook frees the wrapper's reducer before interpreter teardown)
            getattr(self.rt.accelerator, "_models", []).append(model)
        return model

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if sync or self._manual:
            return _NULL
        no_sync: Any = model.no_sync
        ctx: contextlib.AbstractContextManager[Any] = no_sync()
        return ctx

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        if not self._manual:
            return
        from .grads import flatten_dense, unflatten_dense

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        world = self.rt.world_size
        for group in by_dtype.values():
            if any(p.grad is not None and p.grad.is_sparse for p in group):
                raise NotImplementedError("sparse gradients cannot be averaged across alternating phases yet")
            has = torch.tensor([float(p.grad is not None) for p in group], device=self.rt.device, dtype=group[0].dtype)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([flatten_dense(grads), has])
            torch.distributed.all_reduce(flat)
            n = flat.numel() - len(group)
            counts = flat[n:].tolist()  # (how many ranks had a gradient: read once per phase step)
            flat = flat[:n].div_(world)
            for p, value, count in zip(group, unflatten_dense(flat, grads), counts, strict=True):
                p.grad = value if count > 0 else None

    def check_unused(self, module: nn.Module, params: list[torch.Tensor]) -> None:
        if self._manual or self.find_unused_parameters:
            return
        missing = torch.tensor([float(p.grad is None) for p in params], device=self.rt.device)
        self.rt.all_reduce_sum(missing)  # (once per fit: a parameter idle on any rank stalls DDP)
        if not bool((missing > 0).any()):
            return
        from ..doctor import LoopError

        names = {id(p): n for n, p in module.named_parameters()}
        idle = [names.get(id(p), "?") for p, m in zip(params, missing.tolist(), strict=True) if m > 0]
        shown = ", ".join(idle[:8]) + (f", ... ({len(idle) - 8} more)" if len(idle) > 8 else "")
        raise LoopError(
            f"{len(idle)} parameter(s) of {type(module).__name__} got no gradient in the first step on some "
            f"process: {shown}. DDP averages every parameter in every step: its bucket of them was never "
            "averaged, and DDP itself would stop at the next step with an error naming only parameter indices. Fix: "
            "pass Engine(find_unused_parameters=True) if some steps legitimately skip them, use them in "
            "forward, or requires_grad_(False) them if they are frozen; parameters and optimizer state are "
            "unchanged",
            "gradients",
        )

    def eval_model(self, module: nn.Module, model: nn.Module) -> nn.Module:
        return module  # DDP's wrapper adds nothing to a forward without backward (and would broadcast buffers)

    def sync_buffers(self, module: nn.Module) -> None:
        self.rt.broadcast([b for b in module.buffers() if b.numel()])

    def summary(self) -> str:
        extra = " (alternating phases: gradients averaged per phase)" if self._manual else ""
        unused = " find_unused_parameters=True" if self.find_unused_parameters else ""
        return f"strategy=ddp{unused}{extra}"
