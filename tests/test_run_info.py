"""framework.run_info: a fresh run never starts in a run dir that holds another run (its checkpoints
would be pruned first and resume="auto" would pick the other run's), and recipes default to a new dir."""

from __future__ import annotations

import hashlib

import pytest

from framework import Engine
from framework.run_info import earlier_run, next_free_run_dir, recipe_run_dir

from .helpers import TinyClassifier, classification_data


def engine(run_dir, **kw) -> Engine:
    return Engine(max_epochs=2, batch_size=50, progress=False, run_dir=str(run_dir), **kw)


def digest(run_dir) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def test_a_fresh_fit_refuses_a_run_dir_that_holds_checkpoints_and_leaves_it_untouched(tmp_path):
    data = classification_data(200)
    engine(tmp_path, keep_last=1).fit(TinyClassifier(), data)
    before = digest(tmp_path)
    assert any(name.startswith("checkpoints/step-") for name in before)

    with pytest.raises(ValueError, match=r"already holds an earlier run \(checkpoints up to step-\d+\).*resume='auto'"):
        engine(tmp_path, keep_last=1).fit(TinyClassifier(), data)
    assert digest(tmp_path) == before  # not a byte written: no checkpoint pruned, no metrics appended

    # resume="auto" continues that run instead (here it has finished: it ends at once, at the same step).
    resumed = engine(tmp_path, keep_last=1, resume="auto").fit(TinyClassifier(), data)
    assert resumed.step == 8 and resumed.epoch == 2


def test_a_metrics_file_alone_marks_an_earlier_run(tmp_path):
    data = classification_data(200)
    engine(tmp_path, checkpoint_every_epoch=False, log_every_n_steps=1).fit(TinyClassifier(), data)
    assert earlier_run(tmp_path) == "a metrics.jsonl"
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        engine(tmp_path, checkpoint_every_epoch=False).fit(TinyClassifier(), data)


def test_a_second_fit_of_the_same_engine_continues_its_own_run(tmp_path):
    data = classification_data(200)
    e = Engine(max_steps=4, batch_size=50, progress=False, run_dir=str(tmp_path), checkpoint_every_n_steps=2)
    e.fit(TinyClassifier(), data)
    e.max_steps = 8
    e.fit(TinyClassifier(), data)  # its checkpoints go on from step 4: nothing to mix up
    assert e.step == 8
    assert earlier_run(tmp_path) == "checkpoints up to step-00000008"


def test_an_empty_or_config_only_dir_is_free(tmp_path):
    assert earlier_run(tmp_path / "missing") is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    assert earlier_run(tmp_path) is None
    engine(tmp_path, max_steps=1).fit(TinyClassifier(), classification_data(100))


def test_next_free_run_dir_counts_up_past_used_dirs(tmp_path):
    base = str(tmp_path / "runs" / "digits-mlp")
    assert next_free_run_dir(base) == base
    for used in (base, base + "-2"):
        (tmp_path / "runs" / used.rsplit("/", 1)[1]).mkdir(parents=True)
        (tmp_path / "runs" / used.rsplit("/", 1)[1] / "metrics.jsonl").write_text('{"step": 1}\n')
    assert next_free_run_dir(base) == base + "-3"


def test_recipe_run_dir_refuses_an_explicit_used_dir_unless_resuming(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"already holds an earlier run.*resume='auto'"):
        recipe_run_dir(str(used), "runs/x", resume=None)
    assert recipe_run_dir(str(used), "runs/x", resume="auto") == str(used)
    base = str(tmp_path / "runs" / "x")
    assert recipe_run_dir(None, base, resume=None) == base
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert recipe_run_dir(None, base, resume=None) == base + "-2"
    assert recipe_run_dir(None, base, resume="auto") == base  # resuming goes back to the default dir
