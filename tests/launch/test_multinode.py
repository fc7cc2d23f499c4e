"""The multi-node path, for real: two `accelerate launch --config_file launch/multinode.yaml`
commands ("nodes" 0 and 1, one process each) on loopback, CPU over gloo, must reach the same
parameters as one process (docs/DESIGN.md, the exactness rule)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time

import pytest
import torch

from tests.helpers import ACCELERATE, ROOT
from tests.launch import exactness_run

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where `--main_process_port 0` launches
    and gloo's own connections take theirs: parallel tests then can't grab it between check and use."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def test_two_nodes_on_loopback_match_one_process(tmp_path):
    out = tmp_path / "params.pt"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            ACCELERATE, "launch", "--config_file", str(ROOT / "launch/multinode.yaml"),
            # The fields multinode.yaml marks EDIT, set for 2 one-process nodes on this machine:
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--num_processes", "2", "--num_machines", "2",
            str(ROOT / "tests/launch/exactness_run.py"), str(out),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,  # its own process group: a kill reaches the workers too
            )
        )  # fmt: skip
    outputs = ["", ""]
    deadline = time.monotonic() + 180
    try:
        for rank, p in enumerate(procs):
            outputs[rank] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for rank, p in enumerate(procs):  # never leave a node (or its workers) waiting on its peer
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                outputs[rank] = p.communicate()[0]
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"node {rank} exited {p.returncode} (-9: killed after 180 s):\n" + "\n".join(
            f"--- node {r} ---\n{text[-5000:]}" for r, text in enumerate(outputs)
        )

    expected, world = exactness_run.run()  # the same run, 1 process, in this process
    assert world == 1
    initial = torch.cat([p.detach().reshape(-1) for p in exactness_run.TokenModel().parameters()])
    assert (expected - initial).abs().max() > 1e-2, "the run must move the parameters for the match to mean anything"
    for rank in (0, 1):
        got = torch.load(f"{out}.rank{rank}")
        assert got["world_size"] == 2 and got["rank"] == rank
        assert got["node_rank"] == rank, "each process should run as its own node (machine_rank)"
        diff = (got["params"] - expected).abs().max().item()
        assert diff <= 1e-5, f"rank {rank}: 2 nodes x 1 process differ from 1 process by {diff:.3g}"
