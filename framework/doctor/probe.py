"""Checks ``count_weights`` and ``loss_scaling``: the halves probe.

Once per fit, on the first checked step (the fit's first optimizer step), the probe computes the loss of
the step's first micro-batch and of its two halves, with ``count_items`` of each. Exactly these calls of
your code, on top of training's own: ``split_batch`` 4 times (the micro-batch, to sort its items, then each
of the three parts), ``forward``, ``compute_loss`` and ``count_items`` 3 times each (the micro-batch, its
first half, its second half). They run in eval mode (``self.training`` is False, so ``self.log`` records
nothing), without gradients, autocast or TF32, with the RNG forked and the buffers put back, on a copy of
the module that shares its parameters and buffers: whatever Python state a forward keeps (a call
counter, a list of inputs seen, a plain tensor attribute it updates in place) changes on the copy only.
So nothing of training changes ("observation never steers"), and a module's own counters do not see the
extra calls. What the copy cannot hide: state outside the module (a global, a class attribute, a
closure in a hook) sees them; ``doctor="off"`` runs no probe.

What the probe sees is never swallowed: a non-finite loss on any of its calls stops the run under
``nan_policy="raise"`` (:class:`~framework.guard.NonFiniteError`, before any optimizer step, naming the
call) and is a warning under ``"skip"``, as a non-finite loss in training would be.

For a loss that is a mean over the items ``count_items`` counts, the batch's loss is the count-weighted
mean of its halves' losses, to rounding.

- ``count_weights`` (every level): does ``count_items`` weigh the halves right? The engine weighs
  micro-batches and processes by it, so a count of sequences under a mean over tokens (the default
  ``len(targets)`` with Hugging Face causal-LM batches) accumulates with the wrong weights. To avoid
  false positives on losses that no count can decompose (in-batch negatives, batch statistics, a
  sum), it warns only when a *natural* alternative count (the target elements that are not -100,
  with and without a causal shift, or all of them) explains the halves to rounding while
  ``count_items`` misses by orders of magnitude more; the fix names that count. The halves are
  chosen to tell counts apart: items sorted by their number of counted targets, the larger half first.
- ``loss_scaling``: the loss scales with the batch, like a sum: the batch's loss is the sum of its
  halves' losses, not their mean. Under ``doctor="basic"`` (the default) it is judged wherever a sum
  changes the result: with gradient accumulation or several processes (the engine weighs micro-batches
  by count_items, exact for a mean only); ``"full"`` judges it always.

Not run under FSDP (the extra forwards all-gather parameters: a rank whose probe failed would leave
the others waiting) nor in alternating phases (each phase's loss may draw its own noise).
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..guard import NonFiniteError
from .context import Context, FitInfo
from .findings import LoopError
from .inspect import batch_len, split_halves, tensors_in
from .loss import split_loss

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's default ignore_index
CONSISTENT = 20  # count_items agrees when it explains the halves within this many rounding tolerances
MARGIN = 100  # ... and is wrong only when it misses by this many times more than the alternative


@dataclass(frozen=True)
class Count:
    """A count of one micro-batch's halves: what it counts, its code (``{t}`` = the targets), its values."""

    label: str
    code: str
    halves: tuple[float, float]


@dataclass(frozen=True)
class Measured:
    """The probe's numbers: the micro-batch's loss and count, its halves' losses and counts, the natural
    counts of the halves, and the rounding tolerance of the dtypes involved.
    """

    loss: float
    count: float
    halves: tuple[float, float]
    counts: tuple[float, float]
    alternatives: list[Count]
    tol: float
    items: int


@dataclass(frozen=True)
class Verdict:
    """What the probe says of ``count_items``: ``"ok"``, ``"mismatch"`` (``alternative`` explains the
    halves instead) or ``"undecided"``; the relative errors of both.
    """

    kind: str
    alternative: Count | None = None
    err_module: float = math.nan
    err_alternative: float = math.nan


