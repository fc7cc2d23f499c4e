"""`import framework` stays cheap: no optional heavy package at import time, little time over torch.

In the style of Accelerate's own ``test_imports``: each import runs in a fresh interpreter under
``python -X importtime``, whose report (one line per module: self µs | cumulative µs | name)
is parsed. The assertions are on *which* modules get imported, which is deterministic; the
time check has generous slack, since CI machines are noisy.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported on first use only (trackers, plots, checkpoints, the launcher, config files, progress bars).
LAZY = (
    "accelerate",
    "safetensors",
    "matplotlib",
    "sklearn",
    "tensorboard",
    "yaml",
    "tqdm",
    "transformers",
    "tokenizers",
)


@dataclass(frozen=True)
class Imported:
    name: str
    self_us: int
    cumulative_us: int


def parse_importtime(stderr: str) -> list[Imported]:
    """The modules of a ``-X importtime`` report, in the order they finished importing.

    Example::

        >>> parse_importtime("import time:       150 |        150 |   json.decoder\\n")
        [Imported(name='json.decoder', self_us=150, cumulative_us=150)]
    """
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        out.append(Imported(name.strip(), int(self_us), int(cumulative_us)))
    return out


@cache
def importtime(statement: str) -> tuple[Imported, ...]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(parse_importtime(proc.stderr))


def added_by_framework() -> list[Imported]:
    """What ``import framework`` imports beyond what ``import torch`` already does."""
    torch_names = {m.name for m in importtime("import torch")}
    return [m for m in importtime("import framework") if m.name not in torch_names]


def test_the_report_is_parsed():
    mods = importtime("import torch")
    assert any(m.name == "torch" for m in mods)
    assert all(m.self_us >= 0 and m.cumulative_us >= m.self_us for m in mods)


def test_import_framework_imports_no_lazy_package():
    imported = {m.name.split(".")[0] for m in importtime("import framework")}
    added = {m.name.split(".")[0] for m in added_by_framework()}
    # torch itself may pull some of these (e.g. tqdm via torch.hub); what counts is that framework adds none.
    assert not added & set(LAZY), (
        f"`import framework` imports {sorted(added & set(LAZY))}; import them where they are used"
    )
    for name in ("accelerate", "safetensors", "matplotlib", "sklearn", "tensorboard", "yaml"):
        assert name not in imported, f"`import framework` imports {name}"


def test_import_framework_adds_no_third_party_package():
    """Beyond torch (and what torch imports), only framework's own modules and the standard library."""
    third_party = sorted(
        {m.name for m in added_by_framework()
         if m.name.split(".")[0] != "framework" and m.name.split(".")[0] not in sys.stdlib_module_names}
    )  # fmt: skip
    assert not third_party, f"`import framework` also imports {third_party}; import them lazily, where they are used"


def test_import_framework_costs_little_over_torch():
    """The target is <= 1.10x `import torch` in wall time (benchmarks/overhead.py measures it);
    here the summed self time of the modules framework adds must stay under a generous 25% of torch's."""
    torch_us = next(m.cumulative_us for m in importtime("import torch") if m.name == "torch")
    added_us = sum(m.self_us for m in added_by_framework())
    slowest = sorted(added_by_framework(), key=lambda m: -m.self_us)[:5]
    assert added_us < 0.25 * torch_us, (
        f"`import framework` adds {added_us / 1e3:.0f} ms to torch's {torch_us / 1e3:.0f} ms; slowest: "
        + ", ".join(f"{m.name} {m.self_us / 1e3:.0f} ms" for m in slowest)
    )
