"""framework.observability.run_info: a fresh run never starts in a run dir that holds another run (its checkpoints
would be pruned first and resume="auto" would pick the other run's), nor in one that a running fit
writes to: it starts beside it (run_dir-2, -3, ...), by one rule for the Engine and the recipes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re

import pytest
import torch

from framework import Engine
from framework.observability.run_info import (
    RunDirInUse,
    earlier_run,
    run_dir_for,
    run_versions,
)
from tests.helpers import ROOT, CrashAt, TinyClassifier, classification_data, launch


def engine(run_dir, **kw) -> Engine:
    return Engine(max_epochs=2, batch_size=50, progress=False, run_dir=str(run_dir), **kw)


def digest(run_dir) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"  # (the lock names its latest holder; it is not run data)
    }


def test_a_fresh_fit_into_a_run_dir_that_holds_a_run_starts_beside_it_and_leaves_it_untouched(tmp_path, capsys):
    data = classification_data(200)
    base = tmp_path / "run"
    first = engine(base, keep_last=1)
    assert first.run_dir == str(base)
    first.fit(TinyClassifier(), data)
    before = digest(base)
    assert any(name.startswith("checkpoints/step-") for name in before)
    assert capsys.readouterr().err.splitlines()[0] == f"run_dir: {base}"  # said, with progress=False

    second = engine(base, keep_last=1)
    assert second.run_dir == f"{base}-2"  # known before fit: a recipe writes its files there
    second.fit(TinyClassifier(), data)
    assert digest(base) == before  # not a byte written there: no checkpoint pruned, no metrics appended
    assert capsys.readouterr().err.splitlines()[0] == (
        f"run_dir: {base}-2 ({base} holds an earlier run; a fresh run starts beside it, never in it)"
    )
    assert earlier_run(f"{base}-2") is not None
    assert engine(base).run_dir == f"{base}-3"

    # resume="auto" continues the newest run, the last fresh one started from this run_dir.
    resumed = engine(base, keep_last=1, resume="auto")
    assert resumed.run_dir == f"{base}-2"
    resumed.fit(TinyClassifier(), data)  # it had finished: it ends at once, at the same step
    assert resumed.step == 8 and resumed.epoch == 2 and digest(base) == before
    assert "(the newest run of" in capsys.readouterr().err


def test_a_run_that_starts_in_the_chosen_dir_before_fit_is_refused_and_nothing_is_written(tmp_path):
    # The dir is chosen when the Engine is built; another run may start there before fit: it is never mixed with.
    data = classification_data(200)
    late = engine(tmp_path / "run")
    engine(tmp_path / "run").fit(TinyClassifier(), data)
    before = digest(tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds an earlier run \(checkpoints up to step-\d+\).*resume='auto'"):
        late.fit(TinyClassifier(), data)
    assert digest(tmp_path / "run") == before


def test_a_metrics_file_alone_marks_an_earlier_run(tmp_path):
    data = classification_data(200)
    engine(tmp_path / "run", checkpoint_every_epoch=False, log_every_n_steps=1).fit(TinyClassifier(), data)
    assert earlier_run(tmp_path / "run") == "a metrics.jsonl"
    assert engine(tmp_path / "run", checkpoint_every_epoch=False).run_dir == str(tmp_path / "run-2")


def test_the_one_rule_counts_versions_past_the_highest_and_resume_auto_takes_the_newest(tmp_path):
    base = str(tmp_path / "runs" / "digits")
    assert run_dir_for(base) == base and run_dir_for(base, "auto") == base  # nothing there: start in base
    for name in ("digits", "digits-2", "digits-7", "digits-9", "digits-02", "digitsx-3", "digits-3-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        if name != "digits-9":  # (a dir without a run is no version that counts)
            (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"step": 1}\n')
    assert [n for n, _ in run_versions(base)] == [1, 2, 7]
    assert run_dir_for(base) == base + "-8"  # never a gap-filler: the newest run is always the highest
    assert run_dir_for(base, "auto") == base + "-7"
    assert run_dir_for(base, str(tmp_path / "ckpt")) == base  # an explicit checkpoint: the dir as given


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


def test_a_fresh_run_dir_counts_up_past_used_dirs(tmp_path):
    base = str(tmp_path / "runs" / "digits-mlp")
    assert run_dir_for(base) == base
    for used in (base, base + "-2"):
        (tmp_path / "runs" / used.rsplit("/", 1)[1]).mkdir(parents=True)
        (tmp_path / "runs" / used.rsplit("/", 1)[1] / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run_dir_for(base) == base + "-3"


def test_a_recipes_run_dir_follows_the_engines_rule_for_explicit_and_default_dirs(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run_dir_for(str(used), resume=None) == f"{used}-2"  # never into another run
    assert run_dir_for(str(used), resume="auto") == str(used)
    base = str(tmp_path / "runs" / "x")
    assert run_dir_for(base, resume=None) == base
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run_dir_for(base, resume=None) == base + "-2"
    assert run_dir_for(base, resume="auto") == base  # resuming goes back to the newest run


def test_a_fit_refuses_a_run_dir_that_a_running_fit_holds_and_writes_nothing(tmp_path):
    # Another process's fit, as the OS sees it: an flock on run_dir/.lock (a separate open file
    # description conflicts even within one process).
    (tmp_path / "run").mkdir()
    holder = os.open(tmp_path / "run" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"the fit of pid 4242 on host node7")
    module = TinyClassifier()
    before = [p.detach().clone() for p in module.parameters()]
    try:
        with pytest.raises(RunDirInUse, match=r"in use by the fit of pid 4242 on host node7.*own run_dir"):
            engine(tmp_path / "run", resume="auto").fit(module, classification_data(100))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    finally:
        os.close(holder)
    engine(tmp_path / "run", max_steps=1, resume="auto").fit(module, classification_data(100))  # released: runs


def test_the_lock_is_released_when_a_fit_raises_so_a_resume_can_follow(tmp_path):
    data = classification_data(200)
    crashing = engine(tmp_path, checkpoint_every_n_steps=2, callbacks=[CrashAt(3)])
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(TinyClassifier(), data)
    resumed = engine(tmp_path, resume="auto")
    resumed.fit(TinyClassifier(), data)  # the same process, a new Engine: the dead fit's lock is gone
    assert resumed.step == 8
    assert "pid" in (tmp_path / ".lock").read_text()  # the file stays, naming its last holder


@pytest.mark.multiprocess
def test_under_two_processes_every_rank_refuses_a_held_run_dir(tmp_path):
    launch(ROOT / "tests" / "scripts" / "run_dir_lock_ddp.py", str(tmp_path), timeout=120)  # (fails, not hangs)
    busy0, busy1 = ((tmp_path / f"busy-rank{r}.txt").read_text() for r in (0, 1))
    assert "in use by the fit of pid 4242 on host node7" in busy0
    assert "the main process could not lock run_dir=" in busy1 and "see its error" in busy1
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]


@pytest.mark.multiprocess
def test_under_two_processes_a_second_run_goes_beside_the_first_on_every_rank(tmp_path):
    import json

    launch(ROOT / "tests" / "scripts" / "run_dir_versions_ddp.py", str(tmp_path), timeout=180)
    ranks = [{a: json.loads((tmp_path / f"rank{r}-{a}.json").read_text()) for a in ("first", "second")} for r in (0, 1)]
    for seen in ranks:
        assert seen["first"] == {"chosen": str(tmp_path / "run"), "used": str(tmp_path / "run")}
        assert seen["second"] == {"chosen": str(tmp_path / "run-2"), "used": str(tmp_path / "run-2")}
    assert not (tmp_path / "elsewhere").exists()  # rank 1's own choice was overruled by rank 0's before anything
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 4]  # the first run's epoch and stop records only: the second wrote into run-2
    assert earlier_run(tmp_path / "run-2") == "checkpoints up to step-00000004"


def test_the_lock_is_released_while_forked_dataloader_workers_live_on(tmp_path):
    # Persistent workers share the lock's open file: closing it alone would leave the run dir locked.
    from torch.utils.data import DataLoader, TensorDataset

    x, y = classification_data(200)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, num_workers=2, persistent_workers=True)
    e = Engine(max_steps=4, progress=False, run_dir=str(tmp_path), checkpoint_every_n_steps=2)
    e.fit(TinyClassifier(), loader)
    e.max_steps = 8
    e.fit(TinyClassifier(), loader)  # the workers from the first fit are still alive
    assert e.step == 8


# ---------------------------------------------------------------- what config.json records


class Grouped(TinyClassifier):
    def configure_optimizers(self):
        first, last = self.net[0], self.net[-1]
        opt = torch.optim.SGD(
            [{"params": first.parameters(), "lr": 0.1, "weight_decay": 1e-4}, {"params": last.parameters()}],
            lr=0.05, momentum=0.9,
        )  # fmt: skip
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def test_config_json_records_the_optimizers_schedulers_callbacks_and_where_the_run_started(tmp_path):
    import json
    import platform
    import sys

    from framework import EarlyStopping

    data = classification_data(200)
    val = (data[0][:64], data[1][:64])
    engine(tmp_path, callbacks=[EarlyStopping(monitor="val/acc", mode="max", patience=5)]).fit(Grouped(), data, val)
    written = json.loads((tmp_path / "config.json").read_text())
    resolved = written["resolved"]
    groups = resolved["optimizer_settings"]["optimizer"]["param_groups"]
    assert resolved["optimizer_settings"]["optimizer"]["class"] == "SGD" and len(groups) == 2
    assert {k: groups[0][k] for k in ("params", "lr", "momentum", "weight_decay")} == {
        "params": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
    }  # fmt: skip
    assert {k: groups[1][k] for k in ("params", "lr", "momentum", "weight_decay")} == {
        "params": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0,
    }  # fmt: skip
    assert resolved["scheduler_settings"]["optimizer"] == {"step_size": 3, "gamma": 0.5, "last_epoch": 0}
    assert resolved["callback_settings"] == [
        {"class": "EarlyStopping", "monitor": "val/acc", "patience": 5, "mode": "max", "min_delta": 0.0}
    ]
    run = written["run"]
    assert run["torch"] == torch.__version__ and run["python"] == platform.python_version()
    assert run["accelerate"] and run["framework"] and run["host"] and run["argv"] == sys.argv
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", run["started"])
    assert run["git"] is None or re.fullmatch(r"[0-9a-f]{40}", run["git"]["commit"])


def test_git_state_names_the_commit_of_the_scripts_checkout_and_never_fails_without_one(tmp_path, monkeypatch):
    import subprocess

    from framework.observability.run_info import git_state

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "train.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True, env={**os.environ, **env})
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == {"commit": head, "dirty": False}
    (repo / "train.py").write_text("print(2)\n")
    git_state.cache_clear()
    assert git_state(repo) == {"commit": head, "dirty": True}
    (tmp_path / "plain").mkdir()
    assert git_state(tmp_path / "plain") is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    git_state.cache_clear()
    assert git_state(repo) is None  # no git at all: no record, no error