def natural_counts(targets: tuple[Any, Any]) -> list[tuple[str, str, tuple[float, float]]]:
    """The natural counts of two halves' targets: ``(label, code, (count_a, count_b))`` for each count
    that applies to them (integer targets: not -100, after a causal shift too; any tensor: elements, items).
    """
    a, b = targets
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.ndim == 0 or a.ndim != b.ndim:
        return []
    out: list[tuple[str, str, tuple[torch.Tensor | int, torch.Tensor | int]]] = []
    integer = not (a.is_floating_point() or a.is_complex() or a.dtype == torch.bool)
    if integer and a.ndim >= 2:
        out.append(
            (
                f"the target tokens that are not {IGNORE_INDEX} after the causal shift (what a Hugging Face "
                "causal-LM loss averages over)",
                f"({{t}}[:, 1:] != {IGNORE_INDEX}).sum()",
                ((a[:, 1:] != IGNORE_INDEX).sum(), (b[:, 1:] != IGNORE_INDEX).sum()),
            )
        )
    if integer:
        out.append(
            (
                f"the target elements that are not {IGNORE_INDEX}",
                f"({{t}} != {IGNORE_INDEX}).sum()",
                ((a != IGNORE_INDEX).sum(), (b != IGNORE_INDEX).sum()),
            )
        )
    out.append(("the target elements", "{t}.numel()", (a.numel(), b.numel())))
    out.append(("the items", "len({t})", (len(a), len(b))))
    return [(label, code, (float(ca), float(cb))) for label, code, (ca, cb) in out]  # (once per fit)


