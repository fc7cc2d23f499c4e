"""``Engine(profile_steps=..., profile_memory=...)`` (framework/observability/profiler.py): the trace file exists,
parses as JSON and holds the five steps' ranges, data_wait, validation and checkpoint in the steps asked for;
the table on rank 0; ranges out of reach or reversed refused with the fix; off, it is not subscribed. The
CUDA memory snapshot and the out-of-memory dump run where a GPU is (``-m cuda``)."""

from __future__ import annotations

import json
import pickle
import re
from typing import Any

import pytest
import torch

from framework import Engine
from framework.observability.profiler import RANGES, Profiler
from tests.helpers import TinyClassifier, classification_data, fit_tiny


def trace_events(path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["traceEvents"]


def annotations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ranges the framework and torch.profiler opened on the host (Chrome trace "complete" events)."""
    return [e for e in events if e.get("cat") == "user_annotation" and e.get("ph") == "X"]


def test_the_trace_holds_every_named_range_inside_the_profiled_steps_and_the_table_is_printed(tmp_path, capsys):
    # 200 items, batch 50: 4 steps an epoch; validation and a checkpoint after every 2nd step.
    fit_tiny(
        tmp_path, max_epochs=2, micro_batch_size=25, profile_steps=(3, 6), val_every_n_steps=2,
        checkpoint_every_n_steps=2,
    )  # fmt: skip
    path = tmp_path / "profile" / "rank0.trace.json"
    events = trace_events(path)  # (it parses: the Chrome trace format, what Perfetto opens)
    ranges = annotations(events)
    names = {e["name"] for e in ranges}
    assert set(RANGES) <= names, set(RANGES) - names
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == [
        "ProfilerStep#3",
        "ProfilerStep#4",
        "ProfilerStep#5",
    ]
    count = {name: sum(e["name"] == name for e in ranges) for name in RANGES}
    assert count["zero_grad"] == count["optimizer_step"] == 3  # steps 3, 4, 5 and no other
    assert count["forward"] == count["loss"] == count["backward"] == 6  # two micro-batches each
    assert count["validation"] == 1 and count["checkpoint"] == 1  # after step 4 (the 4th of the fit's steps)
    # The five steps lie inside their ProfilerStep, in the canonical order.
    step4 = next(e for e in ranges if e["name"] == "ProfilerStep#4")
    inside = sorted(
        (e for e in ranges if e["name"] in RANGES and step4["ts"] <= e["ts"] < step4["ts"] + step4["dur"]),
        key=lambda e: e["ts"],
    )
    assert [e["name"] for e in inside if e["name"] != "data_wait"] == [
        "validation", "checkpoint", "zero_grad", "forward", "loss", "backward", "forward", "loss", "backward",
        "optimizer_step",
    ]  # fmt: skip
    err = capsys.readouterr().err
    assert f"profile of optimizer steps 3..5, rank 0: {path}" in err
    table = err[err.index("profile of optimizer steps") :]
    assert re.search(r"\nforward\s+6\s", table) and "top ops (self CPU time)" in table and "aten::" in table


def test_off_by_default_the_profiler_is_not_subscribed(tmp_path):
    engine, _ = fit_tiny(tmp_path)
    assert not any(isinstance(s, Profiler) for s in engine.events.subscribers)
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize(
    "steps,fix",
    [
        ((5, 3), "profile_steps=(3, 5)"),
        ((3, 3), "profile_steps=(3, 4)"),
        ((-1, 3), "profile_steps=(0, 3)"),
        ((3,), "profile_steps=(3, 5)"),
        ("3:5", "profile_steps=(3, 5)"),
        ((1.0, 3), "profile_steps=(3, 5)"),
    ],
)
def test_a_reversed_or_malformed_range_is_refused_with_the_fix(steps, fix, tmp_path):
    with pytest.raises(ValueError, match=re.escape(fix)):
        Engine(max_steps=10, run_dir=str(tmp_path), profile_steps=steps)


def test_a_range_past_the_end_of_the_fit_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=re.escape("reaches past max_steps=10") + r".*profile_steps=\(7, 10\)"):
        Engine(max_steps=10, run_dir=str(tmp_path), profile_steps=(8, 11))
    with pytest.raises(ValueError, match=r"writes to RUN_DIR/profile/; pass Engine\(run_dir=\.\.\.\)"):
        Engine(max_steps=10, profile_steps=(1, 3))
    # By epochs: 2 epochs of 4 steps end at step 8, known once the fit sees its data.
    with pytest.raises(ValueError, match=re.escape("reaches past step 8, where this fit ends") + r".*\(5, 8\)"):
        fit_tiny(tmp_path / "a", profile_steps=(6, 9))
    assert not (tmp_path / "a" / "profile").exists()
    # The run dir is still fresh: the corrected run starts there.
    fit_tiny(tmp_path / "a", profile_steps=(5, 8))
    assert (tmp_path / "a" / "profile" / "rank0.trace.json").is_file()


def test_a_range_before_the_step_a_resumed_fit_starts_at_is_refused(tmp_path):
    fit_tiny(tmp_path)  # 8 steps, checkpoints at 4 and 8
    with pytest.raises(ValueError, match=r"starts before step 8, where this fit resumes.*profile_steps=\(8, 10\)"):
        fit_tiny(tmp_path, max_epochs=3, resume="auto", profile_steps=(2, 4))


def test_profile_memory_on_cpu_adds_memory_to_the_profile_and_without_steps_is_refused(tmp_path):
    fit_tiny(tmp_path / "a", profile_steps=(1, 2), profile_memory=True)
    events = trace_events(tmp_path / "a" / "profile" / "rank0.trace.json")
    assert any(e.get("name") == "[memory]" for e in events)
    with pytest.raises(ValueError, match=r"this fit runs on cpu: pass profile_steps=\(start, stop\) too"):
        fit_tiny(tmp_path / "b", profile_memory=True)


# ---------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_profile_memory_writes_a_snapshot_the_memory_viz_opens(tmp_path):
    engine, _ = fit_tiny(tmp_path, profile_steps=(1, 3), profile_memory=True)
    assert engine._rt is not None and engine._rt.device.type == "cuda"
    snapshot = pickle.loads((tmp_path / "profile" / "rank0.memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]  # (what pytorch.org/memory_viz reads)
    names = {e["name"] for e in annotations(trace_events(tmp_path / "profile" / "rank0.trace.json"))}
    assert set(RANGES) - {"validation", "checkpoint"} <= names
    assert engine.metrics["train/memory_mb"] > 0


class Greedy(TinyClassifier):
    """Asks for more memory than any GPU has at its third forward."""

    calls = 0

    def forward(self, inputs):
        self.calls += 1
        if self.calls == 3:
            torch.empty(2**50, dtype=torch.uint8, device=inputs.device)  # 1 PiB
        return super().forward(inputs)


@pytest.mark.cuda
@cuda
def test_cuda_out_of_memory_dumps_the_memory_history_before_the_error_propagates(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        fit_tiny(tmp_path, module=Greedy(), profile_memory=True)
    snapshot = pickle.loads((tmp_path / "profile" / "rank0.oom.pickle").read_bytes())
    assert snapshot["device_traces"]


@pytest.mark.cuda
@cuda
def test_cuda_memory_mb_is_the_peak_allocated_since_the_last_record():
    x, y = classification_data(256)
    engine = Engine(max_steps=4, batch_size=64, log_every_n_steps=2, progress=False)
    engine.fit(TinyClassifier(), (x, y))
    assert engine._rt is not None and engine._rt.device.type == "cuda"
    # A tiny model: its peak is parameters, gradients, optimizer state and a batch's activations, well under 64 MiB.
    assert 0 < engine.metrics["train/memory_mb"] < 64
