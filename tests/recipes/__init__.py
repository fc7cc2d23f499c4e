"""Tests of recipes/: each runs in-process (fast checks) and under `accelerate launch` with --smoke."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers import ROOT


def load_recipe(name: str) -> ModuleType:
    """Import recipes/NAME.py as a module (recipes/ is a folder of scripts, not a package)."""
    module_name = f"recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "recipes" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def launch_commands(doc: str) -> list[str]:
    """The docstring's opening block: the lines before its first blank line."""
    return doc.strip().split("\n\n")[0].splitlines()
