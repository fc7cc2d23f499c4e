"""Check ``updates``: the first optimizer steps change every trainable parameter.

A copy of the stepped parameters is taken at the start of the first checked step; the verdict comes
on the checked step at which every optimizer has applied two steps (so an lr that warms up from 0 is
not reported), with one host read for all parameters, and names the cause: a param group with lr=0,
no gradient, a zero gradient, or the optimizer itself. In alternating phases each optimizer counts
its own steps. Under FSDP each rank compares its shard, and a parameter is unchanged only if no
rank's shard changed (an empty shard is no evidence either way), agreed through ``reduce``.
"""

from __future__ import annotations

import torch

from ..parallel.grads import values_of
from .context import Context, FitInfo
from .findings import name_list
from .gradients import Gradients
from .inspect import fingerprint, local

# Snapshots for the check are exact copies up to this many elements in total (1 GiB of fp32);
# beyond it, a float64 sum and norm per parameter stand in for the copy.
_SNAPSHOT_ELEMENTS = 1 << 28


class Updates:
    """``updates``; parameters the ``gradients`` check already reported are not reported again."""

    def __init__(self, ctx: Context, gradients: Gradients) -> None:
        self.ctx = ctx
        self.gradients = gradients
        self._applied: list[int] = []  # applied steps per optimizer, in this fit
        self._last: list[int] = []  # the optimizers the last applied step counted (retract undoes it)
        self._every: list[int] = []
        self._snapshot: list[torch.Tensor] | None = None
        self._exact = True  # copies (True) or fingerprints (False)
        self._decided = False

    def on_fit_start(self, fit: FitInfo) -> None:
        self._applied = [0] * len(fit.optimizers)
        self._every = list(range(len(fit.optimizers)))  # a joint step counts for every optimizer
        self._last = []
        self._snapshot, self._exact, self._decided = None, True, False

    def on_checked_step_start(self) -> None:
        if self._snapshot is None and not self._decided and not any(self._applied):
            self._snapshot = self._take()

    def on_optimizer_step(self, applied: bool, phase: str | None) -> None:
        if applied:  # (every step: keep it to a few list operations)
            self._last = self._every if phase is None else self.ctx.fit.optimizer_indices(phase)
            for i in self._last:
                self._applied[i] += 1
        if self.ctx.checking and self._snapshot is not None and min(self._applied) >= 2:
            self._decide()

    def on_retract(self) -> None:
        for i in self._last:
            if self._applied[i] > 0:
                self._applied[i] -= 1
        self._last = []

    def on_fit_end(self) -> None:
        if self._snapshot is not None:
            if min(self._applied) >= 2:
                self._decide()
            else:
                self.ctx.record.not_run["updates"] = "fewer than 2 optimizer steps were applied"
        self._snapshot = None

    def _take(self) -> list[torch.Tensor] | None:
        fit = self.ctx.fit
        if not fit.stepped:
            return None
        params = [local(p) for _, p in fit.stepped]
        self._exact = sum(p.numel() for p in params) <= _SNAPSHOT_ELEMENTS
        if self._exact:
            return [p.detach().clone() for p in params]
        return [fingerprint(p) for p in params]

    def _decide(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        self._decided = True
        if snapshot is None:
            return
        fit, record = self.ctx.fit, self.ctx.record
        record.ran.add("updates")
        params = [local(p) for _, p in fit.stepped]
        grads = [None if p.grad is None else local(p.grad) for _, p in fit.stepped]
        now = [p.detach() if self._exact else fingerprint(p) for p in params]
        device = params[0].device
        true = torch.tensor(True, device=device)
        # Per parameter: changed?, a gradient that is all zero (or none)? One host read for all.
        changed = [torch.ne(s, q).any() for s, q in zip(snapshot, now, strict=True)]
        zero = [true if g is None else values_of(g).count_nonzero() == 0 for g in grads]
        nonempty = torch.tensor([float(p.numel() > 0) for p in params], dtype=torch.float64, device=device)
        flags = torch.cat([(torch.stack(changed + zero).double().reshape(2, -1) * nonempty).reshape(-1), nonempty])
        if fit.sharded and fit.reduce is not None:
            flags = fit.reduce(flags)  # counts over the ranks' non-empty shards
        values = flags.tolist()
        k = len(params)
        changed_n, zero_n, nonempty_n = values[:k], values[k : 2 * k], values[2 * k :]
        unchanged = [
            i
            for i in range(k)
            if changed_n[i] == 0 and nonempty_n[i] > 0 and id(fit.stepped[i][1]) not in self.gradients.missing_ids
        ]
        if not unchanged:
            return
        reasons: dict[str, list[str]] = {}
        for i in unchanged:
            name, p = fit.stepped[i]
            opt_index = fit.holders[id(p)][0]
            groups = fit.optimizers[opt_index].param_groups
            gi = next((j for j, g in enumerate(groups) if any(q is p for q in g["params"])), 0)
            where = (
                f"param group {gi}"
                if len(fit.optimizers) == 1
                else f"param group {gi} of {fit.optimizer_label(opt_index)}"
            )
            lr = groups[gi].get("lr", None)
            if lr is not None and float(lr) == 0.0:
                why = f"{where} has lr=0"
            elif p.grad is None:
                why = "no gradient"
            elif zero_n[i] == nonempty_n[i]:
                why = "zero gradient"
            else:
                why = f"the optimizer left them unchanged ({where})"
            reasons.setdefault(why, []).append(name)
        detail = "; ".join(f"{why}: {name_list(names)}" for why, names in reasons.items())
        name = fit.name
        record.warn(
            "updates",
            f"{len(unchanged)} trainable parameter(s) of {name} did not change in the first {min(self._applied)} "
            f"optimizer steps ({detail}). Fix: give every param group of {name}.configure_optimizers a non-zero "
            "lr, check that the loss depends on these parameters, or call requires_grad_(False) on parameters "
            "you mean to freeze",
        )
