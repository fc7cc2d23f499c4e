"""Running a model without training it: validation (exact global means over a set, and stateful metrics)
and prediction (every item's outputs, in data order), at any world size.

The module runs in eval mode under ``torch.inference_mode()``; each rank sums the item-weighted loss
and every ``compute_metrics`` value and count, and one all-reduce at the end turns them into exact
means (no padded duplicates, no mean of per-rank means). Stateful metrics
(``LoopModule.configure_metrics``: torchmetrics, or anything with ``update``/``compute``/``reset``)
are reset first, updated on every real batch (never on a rank's zero-weight filler) and computed
with their own cross-rank sync, so a non-decomposable metric (F1, AUROC) is exact over the set too.

Prediction: each rank runs ``LoopModule.predict_step`` on its share of each global batch, in eval mode
under ``torch.inference_mode()``; the rows are then gathered from every rank and put back in the data's
order (each micro-batch knows its place in the global order), so the result has one row per item,
no zero-weight filler, no duplicate and nothing missing, at any world size. Outputs are tensors,
or dicts/tuples/lists of tensors, concatenated leaf by leaf along dim 0.

Users reach both through :meth:`framework.Engine.validate` and :meth:`framework.Engine.predict`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .data import Source
from .doctor.loss import split_loss
from .events import Event, Events
from .module import LoopModule, forward
from .parallel.runtime import Runtime, rng_preserved


def check_metrics(metrics: Any, owner: str, world_size: int) -> dict[str, Any]:
    """What ``configure_metrics`` returned, checked: a dict of objects with update/compute/reset; under several
    processes each must sync itself across them in ``compute`` (torchmetrics' ``Metric`` does). Returns a
    copy of the dict; an object without ``update``/``compute``/``reset`` is a ``TypeError`` naming it.
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
    events: Events | None = None,
    limit_batches: int | None = None,
    *,
    stateful: dict[str, Any] | None = None,
    forwards: Any = None,
    phases: list[str] | None = None,
    no_grad: Callable[[], contextlib.AbstractContextManager[Any]] = torch.inference_mode,
) -> dict[str, float]:
    """``{"loss": ..., <compute_metrics keys>: ..., <stateful metric names>: ...}``, each exact over ``source``.

    ``model`` is what forwards run through (the strategy's eval model: the module, a compiled one, the
    sharded module); ``limit_batches`` caps the global batches (``limit_val_batches``);
    ``forwards(window)`` gives the batches this rank runs (the strategy's: real ones first, then zero-weight
    fillers). ``no_grad``: the strategy's (inference mode, or no_grad where a sharded model keeps buffers that
    training writes later). ``phases``: alternating phases whose ``compute_loss`` requires a phase: each phase's loss on the
    same outputs, as ``loss/<phase>`` (a ``phase`` with a default gives one ``loss``). The module's mode is
    restored.
    """
    was_training = module.training
    module.eval()
    counts_here = rt.layout.reads_for_its_group(rt.rank)  # (the ranks of a TP group run the same batches)
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
    with rng_preserved(rt.device), no_grad():
        for w, window in enumerate(source.windows(epoch=0)):
            if limit_batches is not None and w >= limit_batches:
                break
            real = window.micro_batches
            batches = forwards(window) if forwards is not None else list(real) or [window.filler]
            for i, batch in enumerate(batches):
                # A filler only tells this rank the metric names; a TP peer's batches are its group's first rank's.
                weight = 1.0 if i < len(real) and counts_here else 0.0
                inputs, targets = module.split_batch(batch)
                with rt.autocast():
                    outputs = forward(module, model, inputs)  # (= model(inputs); a dict batch's error named)
                    if phases:
                        loss_fn: Any = module.compute_loss  # (its `phase` has no default: one loss per phase)
                        losses = [loss_fn(outputs, targets, phase=p) for p in phases]
                    else:
                        losses = [module.compute_loss(outputs, targets)]
                    # ({"loss": ..., **extras}: validation reports the loss; the extras are training's logs)
                    losses = [split_loss(loss, f"{type(module).__name__}.compute_loss")[0] for loss in losses]
                if events is not None:
                    events.emit(Event.EVAL_FORWARD, module)  # (the doctor checks eval mode)
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


# ---------------------------------------------------------------- prediction


