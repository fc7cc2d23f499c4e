"""Exported files get the usual file mode (0644 under umask 022; whatever the user's umask gives), not the 0600
that safetensors writes: ``export -o`` and ``export --hf``."""

from __future__ import annotations

import os

import pytest
import torch

from framework import Engine
from framework.checkpoint.weights import save_hf_artifacts
from framework.cli import main as cli
from tests.helpers import TinyClassifier, classification_data


@pytest.fixture
def umask():
    def set_to(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_to
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_a_safetensors_export_gets_the_mode_of_the_users_umask(tmp_path, umask, mask, mode):
    Engine(max_steps=2, batch_size=32, run_dir=str(tmp_path / "run"), progress=False).fit(
        TinyClassifier(), classification_data(64)
    )
    umask(mask)
    assert cli(["export", str(tmp_path / "run"), "-o", str(tmp_path / "model.safetensors")]) == 0
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "run"]  # no probe file left


def test_a_huggingface_export_gets_the_usual_mode_too(tmp_path, umask):
    pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tests.checkpoint.test_export import Wrapped

    torch.manual_seed(0)
    module = Wrapped()
    run_dir = tmp_path / "run"
    save_hf_artifacts(run_dir, module.lm, prefix="lm.")
    x = torch.randint(0, 40, (32, 12))
    Engine(max_steps=2, batch_size=16, run_dir=str(run_dir), progress=False).fit(
        module, [{"input_ids": r, "labels": r} for r in x]
    )
    assert cli(["export", str(run_dir), "--hf", str(tmp_path / "out")]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
