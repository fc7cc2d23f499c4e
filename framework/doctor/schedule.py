"""When the doctor looks: its level, the sparse schedule of checked optimizer steps, the step cap.

Under ``"basic"`` (the default) the checked steps are the first two optimizer steps of a fit, then
the powers of two up to 512, then every 1000th: enough to catch a mistake that shows late (a loss
cached from step 5 on), at a cost that vanishes over a long run. ``"full"`` checks every step;
``"off"`` none. ``FRAMEWORK_DOCTOR`` overrides the level and ``FRAMEWORK_MAX_STEPS`` caps
``max_steps``: that is how ``python -m framework doctor`` drives a recipe it runs.
"""

from __future__ import annotations

import os

LEVELS = ("basic", "full", "off")


def resolve_level(level: str) -> str:
    """``level``, or the environment's ``FRAMEWORK_DOCTOR`` when set; a ValueError for anything else."""
    level = os.environ.get("FRAMEWORK_DOCTOR") or level
    if level not in LEVELS:
        raise ValueError(f'doctor={level!r}; use "basic", "full" or "off"')
    return level


def is_checked(k: int, full: bool) -> bool:
    """Is optimizer step ``k`` (0-based, counted from the start of the fit) a checked one?

    Example:

        >>> from framework.doctor.schedule import is_checked
        >>> [k for k in range(20) if is_checked(k, full=False)]
        [0, 1, 2, 4, 8, 16]
    """
    return full or k < 2 or k % 1000 == 0 or (k < 1000 and k & (k - 1) == 0)


def max_steps_override(max_steps: int | None) -> int | None:
    """``max_steps`` capped by the environment variable ``FRAMEWORK_MAX_STEPS`` (the doctor CLI sets it).

    Example:

        >>> import os
        >>> from unittest import mock
        >>> from framework.doctor import max_steps_override
        >>> with mock.patch.dict(os.environ, {"FRAMEWORK_MAX_STEPS": "3"}):   # as the doctor CLI sets it
        ...     print(max_steps_override(None), max_steps_override(2), max_steps_override(100))
        3 2 3
    """
    cap = os.environ.get("FRAMEWORK_MAX_STEPS")
    if not cap:
        return max_steps
    return int(cap) if max_steps is None else min(max_steps, int(cap))
