"""``python -m framework COMMAND``: ``plot`` (curves from run dirs) and ``doctor`` (check a recipe's loop).

Example::

    python -m framework plot runs/digits -o curves.png
    python -m framework doctor recipes/digits.py --smoke
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m framework {plot,doctor} ...\n  plot RUN_DIR [RUN_DIR ...] [-o curves.png]\n  doctor path/to/recipe.py [recipe args]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "plot":
        from .plot import main as plot_main

        return plot_main(rest)
    if command == "doctor":
        from .doctor.cli import main as doctor_main

        return doctor_main(rest)
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
