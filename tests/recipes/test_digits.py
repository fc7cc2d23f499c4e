"""recipes/digits.py: docstring, config, smoke runs in-process and under accelerate launch, target accuracy."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import ROOT, launch
from tests.recipes import launch_commands, load_recipe

digits = load_recipe("digits")


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_docstring_begins_with_its_launch_commands():
    first = launch_commands(digits.__doc__)
    assert first[0].startswith("python recipes/digits.py")
    text = "\n".join(first)
    for cmd in (
        "accelerate launch --config_file launch/cpu.yaml recipes/digits.py",
        "accelerate launch --config_file launch/cpu_ddp.yaml recipes/digits.py",
        "--smoke",
    ):
        assert cmd in text


def test_split_is_fixed_disjoint_and_standardized():
    a, b = digits.load_splits(0), digits.load_splits(0)
    sizes = {k: len(v[0]) for k, v in a.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360} and sum(sizes.values()) == 1797
    for k in a:
        assert (a[k][0] == b[k][0]).all() and (a[k][1] == b[k][1]).all()  # the same split every run
    mean = a["train"][0].mean(0)
    assert mean.abs().max() < 1e-5  # standardized with the training statistics


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_smoke_in_process(tmp_path, capsys, model):
    run_dir = tmp_path / "run"
    result = digits.main(["--smoke", "--model", model, "--run-dir", str(run_dir), "--progress", "false"])
    out = capsys.readouterr().out
    assert f"digits/{model}: val/acc=" in out and "test/acc=" in out
    assert str(run_dir) in out and "metrics.jsonl" in out  # it says where its outputs went
    assert 0.0 <= result["test/acc"] <= 1.0
    vals = [r for r in _records(run_dir) if "val/acc" in r]
    assert len(vals) == 2  # smoke: 2 epochs, validated at each end
    saved = yaml.safe_load((run_dir / "recipe_config.yaml").read_text())
    assert saved["model"] == model and saved["smoke"] is True
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["module"] == "Classifier"


def test_running_again_starts_a_new_run_dir_and_never_writes_into_another_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run dir is relative: runs/digits-mlp
    smoke = ["--smoke", "--progress", "false"]
    digits.main(smoke)
    digits.main(smoke)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits-mlp", "digits-mlp-2"]
    second = yaml.safe_load((tmp_path / "runs" / "digits-mlp-2" / "recipe_config.yaml").read_text())
    assert second["run_dir"] == "runs/digits-mlp-2"  # the dir actually used
    first = tmp_path / "runs" / "digits-mlp"
    before = (first / "recipe_config.yaml").read_text(), (first / "metrics.jsonl").read_text()
    # Naming that dir again without --resume starts a run beside it, by the Engine's rule: nothing is written there.
    capsys.readouterr()
    digits.main([*smoke, "--run-dir", str(first), "--lr", "0.5"])
    assert ((first / "recipe_config.yaml").read_text(), (first / "metrics.jsonl").read_text()) == before
    assert f"outputs: {first}-3 " in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "runs" / "digits-mlp-3" / "recipe_config.yaml").read_text())["lr"] == 0.5
    # ... and --resume auto continues the newest run (it had finished: nothing more to train).
    result = digits.main([*smoke, "--run-dir", str(first), "--lr", "0.5", "--resume", "auto"])
    assert 0.0 <= result["test/acc"] <= 1.0 and f"outputs: {first}-3 " in capsys.readouterr().out


def test_yaml_config_and_overrides(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: cnn\nhidden: 32\nlr: 0.5\n")
    run_dir = tmp_path / "run"
    digits.main(
        ["--config", str(cfg_file), "--lr", "0.01", "--smoke", "--run-dir", str(run_dir), "--progress", "false"]
    )
    saved = yaml.safe_load((run_dir / "recipe_config.yaml").read_text())
    assert (saved["model"], saved["hidden"], saved["lr"]) == ("cnn", 32, 0.01)  # the flag beats the file


def test_mlp_default_reaches_the_target_accuracy(tmp_path, capsys):
    # The default config, without the wall-clock bound so the outcome is the same on a busy machine.
    result = digits.main(["--run-dir", str(tmp_path / "run"), "--progress", "false", "--max-time", "none"])
    assert result["val/acc"] >= 0.97


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "config, extra", [("launch/cpu.yaml", ()), ("launch/cpu_ddp.yaml", ("--micro-batch-size", "16"))]
)
def test_smoke_under_accelerate_launch(tmp_path, config, extra):
    run_dir = tmp_path / "run"
    proc = launch(ROOT / "recipes/digits.py", "--smoke", "--run-dir", str(run_dir), *extra, config=config)
    assert proc.stdout.count("digits/mlp: val/acc=") == 1, proc.stdout  # only rank 0 prints the summary
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    world = 2 if "ddp" in config else 1
    assert resolved["world_size"] == world and resolved["global_batch"] == 64
    assert resolved["accumulation"] == (2 if extra else 1)
    assert any("val/acc" in r for r in _records(run_dir))
