"""Checkpoint save time: ``engine.save_checkpoint`` against a plain ``torch.save`` of the same tensors.

Not a CI test: a measurement. A ~100 MB model (six 2048x2048 linear layers, fp32) is trained
for one step with plain SGD (no optimizer state tensors), so the checkpoint's tensors are the
model's 100 MB. Then, interleaved, several times each:

- ``torch.save({"model": ..., "optimizer": ...}, path)``: what a hand-written loop does (no fsync:
  the data may still sit in the page cache when it returns);
- the same followed by ``os.fsync``: the durability the engine pays for;
- ``engine.save_checkpoint(path)``: safetensors + JSON (no pickle), RNG states, every file
  fsync'ed, a manifest, an atomic rename and the ``latest`` pointer.

The median of each is reported, with the engine's ratio to both. Target: <= 1.3x ``torch.save``.

Run it (from the repository root)::

    .venv/bin/python benchmarks/checkpoint.py            # 5 repetitions
    .venv/bin/python benchmarks/checkpoint.py --optimizer adamw --reps 3   # + 200 MB of Adam state
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from framework import Engine, LoopModule  # noqa: E402


class Big(LoopModule):
    def __init__(self, width: int, layers: int, optimizer: str) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        self.optimizer = optimizer

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-4)
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def fsync_tree(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()

    torch.manual_seed(0)
    module = Big(args.width, args.layers, args.optimizer)
    x = torch.randn(8, args.width)
    engine = Engine(max_steps=1, batch_size=8, progress=False, doctor="off")
    with contextlib.redirect_stderr(io.StringIO()):
        engine.fit(module, (x, x.clone()))
    opt = engine._fit.opt.optimizer  # type: ignore[union-attr]
    state_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20
    opt_mb = (
        sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
        / 2**20
    )

    def plain(path: Path) -> None:
        torch.save({"model": module.state_dict(), "optimizer": opt.state_dict()}, path)

    def plain_fsync(path: Path) -> None:
        plain(path)
        fsync_tree(path)

    def framework_save(path: Path) -> None:
        engine.save_checkpoint(path)

    runs = {"torch.save": plain, "torch.save + fsync": plain_fsync, "engine.save_checkpoint": framework_save}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for r in range(args.reps + 1):  # the first round warms up (page cache, allocator, lazy imports)
            order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
            for name in order:
                target = root / f"{name.split()[0].replace('.', '_')}-{r}"
                t = time.perf_counter()
                runs[name](target if name == "engine.save_checkpoint" else target.with_suffix(".pt"))
                elapsed = time.perf_counter() - t
                if r:
                    times[name].append(elapsed)
                for leftover in root.iterdir():  # keep the disk (and page cache) from filling up
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

        # Where the engine's extra time goes: its fsyncs (every file, the directories, the pointer).
        fsyncs: list[float] = []
        real_fsync = os.fsync

        def timed_fsync(fd: int) -> None:
            t = time.perf_counter()
            real_fsync(fd)
            fsyncs.append(time.perf_counter() - t)

        os.fsync = timed_fsync  # type: ignore[assignment]
        try:
            framework_save(root / "fsync-count")
        finally:
            os.fsync = real_fsync  # type: ignore[assignment]

    base = statistics.median(times["torch.save"])
    synced = statistics.median(times["torch.save + fsync"])
    print(f"model state {state_mb:.0f} MiB, optimizer state {opt_mb:.0f} MiB ({args.optimizer}); "
          f"median of {args.reps} interleaved runs, {os.cpu_count()} CPUs, torch {torch.__version__}")  # fmt: skip
    print()
    print("| save | s | vs torch.save | vs torch.save + fsync |")
    print("|---|---|---|---|")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.3f} [{min(v):.3f}-{max(v):.3f}] | {med / base:.2f}x | {med / synced:.2f}x |")
    print()
    print(f"One engine save calls fsync {len(fsyncs)} times ({sum(fsyncs):.3f} s in all, the largest "
          f"{max(fsyncs):.3f} s: the model file).")  # fmt: skip


if __name__ == "__main__":
    main()
