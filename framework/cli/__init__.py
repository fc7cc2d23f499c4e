"""Command lines: ``python -m framework COMMAND`` (this module), and the recipes' typed arguments
(:mod:`framework.cli.recipe`).

``python -m framework COMMAND``: ``plot`` (curves from run dirs), ``doctor`` (check a recipe's loop) and
``export`` (deployable files from a run dir's checkpoint).

.. code-block:: bash

    python -m framework plot runs/digits -o curves.png
    python -m framework doctor recipes/digits.py --smoke
    python -m framework export runs/hf_causal_lm -o model.safetensors
    python -m framework export runs/hf_causal_lm --hf exported/

:func:`main` runs the same command line in this process.

Example:

    >>> from framework.cli import main
    >>> main(["doctor", "--help"])
    usage: python -m framework doctor [--steps N] path/to/recipe.py [recipe args]
    ...
    0
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m framework {plot,doctor,export} ...
  plot RUN_DIR [RUN_DIR ...] [-o curves.png]
  doctor path/to/recipe.py [recipe args]
  export RUN_DIR [-o model.safetensors [--prefix lm.]] [--hf OUT_DIR]"""


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m framework COMMAND ...`` (``argv`` defaults to ``sys.argv[1:]``); returns the exit status:
    the command's, or 2 for an unknown command (the usage goes to stderr).

    Example:

        >>> from framework.cli import main
        >>> main(["--help"])
        usage: python -m framework {plot,doctor,export} ...
          plot RUN_DIR [RUN_DIR ...] [-o curves.png]
          doctor path/to/recipe.py [recipe args]
          export RUN_DIR [-o model.safetensors [--prefix lm.]] [--hf OUT_DIR]
        0
        >>> main(["train"])   # stderr: unknown command 'train' and the usage
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "plot":
        from ..observability.plot import main as plot_main

        return plot_main(rest)
    if command == "doctor":
        from ..doctor.cli import main as doctor_main

        return doctor_main(rest)
    if command == "export":
        from ..checkpoint.weights import main as export_main

        return export_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
