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

LOGGED = "_framework_logged"  # where self.log keeps this micro-batch's values (in the instance's __dict__)
# train/<name> keys the engine writes itself: a self.log name must not shadow them.
RESERVED = ("loss", "grad_norm", "items_per_sec", "data_wait", "skipped_steps", "step_time", "tflops", "mfu",
            "memory_mb")  # fmt: skip


def _default_hook(method: Any) -> Any:
    """Marks a LoopModule hook's default, so the engine can tell whether a module overrides it."""
    method.default_hook = True
    return method


class LoopModule(nn.Module):
    """An ``nn.Module`` that also knows how to compute its loss.

    Required: ``forward(inputs)`` and ``compute_loss(outputs, targets)`` (or
    ``compute_loss(outputs, targets, phase)`` for alternating optimizers, e.g. a GAN).
    Optional hooks (defaults below): ``configure_optimizers``, ``split_batch``,
    ``count_items``, ``compute_metrics``, ``configure_metrics``, ``update_metrics``,
    ``predict_step``, ``fsdp_blocks``, and for models larger than one process ``configure_model``,
    ``init_weights``, ``tp_plan`` and ``parallelize``. Inside ``forward``/``compute_loss``, :meth:`log`
    records extra training scalars (``train/<name>``).

    Example:

        >>> from framework import Engine, LoopModule
        >>> class Classifier(LoopModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(8, 3)
        ...
        ...     def forward(self, inputs):
        ...         return self.net(inputs)
        ...
        ...     def compute_loss(self, outputs, targets):
        ...         return F.cross_entropy(outputs, targets)
        >>> engine = Engine(max_epochs=1, batch_size=32, progress=False).fit(Classifier(), train_data)
        >>> engine.step, engine.stop_reason.cause
        (3, 'max_epochs')
    """

    def forward(self, inputs: Any) -> Any:  # pragma: no cover - users override
        """Plain ``nn.Module`` forward: ``outputs = module(inputs)``.

        Example:

            >>> class Classifier(LoopModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.net = nn.Linear(8, 3)
            ...
            ...     def forward(self, inputs):
            ...         return self.net(inputs)
            >>> Classifier()(torch.zeros(4, 8)).shape
            torch.Size([4, 3])
        """
        raise NotImplementedError(
            f"{type(self).__name__}.forward is missing; define forward(self, inputs) returning the outputs"
        )

    def compute_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Return a scalar tensor: the *mean* loss over the items of this batch.

        The engine weighs each micro-batch by ``count_items`` so that the
        gradient of a whole global batch is exact; a sum here would be wrong.
        It may also return ``{"loss": scalar, **extras}``: the extras are logged
        as ``self.log(name, value)`` would (``train/<name>``), only ``"loss"`` is
        backpropagated (validation reports ``"loss"`` alone).

        Example:

            >>> class Penalised(Classifier):  # Classifier's own: F.cross_entropy(outputs, targets)
            ...     def compute_loss(self, outputs, targets):  # with an extra training scalar
            ...         ce = F.cross_entropy(outputs, targets)
            ...         return {"loss": ce + 0.01 * outputs.pow(2).mean(), "ce": ce}
            >>> engine = framework.Engine(max_steps=2, batch_size=32, log_every_n_steps=1, progress=False)
            >>> metrics = engine.fit(Penalised(), train_data).metrics
            >>> round(metrics["train/ce"], 3), round(metrics["train/loss"], 3)
            (1.122, 1.126)
        """
        raise NotImplementedError(
            f"{type(self).__name__}.compute_loss is missing; define compute_loss(self, outputs, targets) "
            "returning a scalar tensor (the mean loss over the batch's items)"
        )

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Log a training scalar from ``forward`` or ``compute_loss``: ``train/<name>`` in the train records.

        Weighted and averaged as ``train/loss`` is: each micro-batch's value by its items (``count_items``),
        summed over the micro-batches and the processes of a step, then averaged over the steps since the
        last record (so on 2 processes it is the mean over every item of the global batches, not rank 0's).
        Values stay on the device and are read on log steps only: logging adds no host sync. Log the same
        names on every micro-batch (in alternating phases: in the same phase each time); a step that
        logs another set is a :class:`~framework.doctor.LoopError`. In eval mode (validation, prediction)
        it does nothing.

        Example:

            >>> class LogsAccuracy(Classifier):
            ...     def compute_loss(self, outputs, targets):
            ...         self.log("acc", (outputs.argmax(-1) == targets).float().mean())
            ...         return F.cross_entropy(outputs, targets)
            >>> engine = framework.Engine(max_steps=3, batch_size=32, log_every_n_steps=3, progress=False)
            >>> round(engine.fit(LogsAccuracy(), train_data).metrics["train/acc"], 4)  # over the 96 items
            0.3021
            >>> LogsAccuracy().log("loss", 1.0)
            Traceback (most recent call last):
            ...
            ValueError: self.log(name='loss', ...): use a non-empty str that is not one of the engine's own ...
        """
        if not isinstance(name, str) or not name or name in RESERVED or name.split("/")[0] in ("loss", "grad_norm"):
            raise ValueError(
                f"self.log(name={name!r}, ...): use a non-empty str that is not one of the engine's own train/ keys "
                f"{list(RESERVED)}, e.g. self.log('acc', acc)"
            )
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(
                    f"self.log({name!r}, value) takes a scalar; got a tensor of shape {list(value.shape)}: log "
                    f"its mean, e.g. self.log({name!r}, value.mean())"
                )
            value = value.detach().reshape(())
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"self.log({name!r}, value) takes a number or a one-element tensor, got "
                            f"{type(value).__name__}")  # fmt: skip
        if not self.training:
            return  # (validation, prediction, the doctor's probe: nothing is logged)
        logged = self.__dict__.get(LOGGED)
        if logged is None:
            logged = self.__dict__[LOGGED] = {}
        logged[name] = value

    def configure_optimizers(self) -> Any:
        """Return an optimizer, ``(optimizer, scheduler)``, a dict, or a dict of named optimizers.

        The dict form is ``{"optimizer": opt, "scheduler": sched, "interval": "step" | "epoch"}``;
        ``interval`` defaults to ``"step"`` (one scheduler step per applied optimizer step).
        Several optimizers: ``{"muon": Muon(matrices), "adamw": AdamW(rest)}`` (each value any of the
        single forms) step jointly after one backward; with ``compute_loss(outputs, targets, phase)``
        they are alternating phases in the dict's order, e.g. ``{"discriminator": opt_d, "generator":
        opt_g}`` (see :mod:`framework.optim`).
        The default is AdamW with lr=1e-3, fused on a GPU: a fused optimizer can skip a
        non-finite step on the device, so the NaN guard needs no host sync per step there
        (``Engine(nan_check="auto")``). For your own optimizer, ``fused=fused_on_gpu(...)``
        (:func:`framework.optim.fused_on_gpu`) does the same.

        Example:

            >>> type(Classifier().configure_optimizers()).__name__  # the default
            'AdamW'
            >>> class HalvedEachEpoch(Classifier):
            ...     def configure_optimizers(self):
            ...         opt = torch.optim.SGD(self.parameters(), lr=0.1)
            ...         sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            ...         return {"optimizer": opt, "scheduler": sched, "interval": "epoch"}
            >>> engine = framework.Engine(max_epochs=2, batch_size=32, progress=False)
            >>> engine.fit(HalvedEachEpoch(), train_data).metrics["lr"]  # 0.1, halved at each epoch's end
            0.025
        """
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused_on_gpu(self.parameters()))

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """Split one collated batch into ``(inputs, targets)``.

        Default: a dict batch (HuggingFace's convention) gives ``(batch, batch["labels"])``, so
        ``forward`` receives the whole dict (``self.model(**inputs)``); a pair ``(x, y)`` gives
        ``(x, y)``. Anything else (a dict without ``"labels"``, a tuple of three) is an error that
        asks you to define ``split_batch``: guessing would train on the wrong tensor.

        Example:

            >>> x, y = torch.zeros(4, 8), torch.tensor([0, 1, 2, 0])
            >>> Classifier().split_batch((x, y))[1]
            tensor([0, 1, 2, 0])
            >>> inputs, targets = Classifier().split_batch({"x": x, "labels": y})  # forward gets the whole dict
            >>> sorted(inputs), targets.shape
            (['labels', 'x'], torch.Size([4]))
            >>> Classifier().split_batch((x, torch.ones(4, 8), y))
            Traceback (most recent call last):
            ...
            TypeError: Classifier got a batch of 3 parts; the default split_batch takes (inputs, targets) pairs ...

            A batch of three parts needs its own::

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

        Example:

            >>> x, y = torch.zeros(4, 8), torch.tensor([0, -100, 2, -100])  # -100: padding, not counted
            >>> Classifier().count_items((x, y))  # the default: len(targets)
            4
            >>> class IgnoresPadding(Classifier):
            ...     def count_items(self, batch):
            ...         return (batch[1] != -100).sum()
            >>> IgnoresPadding().count_items((x, y))
            tensor(2)
        """
        return len(self.split_batch(batch)[1])

    def compute_metrics(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        """Return ``{name: 1-D tensor}``; each metric is the mean of all elements over the whole set.

        Return one value per item (or per token): the engine sums values and
        counts across batches and processes, so the result is an exact mean
        rather than a mean of batch means. Default: no metrics.

        "One value per item" means one per whatever the metric averages over, which need not be
        what ``count_items`` counts: ``count_items`` weighs the *loss*; each metric is weighted by
        the number of values it returns. So when ``count_items`` counts tokens (a token-level
        loss), a per-token metric returns one value per counted token, and ``val/token_acc`` is the
        mean over every counted token of the set (a long sequence weighs more than a short one);
        a per-sequence metric returns one value per sequence, and each sequence weighs the same.

        Example:

            >>> class PerItem(Classifier):
            ...     def compute_metrics(self, outputs, targets):
            ...         return {"acc": (outputs.argmax(-1) == targets).float()}  # one value per item
            >>> model = PerItem()
            >>> acc = framework.Engine(batch_size=20).validate(model, val_data)["acc"]  # batches of 20 and 12
            >>> x, y = val_data.tensors
            >>> acc == (model(x).argmax(-1) == y).float().mean().item()  # the mean over all 32 items
            True

            A token-level one (``labels`` of shape [batch, seq], -100 = padding)::

                def compute_metrics(self, logits, labels):
                    counted = labels != -100                  # the tokens count_items counts
                    right = logits.argmax(-1) == labels
                    return {
                        "token_acc": right[counted].float(),                # one per token
                        "exact_match": (right | ~counted).all(-1).float(),  # one per sequence
                    }
        """
        return {}

    def configure_metrics(self) -> dict[str, Any]:
        """Return ``{name: metric}``: stateful metrics for validation (torchmetrics ``Metric`` s, or objects
        with ``update``/``compute``/``reset``). Default: none.

        The engine resets them before each validation, updates them on every real batch (never a
        rank's filler or a duplicate) through :meth:`update_metrics`, and computes them with their own
        cross-rank sync: ``val/<name>`` is exact over the set at any world size (F1, AUROC, ...).

        Example:

            >>> class Seen:  # a torchmetrics Metric in practice, e.g. BinaryF1Score()
            ...     def reset(self): self.n = 0
            ...     def update(self, outputs, targets): self.n += len(targets)
            ...     def compute(self): return self.n
            >>> class Counted(Classifier):
            ...     def configure_metrics(self):
            ...         return {"seen": Seen()}
            >>> framework.Engine(batch_size=20).validate(Counted(), val_data)["seen"]  # every item once
            32.0
        """
        return {}

    def update_metrics(self, metrics: dict[str, Any], outputs: Any, targets: Any) -> None:
        """Feed one validation batch to the metrics of :meth:`configure_metrics`. Default: ``m.update(outputs, targets)``.

        Example:

            >>> class Mean:  # a torchmetrics.MeanMetric in practice
            ...     def reset(self): self.total, self.n = 0.0, 0
            ...     def update(self, values): self.total, self.n = self.total + values.sum(), self.n + len(values)
            ...     def compute(self): return float(self.total / self.n)
            >>> class Confidence(Classifier):
            ...     def configure_metrics(self):
            ...         return {"confidence": Mean()}
            ...
            ...     def update_metrics(self, metrics, outputs, targets):
            ...         metrics["confidence"].update(outputs.softmax(-1).max(-1).values)
            >>> round(framework.Engine(batch_size=32).validate(Confidence(), val_data)["confidence"], 3)
            0.493
        """
        for metric in metrics.values():
            metric.update(outputs, targets)

    def predict_step(self, batch: Any) -> Any:
        """The output kept for each item by ``Engine.predict``: tensors with one row per item (or dicts/tuples
        of them). Default: the forward of the batch's inputs (:meth:`prediction_inputs`); batches without
        targets are fine.

        Example:

            >>> class Probabilities(Classifier):
            ...     def predict_step(self, batch):
            ...         return self(batch[0]).softmax(-1)
            >>> probs = framework.Engine(batch_size=32).predict(Probabilities(), val_data)
            >>> probs.shape, torch.allclose(probs.sum(-1), torch.ones(32))
            (torch.Size([32, 3]), True)
        """
        return self(self.prediction_inputs(batch))

    def prediction_inputs(self, batch: Any) -> Any:
        """The inputs of a prediction batch: :meth:`split_batch`'s if you overrode it; else a dict batch without
        ``labels``, the first part of a tuple/list, or the batch itself.

        Example:

            >>> x, y = torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)
            >>> Classifier().prediction_inputs((x, y)) is x
            True
            >>> sorted(Classifier().prediction_inputs({"x": x, "labels": y}))
            ['x']
        """
        if type(self).split_batch is not LoopModule.split_batch:
            return self.split_batch(batch)[0]
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k != "labels"}
        if isinstance(batch, (tuple, list)):
            return batch[0]
        return batch

    def fsdp_blocks(self) -> list[nn.Module] | None:
        """The submodules that FSDP shards as units of their own (gathered only while they run), or None for
        the default policy (:func:`framework.strategies.default_blocks`: large elements of ModuleLists and
        Sequentials, e.g. a transformer's blocks). Used only with ``strategy="fsdp"``.

        Example:

            >>> Classifier().fsdp_blocks() is None  # the default policy
            True
            >>> class Deep(Classifier):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            ...
            ...     def fsdp_blocks(self):
            ...         return list(self.blocks)
            >>> len(Deep().fsdp_blocks())
            4
        """
        return None

    # ---- models larger than one process (docs/DESIGN.md, "beyond data parallel")

    @_default_hook
    def configure_model(self) -> None:
        """Build the large layers here instead of in ``__init__``: the engine calls it once, with every parameter
        on the meta device where the layout shards (FSDP, HSDP, TP: nothing is allocated; only each rank's
        shards are materialised after the layout applies), elsewhere on the real device. Their initial values
        then come from :meth:`init_weights`, seeded so they are bitwise the same at every layout.

        Example:

            >>> class Built(LoopModule):
            ...     def configure_model(self):  # e.g. nn.ModuleList(Block(4096) for _ in range(32))
            ...         self.net = nn.Linear(8, 3)
            ...
            ...     def forward(self, inputs):
            ...         return self.net(inputs)
            ...
            ...     def compute_loss(self, outputs, targets):
            ...         return F.cross_entropy(outputs, targets)
            >>> model = Built()
            >>> hasattr(model, "net")
            False
            >>> framework.Engine(max_steps=1, batch_size=32, progress=False).fit(model, train_data).step
            1
            >>> model.net
            Linear(in_features=8, out_features=3, bias=True)
        """

    def init_weights(self) -> None:
        """Initialise the parameters (called by the engine after :meth:`configure_model`): default, each
        submodule's ``reset_parameters()``. The engine runs it once per submodule that holds parameters, on
        full-shape temporaries of that submodule (the others stand in on the meta device, where ops draw no
        randomness), with the RNG seeded from ``(Engine seed, submodule path)``: so write it as if the whole
        model were here, and initialise each parameter from its own shape only.

        Example:

            >>> class SmallInit(LoopModule):
            ...     def configure_model(self):
            ...         self.net = nn.Linear(8, 3)
            ...
            ...     def init_weights(self):
            ...         for m in self.modules():
            ...             if isinstance(m, nn.Linear):
            ...                 nn.init.normal_(m.weight, std=0.02)
            ...                 nn.init.zeros_(m.bias)
            ...
            ...     def forward(self, inputs):
            ...         return self.net(inputs)
            ...
            ...     def compute_loss(self, outputs, targets):
            ...         return F.cross_entropy(outputs, targets)
            >>> model = SmallInit()
            >>> engine = framework.Engine(max_steps=1, batch_size=32, progress=False).fit(model, train_data)
            >>> round(model.net.bias.abs().max().item(), 4)  # zeros, then one AdamW step of lr=1e-3
            0.001
        """
        for m in self.modules():
            reset = getattr(m, "reset_parameters", None)
            if m is not self and callable(reset):
                reset()

    def tp_plan(self) -> dict[str, Any] | None:
        """The tensor-parallel plan, ``{module-path pattern: style}`` (``*`` = one path component), used when
        ``tp_size > 1``; styles ``"colwise"`` (split the output features), ``"rowwise"`` (the input features) or
        a torch ``ParallelStyle`` (:mod:`framework.parallel.tp`). Default: None (no tensor parallelism).

        Example:

            >>> Classifier().tp_plan() is None  # the default
            True
            >>> class Split(Classifier):
            ...     def tp_plan(self):
            ...         return {"net": "colwise"}  # e.g. {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
            >>> framework.Engine(max_steps=1, batch_size=32).fit(Split(), train_data)  # one plain process
            Traceback (most recent call last):
            ...
            ValueError: Split.tp_plan() returns a tensor-parallel plan, but the layout has tp_size=1, ...

            With ``Engine(tp_size=2)``, launched on as many processes as the layout's product (e.g.
            ``accelerate launch --config_file launch/cpu_2d.yaml script.py``), ``net``'s output features are
            split over the 2 ranks of a TP group.
        """
        return None

    @_default_hook
    def parallelize(self, mesh: Any) -> None:
        """The escape hatch: apply your own tensor parallelism on ``mesh`` (a ``DeviceMesh`` with dims
        ``"dp_replicate"``, ``"dp_shard"`` and ``"tp"``; ``mesh["tp"]`` is this rank's TP group) instead of
        :meth:`tp_plan`. The engine still applies activation checkpointing and FSDP over the data-parallel dims
        afterwards.

        Example:

            >>> Classifier().parallelize(mesh=None) is None  # the default does nothing (tp_plan applies, if any)
            True

            An override, used under a launch with ``tp_size > 1``:

            .. code-block:: python

                def parallelize(self, mesh):
                    plan = {"*.up": ColwiseParallel(), "*.down": RowwiseParallel()}
                    parallelize_module(self.blocks, mesh["tp"], plan)
        """


def forward(module: LoopModule, model: Any, inputs: Any) -> Any:
    """``model(inputs)``; a ``TypeError`` from a forward that was handed a whole dict batch by the default
    :meth:`LoopModule.split_batch` (a dict with ``labels`` goes to ``forward`` as is, the HuggingFace
    convention) is raised again naming ``split_batch`` and the fix: torch's own message (an embedding's
    "argument 'input' must be Tensor, not dict") does not say where the dict came from. The loop calls it in
    place of ``model(inputs)``.
    """
    try:
        return model(inputs)
    except TypeError as e:
        if not isinstance(inputs, Mapping) or type(module).split_batch is not LoopModule.split_batch:
            raise
        owner = type(module).__name__
        raise TypeError(
            f"{owner}.forward failed on a dict batch ({type(e).__name__}: {e}). The default split_batch gives "
            f"forward the whole dict (keys {sorted(map(str, inputs))[:8]}), for a forward that takes it "
            f"(self.model(**inputs)). If {owner}.forward takes a tensor, define split_batch(self, batch) returning "
            "(inputs, targets), e.g. return batch['input_ids'], batch['labels']"
        ) from e
