"""benchmarks/: the scripts still run against the current framework and write their tables (smoke
runs with tiny settings; the numbers themselves are measured by running the scripts, not here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def run(script: str, *args: str, timeout: float = 240) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def target_met(text: str, target: str) -> bool:
    """The row ``| <target> | <ratio>x | yes/no |`` of a results table, whose ``<target>`` reads
    ``... <= <limit>x ...``; asserts that its verdict is the comparison of its ratio with its limit (a script that
    printed "yes" for a missed target fails here), and returns it."""
    row = re.search(rf"\| {re.escape(target)} \| (-?\d+\.\d+)x \| (yes|no) \|", text)
    assert row, (target, text)
    limit = float(re.search(r"<= (\d+\.\d+)x", target).group(1))  # type: ignore[union-attr]
    ratio, verdict = float(row.group(1)), row.group(2)
    assert (verdict == "yes") == (ratio <= limit), (target, ratio, verdict)
    return verdict == "yes"


def ratios(text: str, row: str) -> list[float]:
    """The 'N.NNx' ratios in the table rows that start with ``| row |``."""
    lines = [line for line in text.splitlines() if line.startswith(f"| {row} |")]
    assert lines, f"no row {row!r} in:\n{text}"
    return [float(x) for line in lines for x in re.findall(r"(\d+\.\d+)x", line)]


def test_overhead_writes_its_tables_and_checks_its_targets(tmp_path):
    out = tmp_path / "results.md"
    run(
        "overhead.py",
        *("--quick", "--no-lightning", "--no-rss", "--no-import", "--workloads", "tiny", "--data", "tensor"),
        *("--out", str(out)),
    )
    text = out.read_text()
    for row in (
        "raw PyTorch loop (DataLoader)",
        "Engine, defaults",
        "Engine, barebones",
        "hand-written Accelerate loop",
    ):
        assert all(r > 0 for r in ratios(text, row))
    assert re.search(r"In a real step .*: [\d,]+ µs/step with the guard, [\d,]+ without", text)
    target_met(text, "tiny model, tensor data, Engine defaults <= 1.00x raw")


def test_gpu_benchmark_runs_its_loops_on_cpu_when_asked(tmp_path):
    out = tmp_path / "gpu_results.md"
    run("gpu.py", "--quick", "--allow-cpu", "--reps", "1", "--out", str(out))
    text = out.read_text()
    assert text.count("| hand-written Accelerate loop |") == 2  # the MLP and the GPT
    for row in (
        "Engine, defaults (nan_check=auto: deferred on a GPU)",
        'Engine, barebones, nan_check="step" (a sync per step)',
    ):
        assert len(ratios(text, row)) == 2 and all(r > 0 for r in ratios(text, row))


@pytest.mark.multiprocess
def test_fsdp_benchmark_counts_sharded_memory_on_two_processes(tmp_path):
    out = tmp_path / "fsdp_results.md"
    run("fsdp.py", "--quick", "--out", str(out))
    text = out.read_text()
    for rank in (0, 1):  # every parameter and its AdamW state split over 2 ranks: half, exactly (128 | 2)
        assert ratios(text, str(rank))[0] == 0.5
    assert "target: FSDP <= 0.55x DDP per rank (params + optimizer): met" in text


def test_checkpoint_benchmark_reports_both_ratios(tmp_path):
    out = tmp_path / "checkpoint.md"
    run("checkpoint.py", "--width", "64", "--layers", "2", "--reps", "1", "--dir", str(tmp_path), "--out", str(out))
    text = out.read_text()
    for row in ("durable torch.save (fsync)", "engine, sync", "engine, async: stall"):
        assert all(r > 0 for r in ratios(text, row))
    target_met(text, "engine sync <= 1.25x durable torch.save")
    target_met(text, "async stall <= 0.25x engine sync")
    assert not list(tmp_path.glob("tmp*")), "the benchmark removes what it wrote"


def test_input_benchmark_writes_its_table_and_targets(tmp_path):
    out = tmp_path / "input_results.md"
    run("input.py", "--quick", "--no-prefetch-row", "--out", str(out))
    text = out.read_text()
    for row in (
        "compute alone (one pre-collated batch)",
        "raw loop, DataLoader num_workers=0",
        "raw loop, DataLoader num_workers=2",
        "Engine, defaults (prefetch thread)",
        "Engine, num_workers=2",
    ):
        assert len(ratios(text, row)) == 2, row  # (quick runs are too short for the values to mean anything)
    assert re.search(r"whose `__getitem__` costs \d\.\d{3} ms \(time\.sleep", text)
    target_met(text, "Engine defaults <= 0.70x raw num_workers=0")
    target_met(text, "Engine defaults <= 0.90x raw num_workers=2")


def test_memory_benchmark_measures_activation_checkpointing_and_checks_its_target(tmp_path):
    out = tmp_path / "memory.md"
    run("memory.py", "--quick", "--only", "ac", "--out", str(out))
    text = out.read_text()
    assert re.search(r"\| without \| \d+ \| \d+ \|", text) and re.search(
        r"\| activation_checkpointing=True \| \d+", text
    )
    target_met(text, "activation memory with checkpointing <= 0.50x without")
