"""Check ``val_data``, at the start of a fit: validation data is not the training data itself."""

from __future__ import annotations

from .context import Context, FitInfo
from .inspect import same_data


class ValData:
    """``val_data``: the same object, the same dataset behind two loaders, the same Subset, or equal tensors."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def on_fit_start(self, fit: FitInfo) -> None:
        record = self.ctx.record
        if fit.val_data is None:
            record.not_run["val_data"] = "no val_data"
            return
        record.ran.add("val_data")
        if same_data(fit.train_data, fit.val_data):
            record.warn(
                "val_data",
                "val_data is the same data as train_data, so validation measures memorisation, not "
                "generalisation. Fix: pass a held-out split, e.g. train, val = torch.utils.data.random_split("
                "dataset, [0.9, 0.1], generator=torch.Generator().manual_seed(0))",
            )
