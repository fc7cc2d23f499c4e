"""Check ``batchnorm``: BatchNorm layers normalize over the whole batch, not over a micro-batch.

Run once per fit, at the first checked forward: BatchNorm layers in train mode whose forward sees
fewer items than the global batch (gradient accumulation, or several processes without
SyncBatchNorm) compute statistics per micro-batch, so results depend on how the batch is split.
The fix named fits the device: ``nn.SyncBatchNorm`` only runs on CUDA ("SyncBatchNorm layers only
work with GPU modules" on CPU DDP), so elsewhere the advice is GroupNorm/LayerNorm, or accepting
per-process statistics.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .context import Context, FitInfo
from .findings import name_list


class BatchNorm:
    """``batchnorm``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._done = False

    def on_fit_start(self, fit: FitInfo) -> None:
        self._done = False

    def on_watch_enter(self, module: nn.Module) -> None:
        if self._done:
            return
        self._done = True
        fit = self.ctx.fit
        b = fit.batching
        if b is None:
            return
        self.ctx.record.ran.add("batchnorm")
        accumulation, world = getattr(b, "accumulation", 1), getattr(b, "world_size", 1)
        if accumulation <= 1 and world <= 1:
            return
        # SyncBatchNorm already normalizes over all processes; only accumulation splits it then.
        layers = [
            fit.module_names.get(id(m), type(m).__name__)
            for m in module.modules()
            if isinstance(m, _BatchNorm) and m.training and (accumulation > 1 or not isinstance(m, nn.SyncBatchNorm))
        ]
        if not layers:
            return
        micro = getattr(b, "micro_batch_size", None)
        fixes = []
        if accumulation > 1:
            share = b.batch_size // world
            fixes.append(
                f"set micro_batch_size to batch_size / world_size (= {share}) so each process normalizes over "
                "its whole share"
            )
        if world > 1:
            if fit.device_type == "cuda":
                fixes.append(
                    "convert the layers with nn.SyncBatchNorm.convert_sync_batchnorm(module) to normalize over "
                    "all processes"
                )
            fixes.append("use GroupNorm/LayerNorm, which need no batch statistics")
            if fit.device_type != "cuda":
                fixes[-1] += f" (SyncBatchNorm only works on CUDA, not on {fit.device_type})"
            fixes.append(
                "or accept per-process statistics: the engine brings the ranks' BatchNorm buffers into rank 0's "
                "state before validation and checkpoints, so val/* describes the saved model"
            )
        else:
            fixes.append("or use GroupNorm/LayerNorm, which need no batch statistics")
        self.ctx.record.warn(
            "batchnorm",
            f"{fit.name} has BatchNorm layers ({name_list(layers)}) and each forward sees a micro-batch of "
            f"{micro} items, not the global batch of {b.batch_size} ({accumulation} accumulation step(s) x "
            f"{world} process(es)): their statistics are per micro-batch, so results depend on how the batch "
            f"is split. Fix: {'; '.join(fixes)}",
        )
