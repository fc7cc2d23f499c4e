"""``python -m framework doctor path/to/recipe.py [recipe args]``: check a recipe's training loop.

Runs the recipe in this process for a few optimizer steps per fit with every doctor
check on (``doctor="full"``), then prints one row per check: ok / warning / error /
not run, and for each problem the message with its fix. Exit status: 0 when no check
failed with an error, 1 otherwise (or when the recipe crashed).

How: it sets ``FRAMEWORK_DOCTOR=full`` and ``FRAMEWORK_MAX_STEPS=N``, which every
``Engine`` honours, runs the recipe with :func:`runpy.run_path` as ``__main__``, and
collects the findings of every :class:`~framework.doctor.Doctor` the recipe created.
If the short run ends before a validation pass, it validates on two batches of the
recipe's ``val_data`` so the eval-mode check runs too.

.. code-block:: bash

    python -m framework doctor recipes/digits.py --run-dir "$(mktemp -d)"
    python -m framework doctor --steps 5 recipes/adder.py

Pass the recipe a new scratch ``--run-dir`` each time (the short run writes there like any run,
and a fresh run refuses a dir that holds another), or none: the recipes then pick a new one.

:func:`main` does the same in this process. The example's recipe validates on its training data and
has a layer it never uses: two warnings, so the exit status is still 0.

Example:

    >>> from pathlib import Path
    >>> from framework.doctor.cli import main
    >>> _ = Path("recipe.py").write_text('''
    ... import torch, framework
    ... from torch import nn
    ... class Net(framework.LoopModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net, self.unused = nn.Linear(8, 3), nn.Linear(8, 3)
    ...     def forward(self, x):
    ...         return self.net(x)
    ...     def compute_loss(self, outputs, targets):
    ...         return nn.functional.cross_entropy(outputs, targets)
    ... data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    ... framework.Engine(max_epochs=1, batch_size=16, progress=False).fit(Net(), data, val_data=data)
    ... ''')
    >>> main(["recipe.py"])
    doctor report: recipe.py (3 optimizer step(s) per fit, doctor="full")
    outcome: the recipe ran to the end
    status    check
    ...
    WARNING   validation data is not the training data
              -> val_data is the same data as train_data, so validation measures memorisation, ...
    WARNING   every trainable parameter receives a gradient
              -> 2 trainable parameter(s) of Net received no gradient: unused.weight, unused.bias. ...
    ...
    14 ok, 2 warning, 0 error, 0 not run
    0
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
import warnings
from typing import Any

from . import CHECKS, Doctor, Finding, LoopError, LoopWarning, collect, format_table, report_rows

USAGE = """usage: python -m framework doctor [--steps N] path/to/recipe.py [recipe args]

Runs the recipe for N optimizer steps per fit (default 3) with doctor="full" and prints
each check of the training loop: ok / warning / error / not run, and the fix."""


def main(argv: list[str] | None = None) -> int:
    """Run the doctor over a recipe and print the report; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``: ``[--steps N] path/to/recipe.py [recipe args]``; the module
    docstring runs it on a recipe. A wrong command line returns 2, with the usage on stderr.

    Example:

        >>> from framework.doctor.cli import main
        >>> main(["--help"])
        usage: python -m framework doctor [--steps N] path/to/recipe.py [recipe args]
        ...
        >>> main(["--steps", "5", "no_such_recipe.py"])   # stderr: no such recipe: no_such_recipe.py
        2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    steps = 3
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            print(USAGE)
            return 0
        if opt == "--steps" and args:
            steps = int(args.pop(0))
        elif opt.startswith("--steps="):
            steps = int(opt.split("=", 1)[1])
        else:
            print(f"unknown option {opt!r}\n{USAGE}", file=sys.stderr)
            return 2
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if steps < 1:
        print(f"--steps {steps}: use at least 1", file=sys.stderr)
        return 2
    path, recipe_args = args[0], args[1:]
    if not os.path.isfile(path):
        print(f"no such recipe: {path}", file=sys.stderr)
        return 2

    outcome, crashed = "the recipe ran to the end", False
    with collect() as doctors:
        with _recipe_environment(path, recipe_args, steps), warnings.catch_warnings():
            # The report below shows every finding once; don't print each warning as well.
            warnings.simplefilter("ignore", LoopWarning)
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                if e.code not in (0, None):
                    outcome, crashed = f"the recipe exited with status {e.code}", True
            except LoopError as e:
                outcome = f"the doctor stopped the run: {type(e).__name__}"
            except Exception as e:
                if type(e).__name__ == "NonFiniteError":
                    outcome = "the run stopped on a non-finite loss or gradient"
                else:
                    traceback.print_exc()
                    outcome, crashed = f"the recipe raised {type(e).__name__}: {e}", True
            if not crashed:
                _validate_if_missed(list(doctors))
        ran_doctors = list(doctors)

    print(f'doctor report: {path} ({steps} optimizer step(s) per fit, doctor="full")')
    print(f"outcome: {outcome}")
    if not ran_doctors:
        print("the recipe created no Engine, so there was no loop to check")
        return 1
    findings, ran, not_run = _merge(ran_doctors)
    print(format_table(report_rows(findings, ran, not_run)))
    return 1 if crashed or any(f.severity == "error" for f in findings) else 0


class _recipe_environment:
    """Set FRAMEWORK_DOCTOR / FRAMEWORK_MAX_STEPS, sys.argv and sys.path[0] as `python recipe.py` would;
    restore them afterwards."""

    def __init__(self, path: str, args: list[str], steps: int) -> None:
        self.path, self.args, self.steps = path, args, steps

    def __enter__(self) -> None:
        self.saved_env = {k: os.environ.get(k) for k in ("FRAMEWORK_DOCTOR", "FRAMEWORK_MAX_STEPS")}
        self.saved_argv, self.saved_path = sys.argv[:], sys.path[:]
        os.environ["FRAMEWORK_DOCTOR"] = "full"
        os.environ["FRAMEWORK_MAX_STEPS"] = str(self.steps)
        sys.argv = [self.path, *self.args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(self.path)))

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.argv, sys.path[:] = self.saved_argv, self.saved_path


def _validate_if_missed(doctors: list[Doctor]) -> None:
    """A fit cut short by FRAMEWORK_MAX_STEPS may end before its first validation: run one, on two
    batches, so the eval-mode check is not left out."""
    from ..engine import Engine

    if any("eval_mode" in d.ran for d in doctors) or any(f.severity == "error" for d in doctors for f in d.findings):
        return
    for d in doctors:
        module, val_data, batching = (d.context.get(k) for k in ("module", "val_data", "batching"))
        if module is None or val_data is None:
            continue
        micro = getattr(batching, "micro_batch_size", None) or 64
        try:
            Engine(max_steps=1, batch_size=micro, limit_val_batches=2, doctor="full", progress=False).validate(
                module, val_data
            )
        except LoopError:
            pass  # recorded as a finding by that engine's doctor
        return


def _merge(doctors: list[Doctor]) -> tuple[list[Finding], set[str], dict[str, str]]:
    findings: list[Finding] = []
    ran: set[str] = set()
    not_run: dict[str, str] = {}
    for d in doctors:
        findings.extend(f for f in d.findings if (f.check, f.message) not in {(g.check, g.message) for g in findings})
        ran |= d.ran
        for k, v in d.not_run.items():
            not_run.setdefault(k, v)
    return findings, ran, {k: v for k, v in not_run.items() if k in CHECKS}
