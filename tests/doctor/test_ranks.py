"""framework/doctor verdicts that must agree across ranks, under 2 real CPU processes (gloo):
the initial-weights check, and FSDP2's shard-local parameter checks (see tests/scripts/doctor_ranks.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, launch

SCRIPT = ROOT / "tests" / "scripts" / "doctor_ranks.py"


@pytest.mark.multiprocess
def test_verdicts_agree_across_two_ranks(tmp_path):
    proc = launch(SCRIPT, tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # every rank records the same findings

    (finding,) = ranks[0]["weights_differ"]
    assert finding[0] == "initial_weights"
    assert finding[1].startswith(
        "1 of 2 processes start Net from weights that differ from rank 0's, in 4 parameter(s)/buffer(s): body.weight, body.bias, head.weight, head.bias"
    )
    assert (
        "Fix: call framework.seed_everything(seed), with the same seed on every rank, before building the model"
        in finding[1]
    )
    # ... and rank 0 alone printed it.
    assert (proc.stdout + proc.stderr).count("LoopWarning: 1 of 2 processes start Net") == 1
    assert ranks[0]["weights_same"] == []

    # Rank 1 holds empty shards of the 1-row head: not evidence that it did not change.
    shards = [json.loads((tmp_path / f"shards{r}.json").read_text()) for r in (0, 1)]
    assert shards == [{"weight": 4, "bias": 1}, {"weight": 0, "bias": 0}]
    assert ranks[0]["fsdp_clean"] == []
    (finding,) = ranks[0]["fsdp_zero_lr"]
    assert finding[0] == "updates" and "param group 1 has lr=0: head.weight, head.bias" in finding[1]
    (finding,) = ranks[0]["fsdp_unused"]
    assert finding[0] == "gradients" and "received no gradient: spare.weight, spare.bias" in finding[1]
