"""Input-bound training: does the engine hide the cost of ``__getitem__`` behind the step?

Not a CI test: a measurement (``tests/benchmarks/test_scripts.py`` only checks that it runs).

The workload (issue #21): a map-style Dataset whose ``__getitem__`` costs 0.15 ms per item, a
256-1024-1024-10 MLP, batch 64, cross-entropy, SGD, one torch thread. The item's cost is
``time.sleep`` by default (``--item-cost sleep``): it stands for disk or network reads and for
decoders that release the GIL (PIL, torchvision.io, most numpy), the common case, and the one
a background thread can overlap. ``time.sleep`` overshoots short sleeps by tens of microseconds,
so the requested sleep is calibrated at start-up until a call takes 0.15 ms on average (the
measured cost is printed with the table). ``--item-cost busy`` spins the CPU in Python instead,
holding the GIL: the case a thread cannot overlap and worker processes can (``num_workers``).

Loops, interleaved in every repetition (their order rotated), each a complete run of N steps;
reported is the marginal time per optimizer step, (T(N2) - T(N1)) / (N2 - N1), median over the
repetitions (as ``benchmarks/overhead.py`` does), and ratios:

- compute alone: the same pre-collated batch every step (no data loading at all);
- raw PyTorch loop with a shuffling DataLoader, ``num_workers=0`` and ``num_workers=2``;
- the Engine with its defaults (``prefetch=2``: a background thread) and with ``num_workers=2``.

Targets: Engine defaults <= 0.70x the raw ``num_workers=0`` loop and <= 0.90x the raw
``num_workers=2`` loop. Run from the repository root::

    .venv/bin/python benchmarks/input.py            # writes benchmarks/input_results.md
    .venv/bin/python benchmarks/input.py --quick    # a smoke run, not a measurement
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from overhead import LR, Net, Workload, interleaved  # noqa: E402

from framework import Engine  # noqa: E402

ITEM_COST_S = 0.15e-3
WORKLOAD = Workload("MLP 256-1024-1024-10, batch 64", (256, 1024, 1024, 10), 64, True, 64 * 64, 8, 48)


def calibrated_sleep(target: float, calls: int = 200, rounds: int = 8) -> float:
    """The argument of ``time.sleep`` whose calls take ``target`` seconds on average here (a bisection:
    a short sleep overshoots by a machine-dependent amount, 80-120 us on a busy VM). 0.0 where even
    ``time.sleep(0)`` takes longer than ``target`` (the table then shows the longer cost)."""

    def mean(arg: float) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            time.sleep(arg)
        return (time.perf_counter() - t) / calls

    lo, hi = 0.0, target
    for _ in range(rounds):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return lo


class SlowItems(Dataset):
    """``(x[i], y[i])`` after ``cost`` seconds: a sleep (I/O-like, releases the GIL) or a Python spin (holds it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str, sleep_arg: float) -> None:
        self.x, self.y, self.kind, self.sleep_arg = x, y, kind, sleep_arg

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "sleep":
            time.sleep(self.sleep_arg)
        else:
            end = time.perf_counter() + ITEM_COST_S
            while time.perf_counter() < end:
                pass
        return self.x[i], self.y[i]


def item_cost(ds: SlowItems, n: int = 500) -> float:
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return (time.perf_counter() - t) / n


def fresh_model(w: Workload) -> Net:
    torch.manual_seed(0)
    return Net(w)


def run_compute(w: Workload, ds: SlowItems, n: int) -> None:
    """The step alone: one pre-collated batch, every step."""
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = ds.x[: w.batch].clone(), ds.y[: w.batch].clone()
    model.train()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def run_raw(w: Workload, ds: SlowItems, n: int, workers: int) -> None:
    """The loop a user writes: a shuffling DataLoader, then the five steps."""
    model = fresh_model(w)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(ds, batch_size=w.batch, shuffle=True, num_workers=workers)
    model.train()
    step = 0
    while step < n:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == n:
                break


def run_engine(w: Workload, ds: SlowItems, n: int, **kw: object) -> None:
    Engine(max_steps=n, batch_size=w.batch, seed=0, **kw).fit(fresh_model(w), ds)  # type: ignore[arg-type]


