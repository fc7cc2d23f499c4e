"""What the loop doctor reports: the catalogue of checks, its findings, and the report table.

:data:`CHECKS` names every check with what it establishes and its fix; a :class:`Finding` is one
problem found; a :class:`Recorder` (one per :class:`~framework.doctor.Doctor`, shared by its checks)
records findings, raises errors as :class:`LoopError` and emits warnings as :class:`LoopWarning`,
once per fit, from the user's line. :func:`report_rows` and :func:`format_table` render the table that
``python -m framework doctor`` prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass
from typing import NoReturn


class LoopError(RuntimeError):
    """A mistake in the user's loop code, with the fix in the message.

    ``check`` names the doctor check that found it (see :data:`CHECKS`), or is None.

    Example:

        >>> from framework import Engine, LoopError
        >>> class Detached(Classifier):
        ...     def compute_loss(self, outputs, targets):
        ...         return F.cross_entropy(outputs, targets).item()   # a float: no gradient
        >>> try:
        ...     Engine(max_steps=1, batch_size=32, progress=False).fit(Detached(), train_data)
        ... except LoopError as e:
        ...     print(e.check, "|", e)
        loss_value | Detached.compute_loss returned a float (...); return a scalar tensor, ...
    """

    def __init__(self, message: str, check: str | None = None) -> None:
        super().__init__(message)
        self.check = check


class LoopWarning(UserWarning):
    """A likely mistake in the user's loop code; emitted once per fit.

    Example:

        >>> import warnings
        >>> from framework import Engine, LoopWarning
        >>> model = Classifier()
        >>> model.extra = nn.Linear(8, 8)   # never used in forward
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", LoopWarning)   # make the doctor's warnings fatal
        ...     Engine(max_steps=2, batch_size=32, progress=False).fit(model, train_data)
        Traceback (most recent call last):
        ...
        framework.doctor.findings.LoopWarning: 2 trainable parameter(s) of Classifier received no gradient: ...
    """

    check: str | None = None


# id -> (what the check establishes when it passes, the fix when it does not). The order is the report's.
CHECKS: dict[str, tuple[str, str]] = {
    "trainable": (
        "the module has trainable parameters",
        "create layers in __init__ as attributes; don't freeze all of them",
    ),
    "optimizer_coverage": (
        "every trainable parameter is in a param group of exactly one optimizer",
        "build the optimizer from self.parameters(), or requires_grad_(False) what you freeze",
    ),
    "initial_weights": (
        "every process starts from the same weights",
        "call framework.seed_everything(seed) before building the model",
    ),
    "val_data": ("validation data is not the training data", "hold out a separate split for val_data"),
    "batchnorm": (
        "BatchNorm normalizes over the whole batch",
        "make micro_batch_size the per-process batch; GroupNorm/LayerNorm (SyncBatchNorm on CUDA)",
    ),
    "count_items": (
        "count_items returns a non-negative integer",
        "return the number of items compute_loss averages over",
    ),
    "count_weights": (
        "count_items counts what compute_loss averages over (a micro-batch against its two halves)",
        "count what the loss averages, e.g. (labels[:, 1:] != -100).sum() after a causal shift",
    ),
    "loop_calls": (
        "forward/compute_loss leave backward, zero_grad and optimizer.step to the engine",
        "remove those calls; return the loss from compute_loss",
    ),
    "train_mode": ("the module stays in train mode while training", "remove .eval() from forward/compute_loss"),
    "loss_value": (
        "compute_loss returns a scalar tensor that requires grad",
        "return e.g. F.cross_entropy(outputs, targets)",
    ),
    "loss_graph": (
        "the loss is computed from this step's forward outputs",
        "compute the loss from `outputs` in compute_loss, every step; no torch.no_grad() in forward",
    ),
    "gradients": (
        "every trainable parameter receives a gradient",
        "use the parameter in forward, or requires_grad_(False) it",
    ),
    "updates": ("the first optimizer steps change every trainable parameter", "check lr, param groups and gradients"),
    "finite": ("the loss and the gradients are finite", "lower the lr, set clip_grad_norm, check the data"),
    "loss_scaling": (
        "the loss is a mean over items, not a sum (with accumulation or several processes; always under 'full')",
        "use reduction='mean', or divide by count_items(batch)",
    ),
    "eval_mode": (
        "the module stays in eval mode during validation",
        "remove .train() from forward/compute_loss/compute_metrics",
    ),
}


@dataclass
class Finding:
    """One problem the doctor found: the check's id, ``"error"`` or ``"warning"``, and the message.

    Example:

        >>> from framework import Engine
        >>> model = Classifier()
        >>> model.extra = nn.Linear(8, 8)   # never used in forward
        >>> engine = Engine(max_steps=2, batch_size=32, progress=False).fit(model, train_data)
        >>> engine.doctor.findings
        [Finding(check='gradients', severity='warning', message='2 trainable parameter(s) of Classifier ...')]
    """

    check: str
    severity: str
    message: str


class Recorder:
    """What the checks found: :attr:`findings`, the checks that :attr:`ran`, and why the others did not
    (:attr:`not_run`). The :class:`~framework.doctor.Doctor` owns one and hands it to every check;
    findings accumulate over the doctor's life (a ``fit`` then a ``validate`` report together), while
    "once per fit" for warnings restarts with :meth:`new_fit`. A check records a warning with
    :meth:`warn` and an error with :meth:`fail` (which raises :class:`LoopError`).
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.ran: set[str] = set()  # checks that ran at least once (the report's "ok" rows)
        self.not_run: dict[str, str] = {}  # why a check could not run, for the report
        self.is_main = True  # one process speaks for all; every rank records the finding
        self._warned: set[str] = set()

    def new_fit(self, is_main: bool) -> None:
        """A new fit: each warning may be emitted once again; ``is_main`` says whether this process speaks."""
        self._warned.clear()
        self.is_main = is_main

    def fail(self, check: str, message: str) -> NoReturn:
        """Record an error finding and raise :class:`LoopError` (the run stops here)."""
        self.error(check, message)
        raise LoopError(message, check)

    def error(self, check: str, message: str) -> None:
        """Record an error finding without raising (the caller raises its own error, e.g. NonFiniteError)."""
        self.ran.add(check)
        self.findings.append(Finding(check, "error", message))

    def warn(self, check: str, message: str, key: str | None = None) -> None:
        """Record a warning finding and emit it as a :class:`LoopWarning`, once per fit per ``key``."""
        key = key or check
        self.ran.add(check)
        if key in self._warned:
            return
        self._warned.add(key)
        self.findings.append(Finding(check, "warning", message))
        if self.is_main:  # one process speaks for all; every rank records the finding
            w = LoopWarning(message)
            w.check = check
            warnings.warn(w, stacklevel=user_stacklevel())