def _rows(leaves: list[Any], owner: str) -> int:
    sizes = set()
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            kind = "a 0-dim tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"{owner}.predict_step returned {kind} among its outputs; return tensors with one row per item "
                "(or dicts/tuples of them), e.g. return self(inputs).softmax(-1)"
            )
        sizes.add(leaf.shape[0])
    if len(sizes) > 1:
        raise ValueError(f"{owner}.predict_step returned tensors with different numbers of rows {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def predict(
    module: LoopModule,
    model: nn.Module,
    source: Source,
    rt: Runtime,
    *,
    forwards: Any = None,
    no_grad: Callable[[], contextlib.AbstractContextManager[Any]] = torch.inference_mode,
) -> Any:
    """Run ``module.predict_step`` over ``source`` and return every item's output in data order (e.g. a tensor
    of shape ``[len(data), n_classes]``)."""
    owner = type(module).__name__
    was_training = module.training
    module.eval()
    rows_here = rt.layout.reads_for_its_group(rt.rank)  # (a TP peer runs the same batches: its rows come once)
    keys: list[int] = []  # each real micro-batch's place in the global order
    counts: list[int] = []
    parts: list[list[torch.Tensor]] = []
    spec: Any = None
    with rng_preserved(rt.device), no_grad():
        for window in source.windows(epoch=0):
            real = window.micro_batches
            batches = forwards(window) if forwards is not None else list(real) or [window.filler]
            for i, batch in enumerate(batches):
                out = module.predict_step(batch) if model is module else _through(module, model, batch)
                leaves, this_spec = tree_flatten(out)
                n = _rows(leaves, owner)
                if spec is None:
                    spec = this_spec
                elif this_spec != spec:
                    raise ValueError(f"{owner}.predict_step returned differently structured outputs for two batches")
                if i < len(real) and rows_here:
                    keys.append(window.order[i] if i < len(window.order) else len(keys))
                    counts.append(n)
                    parts.append(leaves)
                elif not parts:
                    parts_template = [leaf[:0] for leaf in leaves]  # (a rank with no real rows still gathers)
                    parts.append(parts_template)
                    counts.append(0)
                    keys.append(-1)
    module.train(was_training)
    if spec is None:
        raise ValueError("predict got no data; pass a non-empty dataset")
    n_leaves = len(parts[0])
    local = [torch.cat([p[j] for p in parts]) for j in range(n_leaves)]
    if rt.world_size == 1:
        return tree_unflatten(local, spec)
    return tree_unflatten(_gather_in_order(local, keys, counts, rt), spec)


def _through(module: LoopModule, model: nn.Module, batch: Any) -> Any:
    """predict_step with forwards routed through ``model`` (a compiled module) when the step is the default."""
    if type(module).predict_step is not LoopModule.predict_step:
        return module.predict_step(batch)
    return model(module.prediction_inputs(batch))


def _gather_in_order(local: list[torch.Tensor], keys: list[int], counts: list[int], rt: Runtime) -> list[torch.Tensor]:
    """Every rank's rows, sorted by their place in the global order (the same result on every rank)."""
    world, device = rt.world_size, rt.device
    meta = torch.tensor([[k, c] for k, c in zip(keys, counts, strict=True)], dtype=torch.int64, device=device)
    n_batches = torch.tensor([len(keys)], dtype=torch.int64, device=device)
    all_n = [torch.zeros_like(n_batches) for _ in range(world)]
    torch.distributed.all_gather(all_n, n_batches)
    most = max(int(t) for t in all_n)
    padded = torch.full((most, 2), -1, dtype=torch.int64, device=device)
    padded[: len(keys)] = meta
    all_meta = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(all_meta, padded)
    rows = [int(all_meta[r][: int(all_n[r]), 1].clamp(min=0).sum()) for r in range(world)]
    most_rows = max(rows)
    gathered: list[list[torch.Tensor]] = []
    for leaf in local:
        send = leaf.to(torch.uint8) if leaf.dtype == torch.bool else leaf  # (gloo has no bool collectives)
        buf = torch.zeros((most_rows, *send.shape[1:]), dtype=send.dtype, device=device)
        buf[: send.shape[0]] = send
        out = [torch.empty_like(buf) for _ in range(world)]
        torch.distributed.all_gather(out, buf.contiguous())
        gathered.append([o.to(leaf.dtype) for o in out])
    pieces: list[tuple[int, int, int, int]] = []  # (key, rank, offset, count)
    for r in range(world):
        offset = 0
        for key, c in all_meta[r][: int(all_n[r])].tolist():
            if key >= 0 and c > 0:
                pieces.append((key, r, offset, c))
            offset += max(c, 0)
    pieces.sort()
    return [torch.cat([g[r][o : o + c] for _, r, o, c in pieces]) for g in gathered]