def count_order(targets: Any, n: int) -> torch.Tensor | None:
    """A permutation of the ``n`` items that sorts them by their number of targets that are not -100
    (most first), so the halves' counts differ as much as they can; None where every item counts the
    same (or the targets are not per-item integer tensors), or where a half would count nothing.
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim == 0 or targets.shape[0] != n:
        return None
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return None
    per_item = (targets != IGNORE_INDEX).reshape(n, -1).sum(1)
    order = torch.argsort(per_item, descending=True, stable=True)
    low = per_item[order[n // 2 :]].sum()
    keep = bool((low > 0) & (per_item.max() > per_item.min()))  # one host read, once per fit
    return order if keep else None


def rounding_tolerance(dtypes: list[torch.dtype]) -> float:
    """Relative rounding allowed between a batch's loss and its halves' weighted mean: 16 ulps of the
    least precise float dtype involved (1.9e-6 for float32; bf16 is too coarse to tell counts apart).

    Example:

        >>> from framework.doctor.probe import rounding_tolerance
        >>> rounding_tolerance([torch.float32, torch.float64])   # 16 * 1.19e-07
        1.9e-06
    """
    eps = [torch.finfo(d).eps for d in dtypes if d.is_floating_point]
    return 16 * max(eps or [torch.finfo(torch.float32).eps])


def count_verdict(
    full: float,
    halves: tuple[float, float],
    counts: tuple[float, float],
    alternatives: list[Count],
    tol: float,
) -> Verdict:
    """Does ``count_items`` (``counts`` on the halves) weigh the halves' losses into the batch's loss?

    ``"ok"`` when it does to ``CONSISTENT * tol``; ``"mismatch"`` when an alternative with other
    proportions does to ``tol`` and ``count_items`` misses by at least ``MARGIN`` times more;
    otherwise ``"undecided"`` (no count decomposes the loss).

    Example:

        >>> from framework.doctor.probe import Count, count_verdict
        >>> count_verdict(2.0, (1.0, 4.0), (2, 1), [], tol=2e-6).kind
        'ok'
        >>> count_verdict(2.0, (1.0, 4.0), (1, 1), [Count("the tokens", "{t}.numel()", (2.0, 1.0))], 2e-6).kind
        'mismatch'
    """
    a, b = halves
    na, nb = counts
    if not all(math.isfinite(x) for x in (full, a, b, na, nb)) or na < 0 or nb < 0 or na + nb <= 0:
        return Verdict("undecided")
    scale = max(abs(full), 1e-12)

    def err(ca: float, cb: float) -> float:
        return abs(full - (ca * a + cb * b) / (ca + cb)) / scale if ca + cb > 0 else math.inf

    e_module = err(na, nb)
    if e_module <= CONSISTENT * tol:
        return Verdict("ok", err_module=e_module)
    share = na / (na + nb)
    others = [c for c in alternatives if sum(c.halves) > 0 and abs(c.halves[0] / sum(c.halves) - share) > 1e-12]
    if others:
        best = min(others, key=lambda c: err(*c.halves))
        e_best = err(*best.halves)
        if e_best <= tol and e_module >= MARGIN * max(e_best, 1e-12):
            return Verdict("mismatch", best, e_module, e_best)
    return Verdict("undecided", err_module=e_module)


def is_sum_like(full: float, halves: tuple[float, float], counts: tuple[float, float]) -> bool:
    """The batch's loss is the sum of its halves' losses (to 5%), far (25%) from their count-weighted mean.

    Example:

        >>> from framework.doctor.probe import is_sum_like
        >>> is_sum_like(10.0, (4.0, 6.0), (16, 16)), is_sum_like(5.0, (4.0, 6.0), (16, 16))
        (True, False)
    """
    a, b = halves
    na, nb = counts
    if not all(math.isfinite(x) for x in (full, a, b)) or na + nb <= 0:
        return False
    scale = max(abs(full), 1e-12)
    return abs(full - (a + b)) <= 0.05 * scale and abs(full - (na * a + nb * b) / (na + nb)) >= 0.25 * scale


class HalvesProbe:
    """``count_weights`` and ``loss_scaling`` (the latter with accumulation or several processes under
    ``doctor="basic"``, always under ``"full"``). It runs once per fit, on a checked step inside
    :meth:`~framework.doctor.Doctor.watch` (it needs the watched batch): three no-grad forwards.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._done = False

    def on_fit_start(self, fit: FitInfo) -> None:
        self._done = False
        if not self._judges_scaling(fit):
            self.ctx.record.not_run.setdefault(
                "loss_scaling",
                'one process without accumulation: a sum trains as a plain loop would (doctor="full" judges it too)',
            )

    def _judges_scaling(self, fit: FitInfo) -> bool:
        """A sum where a mean is expected changes the result with accumulation or several processes (the
        engine weighs the micro-batches by count_items); ``"full"`` judges it anyway."""
        accumulation = int(getattr(fit.batching, "accumulation", 1) or 1)
        return self.ctx.full or accumulation > 1 or fit.world_size > 1

    def on_checked_loss(self, module: nn.Module, loss: Any, outputs: Any, phase: str | None) -> None:
        if self._done or not self.ctx.watching or self.ctx.batch is None:
            return  # (inside watch only: there the user's code was just vetted for backward/step calls)
        self._done = True
        fit = self.ctx.fit
        scaling = self._judges_scaling(fit)
        checks = ("count_weights", "loss_scaling") if scaling else ("count_weights",)
        why_not = None
        if fit.sharded:
            why_not = "not run under FSDP (the probe's extra forwards would all-gather the parameters on every rank)"
        elif fit.phases is not None or phase is not None:
            why_not = "not run in alternating phases (each phase's loss may draw its own noise or detach outputs)"
        if why_not is None:
            try:
                measured = self._measure(module, self.ctx.batch)
            except LoopError:
                raise
            except Exception as e:  # the probe is optional: a module that cannot take half a batch is not wrong
                why_not = f"the probe failed: {type(e).__name__}: {e}"[:200]
            else:
                if measured is None:
                    why_not = "the batch could not be split in two (fewer than 2 items, or no tensors)"
                elif not self._finite(module, measured, loss):
                    why_not = "the probe's loss was not finite (reported under check finite)"
                else:
                    self._judge_counts(module, measured)
                    if scaling:
                        self._judge_scaling(module, measured)
        if why_not is not None:
            for check in checks:
                self.ctx.record.not_run[check] = why_not

    def _measure(self, module: Any, batch: Any) -> Measured | None:
        n = batch_len(batch)
        if n is None or n < 2:
            return None
        targets = module.split_batch(batch)[1]
        halves = split_halves(batch, count_order(targets, n))
        if halves is None:
            return None
        device = next((t.device for t in tensors_in(batch)), torch.device("cpu"))
        losses, counts, half_targets = [], [], []
        shadow = _shadow(module, self.ctx.fit.optimizers)
        with _observing(shadow, module, device):
            for part in (batch, *halves):
                inputs, part_targets = shadow.split_batch(part)
                result = shadow.compute_loss(shadow(inputs), part_targets)
                losses.append(split_loss(result, f"{type(module).__name__}.compute_loss")[0].detach())
                counts.append(shadow.count_items(part))
                half_targets.append(part_targets)
        dtypes = [loss.dtype for loss in losses] + [p.dtype for p in module.parameters()]
        values = torch.stack(
            [loss.double().reshape(()).cpu() for loss in losses]
            + [torch.as_tensor(c).double().reshape(()).cpu() for c in counts]
        ).tolist()
        alternatives = [
            Count(label, code, pair) for label, code, pair in natural_counts((half_targets[1], half_targets[2]))
        ]
        return Measured(
            values[0],
            values[3],
            (values[1], values[2]),
            (values[4], values[5]),
            alternatives,
            rounding_tolerance(dtypes),
            n,
        )

    def _finite(self, module: nn.Module, m: Measured, own: Any) -> bool:
        """Report a non-finite loss on the probe's calls as training would (never swallow it): under
        ``nan_policy="raise"`` a :class:`NonFiniteError` before any optimizer step, under ``"skip"`` a warning;
        where training's own loss of that micro-batch (``own``) is not finite either, the NaN guard reports it,
        with the step and the parameters. Returns whether every loss was finite."""
        values = (m.loss, *m.halves)
        if all(math.isfinite(v) for v in values):
            return True
        if isinstance(own, torch.Tensor) and not math.isfinite(float(own.detach().float())):  # (the error path)
            return False
        name, fit = type(module).__name__, self.ctx.fit
        shown = ", ".join(f"{part} {v:g}" for part, v in zip(("the micro-batch", "its first half", "its second half"),
                                                              values, strict=True))  # fmt: skip
        message = (
            f"{name}.compute_loss returned a non-finite loss on the doctor's probe ({shown}): the probe "
            f"calls forward and compute_loss 3 extra times, on this fit's first micro-batch of {m.items} items and "
            "on its two halves (eval mode, no gradients, on a copy of the module), and one of those losses was "
            "not finite. Training would have stopped on such a loss too; fix what makes it non-finite (log() or "
            "a division by zero in the loss, that batch's inputs), or pass doctor='off' to run without the probe"
        )
        if fit.nan_policy == "raise":
            self.ctx.record.error("finite", message)
            raise NonFiniteError(f"{message} (nan_policy='raise'; no parameter was changed)")
        self.ctx.record.warn("finite", message + " (nan_policy='skip': training goes on)", key="finite:probe")
        return False

    def _judge_counts(self, module: nn.Module, m: Measured) -> None:
        record, name = self.ctx.record, type(module).__name__
        full, halves, counts, n = m.loss, m.halves, m.counts, m.items
        verdict = count_verdict(full, halves, counts, m.alternatives, m.tol)
        if verdict.kind == "ok":
            record.ran.add("count_weights")
            return
        if verdict.kind == "undecided" or verdict.alternative is None:
            record.not_run["count_weights"] = (
                "the micro-batch's loss is not a count-weighted mean of its halves' losses for count_items or any "
                "natural count (items that interact, e.g. in-batch negatives or batch statistics, or a sum), "
                "so count_items cannot be checked this way"
            )
            return
        alt = verdict.alternative
        code = alt.code.format(t=_targets_expr(module, self.ctx.batch))
        record.warn(
            "count_weights",
            f"{name}.count_items does not count what {name}.compute_loss averages over: on a micro-batch of {n} "
            f"items, the loss ({full:.6g}) is the mean of its two halves' losses ({halves[0]:.6g}, {halves[1]:.6g}) "
            f"weighted by {alt.label} ({alt.halves[0]:g} and {alt.halves[1]:g}; off by {verdict.err_alternative:.1e}, "
            f"rounding), not by count_items ({counts[0]:g} and {counts[1]:g}; off by {verdict.err_module:.1e}). The "
            "engine weighs each micro-batch and each process by count_items, so with gradient accumulation or "
            f"several processes the step's gradient is a mean with the wrong weights. Fix: define "
            f"count_items(self, batch) returning {code}",
        )

    def _judge_scaling(self, module: nn.Module, m: Measured) -> None:
        record, name = self.ctx.record, type(module).__name__
        record.ran.add("loss_scaling")
        if is_sum_like(m.loss, m.halves, m.counts):
            full, (a, b) = m.loss, m.halves
            record.warn(
                "loss_scaling",
                f"{name}.compute_loss scales with the batch size, like a sum: on a batch of {m.count:g} items it "
                f"returned {full:.4g}, and {a:.4g} + {b:.4g} on its two halves. The engine weighs each micro-batch "
                "by count_items, which is exact only for a mean over items; a sum multiplies the learning rate by "
                "the batch size. Fix: use reduction='mean' (the default), or divide the sum by count_items(batch)",
            )


