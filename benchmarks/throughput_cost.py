"""What throughput logging (``Engine(throughput=True)``, the default) costs per step: the Engine on the tiny MLP
of benchmarks/overhead.py, with it on and off, interleaved in one process (so a busy moment of the machine hits
both alike), marginal time per step, this process's CPU time (steadier on a shared machine), one thread.

    .venv/bin/python benchmarks/throughput_cost.py            # --reps 7 (default)

Off log steps the subscriber only reads the clock (a few calls of a handler that returns at once); the first
step runs under FlopCounterMode, a one-off that the marginal time leaves out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import overhead

from framework import Engine

BAREBONES: dict[str, Any] = dict(progress=False, doctor="off", log_every_n_steps=10**9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    overhead.CLOCK = time.process_time
    w = overhead.TINY
    x, y = overhead.make_data(w)
    print("| data | loop | throughput on, µs/step | off, µs/step | on - off |\n|---|---|---|---|---|")
    for kind in ("tensor", "dataset"):
        ds = overhead.dataset(kind, x, y)
        for name, kw in (("Engine, defaults", {}), ("Engine, barebones", BAREBONES)):

            def run(n: int, throughput: bool, kw: dict[str, Any] = kw, ds: Any = ds) -> None:
                Engine(max_steps=n, batch_size=w.batch, seed=0, throughput=throughput, **kw).fit(
                    overhead.fresh_model(w), ds
                )

            loops = {"on": lambda n, run=run: run(n, True), "off": lambda n, run=run: run(n, False)}
            out = {k: statistics.median(v) * 1e6 for k, v in overhead.interleaved(loops, w.n1, w.n2, args.reps).items()}
            print(
                f"| {kind} | {name} | {out['on']:.0f} | {out['off']:.0f} | {out['on'] - out['off']:+.0f} |", flush=True
            )


if __name__ == "__main__":
    main()
