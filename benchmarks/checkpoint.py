"""What a checkpoint costs: the engine's complete checkpoint against a durable ``torch.save``, and
the training thread's stall with ``checkpoint_async=True``.

Not a CI test: a measurement. A ~100 MB model (six 2048x2048 linear layers, fp32) is trained for
one step with AdamW, so the state is 100 MB of weights and 200 MB of optimizer moments. Then,
interleaved in one process, several times each:

- ``torch.save`` of ``{"model": ..., "optimizer": ...}`` state dicts: what a hand-written loop does
  (no fsync: the data may still sit in the page cache when it returns), for reference;
- **durable torch.save** (the baseline): the same, flushed and fsync'ed, and its directory entry
  fsync'ed (what it takes for the file to survive a power cut);
- **engine, sync**: ``Fit.save``, everything ``Engine`` does at a checkpoint: model,
  optimizer state and RNG states as safetensors + JSON (no pickle), every file SHA-256 hashed while
  it is written and fsync'ed, ``manifest.json`` and ``SHA256SUMS``, an atomic rename, ``latest``;
- **engine, async stall**: the same with ``checkpoint_async=True``: the time the training thread is
  blocked (copying the state into reused host buffers); the write then runs in the background
  (its total time is reported too; each repetition waits for it before the next one starts).

Targets: engine sync <= 1.25x durable torch.save; async stall <= 0.25x engine sync. The median of
each is reported.

Run it (from the repository root)::

    .venv/bin/python benchmarks/checkpoint.py                  # 5 repetitions
    .venv/bin/python benchmarks/checkpoint.py --reps 9 --dir /scratch   # on another disk
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from framework import Engine, LoopModule, checkpoint  # noqa: E402

TARGET_SYNC, TARGET_STALL = 1.25, 0.25


class Big(LoopModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    module = Big(args.width, args.layers)
    x = torch.randn(8, args.width)
    engine = Engine(max_steps=1, batch_size=8, progress=False, doctor="off")
    with contextlib.redirect_stderr(io.StringIO()):
        engine.fit(module, (x, x.clone()))
    fit = engine._fit
    assert fit is not None
    opt = fit.optimizers.first.optimizer
    model_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20
    opt_mb = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()) / 2**20
    saver = checkpoint.AsyncCheckpointer()
    background: list[float] = []

    def plain(path: Path) -> None:
        torch.save({"model": module.state_dict(), "optimizer": opt.state_dict()}, path)

    def durable(path: Path) -> None:
        with open(path, "wb") as f:
            torch.save({"model": module.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(path.parent)

    def engine_sync(path: Path) -> None:
        fit.saver = None
        fit.save(path.parent, path.name, None, prune=False)

    def engine_async(path: Path) -> None:
        fit.saver = saver  # (Engine(checkpoint_async=True)'s saver: the state copied now, written in a thread)
        fit.save(path.parent, path.name, None, prune=False)

    runs: dict[str, Callable[[Path], None]] = {
        "torch.save (no fsync)": plain,
        "durable torch.save (fsync)": durable,
        "engine, sync": engine_sync,
        "engine, async: stall": engine_async,
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for r in range(args.reps + 1):  # the first round warms up (page cache, allocator, lazy imports, buffers)
            order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
            for name in order:
                target = root / f"rep-{r}"
                t = time.perf_counter()
                runs[name](target.with_suffix(".pt") if "torch.save" in name else target)
                elapsed = time.perf_counter() - t
                if "async" in name:
                    saver.wait()  # (not part of the stall: the training thread would be training meanwhile)
                    if r:
                        background.append(time.perf_counter() - t)
                if r:
                    times[name].append(elapsed)
                for leftover in root.iterdir():  # keep the disk (and page cache) from filling up
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    med = {k: statistics.median(v) for k, v in times.items()}
    base, sync = med["durable torch.save (fsync)"], med["engine, sync"]
    load = os.getloadavg()
    lines = [
        f"state: model {model_mb:.0f} MiB + AdamW {opt_mb:.0f} MiB; median of {args.reps} interleaved repetitions; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}",
        "",
        "| save | s (median [min-max]) | vs durable torch.save | vs engine sync |",
        "|---|---|---|---|",
    ]
    for name, v in times.items():
        lines.append(f"| {name} | {med[name]:.3f} [{min(v):.3f}-{max(v):.3f}] | {med[name] / base:.2f}x | "
                     f"{med[name] / sync:.2f}x |")  # fmt: skip
    lines.append(f"| (engine, async: the background write, total) | {statistics.median(background):.3f} | "
                 f"{statistics.median(background) / base:.2f}x | {statistics.median(background) / sync:.2f}x |")  # fmt: skip
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| engine sync <= {TARGET_SYNC:.2f}x durable torch.save | {sync / base:.2f}x | "
        f"{'yes' if sync / base <= TARGET_SYNC else 'no'} |",
        f"| async stall <= {TARGET_STALL:.2f}x engine sync | {med['engine, async: stall'] / sync:.2f}x | "
        f"{'yes' if med['engine, async: stall'] / sync <= TARGET_STALL else 'no'} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
