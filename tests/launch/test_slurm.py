"""launch/slurm_env.sh and launch/slurm.sbatch, run for real with a fake SLURM: fake `scontrol`
and `srun` on PATH and a fake `accelerate` that records how it was called."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

ENV_VARS = ("MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "MACHINE_RANK", "NUM_MACHINES", "GPUS_PER_NODE", "NUM_PROCESSES")


def _fake_bin(tmp_path: Path) -> Path:
    """A bin dir with a fake scontrol (hostnames / requeue, calls logged) and srun (runs the task here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'echo "scontrol $*" >> "$FAKE_LOG"\n'
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-node-07\\ngpu-node-08\\n"; fi\n'
    )
    # srun: drop its own options, then exec the task in place (so the batch shell's
    # `kill -USR1 $SRUN_PID` reaches the task, as real srun forwards signals to its tasks).
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ENV_VARS}
    env.update(
        PATH=f"{_fake_bin(tmp_path)}:{env['PATH']}",
        FAKE_LOG=str(tmp_path / "calls.log"),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    env.update(extra)
    return env


def _source(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = "source launch/slurm_env.sh || exit 7\n" + "".join(f'echo "{v}=${v}"\n' for v in ENV_VARS)
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_derives_addresses_from_the_slurm_environment(tmp_path):
    proc = _source(_slurm_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.split())
    assert got == {
        "MAIN_PROCESS_IP": "gpu-node-07",  # the first host of the expanded node list
        "MAIN_PROCESS_PORT": str(20000 + 123456 % 20000),
        "MACHINE_RANK": "1",
        "NUM_MACHINES": "2",
        "GPUS_PER_NODE": "4",
        "NUM_PROCESSES": "8",  # Accelerate counts processes over all nodes
    }
    assert "scontrol show hostnames gpu-node-[07-08]" in (tmp_path / "calls.log").read_text()


def test_preset_values_win(tmp_path):
    proc = _source(_slurm_env(tmp_path, MAIN_PROCESS_PORT="29999", MAIN_PROCESS_IP="10.1.2.3", GPUS_PER_NODE="2"))
    got = dict(line.split("=", 1) for line in proc.stdout.split())
    assert got["MAIN_PROCESS_PORT"] == "29999" and got["MAIN_PROCESS_IP"] == "10.1.2.3" and got["NUM_PROCESSES"] == "4"
    assert not (tmp_path / "calls.log").exists()  # no scontrol call needed


@pytest.mark.parametrize(
    "missing, message", [("SLURM_JOB_ID", "SLURM_JOB_ID is not set"), ("SLURM_NODEID", "SLURM_NODEID is not set")]
)
def test_outside_slurm_fails_clearly(tmp_path, missing, message):
    env = _slurm_env(tmp_path)
    del env[missing]
    proc = _source(env)
    assert proc.returncode == 7 and message in proc.stderr


def test_sbatch_script_is_valid_bash_with_requeue_directives():
    text = (ROOT / "launch/slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch/slurm.sbatch")]).returncode == 0
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --nodes="):
        assert directive in text


FAKE_ACCELERATE = """#!/bin/bash
# Records its arguments, then behaves like a training run: exits 0 when done, or, on
# USR1, "checkpoints" and exits non-zero (as `accelerate launch` does after its workers exit 143).
trap 'echo USR1 >> "$FAKE_LOG"; exit 1' USR1
echo "accelerate $*" >> "$FAKE_LOG"
echo "PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" >> "$FAKE_LOG"
touch "$FAKE_STARTED"
for _ in $(seq 1 "$FAKE_STEPS"); do sleep 0.05; done
exit 0
"""


def _run_sbatch(tmp_path: Path, steps: int, send_usr1: bool) -> tuple[int, str]:
    fake = tmp_path / "accelerate"
    fake.write_text(FAKE_ACCELERATE)
    fake.chmod(0o755)
    env = _slurm_env(
        tmp_path, SLURM_NODEID="0", ACCELERATE=str(fake), FAKE_STEPS=str(steps), FAKE_STARTED=str(tmp_path / "started")
    )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch/slurm.sbatch"), "recipes/digits.py", "--run-dir", "runs/x"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        if send_usr1:
            deadline = time.monotonic() + 30
            while not (tmp_path / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR1)  # what SLURM does 120 s before the time limit (B: = batch shell)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, (tmp_path / "calls.log").read_text() + out


def test_sbatch_launches_accelerate_per_node_and_finishes(tmp_path):
    rc, log = _run_sbatch(tmp_path, steps=1, send_usr1=False)
    assert rc == 0, log
    assert "srun --ntasks-per-node=1" in log
    assert (
        "accelerate launch --config_file launch/multinode.yaml --machine_rank 0 --main_process_ip gpu-node-07 "
        f"--main_process_port {20000 + 123456 % 20000} --num_machines 2 --num_processes 8 "
        "recipes/digits.py --run-dir runs/x"
    ) in log
    assert "SIGUSR1" in log.split("PET_SIGNALS_TO_HANDLE=")[1].splitlines()[0]  # torchrun forwards USR1
    assert "requeue" not in log  # a finished run is not requeued


def test_sbatch_forwards_usr1_then_requeues(tmp_path):
    rc, log = _run_sbatch(tmp_path, steps=600, send_usr1=True)
    assert rc == 0, log
    assert "USR1" in log.splitlines()  # the task got the signal (checkpoint-and-exit in the engine)
    assert "scontrol requeue 123456" in log
