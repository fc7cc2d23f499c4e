"""LoopModule: the model-specific half of a training loop.

The user writes what only they know (the forward pass, the loss, the optimizer);
:class:`framework.Engine` owns everything else (the order of the five steps,
gradient reset, modes, scaling, precision, checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .optim import fused_on_gpu


class LoopModule(nn.Module):
    """An ``nn.Module`` that also knows how to compute its loss.

    Required: ``forward(inputs)`` and ``compute_loss(outputs, targets)``.
    Optional hooks (defaults below): ``configure_optimizers``, ``split_batch``,
    ``count_items`` and ``compute_metrics``.

    Example::

        class Classifier(LoopModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Linear(64, 10)

            def forward(self, inputs):
                return self.net(inputs)

            def compute_loss(self, outputs, targets):
                return F.cross_entropy(outputs, targets)

        Engine(max_epochs=3, batch_size=64).fit(Classifier(), train_data)
    """

    def forward(self, inputs: Any) -> Any:  # pragma: no cover - users override
        """Plain ``nn.Module`` forward: ``outputs = module(inputs)``.

        Example::

            def forward(self, inputs):
                return self.net(inputs)
        """
        raise NotImplementedError(
            f"{type(self).__name__}.forward is missing; define forward(self, inputs) returning the outputs"
        )

    def compute_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Return a scalar tensor: the *mean* loss over the items of this batch.

        The engine weighs each micro-batch by ``count_items`` so that the
        gradient of a whole global batch is exact; a sum here would be wrong.

        Example::

            def compute_loss(self, outputs, targets):
                return F.cross_entropy(outputs, targets)
        """
        raise NotImplementedError(
            f"{type(self).__name__}.compute_loss is missing; define compute_loss(self, outputs, targets) "
            "returning a scalar tensor (the mean loss over the batch's items)"
        )

    def configure_optimizers(self) -> Any:
        """Return an optimizer, ``(optimizer, scheduler)``, or a dict.

        The dict form is ``{"optimizer": opt, "scheduler": sched, "interval": "step" | "epoch"}``;
        ``interval`` defaults to ``"step"`` (one scheduler step per applied optimizer step).
        The default is AdamW with lr=1e-3, fused on a GPU: a fused optimizer can skip a
        non-finite step on the device, so the NaN guard needs no host sync per step there
        (``Engine(nan_check="auto")``). For your own optimizer, ``fused=fused_on_gpu(...)``
        (:func:`framework.optim.fused_on_gpu`) does the same.

        Example::

            def configure_optimizers(self):
                opt = torch.optim.SGD(self.parameters(), lr=0.1)
                return {"optimizer": opt,
                        "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
                        "interval": "epoch"}
        """
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused_on_gpu(self.parameters()))

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split one collated batch into ``(inputs, targets)``.

        Default: a dict batch (HuggingFace's convention) gives ``(batch, batch["labels"])``, so
        ``forward`` receives the whole dict (``self.model(**inputs)``); a pair ``(x, y)`` gives
        ``(x, y)``. Anything else (a dict without ``"labels"``, a tuple of three) is an error that
        asks you to define ``split_batch``: guessing would train on the wrong tensor.

        Example::

            def split_batch(self, batch):
                x, mask, y = batch
                return (x, mask), y
        """
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise TypeError(
                    f"{type(self).__name__} got a dict batch with keys {sorted(map(str, batch))} and no 'labels'; "
                    "the default split_batch returns (batch, batch['labels']). Define split_batch(self, batch) "
                    "returning (inputs, targets), e.g. return batch, batch['target']"
                )
            return batch, batch["labels"]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        if isinstance(batch, (tuple, list)):
            raise TypeError(
                f"{type(self).__name__} got a batch of {len(batch)} parts; the default split_batch takes "
                "(inputs, targets) pairs only. Define split_batch(self, batch) returning (inputs, targets), "
                "e.g. x, mask, y = batch; return (x, mask), y"
            )
        raise TypeError(
            f"{type(self).__name__} got a batch of type {type(batch).__name__}; the default split_batch takes "
            "(inputs, targets) pairs or dicts with 'labels'. Define split_batch(self, batch) returning "
            "(inputs, targets)"
        )

    def count_items(self, batch: Any) -> int | torch.Tensor:
        """How many items ``compute_loss`` averages over in ``batch``. Default: ``len(targets)``.

        Token-level losses return the number of counted tokens; a tensor is fine
        (it stays on the device, so counting never forces a host sync).

        Example::

            def count_items(self, batch):
                return (batch[1] != -100).sum()
        """
        return len(self.split_batch(batch)[1])

    def compute_metrics(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """Return ``{name: 1-D tensor}``; each metric is the mean of all elements over the whole set.

        Return one value per item (or per token): the engine sums values and
        counts across batches and processes, so the result is an exact mean
        rather than a mean of batch means. Default: no metrics.

        Example::

            def compute_metrics(self, outputs, targets):
                return {"acc": (outputs.argmax(-1) == targets).float()}
        """
        return {}
