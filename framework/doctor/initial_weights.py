"""Check ``initial_weights``: every process starts from the same weights.

Called by the engine before it wraps the model for DDP/FSDP. Each rank fingerprints every parameter
and buffer exactly (the int64 sum of its bit patterns, :func:`~framework.doctor.inspect.bits_sum`:
integer sums do not depend on reduction order or thread count, so identical weights can never look
different); one ``reduce`` gives every rank rank 0's fingerprints (the others add zeros, which is
exact), a second counts, per tensor, the ranks that differ. DDP copies rank 0's weights when it
wraps the model, but FSDP shards each rank's own, and any rank-dependent draw before the fit makes
the run depend on the world size, hence the warning and its fix, ``framework.seed_everything``.
One process: trivially the same.
"""

from __future__ import annotations

import torch
from torch import nn

from .context import Context, FitInfo, Reduce
from .findings import name_list
from .inspect import bits_sum, is_dtensor


class InitialWeights:
    """``initial_weights``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_fit_start(self, fit: FitInfo) -> None:
        if fit.reduce is None:
            self.ctx.record.ran.add("initial_weights")  # one process: one set of weights
        elif "initial_weights" not in self.ctx.record.ran:
            self.ctx.record.not_run.setdefault(
                "initial_weights", "the engine did not call Doctor.check_initial_weights before wrapping the model"
            )

    def on_initial_weights(
        self, module: nn.Module, reduce: Reduce | None, is_rank0: bool, device: torch.device
    ) -> None:
        record = self.ctx.record
        if reduce is None:
            record.ran.add("initial_weights")
            return
        tensors = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers())]
        if any(is_dtensor(t) for _, t in tensors):
            record.not_run["initial_weights"] = "called after FSDP sharded the model (each rank holds other shards)"
            return
        if any(t.is_meta for _, t in tensors):
            record.not_run["initial_weights"] = "the model is on the meta device (no weights yet)"
            return
        record.ran.add("initial_weights")
        mine = torch.stack(
            [bits_sum(t).to(device) for _, t in tensors] + [torch.zeros((), dtype=torch.int64, device=device)]
        )
        rank0 = reduce(mine.clone() if is_rank0 else torch.zeros_like(mine))  # rank 0's, exactly (+0 elsewhere)
        differ = (mine != rank0).to(torch.int64)
        differ[-1] = 1  # the last entry counts the processes
        *per_tensor, world = reduce(differ).tolist()  # the one host read
        names = [n for (n, _), d in zip(tensors, per_tensor, strict=True) if d > 0]
        if not names:
            return
        ranks = max(per_tensor)
        name = type(module).__name__
        record.warn(
            "initial_weights",
            f"{ranks} of {world} processes start {name} from weights that differ from rank 0's, in "
            f"{len(names)} parameter(s)/buffer(s): {name_list(names)}. The model was built before every rank was "
            "seeded alike: DDP copies rank 0's weights when it wraps the model, but FSDP shards each rank's own "
            "(a model stitched from different initialisations), and the run depends on the world size. Fix: call "
            "framework.seed_everything(seed), with the same seed on every rank, before building the model (or "
            "load the same weights on every rank)",
        )
