"""Validation: exact global means over a set, at any world size.

The module runs in eval mode under ``torch.inference_mode()``; each rank sums the
item-weighted loss and every metric's values and counts, and one all-reduce at the
end turns them into exact means (no padded duplicates, no mean of per-rank means).
"""

from __future__ import annotations

import torch
from torch import nn

from .data import Source
from .distributed import Runtime, rng_preserved
from .doctor import Doctor
from .module import LoopModule


def evaluate(
    module: LoopModule,
    model: nn.Module,
    source: Source,
    rt: Runtime,
    doctor: Doctor,
    limit_batches: int | None = None,
    compiled: bool = False,
) -> dict[str, float]:
    """``{"loss": ..., <compute_metrics keys>: ...}``, each the exact mean over every item of ``source``.

    ``model`` is the wrapped module (used only where the wrapper matters: FSDP, torch.compile);
    ``limit_batches`` caps the global batches (``limit_val_batches``). The module's mode is restored.

    Example::

        metrics = evaluate(module, module, source, runtime, Doctor("off"))
        metrics["loss"], metrics["acc"]
    """
    eval_model = model if rt.fsdp or compiled else module  # DDP's wrapper adds nothing here
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    count = torch.zeros((), device=rt.device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}
    metric_counts: dict[str, int] = {}
    # Validation draws on no training randomness, so a run with it matches one without.
    with rng_preserved(rt.device), torch.inference_mode():
        for w, window in enumerate(source.windows(epoch=0)):
            if limit_batches is not None and w >= limit_batches:
                break
            weight = 1.0 if window.micro_batches else 0.0  # a filler only tells this rank the metric names
            for batch in window.micro_batches or [window.filler]:
                inputs, targets = module.split_batch(batch)
                with rt.autocast():
                    outputs = eval_model(inputs)
                    loss = module.compute_loss(outputs, targets)
                doctor.check_eval_mode(module)
                n = module.count_items(batch)
                loss_sum += loss.double() * n * weight
                count += n * weight
                for k, v in module.compute_metrics(outputs, targets).items():
                    v = v.detach().reshape(-1).double()
                    metric_sums[k] = metric_sums.get(k, 0) + v.sum() * weight
                    metric_counts[k] = metric_counts.get(k, 0) + int(v.numel() * weight)
    module.train(was_training)
    keys = sorted(metric_sums)
    packed = torch.stack(
        [loss_sum, count]
        + [
            t
            for k in keys
            for t in (
                torch.as_tensor(metric_sums[k], device=rt.device).double(),
                torch.tensor(float(metric_counts[k]), device=rt.device, dtype=torch.float64),
            )
        ]
    )
    values = rt.all_reduce_sum(packed).tolist()
    out = {"loss": values[0] / max(values[1], 1.0)}
    for j, k in enumerate(keys):
        out[k] = values[2 + 2 * j] / max(values[3 + 2 * j], 1.0)
    return out
