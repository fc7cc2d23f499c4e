"""Shared test helpers: launching 2 CPU processes, and small modules."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from framework import Callback, LoopModule

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def launch(
    script: str | Path,
    *args: str,
    config: str = "launch/cpu_ddp.yaml",
    timeout: float = 180,
    env: dict[str, str] | None = None,
    launcher_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``accelerate launch --config_file CONFIG [launcher_args] script args`` and fail (not hang) past
    ``timeout``. Raises AssertionError with the output when the launch exits non-zero.
    """
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / config), *launcher_args, str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


class TinyClassifier(LoopModule):
    """8 features -> 3 classes; deterministic given the seed."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def compute_metrics(self, outputs, targets):
        return {"acc": (outputs.argmax(-1) == targets).float()}


def classification_data(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


class CrashAt(Callback):
    """Stands in for a kill: raises KeyboardInterrupt at the end of step ``step`` (after it was logged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, engine, module, metrics):
        if engine.step == self.step:
            raise KeyboardInterrupt


def reseal(ckpt: Path, edit: Any = None) -> None:
    """Rewrite a checkpoint's manifest.json and SHA256SUMS to match its files as they are now (a careful
    tamperer, or a tool that edits a checkpoint), computed here with hashlib, independently of the
    framework. ``edit(manifest)`` may then change the manifest dict before it is written.
    """
    manifest = json.loads((ckpt / "manifest.json").read_text())
    names = sorted(manifest["files"])
    manifest["files"] = {
        n: {"size": (ckpt / n).stat().st_size, "sha256": hashlib.sha256((ckpt / n).read_bytes()).hexdigest()}
        for n in names
    }
    if edit is not None:
        edit(manifest)
    data = json.dumps(manifest).encode()
    (ckpt / "manifest.json").write_bytes(data)
    lines = [f"{hashlib.sha256((ckpt / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    lines.append(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    (ckpt / "SHA256SUMS").write_text("".join(lines))


def fit_tiny(run_dir: Path, module: nn.Module | None = None, **kw: Any) -> tuple[Any, nn.Module]:
    """Fit a TinyClassifier (seeded) on 200 items, batch 50: 4 steps an epoch, a checkpoint at each
    epoch end (steps 4, 8, ...). Returns (engine, module)."""
    from framework import Engine

    torch.manual_seed(0)
    x, y = classification_data(200)
    module = module if module is not None else TinyClassifier()
    args: dict[str, Any] = dict(max_epochs=2, batch_size=50, run_dir=str(run_dir), progress=False, doctor="off")
    args.update(kw)
    engine = Engine(**args)
    engine.fit(module, (x, y), (x[:50], y[:50]))
    return engine, module


class Items(Dataset):
    """Item i is (tensor(i), tensor(0)): a batch names which items it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), torch.tensor(0)


class ItemStream(IterableDataset):
    """The same items as :class:`Items`, as a stream."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return ((torch.tensor(i), torch.tensor(0)) for i in range(self.n))


def doctor_step(doctor, module, optimizers, batch, count: bool = False):
    """One optimizer step on ``batch`` = (x, y), driven by hand through the doctor's events in the
    engine's order (``count``: also the count_items check); returns the loss."""
    x, y = batch
    doctor.start_step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with doctor.watch(module, batch):
        outputs = module(x)
        doctor.check_train_mode(module, "forward")
        loss = module.compute_loss(outputs, y)
        doctor.check_loss(module, loss, outputs)
    if count:
        doctor.check_count(module, module.count_items(batch))
    loss.backward()
    doctor.after_backward()
    for opt in optimizers:
        opt.step()
    doctor.after_optimizer_step(True)
    return loss
