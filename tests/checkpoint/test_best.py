"""The best checkpoint, one call away: ``engine.best_checkpoint``, ``load_weights(..., which="best")`` and
``python -m framework export RUN_DIR --best``, all ranked by monitor/mode as keep_best keeps them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import framework
from framework import Engine
from framework.checkpoint.files import CheckpointError
from framework.cli import main as cli
from tests.helpers import TinyClassifier, classification_data

SCORES = [0.3, 0.9, 0.5, 0.7]  # val/score of the 4 epochs' validations: best 0.9 (max) at epoch 2, 0.3 (min) at 1


class Scored(TinyClassifier):
    """A validation metric the test controls: the k-th validation scores SCORES[k] (one batch per validation)."""

    def __init__(self):
        super().__init__()
        self.validations = 0

    def compute_metrics(self, outputs, targets):
        score = SCORES[self.validations]
        self.validations += 1
        return {"score": torch.full((len(targets),), score)}


def train(run_dir, mode: str = "max", keep_best: int = 1) -> Engine:
    x, y = classification_data(256)
    torch.manual_seed(0)
    engine = Engine(
        max_epochs=4, batch_size=64, keep_last=1, keep_best=keep_best, monitor="val/score", mode=mode,
        run_dir=str(run_dir), progress=False,
    )  # fmt: skip
    engine.fit(Scored(), (x, y), (x[:64], y[:64]))  # 4 steps an epoch
    return engine


def weights_of(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint, "model.safetensors"))


@pytest.mark.parametrize(("mode", "best_step"), [("max", 8), ("min", 4)])
def test_the_best_checkpoint_is_ranked_by_monitor_and_mode_and_one_call_away(tmp_path, mode, best_step):
    engine = train(tmp_path, mode)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == sorted({f"step-{best_step:08d}", "step-00000016"})  # keep_last=1 and keep_best=1
    assert engine.best_checkpoint == str(tmp_path / "checkpoints" / f"step-{best_step:08d}")
    best, latest = weights_of(engine.best_checkpoint), weights_of(tmp_path / "checkpoints" / "step-00000016")
    assert any(not torch.equal(best[k], latest[k]) for k in best)  # (so that picking the wrong one would show)

    loaded = framework.load_weights(TinyClassifier(), tmp_path, which="best").state_dict()
    assert all(torch.equal(loaded[k], best[k]) for k in best)
    newest = framework.load_weights(TinyClassifier(), tmp_path).state_dict()  # which="latest", the default
    assert all(torch.equal(newest[k], latest[k]) for k in latest)

    old = os.umask(0o022)
    try:
        assert cli(["export", str(tmp_path), "-o", str(tmp_path / "best.safetensors"), "--best"]) == 0
    finally:
        os.umask(old)
    exported = load_file(tmp_path / "best.safetensors")
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert (tmp_path / "best.safetensors").stat().st_mode & 0o777 == 0o644  # the usual mode, not 0600


def test_a_run_that_kept_no_best_checkpoint_says_keep_best(tmp_path, capsys):
    engine = train(tmp_path, keep_best=0)
    assert engine.best_checkpoint is None
    with pytest.raises(CheckpointError, match=r"kept no best checkpoint \(keep_best=0\).*Engine\(keep_best=1"):
        framework.load_weights(TinyClassifier(), tmp_path, which="best")
    assert cli(["export", str(tmp_path), "-o", str(tmp_path / "x.safetensors"), "--best"]) == 2
    assert "keep_best=0" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match=r"which='newest'; use 'latest'.*or 'best'"):
        framework.load_weights(TinyClassifier(), tmp_path, which="newest")
    with pytest.raises(CheckpointError, match=r"not a run dir.*pass the run dir"):
        framework.load_weights(TinyClassifier(), tmp_path / "checkpoints" / "step-00000016", which="best")


def test_without_validation_keep_best_has_nothing_to_rank_and_says_so(tmp_path):
    x, y = classification_data(128)
    Engine(max_epochs=1, batch_size=64, keep_best=1, run_dir=str(tmp_path), progress=False).fit(
        TinyClassifier(), (x, y)
    )
    assert json.loads((tmp_path / "config.json").read_text())["keep_best"] == 1
    with pytest.raises(CheckpointError, match=r"none of its checkpoints has a val/loss value yet"):
        framework.load_weights(TinyClassifier(), tmp_path, which="best")
