"""README.md stays true: every Python block runs as written (twice in a row), and every command names files that
exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from .helpers import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang in ("bash", "sh", "shell")]


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-block-{i}" for i in range(len(PYTHON))])
@pytest.mark.timeout(600)
def test_every_python_block_runs_and_runs_again(code, tmp_path):
    # Twice in the same directory, as a user runs a script again: a second run must work too (a run dir that
    # holds the first run's gets a fresh one beside it).
    for attempt in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, f"{attempt} run: " + proc.stdout[-2000:] + proc.stderr[-3000:]
    if "run_dir=" in code:  # the second run went beside the first, and said so
        assert "holds an earlier run" in proc.stderr, proc.stderr[-2000:]


def test_every_command_names_files_that_exist_and_modules_that_answer_help():
    assert PYTHON and SHELL
    for block in SHELL:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for command in filter(None, re.split(r"&&|\|\|", line)):
                words = shlex.split(command.replace("$(mktemp -d)", "/tmp/x").replace('"', ""))
                for word in words:
                    if re.match(r"^(recipes|benchmarks|launch|tests|framework)/[\w/.-]+\.(py|yaml|sh|sbatch)$", word):
                        assert (ROOT / word).is_file(), f"README names {word}, which does not exist"
                if len(words) > 3 and words[1:3] == ["-m", "framework"]:
                    subcommand = words[3]
                    out = subprocess.run(
                        [sys.executable, "-m", "framework", subcommand, "--help"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60,
                    )  # fmt: skip
                    assert out.returncode == 0, (command, out.stderr)
