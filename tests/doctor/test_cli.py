"""framework/doctor/cli.py: ``python -m framework doctor RECIPE [args]`` on a recipe-shaped script with one
planted mistake at a time, on a real recipe, and through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from framework.doctor import CHECKS
from framework.doctor.cli import main
from tests.helpers import ROOT

SCRIPT = str(ROOT / "tests" / "scripts" / "doctor_recipe.py")


def doctor(capsys, *args: str) -> tuple[int, dict[str, str], str]:
    """Run the CLI in this process; returns (exit status, {check title: status}, output)."""
    rc = main([SCRIPT, *args])
    out = capsys.readouterr().out
    titles = {title: check for check, (title, _) in CHECKS.items()}
    rows = {}
    for line in out.splitlines():
        status, title = line[:9].strip(), line[10:].strip()  # the table's two columns
        if title in titles:
            rows[titles[title]] = status
    assert len(rows) == len(CHECKS), out  # a row per check
    return rc, rows, out


def test_a_correct_recipe_is_all_ok(capsys):
    env_before, argv_before = {k: v for k, v in os.environ.items() if k.startswith("FRAMEWORK_")}, sys.argv[:]
    rc, rows, out = doctor(capsys, "--bug", "none")
    assert rc == 0
    assert set(rows.values()) == {"ok"}, out  # every check ran, including validation and the sum probe
    assert "steps 3 val" in out  # the recipe's max_steps=10_000 was capped to 3
    assert "outcome: the recipe ran to the end" in out and f"{len(CHECKS)} ok, 0 warning, 0 error, 0 not run" in out
    env_after = {k: v for k, v in os.environ.items() if k.startswith("FRAMEWORK_")}
    assert env_after == env_before and sys.argv == argv_before  # FRAMEWORK_* and argv restored


@pytest.mark.parametrize(
    "bug, check, status, text",
    [
        ("sum", "loss_scaling", "WARNING", "Net.compute_loss scales with the batch size, like a sum"),
        ("unused", "gradients", "WARNING", "received no gradient: head.weight, head.bias"),
        ("detach", "loss_value", "ERROR", "Net.compute_loss returned a loss that does not require grad"),
        ("eval", "train_mode", "ERROR", "Net switched itself to eval mode during training"),
    ],
)
def test_each_planted_mistake_gets_its_row_and_fix(capsys, bug, check, status, text):
    rc, rows, out = doctor(capsys, "--bug", bug)
    assert rows[check] == status, out
    assert text in " ".join(out.split())  # the message (with its fix) under the row, unwrapped
    assert "Fix" in out or "remove the" in out
    assert [c for c, s in rows.items() if s in ("WARNING", "ERROR")] == [check]  # nothing else is blamed
    assert rc == (1 if status == "ERROR" else 0)


def test_a_crashing_recipe_fails_with_its_error(capsys):
    rc = main([SCRIPT, "--bug", "crash"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "outcome: the recipe raised ValueError: a bug in forward that is not a loop mistake" in captured.out
    assert "Traceback" in captured.err


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["no/such/recipe.py"]) == 2
    assert main(["--frobnicate", SCRIPT]) == 2
    assert "usage: python -m framework doctor" in capsys.readouterr().out


def test_the_command_line_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "framework", "doctor", "--steps", "2", SCRIPT, "--bug", "eval"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '(2 optimizer step(s) per fit, doctor="full")' in proc.stdout
    assert "ERROR     the module stays in train mode while training" in proc.stdout


@pytest.mark.skipif(not (ROOT / "recipes" / "digits.py").exists(), reason="recipes/digits.py not present")
def test_the_digits_recipe_has_a_clean_loop(capsys, tmp_path):
    pytest.importorskip("sklearn")
    rc = main([str(ROOT / "recipes" / "digits.py"), "--smoke", "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "0 warning, 0 error" in out, out  # no false positive on a real recipe


def _launch_2(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` 2 CPU processes (launch/cpu_ddp.yaml), keeping all of their output."""
    from tests.helpers import ACCELERATE

    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), *args]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
    )


@pytest.mark.multiprocess
def test_under_two_processes_full_doctor_is_clean_and_names_unused_parameters_before_ddp_could_fail():
    env = {"FRAMEWORK_DOCTOR": "full", "FRAMEWORK_MAX_STEPS": "4"}
    proc = _launch_2(SCRIPT, "--bug", "none", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LoopWarning" not in proc.stderr + proc.stdout
    # DDP would refuse unused parameters on the next forward, naming only their indices (after the ranks'
    # parameters diverged); the run stops at step 1 instead, with the parameters and the fix named ...
    proc = _launch_2(SCRIPT, "--bug", "unused", env=env)
    assert proc.returncode != 0
    out = proc.stderr
    assert "Expected to have finished reduction" not in out, out
    assert "LoopError: 2 parameter(s) of Net got no gradient in the first step" in out, out
    assert "head.weight, head.bias" in out and "Engine(find_unused_parameters=True)" in out, out
    # ... and the doctor named them too, once (rank 0 speaks for all), before that error.
    assert (
        out.count("LoopWarning: 2 trainable parameter(s) of Net received no gradient: head.weight, head.bias") == 1
    ), out
    assert out.index("LoopWarning") < out.index("LoopError"), out
