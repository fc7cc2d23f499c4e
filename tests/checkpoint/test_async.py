"""Engine(checkpoint_async=True): the same checkpoints as synchronous saves, written in the background
from a snapshot; one write in flight; on_checkpoint_save only once a checkpoint is on disk; errors
raised at the next wait or save; preemption waits for the write. (A kill -9 mid-write: see
tests/checkpoint/test_resume.py::test_kill_9_during_a_save_leaves_the_previous_checkpoint_intact.)"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import framework
from framework.checkpoint import AsyncCheckpointer, CheckpointReader, list_checkpoints
from tests.helpers import fit_tiny


class OnDisk(framework.Callback):
    """Records each on_checkpoint_save and checks, right then, that the checkpoint is complete."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def on_checkpoint_save(self, engine, path):
        CheckpointReader(Path(path))  # raises if it is not completely on disk yet
        self.saved.append(Path(path).name)


def _tensor_hashes(run: Path) -> dict[str, dict[str, str]]:
    out = {}
    for found in list_checkpoints(run / "checkpoints"):
        files = CheckpointReader(found.path).files
        out[found.path.name] = {n: e.sha256 for n, e in files.items() if n.endswith(".safetensors")}
    return out


def test_async_checkpoints_are_the_synchronous_ones_and_callbacks_see_them_on_disk(tmp_path):
    kw = dict(max_epochs=3, checkpoint_every_n_steps=3, keep_last=10)
    sync_engine, sync_module = fit_tiny(tmp_path / "sync", **kw)
    on_disk = OnDisk()
    async_engine, async_module = fit_tiny(tmp_path / "async", checkpoint_async=True, callbacks=[on_disk], **kw)
    assert async_engine.step == sync_engine.step == 12
    for a, b in zip(sync_module.parameters(), async_module.parameters(), strict=True):
        assert torch.equal(a, b)
    hashes = _tensor_hashes(tmp_path / "async")
    assert hashes == _tensor_hashes(tmp_path / "sync")  # bitwise the same tensors in every checkpoint
    assert on_disk.saved == sorted(hashes)  # one callback per checkpoint, each after it was complete


def test_a_run_resumed_from_async_checkpoints_is_exact(tmp_path):
    _, straight = fit_tiny(tmp_path / "a", max_epochs=3, checkpoint_every_n_steps=3)
    fit_tiny(tmp_path / "b", max_epochs=3, max_steps=7, checkpoint_every_n_steps=3, checkpoint_async=True)
    engine, resumed = fit_tiny(tmp_path / "b", max_epochs=3, checkpoint_every_n_steps=3, checkpoint_async=True,
                               resume="auto")  # fmt: skip
    assert engine.step == 12
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_snapshot_is_taken_at_the_call_and_one_write_is_in_flight(tmp_path):
    root = tmp_path / "checkpoints"
    saver = AsyncCheckpointer()
    big = torch.ones(8 << 20)  # 32 MB: the background write takes a while
    w = saver.writer(root, "step-00000001")
    w.prepare()
    w.tensors("model.safetensors", {"w": big})
    big.fill_(2.0)  # training goes on and changes the tensor: the checkpoint holds the copy
    w.commit()
    assert w.finalize(keep_last=3) == root / "step-00000001"
    w2 = saver.writer(root, "step-00000002")  # waits for the first write
    assert (root / "step-00000001" / "manifest.json").is_file() and not (root / ".tmp-step-00000001").exists()
    assert torch.equal(CheckpointReader(root / "step-00000001").tensors("model.safetensors")["w"], torch.ones(8 << 20))
    w2.prepare()
    w2.json("state.json", {"step": 2})
    w2.commit()
    w2.finalize(keep_last=3)
    assert saver.wait() == root / "step-00000002"
    assert saver.wait() is None
    with pytest.raises(TypeError, match="complex128"):  # (refused at the call, not later in the background)
        saver.writer(root, "step-00000003").tensors("x.safetensors", {"c": torch.zeros(2, dtype=torch.complex128)})


def test_preemption_waits_for_the_background_write_before_exiting(tmp_path):
    class Preempt(framework.Callback):
        def on_step_end(self, engine, module, metrics):
            if engine.step == 6:
                os.kill(os.getpid(), signal.SIGTERM)  # (the engine's handler: checkpoint, then exit 143)

    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(SystemExit) as info:
        fit_tiny(tmp_path / "run", max_epochs=3, checkpoint_async=True, callbacks=[Preempt()])
    assert info.value.code == 143
    reader = CheckpointReader(tmp_path / "run" / "checkpoints" / "step-00000006")  # complete on exit
    assert reader.json("state.json")["state"]["counters"]["step"] == 6
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_checkpoint_async_is_recorded_in_config_and_checked():
    with pytest.raises(ValueError, match="checkpoint_async='yes'; use True or False"):
        framework.Engine(max_steps=1, checkpoint_async="yes")


def test_config_json_records_checkpoint_async(tmp_path):
    fit_tiny(tmp_path / "run", max_epochs=1, checkpoint_async=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["checkpoint_async"] is True