def _targets_expr(module: nn.Module, batch: Any) -> str:
    """How the fix's code spells the targets of ``batch``: as the default ``split_batch`` finds them."""
    from ..module import LoopModule

    if getattr(type(module), "split_batch", None) is LoopModule.split_batch:
        return 'batch["labels"]' if isinstance(batch, Mapping) else "batch[1]"
    return "self.split_batch(batch)[1]"


def _shadow(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Any:
    """A copy of ``module`` that shares its parameters and buffers, and the optimizers' state (a module may
    keep its optimizer on ``self``), so they cost no memory, but not its other state: whatever the user's
    forward records or counts (a list of inputs, a call counter, a plain tensor attribute updated in place,
    a queue) is recorded on the copy, so the probe's forwards leave no trace."""
    shared: dict[int, Any] = {}
    for opt in optimizers:
        shared[id(opt)] = opt
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    shared[id(v)] = v
    for m in module.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            shared[id(t)] = t  # (the buffers are put back after the probe: _observing)
    for m in module.modules():  # (after every parameter: an attribute may alias one of a later submodule)
        for v in vars(m).values():
            # Methods and functions set on the instance: the doctor's own zero_grad patch is one during the
            # watched forward; copying it would copy the doctor, the fit and its data.
            if isinstance(v, (types.MethodType, types.FunctionType)):
                shared[id(v)] = v
            # Plain tensor attributes are cloned, not shared: a forward may update one in place (a counter, a
            # running statistic). Detached: one kept from a forward (self.last_hidden) has a graph to leave behind.
            elif isinstance(v, torch.Tensor) and id(v) not in shared:
                shared[id(v)] = v.detach().clone()
    try:
        return copy.deepcopy(module, shared)
    except Exception as e:
        raise RuntimeError(
            f"could not copy {type(module).__name__} for the probe's forwards ({type(e).__name__}: {e})"
        ) from e


@contextlib.contextmanager
def _observing(shadow: nn.Module, module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the probe's forwards (on ``shadow``, a copy of ``module`` sharing its tensors) without a trace
    on training: forked RNG, no grad, eval mode (set as an attribute: a user's ``train()`` override
    must not run), no autocast, no TF32; afterwards the precision settings and any buffer of ``module``
    a forward changed in place are put back."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    cuda = device.type == "cuda"
    precision = torch.get_float32_matmul_precision() if cuda else None
    cudnn_tf32 = torch.backends.cudnn.allow_tf32 if cuda else None
    try:
        autocast_off: contextlib.AbstractContextManager[Any] = torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        autocast_off = contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []), torch.no_grad(), autocast_off:
            for m in shadow.modules():
                m.training = False
            if cuda:
                torch.set_float32_matmul_precision("highest")
                torch.backends.cudnn.allow_tf32 = False
            yield
    finally:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape != saved.shape or not torch.equal(b, saved):
                    b.copy_(saved)
