"""Launching runs that tests signal or kill: pids per rank, bounded waits, no orphans.

A :class:`Run` starts ``accelerate launch`` (or one plain process) in a session of its own with its
output in a file; the script writes ``pid-rank{R}`` into its run dir, so a test signals exactly one
rank. Every wait has a deadline: past it the launcher, its process group and every rank are killed
(torchrun starts its workers in sessions of their own, so the launcher's group alone is not enough)
and the test fails with the output, instead of hanging CI.

Example::

    with Run(script_cmd(SCRIPT, run_dir, out, ddp=True), run_dir, tmp_path / "a.log") as run:
        run.wait_until(lambda: step(run_dir) >= 3, 60, "training under way")
        run.signal(1, signal.SIGTERM)
        rc = run.wait(60)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .helpers import ACCELERATE, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def script_cmd(script: Path, *args: Any, ddp: bool) -> list[str]:
    """The command of ``script args``: under ``accelerate launch`` (2 CPU processes) or one plain process."""
    tail = [str(script), *map(str, args)]
    if ddp:
        return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), *tail]
    return [sys.executable, *tail]


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class Run:
    """One launch (see the module docstring). A context manager: leaving it kills whatever still runs."""

    def __init__(self, cmd: list[str], run_dir: Path, log: Path, world: int | None = None) -> None:
        self.cmd, self.run_dir, self.log_path = cmd, run_dir, log
        self.world = world if world is not None else (2 if cmd[0] == ACCELERATE else 1)
        stale_files = (
            "pid-rank*",
            "start-rank*",
            "step",
            "exit-rank*",
            "error-rank*",
            "saving-rank*",
            "validating-rank*",
            "sigterm-rank*",
        )
        for stale in stale_files:
            for path in run_dir.glob(stale):  # (a previous launch's: a stale pid could name another process)
                path.unlink()
        self.log = open(log, "w")  # noqa: SIM115 (closed in __exit__; a file, not a pipe: a full pipe blocks ranks)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ended: float | None = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill_all()
        self.log.close()

    # ---- observing

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.kill_all()
        raise AssertionError(f"{why}\n{' '.join(self.cmd)}\nOUTPUT:\n{self.output()[-8000:]}")

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> float:
        """Poll ``condition`` until true; returns when it became true (time.monotonic). Fails past ``timeout`` or
        when the launch exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return time.monotonic()
            if self.proc.poll() is not None:
                self.fail(f"the launch exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout} s")
            time.sleep(0.02)

    def pid(self, rank: int, timeout: float = 120) -> int:
        path = self.run_dir / f"pid-rank{rank}"
        self.wait_until(lambda: read_int(path) is not None, timeout, f"pid file of rank {rank}")
        pid = read_int(path)
        assert pid is not None
        return pid

    def _tree(self) -> set[int]:
        import psutil

        try:
            return {self.proc.pid, *(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def step(self) -> int:
        """Rank 0's last optimizer step (-1 before the first)."""
        value = read_int(self.run_dir / "step")
        return -1 if value is None else value

    def exits(self) -> dict[int, Any]:
        """What each rank recorded as its exit: {"code": ..., "step": ...} (missing ranks left out)."""
        found = {}
        for r in range(self.world):
            try:
                found[r] = json.loads((self.run_dir / f"exit-rank{r}.json").read_text())
            except FileNotFoundError:
                pass
        return found

    def launcher_exit_codes(self) -> dict[int, int]:
        """The per-rank exit codes torchrun's failure summary reports (only ranks that did not exit 0)."""
        text = self.output()
        found: dict[int, int] = {}
        for rank, code in re.findall(r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", text):
            found[int(rank)] = int(code)
        return found

    # ---- acting

    def signal(self, rank: int, sig: int) -> float | None:
        """Send ``sig`` to rank ``rank`` only; returns when (time.monotonic), or None if it had exited."""
        pid = self.pid(rank)
        if pid not in self._tree():  # (exited: the pid is no longer ours to signal)
            return None
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        """The launch's exit status; kills everything and fails past ``timeout``."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the launch did not exit within {timeout} s")
            raise  # (fail raised)
        self.ended = time.monotonic()
        return rc

    def kill_all(self) -> None:
        """SIGKILL the launcher's process group and every descendant of the launcher (the ranks)."""
        pids = self._tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def shared_dir(tmp_path_factory: Any, name: str, make: Callable[[Path], None]) -> Path:
    """A directory that ``make`` fills once per test session, even with several pytest-xdist workers (the
    first to need it builds it under a file lock; the others wait and reuse it): one reference run per
    configuration, not one per worker. A failed ``make`` is recorded, so the other workers report it
    instead of running it again."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # (shared by the workers of this session, never an older session's)
    target, failed = root / name, root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock"), timeout=900):
        if failed.exists():
            raise AssertionError(failed.read_text())
        if not (target / "done").is_file():
            if target.exists():
                import shutil

                shutil.rmtree(target)
            target.mkdir()
            try:
                make(target)
            except Exception as err:
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
            (target / "done").touch()
    return target


def alive(pid: int | None) -> bool:
    import psutil

    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def agreement_launch(tmp_path_factory: Any) -> Path:
    """The one launch of tests/scripts/ddp_agreement.py, once per session (see its docstring): its cases, the
    uninterrupted reference of preempt_run.py, then the dead peer: once that phase is under way, rank 1 gets
    SIGKILL; what rank 0 and the launcher did is written to ``dead-peer.json``. Returns its directory."""

    def make(d: Path) -> None:
        dead = d / "dead" / "run"
        with Run(script_cmd(ROOT / "tests" / "scripts" / "ddp_agreement.py", d, ddp=True), dead, d / "log") as run:
            run.wait_until(lambda: run.step() >= 3, 600, "the dead-peer phase under way (every case done)")
            killed = run.signal(1, signal.SIGKILL)
            assert killed is not None
            error, pid = dead / "error-rank0.txt", run.pid(0)
            failed = run.wait_until(lambda: error.exists() or not alive(pid), 120, "rank 0 to fail or exit")
            rc = run.wait(120)
        record = {
            "rc": rc,
            "seconds": failed - killed,  # from the SIGKILL to rank 0's own error (or its death)
            "error": error.read_text() if error.exists() else None,
            "sigterm_noted": (dead / "sigterm-rank0").exists(),  # (torchrun's SIGTERM came, harmlessly)
            "exit_recorded": (dead / "exit-rank0.json").exists(),
        }
        (d / "dead-peer.json").write_text(json.dumps(record))

    return shared_dir(tmp_path_factory, "ddp-agreement", make)