LOOPS = {
    "compute alone (one pre-collated batch)": lambda w, ds, n: run_compute(w, ds, n),
    "raw loop, DataLoader num_workers=0": lambda w, ds, n: run_raw(w, ds, n, 0),
    "raw loop, DataLoader num_workers=2": lambda w, ds, n: run_raw(w, ds, n, 2),
    "Engine, defaults (prefetch thread)": lambda w, ds, n: run_engine(w, ds, n),
    "Engine, num_workers=2": lambda w, ds, n: run_engine(w, ds, n, num_workers=2),
    "Engine, prefetch=0 (no overlap)": lambda w, ds, n: run_engine(w, ds, n, prefetch=0),
}
RAW0, RAW2, ENGINE = (
    "raw loop, DataLoader num_workers=0",
    "raw loop, DataLoader num_workers=2",
    "Engine, defaults (prefetch thread)",
)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny runs, 1 repetition: a smoke test, not a measurement")
    p.add_argument("--item-cost", choices=("sleep", "busy"), default="sleep", help="how an item's 0.15 ms is spent")
    p.add_argument("--no-prefetch-row", action="store_true", help="leave out the Engine prefetch=0 row")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "input_results.md"), help="markdown out ('' = none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    w = WORKLOAD
    reps = 1 if args.quick else max(1, args.reps)
    if args.quick:
        w = Workload(w.name, w.sizes, w.batch, True, w.batch * 4, 1, 3)
    sleep_arg = calibrated_sleep(ITEM_COST_S, calls=20, rounds=4) if args.quick else calibrated_sleep(ITEM_COST_S)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w.items, w.sizes[0], generator=g)
    y = torch.randint(0, w.sizes[-1], (w.items,), generator=g)
    ds = SlowItems(x, y, args.item_cost, sleep_arg)
    cost = item_cost(ds, 100 if args.quick else 500)
    loops = {k: v for k, v in LOOPS.items() if not (args.no_prefetch_row and "prefetch=0" in k)}
    load_before = load()
    print(f"... {w.name}: N1={w.n1}, N2={w.n2}, {reps} repetition(s), item {cost * 1e3:.3f} ms", file=sys.stderr)
    runs = {k: (lambda n, f=f: f(w, ds, n)) for k, f in loops.items()}
    res = interleaved(runs, w.n1, w.n2, reps, warmup=None if args.quick else 2)
    load_after = load()
    med = {k: statistics.median(v) for k, v in res.items()}

    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    lines = [
        "# Input-bound benchmark",
        "",
        f"Produced by `{command}` (from the repository root).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, load average "
        f"{load_before} before and {load_after} after (1, 5, 15 min), torch {torch.__version__} (1 intra-op "
        f"thread), Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. {w.name}, cross-entropy, SGD; "
        f"a map-style Dataset of {w.items} items whose `__getitem__` costs {cost * 1e3:.3f} ms "
        f"({'time.sleep, calibrated: I/O-like, releases the GIL' if args.item_cost == 'sleep' else 'a Python busy-wait: holds the GIL'}). "
        f"Marginal wall time per optimizer step, (T({w.n2}) - T({w.n1})) / {w.n2 - w.n1}, median of {reps} "
        "interleaved repetitions (min-max in brackets).",
        "",
        "| loop | ms/step | vs raw num_workers=0 | vs raw num_workers=2 |",
        "|---|---|---|---|",
    ]
    for name, values in res.items():
        lines.append(
            f"| {name} | {med[name] * 1e3:.1f} [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}] | "
            f"{med[name] / med[RAW0]:.2f}x | {med[name] / med[RAW2]:.2f}x |"
        )
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| Engine defaults <= 0.70x raw num_workers=0 | {med[ENGINE] / med[RAW0]:.2f}x | "
        f"{'yes' if med[ENGINE] / med[RAW0] <= 0.70 else 'no'} |",
        f"| Engine defaults <= 0.90x raw num_workers=2 | {med[ENGINE] / med[RAW2]:.2f}x | "
        f"{'yes' if med[ENGINE] / med[RAW2] <= 0.90 else 'no'} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
