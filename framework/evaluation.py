"""Validation: exact global means over a set, and stateful metrics, at any world size.

The module runs in eval mode under ``torch.inference_mode()``; each rank sums the item-weighted loss
and every ``compute_metrics`` value and count, and one all-reduce at the end turns them into exact
means (no padded duplicates, no mean of per-rank means). Stateful metrics
(``LoopModule.configure_metrics``: torchmetrics, or anything with ``update``/``compute``/``reset``)
are reset first, updated on every real batch (never on a rank's zero-weight filler) and computed
with their own cross-rank sync, so a non-decomposable metric (F1, AUROC) is exact over the set too.

Example::

    metrics = evaluate(module, module, source, runtime, Doctor("off"), stateful=module.configure_metrics())
    metrics["loss"], metrics["acc"], metrics["f1"]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import Source
from .distributed import Runtime, rng_preserved
from .module import LoopModule


def check_metrics(metrics: Any, owner: str, world_size: int) -> dict[str, Any]:
    """What ``configure_metrics`` returned, checked: a dict of objects with update/compute/reset; under several
    processes each must sync itself across them in ``compute`` (torchmetrics' ``Metric`` does).

    Example::

        check_metrics({"f1": torchmetrics.F1Score("binary")}, "Net.configure_metrics", world_size=2)
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and k for k in metrics):
        raise TypeError(f"{owner} must return a dict of name -> metric object, got {type(metrics).__name__}")
    for name, m in metrics.items():
        missing = [a for a in ("update", "compute", "reset") if not callable(getattr(m, a, None))]
        if missing:
            raise TypeError(f"{owner}[{name!r}] is a {type(m).__name__} without {missing}; use a torchmetrics Metric")
        if world_size > 1 and not _syncs(m):
            raise TypeError(
                f"{owner}[{name!r}] is a {type(m).__name__}, which does not sync across processes: with "
                f"{world_size} processes each would compute it over its own share of the set. Use a "
                "torchmetrics Metric (it syncs in compute), or set syncs_across_processes = True on an object that does"
            )
    return dict(metrics)


def _syncs(metric: Any) -> bool:
    if getattr(metric, "syncs_across_processes", False):
        return True
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:
        return False
    return isinstance(metric, (Metric, MetricCollection)) and getattr(metric, "sync_on_compute", True)


def _scalars(name: str, value: Any) -> dict[str, float]:
    """A metric's ``compute()`` result as named floats (a dict result, e.g. a MetricCollection, by key)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_scalars(f"{name}/{k}" if name else str(k), v))
        return out
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} computed a tensor of shape {list(value.shape)}; log scalars only (e.g. average='macro')"
            )
        return {name: float(value.reshape(()))}
    return {name: float(value)}


def evaluate(
    module: LoopModule,
    model: nn.Module,
    source: Source,
    rt: Runtime,
    doctor: Any,
    limit_batches: int | None = None,
    *,
    stateful: dict[str, Any] | None = None,
    forwards: Any = None,
    phases: list[str] | None = None,
) -> dict[str, float]:
    """``{"loss": ..., <compute_metrics keys>: ..., <stateful metric names>: ...}``, each exact over ``source``.

    ``model`` is what forwards run through (the strategy's eval model: the module, a compiled one, the
    sharded module); ``limit_batches`` caps the global batches (``limit_val_batches``);
    ``forwards(window)`` gives the batches this rank runs (the strategy's: real ones first, then zero-weight
    fillers). ``phases``: alternating phases whose ``compute_loss`` requires a phase: each phase's loss on the
    same outputs, as ``loss/<phase>`` (a ``phase`` with a default gives one ``loss``). The module's mode is
    restored.

    Example::

        metrics = evaluate(module, module, source, runtime, Doctor("off"))
        metrics["loss"], metrics["acc"]
    """
    was_training = module.training
    module.eval()
    loss_names = [f"loss/{p}" for p in phases] if phases else ["loss"]
    loss_sums = {name: torch.zeros((), device=rt.device, dtype=torch.float64) for name in loss_names}
    count = torch.zeros((), device=rt.device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}
    metric_counts: dict[str, int] = {}
    stateful = stateful or {}
    for m in stateful.values():
        m.reset()
        if hasattr(m, "to"):
            m.to(rt.device)
    # Validation draws on no training randomness, so a run with it matches one without.
    with rng_preserved(rt.device), torch.inference_mode():
        for w, window in enumerate(source.windows(epoch=0)):
            if limit_batches is not None and w >= limit_batches:
                break
            real = window.micro_batches
            batches = forwards(window) if forwards is not None else list(real) or [window.filler]
            for i, batch in enumerate(batches):
                weight = 1.0 if i < len(real) else 0.0  # a filler only tells this rank the metric names
                inputs, targets = module.split_batch(batch)
                with rt.autocast():
                    outputs = model(inputs)
                    if phases:
                        loss_fn: Any = module.compute_loss  # (its `phase` has no default: one loss per phase)
                        losses = [loss_fn(outputs, targets, phase=p) for p in phases]
                    else:
                        losses = [module.compute_loss(outputs, targets)]
                doctor.check_eval_mode(module)
                n = module.count_items(batch)
                for name, loss in zip(loss_names, losses, strict=True):
                    loss_sums[name] += loss.double() * n * weight
                count += n * weight
                for k, v in module.compute_metrics(outputs, targets).items():
                    v = v.detach().reshape(-1).double()
                    metric_sums[k] = metric_sums.get(k, 0) + v.sum() * weight
                    metric_counts[k] = metric_counts.get(k, 0) + int(v.numel() * weight)
                if stateful and weight:
                    module.update_metrics(stateful, outputs, targets)
        computed: dict[str, float] = {}
        for name, m in stateful.items():  # (collective for torchmetrics: every rank computes, in this order)
            computed.update(_scalars(name, m.compute()))
    module.train(was_training)
    keys = sorted(metric_sums)
    packed = torch.stack(
        [*loss_sums.values(), count]
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
    n_loss = len(loss_names)
    total = max(values[n_loss], 1.0)
    out = {name: values[i] / total for i, name in enumerate(loss_names)}
    for j, k in enumerate(keys):
        out[k] = values[n_loss + 1 + 2 * j] / max(values[n_loss + 2 + 2 * j], 1.0)
    clash = sorted(set(out) & set(computed))
    if clash:
        raise ValueError(f"metric name(s) {clash} come from both compute_metrics and configure_metrics; rename one")
    out.update(computed)
    return out
