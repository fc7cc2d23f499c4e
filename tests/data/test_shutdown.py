"""Clean shutdown: no data thread, worker process or file descriptor outlives a fit — after it ends,
after the dataset raises, after a callback raises SystemExit or KeyboardInterrupt, and after a real
SIGTERM (preemption, exit 143) or SIGINT (Ctrl-C) to a training process.

Counted for real, without psutil: threads from /proc/self/task, child processes from /proc/*/stat
(zombies included: an unreaped child still has its entry), open fds from /proc/self/fd.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework import Callback
from tests.helpers import ROOT
from tests.scripts.data_common import SLOW, Augmented, AugmentedStream, fit

SCRIPT = ROOT / "tests" / "scripts" / "data_run.py"


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (zombies too)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def _in_session(sid: int) -> set[int]:
    """Processes in session ``sid`` (a process started with start_new_session=True and its descendants)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                out.add(int(entry))
    return out


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own fd, closed by now)
            pass
    return out


def _snapshot() -> tuple[int, set[int], dict[str, str]]:
    gc.collect()
    return len(os.listdir("/proc/self/task")), _children(os.getpid()), _fds()


def _assert_nothing_left(before: tuple[int, set[int], dict[str, str]], fds_too: bool = True) -> None:
    threads, children, fds = _snapshot()
    assert threads <= before[0], f"{threads - before[0]} thread(s) left behind"
    assert children <= before[1], f"child process(es) left behind: {children - before[1]}"
    if not fds_too:
        return
    new = {fd: target for fd, target in fds.items() if before[2].get(fd) != target}
    assert len(fds) <= len(before[2]), f"{len(fds) - len(before[2])} file descriptor(s) left open: {new}"


class Raise(Callback):
    def __init__(self, error: BaseException, step: int = 3) -> None:
        self.error, self.step = error, step

    def on_step_end(self, engine, module, metrics):
        if engine.step == self.step:
            raise type(self.error)(*self.error.args)  # (a fresh one: a raised instance keeps its traceback)


# (kind of data, num_workers): a prefetch thread, worker processes, a stream's thread.
MODES = [("dataset", 0), ("dataset", 2), ("stream", 0)]


def _data(kind: str, sleep: float = SLOW):
    # (slow enough items: a Dataset with num_workers=0 and a stream are then made by the prefetch thread)
    return Augmented("generator", sleep=sleep) if kind == "dataset" else AugmentedStream("generator", sleep=sleep)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    # First use starts things that live for the process (torch's own pools): not ours to count.
    fit(Augmented("generator"), num_workers=2, max_epochs=1)


@pytest.mark.parametrize("kind,workers", MODES)
def test_a_fit_leaves_no_thread_process_or_fd(kind, workers):
    before = _snapshot()
    engine, _ = fit(_data(kind), num_workers=workers)
    assert engine.step == 16
    _assert_nothing_left(before)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_dataset_is_raised_as_is_and_leaves_nothing_behind(workers):
    before = _snapshot()
    with pytest.raises(ValueError, match="corrupt item 77") as info:
        fit(Augmented("generator", sleep=SLOW, fail_at=77), num_workers=workers)
    # The traceback, holding the fit's frames, is still alive: the threads and workers are gone anyway.
    _assert_nothing_left(before, fds_too=False)
    del info  # (its frames hold the last batch, whose worker-sent tensors are fds in shared memory)
    _assert_nothing_left(before)


@pytest.mark.parametrize(
    "kind,workers,error",
    [*((k, w, SystemExit(143)) for k, w in MODES), ("dataset", 2, KeyboardInterrupt())],
    ids=[*(f"SystemExit-{k}-{w}" for k, w in MODES), "KeyboardInterrupt-dataset-2"],
)
def test_a_callback_raising_systemexit_or_ctrl_c_leaves_nothing_behind(kind, workers, error):
    before = _snapshot()
    with pytest.raises(type(error)) as info:
        # Slow items: the thread or the workers are busy fetching ahead when the step ends the fit.
        fit(_data(kind, sleep=0.002), num_workers=workers, callbacks=[Raise(error)])
    # While the exception is alive: no thread, no process (the fit closed them; nothing waits for GC).
    _assert_nothing_left(before, fds_too=False)
    # Its traceback holds the engine's frames, and with them the batch being trained on (tensors a
    # worker sent in shared memory, each an fd): released with it, and then no fd is left either.
    del info
    _assert_nothing_left(before)


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(SCRIPT), "-", "-", "--workers", "2", "--kind", "global", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for(proc: subprocess.Popen[str], line: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if line in got:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    raise AssertionError(f"no {line!r} within {timeout} s")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_job_ends_it_with_its_workers(signum, code):
    """The signal goes to every process of the session, as SLURM's preemption or a terminal's Ctrl-C
    does: the run stops at a step boundary (143 after preemption, 130 for Ctrl-C) and no worker is left."""
    # Step 5's callback pauses 2 s with the workers alive and busy; the signal comes meanwhile.
    proc = _start("--hang-after", "5")
    try:
        _wait_for(proc, "hanging")
        assert len(_in_session(proc.pid)) >= 3, "the run should have its 2 workers now"
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    if signum == signal.SIGINT:
        assert "interrupted (Ctrl-C) at step" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while _in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _in_session(proc.pid), "worker processes outlived the run"
