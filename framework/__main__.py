"""``python -m framework COMMAND``: see :mod:`framework.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