def report_rows(findings: list[Finding], ran: set[str], not_run: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """Merge findings into one row per check of :data:`CHECKS` (see :meth:`Doctor.report`).

    Example:

        >>> from framework.doctor import Finding, report_rows
        >>> found = [Finding("finite", "error", "non-finite loss")]
        >>> rows = report_rows(found, ran={"trainable", "finite"}, not_run={"updates": "fewer than 2 steps"})
        >>> for check, title, status, detail in rows:
        ...     if check in ("trainable", "updates", "finite"):
        ...         print(f"{check}: {status} {detail!r}")
        trainable: ok ''
        updates: not run 'fewer than 2 steps'
        finite: error 'non-finite loss'
    """
    rows = []
    for check, (title, _fix) in CHECKS.items():
        mine = [f for f in findings if f.check == check]
        if any(f.severity == "error" for f in mine):
            status = "error"
        elif mine:
            status = "warning"
        elif check in ran:
            status = "ok"
        else:
            status = "not run"
        if mine:
            seen: list[str] = []
            for f in mine:
                if f.message not in seen:
                    seen.append(f.message)
            detail = "\n".join(seen)
        elif status == "not run":
            detail = not_run.get(check, "not reached in this run")
        else:
            detail = ""
        rows.append((check, title, status, detail))
    return rows


def format_table(rows: list[tuple[str, str, str, str]], width: int = 100) -> str:
    """Render report rows: status, what was checked, and (for problems) the message with its fix.

    Example:

        >>> from framework.doctor import format_table
        >>> rows = [("trainable", "the module has trainable parameters", "ok", ""),
        ...         ("finite", "the loss and the gradients are finite", "error", "non-finite loss; fix: lower the lr")]
        >>> print(format_table(rows, width=50))
        status    check
        --------- ----------------------------------------
        ok        the module has trainable parameters
        ERROR     the loss and the gradients are finite
                  -> non-finite loss; fix: lower the lr
        --------- ----------------------------------------
        1 ok, 0 warning, 1 error, 0 not run
    """
    lines = [f"{'status':<9} check", f"{'-' * 9} {'-' * (width - 10)}"]
    for _, title, status, detail in rows:
        label = status.upper() if status in ("error", "warning") else status
        lines.append(f"{label:<9} {title}")
        for para in detail.splitlines() if detail else []:
            lines.extend(textwrap.wrap(para, width, initial_indent=" " * 10 + "-> ", subsequent_indent=" " * 13))
    counts = {s: sum(r[2] == s for r in rows) for s in ("ok", "warning", "error", "not run")}
    lines.append(f"{'-' * 9} {'-' * (width - 10)}")
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # framework/, not only the doctor


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside this package (and the
    contextlib frames of ``watch``): the user's ``engine.fit(...)`` line, not the doctor's internals.
    """
    frame: types.FrameType | None = sys._getframe(2)
    level = 2  # level 1 is Doctor.warn itself
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def name_list(names: list[str], limit: int = 8) -> str:
    """``names`` joined for a message, the first ``limit`` of them and a count of the rest.

    Example:

        >>> name_list(["a", "b", "c"], limit=2)
        'a, b, ... (1 more)'
    """
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
