"""Check ``finite``: the loss and the gradients are finite.

The engine's non-finite guard does the per-step work (one fused check); this check names the culprit
when the guard fires: the loss, and which parameters' gradients. It runs on the bad step only, so its
host reads cost nothing on the healthy path. Under FSDP each rank sees its gradient shards; the
names are agreed through ``reduce`` so every rank reports the same ones.
"""

from __future__ import annotations

import torch

from ..parallel.grads import values_of
from .context import Context, FitInfo
from .findings import name_list
from .inspect import local


class Finite:
    """``finite``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_checked_step_start(self) -> None:
        self.ctx.record.ran.add("finite")  # the engine's non-finite guard runs before this step's optimizer step

    def diagnose(self, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
        """What went non-finite (``": ..."``, or ``""`` when nothing could be named); records the error."""
        fit: FitInfo | None = self.ctx.fit if self.ctx.has_fit else None
        name = self.ctx.module_name()
        names = fit.param_names if fit is not None else {}
        with_grad = [(p, values_of(local(p.grad))) for p in params if p.grad is not None]
        flags = torch.stack(
            [~torch.isfinite(local(loss.detach())).all()] + [~torch.isfinite(g).all() for _, g in with_grad]
        ).double()
        if fit is not None and fit.sharded and fit.reduce is not None:
            flags = fit.reduce(flags)  # every rank reaches this: the guard's verdict is global
        bad_flags = flags.tolist()
        parts = []
        if bad_flags[0]:
            value = float(local(loss.detach()).float())
            shown = (
                f"{value:g}" if value != value or abs(value) == float("inf") else "a non-finite loss on another process"
            )
            parts.append(
                f"{name}.compute_loss returned {shown} (check the inputs and targets of that batch, and "
                "log()/division by zero in the loss)"
            )
        bad = [names.get(id(p), "?") for (p, _), f in zip(with_grad, bad_flags[1:], strict=True) if f]
        if bad:
            parts.append(f"non-finite gradients in {name_list(bad)}")
        detail = (": " + "; ".join(parts)) if parts else ""
        self.ctx.record.error(
            "finite",
            f"non-finite loss or gradient{detail}; fix: lower the learning rate, set clip_grad_norm, or check "
            "that batch's data",
        )
        return detail
