"""Two real processes (accelerate launch, launch/cpu_ddp.yaml): the model FLOPs each process logs are its own,
per optimizer step, at DDP with accumulation, FSDP and TP (within 10% of the analytic count), and each rank
writes its own profiler trace (tests/scripts/observability_run.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, launch
from tests.observability.test_throughput import analytic_flops
from tests.scripts.observability_run import BATCH, SIZES


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_each_process_counts_its_own_flops_per_optimizer_step_at_every_layout(tmp_path):
    launch(ROOT / "tests" / "scripts" / "observability_run.py", str(tmp_path), timeout=240)
    per_process_items = analytic_flops(SIZES, BATCH // 2)  # DDP, FSDP: each process runs half the window's items
    tp_share = analytic_flops(SIZES, BATCH) // 2  # TP: every item, through half of each layer
    for rank in (0, 1):
        counted = json.loads((tmp_path / f"flops-rank{rank}.json").read_text())
        assert counted["ddp"] == pytest.approx(per_process_items, rel=0.10), (rank, counted)
        assert counted["fsdp"] == pytest.approx(per_process_items, rel=0.10), (rank, counted)
        assert counted["tp"] == pytest.approx(tp_share, rel=0.10), (rank, counted)
        for layout in ("ddp", "fsdp", "tp"):  # the record's figures say the same
            assert counted[f"{layout}/tflops_x_step_time"] == pytest.approx(counted[layout])
        trace = json.loads((tmp_path / "ddp" / "profile" / f"rank{rank}.trace.json").read_text())
        names = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}
        assert {"zero_grad", "forward", "loss", "backward", "optimizer_step", "data_wait"} <= names
