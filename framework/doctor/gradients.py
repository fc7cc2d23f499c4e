"""Check ``gradients``: every trainable parameter receives a gradient (metadata only, checked steps).

Decided over the first two checked steps, so a parameter legitimately idle on one batch (a routed
expert) is not reported; under DDP after the first, because an unused parameter makes DDP's next
forward fail (its "Expected to have finished reduction" error names only parameter indices).

Alternating phases (a GAN): in each phase only the parameters of that phase's optimizer must get a
gradient (the discriminator's loss of ``outputs.detach()`` reaches no generator parameter, rightly).
Under FSDP a parameter counts as reached when any rank's shard got a gradient (agreed through
``reduce``).
"""

from __future__ import annotations

import torch

from .context import Context, FitInfo
from .findings import name_list


class Gradients:
    """``gradients``; :attr:`missing_ids` are the parameters it reported (the ``updates`` check skips them)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.missing_ids: set[int] = set()
        self._seen: dict[str | None, set[int]] = {}
        self._checks: dict[str | None, int] = {}
        self._decided = False

    def on_fit_start(self, fit: FitInfo) -> None:
        self.missing_ids = set()
        self._seen, self._checks, self._decided = {}, {}, False

    def on_checked_backward(self, phase: str | None) -> None:
        if self._decided:
            return
        fit = self.ctx.fit
        self.ctx.record.ran.add("gradients")
        key = phase if fit.phases is not None else None
        seen = self._seen.setdefault(key, set())
        seen.update(id(p) for _, p in fit.params_of(key) if p.grad is not None)
        self._checks[key] = self._checks.get(key, 0) + 1
        need = 1 if fit.world_size > 1 else 2  # under DDP: before its next forward fails
        if all(self._checks.get(k, 0) >= need for k in fit.phase_keys()):
            self._decide()

    def on_fit_end(self) -> None:
        if not self._decided and self._checks:
            self._decide()  # e.g. a 1-step fit

    def _decide(self) -> None:
        self._decided = True
        fit = self.ctx.fit
        keys = [k for k in fit.phase_keys() if k in self._checks]
        unseen = {k: [(n, p) for n, p in fit.params_of(k) if id(p) not in self._seen[k]] for k in keys}
        if fit.sharded and fit.reduce is not None:
            # A shard's gradient is local: a parameter is reached when any rank's shard got one.
            # The last entry counts the processes. (All ranks reach this at the same checked step.)
            flags = [0.0 if id(p) in self._seen[k] else 1.0 for k in keys for _, p in fit.params_of(k)] + [1.0]
            *agreed, world = fit.reduce(torch.tensor(flags, dtype=torch.float64, device=_device(fit))).tolist()
            it = iter(agreed)
            unseen = {k: [(n, p) for n, p in fit.params_of(k) if next(it) >= world] for k in keys}
        for k in keys:
            missing = unseen[k]
            if not missing:
                continue
            self.missing_ids |= {id(p) for _, p in missing}
            names = [n for n, _ in missing]
            name = fit.name
            in_phase = "" if k is None else f" in the {k} phase"
            if k is None:
                why = f"{name}.forward does not use them (or the loss does not depend on them), so they never train"
            else:
                why = (
                    f"the {k} phase's loss, {name}.compute_loss(outputs, targets, {k!r}), does not depend on "
                    f"them, so the {k} optimizer never trains them"
                )
            ddp = (
                "; under DDP, parameters that get no gradient also need Engine(find_unused_parameters=True): "
                "without it DDP stops the run at the next step"
                if fit.strategy == "ddp"
                else ""
            )
            self.ctx.record.warn(
                "gradients",
                f"{len(missing)} trainable parameter(s) of {name} received no gradient{in_phase}: "
                f"{name_list(names)}. {why}. Fix: use them in forward, remove them, or call "
                f"requires_grad_(False) on them if frozen by design{ddp}",
                key=f"gradients:{k}",
            )


def _device(fit: FitInfo) -> torch.device:
    """Where this fit's collectives run: the parameters' device (NCCL needs CUDA tensors)."""
    return next((p.device for _, p in fit.stepped), torch.device("cpu"))
