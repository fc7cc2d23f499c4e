"""Runs the adder recipe's default config and records its exact match and wall time.

    python benchmarks/adder.py                                  # launch/cpu.yaml, the target's setting
    python benchmarks/adder.py --launch launch/cpu_ddp.yaml     # or any other launch config
    python benchmarks/adder.py -- --micro-batch-size 64         # extra recipe flags after --

Not a CI test: one full training run (about 4 minutes on 2 quiet CPU cores). It times the
whole `accelerate launch --config_file launch/cpu.yaml recipes/adder.py` command, as a user
would (start-up, data generation, training, final validation), reads the final
``val/exact_match`` from the recipe's summary, the first step at which the per-epoch
validation reached 0.99 from ``metrics.jsonl``, and appends a row to
``benchmarks/adder_results.md`` with the hardware, the load average before and after (other
work on the machine slows the run down) and whether the target (>= 0.99 within 300 s) held.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "adder_results.md"
HEADER = (
    "# recipes/adder.py: measured runs\n\n"
    "Written by `python benchmarks/adder.py` (one row per run). Target: val/exact_match >= 0.99 on the\n"
    "2,000 held-out problems within 300 s on 2 CPU cores, under `accelerate launch --config_file\n"
    "launch/cpu.yaml recipes/adder.py`. *load before/after* is the 1-minute load average: above the core\n"
    "count, other processes were competing for the CPU and the wall time is pessimistic.\n\n"
    "| date (UTC) | launch | extra flags | exact match | token acc | steps | first step >= 0.99 | wall (s) | target | hardware | load before/after |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} x {cpu}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", default="launch/cpu.yaml", help="accelerate config file (default: launch/cpu.yaml)")
    parser.add_argument("--run-dir", default="runs/bench-adder", help="the recipe's run dir (emptied first)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the run is killed")
    parser.add_argument("extra", nargs="*", help="recipe flags, after --")
    args = parser.parse_args()

    run_dir = ROOT / args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no resume, no appended metrics
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", args.launch, "recipes/adder.py", "--run-dir", str(run_dir),
           "--progress", "false", *args.extra]  # fmt: skip
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - t0
    load_after = os.getloadavg()[0]
    sys.stderr.write(proc.stderr[-3000:])
    print(proc.stdout)
    if proc.returncode != 0:
        print(f"adder run failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode

    summary = re.search(r"val/exact_match=([\d.]+) val/token_acc=([\d.]+).*steps=(\d+)", proc.stdout)
    assert summary, "no summary line in the recipe's output"
    exact, token_acc, steps = float(summary[1]), float(summary[2]), int(summary[3])
    first = next(
        (r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
         if r.get("val/exact_match", 0) >= 0.99),
        None,
    )  # fmt: skip
    ok = exact >= 0.99 and wall <= 300
    row = (
        f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} | `{args.launch}` | "
        f"`{' '.join(args.extra) or '-'}` | {exact:.4f} | {token_acc:.4f} | {steps} | {first or '-'} | "
        f"{wall:.0f} | {'met' if ok else 'missed'} | {hardware()} | {load_before:.1f} / {load_after:.1f} |\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as f:
        f.write(row)
    print(f"exact match {exact:.4f} in {wall:.0f} s (target {'met' if ok else 'missed'}); recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
