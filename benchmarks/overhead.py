"""Per-step overhead of the Engine against the training loop a user writes by hand.

Not a CI test: a measurement. Everything runs in one process, with the loops
interleaved in every repetition (so a slow moment of the machine hits all of
them alike), and reports the *marginal* time per optimizer step,

    (T(N2) - T(N1)) / (N2 - N1)

where T(N) is the wall time of a complete run of N steps (building the model,
optimizer, data loading and, for the Engine, the Accelerator). The difference
cancels every one-off setup cost and leaves what each step costs. The median
over the repetitions is reported.

Workloads:

- tiny MLP 32->64->1, batch 64, MSE: overhead-dominated (the loop's own Python
  cost is most of the step);
- medium MLP 784-1024-1024-10, batch 256, cross-entropy: compute-dominated;

each with in-memory tensors (a ``TensorDataset``) and with a generic map-style
``Dataset`` whose ``__getitem__`` takes one int index. All loops use SGD(lr=0.01)
and shuffle every epoch.

Loops: the raw PyTorch loop (a ``DataLoader`` over the dataset, as people write
it); for tensors also a hand-indexed loop (``x[perm[i:i+b]]``, no DataLoader:
the fastest loop one can write, shown for reference); the Engine with defaults;
the Engine barebones (``progress=False, doctor="off"``, no logging, no
run_dir); a hand-written Accelerate loop; and, when ``lightning`` is
importable, Lightning Fabric and the Lightning Trainer (everything off, and
defaults). Lightning is never a dependency: install it anywhere on the path,
e.g. ``pip install --target /tmp/lightning_pkgs lightning`` and run with
``PYTHONPATH=/tmp/lightning_pkgs``.

Also measured: the cost of the engine's one per-step host read (the NaN guard +
stop flags), the peak RSS of an Engine run against the raw loop on the medium
model (each in a fresh process), and the wall time of ``import framework``
against ``import torch`` (fresh processes).

Run it from the repository root (a few minutes; ``--quick`` for a smoke run)::

    .venv/bin/python benchmarks/overhead.py
    PYTHONPATH=/tmp/lightning_pkgs .venv/bin/python benchmarks/overhead.py   # with Lightning rows

On a busy machine, ``--threads 1 --clock cpu`` measures this process's CPU time
instead of wall time, which other processes disturb far less (``--note`` adds a
line saying so to the results). The tables are printed and written to
``benchmarks/results.md`` (``--out``), with the command that produced them and a
summary of the issue's targets.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from framework import Engine, LoopModule  # noqa: E402

LR = 0.01


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]  # layer widths: in, hidden..., out
    batch: int
    classes: bool  # cross-entropy over sizes[-1] classes, else MSE regression
    items: int  # dataset size (a whole number of batches: every epoch is full batches)
    n1: int
    n2: int


def make_net(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def loss_fn(w: Workload) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.cross_entropy if w.classes else F.mse_loss


class Net(LoopModule):
    """The same network for every loop; as a LoopModule for the Engine."""

    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.net = make_net(w.sizes)
        self._loss = loss_fn(w)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(outputs, targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class MapDataset(Dataset):
    """A generic map-style dataset: one int index in, one (x, y) sample out, no __getitems__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_data(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w.items, w.sizes[0], generator=g)
    if w.classes:
        y = torch.randint(0, w.sizes[-1], (w.items,), generator=g)
    else:
        y = torch.randn(w.items, w.sizes[-1], generator=g)
    return x, y


