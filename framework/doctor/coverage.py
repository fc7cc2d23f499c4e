"""Checks ``trainable`` and ``optimizer_coverage``, at the start of a fit: something trains, and every
trainable parameter is stepped by exactly one optimizer.

A parameter that no optimizer holds gets gradients but never changes. One held by two optimizers is
stepped twice per optimizer step in a joint step (one loss, every optimizer steps: an error), or by
both phases, each with its own optimizer state, in alternating phases (a warning: a backbone shared
on purpose is possible there).
"""

from __future__ import annotations

from .context import Context, FitInfo
from .findings import name_list
from .inspect import is_dtensor


class ParameterCoverage:
    """``trainable`` and ``optimizer_coverage``: a :class:`LoopError` when nothing is trainable, a
    :class:`LoopWarning` naming the parameters no optimizer holds."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_fit_start(self, fit: FitInfo) -> None:
        record, name = self.ctx.record, fit.name
        record.ran.add("trainable")
        if not fit.trainable:
            record.fail(
                "trainable",
                f"{name} has no trainable parameters (none with requires_grad=True); create layers in "
                "__init__ as attributes and don't freeze all of them",
            )
        if fit.sharded and not any(is_dtensor(p) for _, p in fit.trainable):
            # FSDP1 flattens parameters: names and identities no longer match the optimizer's.
            record.not_run["optimizer_coverage"] = (
                "under FSDP the parameters are not DTensors (FSDP1 flattens them); the check needs FSDP2's fully_shard"
            )
            return
        record.ran.add("optimizer_coverage")
        missing = [n for n, p in fit.trainable if id(p) not in fit.holders]
        if missing:
            where = (
                "the optimizer"
                if len(fit.optimizers) == 1
                else f"any of the {len(fit.optimizers)} optimizers"
                + (f" ({', '.join(fit.phases)})" if fit.phases else "")
            )
            record.warn(
                "optimizer_coverage",
                f"{len(missing)} trainable parameter(s) of {name} are in no param group of {where} "
                f"from {name}.configure_optimizers, so they get gradients but never change: {name_list(missing)}. "
                "Fix: build the optimizer from self.parameters() (or add a param group for them), or call "
                "requires_grad_(False) on the ones you mean to freeze",
            )
        shared: dict[tuple[int, ...], list[str]] = {}
        for n, p in fit.trainable:
            held = fit.holders.get(id(p), [])
            if len(held) > 1:
                shared.setdefault(tuple(held), []).append(n)
        for holders, names in shared.items():
            labels = " and ".join(fit.optimizer_label(i) for i in holders)
            if fit.phases is None:
                record.fail(
                    "optimizer_coverage",
                    f"{len(names)} parameter(s) of {name} are in {labels} from {name}.configure_optimizers: "
                    f"{name_list(names)}. Every optimizer steps in each optimizer step, so these are updated "
                    "twice per step, each time with its own optimizer state. Fix: put each parameter in exactly "
                    "one optimizer, e.g. matrices in one and the rest (biases, norms, embeddings) in the other",
                )
            record.warn(
                "optimizer_coverage",
                f"{len(names)} parameter(s) of {name} are in {labels} from {name}.configure_optimizers: "
                f"{name_list(names)}. They are stepped in each of those phases, by optimizers with separate "
                "state (two Adam moment estimates for one parameter). Fix: put each parameter in the optimizer "
                "of the one phase that trains it; if both phases are meant to train them, ignore this",
                key="optimizer_shared",
            )