def dataset(kind: str, x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return TensorDataset(x, y) if kind == "tensor" else MapDataset(x, y)


def fresh_model(w: Workload) -> Net:
    torch.manual_seed(0)
    return Net(w)


# ----------------------------------------------------------------------------- the loops
# Each runner does a complete run of n optimizer steps, setup included.


def run_raw(w: Workload, ds: Dataset, n: int) -> None:
    """The loop a user writes: a shuffling DataLoader, then the five steps."""
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(ds, batch_size=w.batch, shuffle=True)
    model.train()
    step = 0
    while step < n:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = model.compute_loss(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if step == n:
                break


def run_raw_indexed(w: Workload, ds: TensorDataset, n: int) -> None:
    """The fastest hand-written loop over in-memory tensors: one index op per batch, no DataLoader."""
    x_all, y_all = ds.tensors
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    step = 0
    while step < n:
        perm = torch.randperm(len(x_all))
        for i in range(0, len(perm), w.batch):
            idx = perm[i : i + w.batch]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            loss = model.compute_loss(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if step == n:
                break


def run_engine(w: Workload, ds: Dataset, n: int, barebones: bool) -> None:
    kw = dict(progress=False, doctor="off", log_every_n_steps=10**9, run_dir=None) if barebones else {}
    Engine(max_steps=n, batch_size=w.batch, seed=0, **kw).fit(fresh_model(w), ds)


def new_accelerator(**kw: Any) -> Any:
    """A fresh ``Accelerator(**kw)`` (its shared state reset first, so each loop gets its own settings)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(**kw)


def accelerate_steps(accelerator: Any, model: Any, opt: Any, loader: DataLoader[Any], loss_fn: Any, n: int) -> None:
    """``n`` steps of the loop in Accelerate's examples: ``prepare``, then zero_grad, forward, loss,
    ``accelerator.backward``, step (also the GPU benchmark's baseline, benchmarks/gpu.py)."""
    model, opt, loader = accelerator.prepare(model, opt, loader)
    model.train()
    step = 0
    while step < n:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            opt.step()
            step += 1
            if step == n:
                break


def run_accelerate(w: Workload, ds: Dataset, n: int) -> None:
    """A hand-written Accelerate loop, as in Accelerate's examples."""
    accelerator = new_accelerator(cpu=True)
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    accelerate_steps(accelerator, model, opt, DataLoader(ds, batch_size=w.batch, shuffle=True), loss_fn(w), n)


def run_fabric(w: Workload, ds: Dataset, n: int) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(DataLoader(ds, batch_size=w.batch, shuffle=True))
    model.train()
    step = 0
    while step < n:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(w)(model(x), y)
            fabric.backward(loss)
            opt.step()
            step += 1
            if step == n:
                break


def run_trainer(w: Workload, ds: Dataset, n: int, defaults: bool, tmp: str) -> None:
    import lightning.pytorch as pl

    class LitNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = make_net(w.sizes)
            self._loss = loss_fn(w)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return self._loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=LR)

    loader = DataLoader(ds, batch_size=w.batch, shuffle=True)
    if defaults:
        kw = dict(default_root_dir=tmp)
    else:
        kw = dict(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp,
        )
    trainer = pl.Trainer(max_steps=n, accelerator="cpu", devices=1, **kw)
    trainer.fit(LitNet(), loader)


def have_lightning() -> bool:
    """Is lightning importable? (Not imported here: only the Lightning rows import it.)"""
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


# ----------------------------------------------------------------------------- timing


@contextlib.contextmanager
def quiet():
    """Swallow what the loops print (progress lines, Lightning's banners): the table is the output."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        yield


CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time)


def timed(fn: Callable[[], None]) -> float:
    """Seconds ``fn`` takes, quietly; on a GPU, until its queued work is done."""
    gc.collect()
    cuda = torch.cuda.is_available()
    with quiet():
        if cuda:
            torch.cuda.synchronize()
        t = CLOCK()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return CLOCK() - t


def interleaved(
    loops: dict[str, Callable[[int], None]], n1: int, n2: int, reps: int, warmup: int | None = None
) -> dict[str, list[float]]:
    """Marginal seconds per step, (T(n2) - T(n1)) / (n2 - n1), for every loop, one value per repetition;
    loops interleaved, their order rotated each repetition. ``warmup`` steps run first for each loop, so
    first-call costs (lazy imports, allocator growth) stay out of the numbers."""
    names = list(loops)
    if warmup:
        for name in names:
            timed(partial(loops[name], warmup))
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t1, t2 = timed(partial(loops[name], n1)), timed(partial(loops[name], n2))
            out[name].append((t2 - t1) / (n2 - n1))
    return out


def loops_for(w: Workload, kind: str, ds: Dataset, lightning: bool, tmp: str) -> dict[str, Callable[[int], None]]:
    loops: dict[str, Callable[[int], None]] = {"raw PyTorch loop (DataLoader)": lambda n: run_raw(w, ds, n)}
    if kind == "tensor":
        loops["raw loop, hand-indexed tensors (no DataLoader)"] = lambda n: run_raw_indexed(w, ds, n)  # type: ignore[arg-type]
    loops["Engine, defaults"] = lambda n: run_engine(w, ds, n, barebones=False)
    loops["Engine, barebones"] = lambda n: run_engine(w, ds, n, barebones=True)
    loops["hand-written Accelerate loop"] = lambda n: run_accelerate(w, ds, n)
    if lightning:
        loops["Lightning Fabric"] = lambda n: run_fabric(w, ds, n)
        loops["Lightning Trainer, everything off"] = lambda n: run_trainer(w, ds, n, False, tmp)
        loops["Lightning Trainer, defaults"] = lambda n: run_trainer(w, ds, n, True, tmp)
    return loops


def measure(w: Workload, kind: str, reps: int, lightning: bool, tmp: str, only: str | None) -> dict[str, list[float]]:
    """Marginal seconds per step for every loop, one value per repetition; loops interleaved, order rotated."""
    x, y = make_data(w)
    ds = dataset(kind, x, y)
    loops = loops_for(w, kind, ds, lightning, tmp)
    if only:
        loops = {k: v for k, v in loops.items() if k.startswith("raw PyTorch") or only.lower() in k.lower()}
    return interleaved(loops, w.n1, w.n2, reps, warmup=max(2, w.n1 // 4))


def guard_cost(w: Workload, iters: int = 2000) -> dict[str, float]:
    """The engine's per-step NaN guard on this model, op by op, in a tight loop (a lower bound:
    in a real step the caches are cold and the same ops cost more; see guard_in_situ)."""
    from framework.parallel import grads as gradient_ops

    model = fresh_model(w)
    x, y = make_data(w)
    x, y = x[: w.batch], y[: w.batch]
    model.compute_loss(model(x), y).backward()
    loss = model.compute_loss(model(x), y).detach()
    grads = [p.grad for p in model.parameters()]

    def bench(fn: Callable[[], object]) -> float:
        for _ in range(50):
            fn()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters

    check = gradient_ops.NonFiniteCheck()
    flag = check([*grads, loss])
    assert flag is not None
    return {
        "the fused check of the gradients and the loss (grads.NonFiniteCheck)": bench(lambda: check([*grads, loss])),
        "the one host read (.item())": bench(flag.item),
        "instead, a norm per gradient + one stack (the check before the fused one)": bench(
            lambda: torch.stack([*torch._foreach_norm(grads, 2.0), loss])
        ),
        "log steps and clipping only: the total norm (grads.grad_norm)": bench(lambda: gradient_ops.grad_norm(grads)),
    }


@contextlib.contextmanager
def guard_disabled():
    """Benchmark-only: make the engine's NaN guard a no-op (a fixed all-finite flag), to price it in a real step."""
    from framework.parallel import grads as gradient_ops

    real = gradient_ops.NonFiniteCheck.__call__
    finite = torch.zeros(1)
    gradient_ops.NonFiniteCheck.__call__ = lambda self, tensors: finite  # type: ignore[method-assign]
    try:
        yield
    finally:
        gradient_ops.NonFiniteCheck.__call__ = real  # type: ignore[method-assign]


def guard_in_situ(w: Workload, reps: int) -> tuple[float, float]:
    """Marginal µs/step of the barebones Engine with and without its NaN guard (tensor data)."""
    x, y = make_data(w)
    ds = dataset("tensor", x, y)

    def without(n: int) -> None:
        with guard_disabled():
            run_engine(w, ds, n, barebones=True)

    loops = {"with": lambda n: run_engine(w, ds, n, barebones=True), "without": without}
    out = interleaved(loops, w.n1, w.n2, reps)  # (two loops: their order alternates)
    return statistics.median(out["with"]), statistics.median(out["without"])


# ----------------------------------------------------------------------------- fresh processes: RSS and import time

RSS_CHILD = """
import resource, sys
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
x, y = torch.randn(256 * 64, 784), torch.randint(0, 10, (256 * 64,))
ds = TensorDataset(x, y)
net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
steps = {steps}
if {which!r} == "raw":
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    step = 0
    while step < steps:
        for xb, yb in DataLoader(ds, batch_size=256, shuffle=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
            step += 1
            if step == steps:
                break
else:
    import io, contextlib
    from framework import Engine, LoopModule

    class Net(LoopModule):
        def __init__(self):
            super().__init__()
            self.net = net
        def forward(self, inputs):
            return self.net(inputs)
        def compute_loss(self, outputs, targets):
            return F.cross_entropy(outputs, targets)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    kw = dict(progress=False, doctor="off", log_every_n_steps=10**9) if {which!r} == "engine-barebones" else dict()
    with contextlib.redirect_stderr(io.StringIO()):
        Engine(max_steps=steps, batch_size=256, seed=0, **kw).fit(Net(), ds)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm[0] if hwm else -1)
"""


def peak_rss(which: str, steps: int) -> float:
    """Peak RSS in MiB of a fresh process that trains the medium model for ``steps`` steps.

    ``ru_maxrss`` is in KiB on Linux. It keeps the parent's peak across the spawn (Linux carries the
    old address space's high-water mark over exec), so main() measures this before the benchmark
    grows; where /proc/self/status has VmHWM (the child's own peak), that is used instead.
    """
    code = RSS_CHILD.format(root=str(ROOT), which=which, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    maxrss, hwm = (int(v) for v in out.stdout.split()[-2:])
    return (hwm if hwm > 0 else maxrss) / 1024


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


# ----------------------------------------------------------------------------- report

TINY = Workload("tiny MLP 32-64-1, batch 64", (32, 64, 1), 64, False, 64 * 512, 200, 1200)
MEDIUM = Workload("medium MLP 784-1024-1024-10, batch 256", (784, 1024, 1024, 10), 256, True, 256 * 64, 5, 40)


class Report:
    """The lines of results.md, printed as they are written; the targets collected for the last table."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.checks: list[tuple[str, float, float]] = []  # (target, measured, limit)
        self.summary: dict[str, dict[str, float]] = {}  # loop -> column -> ratio vs raw
        self.columns: list[str] = []

    def emit(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: str, rows: list[str]) -> None:
        self.emit(header)
        self.emit("|" + "---|" * (header.count("|") - 1))
        for row in rows:
            self.emit(row)
        self.emit()


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported; >= 3)")
    p.add_argument("--quick", action="store_true", help="short runs, 3 repetitions: a smoke test, not a measurement")
    p.add_argument("--only", default=None, help="run only the loops whose name contains this (plus the raw loop)")
    p.add_argument("--workloads", default="tiny,medium", help="comma-separated subset of tiny,medium")
    p.add_argument("--data", default="tensor,dataset", help="comma-separated subset of tensor,dataset")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or this process's CPU time (steadier on a busy machine; use with --threads 1)",
    )
    p.add_argument("--no-lightning", action="store_true", help="skip Lightning even when it is installed")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--no-import", action="store_true")
    p.add_argument("--note", default="", help="a line for results.md, e.g. how busy the machine was")
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results.md"), help="where to write the table ('' = don't)"
    )
    return p.parse_args()


def _header(args: argparse.Namespace, reps: int, lightning: bool) -> list[str]:
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    lines = [
        "# Overhead benchmark",
        "",
        f"Produced by `{command}` (from the repository root).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s)), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Marginal {'CPU' if args.clock == 'cpu' else 'wall'} time per optimizer step, (T(N2) - T(N1)) / (N2 - N1), "
        f"median of {reps} interleaved repetitions (min-max in brackets).",
        "",
    ]
    if not lightning:
        lines += ["Lightning is not installed here, so its rows are absent.", ""]
    if args.note:
        lines += [args.note, ""]
    return lines


def _targets(key: str, kind: str, ratio: dict[str, float]) -> list[tuple[str, float, float]]:
    """The issue's targets for one workload's table."""
    if "Engine, defaults" not in ratio or "Engine, barebones" not in ratio:
        return []
    if key == "tiny" and kind == "tensor":
        return [("tiny model, tensor data, Engine defaults <= 1.00x raw", ratio["Engine, defaults"], 1.00)]
    if key == "tiny":
        return [
            ("tiny model, generic Dataset, Engine defaults <= 1.10x raw", ratio["Engine, defaults"], 1.10),
            ("tiny model, generic Dataset, Engine barebones <= 1.05x raw", ratio["Engine, barebones"], 1.05),
        ]
    return [(f"medium model, {kind} data, Engine defaults <= 1.02x raw", ratio["Engine, defaults"], 1.02)]


def _loop_tables(
    report: Report, args: argparse.Namespace, workloads: dict[str, Workload], reps: int, lightning: bool
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for key in filter(None, args.workloads.split(",")):
            w = workloads[key]
            for kind in args.data.split(","):
                title = f"{w.name}, {'in-memory tensors (TensorDataset)' if kind == 'tensor' else 'generic map-style Dataset'}"
                print(f"... {title}: N1={w.n1}, N2={w.n2}", file=sys.stderr, flush=True)
                res = measure(w, kind, reps, lightning, tmp, args.only)
                raw = statistics.median(res["raw PyTorch loop (DataLoader)"])
                column = f"{key}, {kind}"
                report.columns.append(column)
                ratio = {name: statistics.median(values) / raw for name, values in res.items()}
                for name, r in ratio.items():
                    report.summary.setdefault(name, {})[column] = r
                report.checks += _targets(key, kind, ratio)
                report.emit(f"### {title}")
                report.emit()
                rows = []
                for name, values in res.items():
                    med = statistics.median(values)
                    rows.append(
                        f"| {name} | {med * 1e6:,.0f} [{min(values) * 1e6:,.0f}-{max(values) * 1e6:,.0f}] | {med / raw:.2f}x |"
                    )
                report.table("| loop | µs/step | vs raw |", rows)


def _guard_section(report: Report, tiny: Workload, reps: int) -> None:
    g = guard_cost(tiny)
    report.emit("### The per-step NaN guard (tiny model)")
    report.emit()
    report.emit("Every step the engine checks that the loss and the gradients are finite with one host read (on CPU")
    report.emit("that read is no device sync). On steps that need no total norm (no clipping, not a log step, one")
    report.emit("process) that check is one fused op, GradScaler's own non-finite check with a scale of exactly 1.")
    report.emit("Its ops in a tight loop, µs per call:")
    report.emit()
    report.table("| part | µs |", [f"| {k} | {v * 1e6:.1f} |" for k, v in g.items()])
    with_guard, without_guard = guard_in_situ(tiny, reps)
    report.emit(
        f"In a real step (Engine barebones, tensor data, median of {reps}): {with_guard * 1e6:,.0f} µs/step with the "
        f"guard, {without_guard * 1e6:,.0f} without: the guard costs {(with_guard - without_guard) * 1e6:,.0f} µs a step."
    )
    report.emit()


def _rss_section(report: Report, rss: dict[str, list[float]], n: int) -> None:
    raw_rss = statistics.median(rss["raw"])
    report.emit(f"### Peak RSS, medium model, tensor data, {n} steps (fresh process each, median of {len(rss['raw'])})")
    report.emit()
    rows = []
    for which, label in (
        ("raw", "raw PyTorch loop"),
        ("engine", "Engine, defaults"),
        ("engine-barebones", "Engine, barebones"),
    ):
        v = statistics.median(rss[which])
        rows.append(f"| {label} | {v:,.0f} | {v / raw_rss:.3f}x |")
    report.table("| run | peak RSS (MiB) | vs raw |", rows)
    report.checks.append(
        ("peak RSS, medium model, Engine defaults <= 1.05x raw", statistics.median(rss["engine"]) / raw_rss, 1.05)
    )


def _import_section(report: Report, quick: bool, lightning: bool) -> None:
    k = 3 if quick else 7
    times: dict[str, list[float]] = {"torch": [], "accelerate": [], "framework": []}
    if lightning:
        times["lightning"] = []
    for _ in range(k):
        for m in times:
            times[m].append(import_time(m))
    base = statistics.median(times["torch"])
    report.emit(f"### Import wall time (fresh process each, median of {k})")
    report.emit()
    rows = [
        f"| `import {m}` | {statistics.median(v) * 1e3:,.0f} | {statistics.median(v) / base:.2f}x |"
        for m, v in times.items()
    ]
    report.table("| import | ms | vs torch |", rows)
    report.checks.append(
        ("`import framework` <= 1.10x `import torch`", statistics.median(times["framework"]) / base, 1.10)
    )


def _closing_tables(report: Report) -> None:
    if report.summary:
        report.emit("### Summary: time per step vs the raw loop")
        report.emit()
        rows = [
            f"| {name} | " + " | ".join(f"{row[c]:.2f}x" if c in row else "" for c in report.columns) + " |"
            for name, row in report.summary.items()
        ]
        report.table("| loop | " + " | ".join(report.columns) + " |", rows)
    if report.checks:
        report.emit("### Targets (issue 9)")
        report.emit()
        rows = [f"| {t} | {v:.2f}x | {'yes' if v <= limit else 'no'} |" for t, v, limit in report.checks]
        report.table("| target | measured | met |", rows)


def main() -> None:
    args = _parse_args()
    reps = 3 if args.quick else max(3, args.reps)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    lightning = not args.no_lightning and have_lightning()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    workloads = {"tiny": TINY, "medium": MEDIUM}
    if args.quick:
        workloads = {
            "tiny": Workload(TINY.name, TINY.sizes, TINY.batch, False, TINY.items, 50, 250),
            "medium": Workload(MEDIUM.name, MEDIUM.sizes, MEDIUM.batch, True, MEDIUM.items, 2, 8),
        }
    report = Report(_header(args, reps, lightning))
    # Long enough for heap growth to show (kept per-step allocations once grew it 1.1-1.3x by step 200).
    n = 20 if args.quick else 200
    rss: dict[str, list[float]] = {"raw": [], "engine": [], "engine-barebones": []}
    if not args.no_rss:  # first, while this process is small (see peak_rss)
        print("... peak RSS", file=sys.stderr, flush=True)
        for _ in range(1 if args.quick else 3):
            for which in rss:
                rss[which].append(peak_rss(which, n))
    _loop_tables(report, args, workloads, reps, lightning)
    _guard_section(report, workloads["tiny"], reps)
    if not args.no_rss:
        _rss_section(report, rss, n)
    if not args.no_import:
        _import_section(report, args.quick, lightning)
    _closing_tables(report)
    if args.out:
        Path(args.out).write_text("\n".join(report.lines).rstrip() + "\n")
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
