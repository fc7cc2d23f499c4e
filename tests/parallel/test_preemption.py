"""Preemption and Ctrl-C with real signals to real processes (framework/parallel/preemption.py).

A signal only sets a flag on the rank that got it; the flags travel in the all-reduce each step already
does, so every rank stops at one agreed step boundary, checkpoints there and exits 143 (SIGTERM) or 130
(a first Ctrl-C); one final agreement per fit catches a signal after the last step.

Each scenario is one launch of tests/scripts/preempt_run.py (2 CPU processes, or one for Ctrl-C) that a
signal stops. The scenarios run as chains in one run dir: each launch resumes (resume="auto") from the
checkpoint the previous one left, and the last launch of a chain runs to the end, which must be
torch.equal to one uninterrupted reference run; each checkpoint is also compared with the reference's
parameters after that step, and each launch must have started at the step the previous one stopped at.
A chain costs one launch per scenario plus one, instead of two: a 2-process launch costs about 12
CPU-seconds of start-up whatever it runs, which is what CI time is made of here. For the same reason
the 2-process reference is a case of the one launch of tests/scripts/ddp_agreement.py, and the second
chain's last launch (the finished run resumed) also takes a SIGTERM after fit's final agreement.

Checked per stopped launch: the exit status of every rank (what it recorded, and what torchrun
reports), the launcher's status, the time from the last signal to the launcher's exit (< 60 s), the
step (the same on every rank, at the next boundary or the one after), the checkpoint (complete, at
that step, the one the message names, equal to the reference's parameters after that step), and
the process group's collective timeout (the default, 300 s on CPU).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointError, CheckpointReader, read_weights
from tests.helpers import ROOT
from tests.procs import Run, agreement_launch, read_int, script_cmd, shared_dir

SCRIPT = ROOT / "tests" / "scripts" / "preempt_run.py"
STEPS = 40  # optimizer steps of a whole preempt_run.py (2 epochs of 20)
EPOCH_END = 20
SLEEP = "0.05"  # seconds per step: about 2 s of training, so a signal lands mid-run
EXIT_WITHIN = 60.0  # seconds from the last signal to the launcher's exit
WAIT = 180.0  # a bound on each wait for the run to get somewhere (start-up on a loaded CI machine)

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------- references (one per configuration)


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint that verifies (sizes and SHA-256), or None."""
    try:
        CheckpointReader(path)
    except CheckpointError as e:
        return str(e)
    return None


def _load_reference(d: Path) -> dict:
    return {"final": torch.load(d / "final.pt"), "steps": torch.load(d / "steps.pt"), "dir": d}


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory):
    """The uninterrupted 2-process run: a case of the one launch of tests/scripts/ddp_agreement.py."""
    return _load_reference(agreement_launch(tmp_path_factory) / "reference")


@pytest.fixture(scope="session")
def one_reference(tmp_path_factory):
    def make(d: Path) -> None:
        (d / "run").mkdir()
        with Run(
            script_cmd(SCRIPT, d / "run", d / "final.pt", "--record", d / "steps.pt", ddp=False), d / "run", d / "log"
        ) as run:
            rc = run.wait(WAIT)
            if rc != 0:
                run.fail(f"the reference run exited {rc}")

    return _load_reference(shared_dir(tmp_path_factory, "preempt-reference-one", make))


# ---------------------------------------------------------------- one link of a chain


def _latest_step(run_dir: Path) -> int:
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        return 0
    return int(name.split("-")[1])


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# What a scenario does to a running launch: sends its signals and returns
# (when the last one went, the latest step rank 0 had finished when the first went, a line for the report).
Act = Callable[[Run, int], tuple[float, int, str]]


def _stopped(run_dir: Path, name: str, act: Act, ref: dict, *extra: str, ddp: bool = True, code: int = 143) -> int:
    """Launch (resuming from the chain's last checkpoint), let ``act`` signal it, check how every rank stopped.
    Returns the step it stopped at."""
    prev = _latest_step(run_dir)
    cmd = script_cmd(SCRIPT, run_dir, run_dir / "final.pt", "--sleep", SLEEP, *extra, ddp=ddp)
    with Run(cmd, run_dir, run_dir.parent / f"{name}.log") as run:
        last_signal, k_after, report = act(run, prev)
        rc = run.wait(EXIT_WITHIN + 30)
        assert run.ended is not None
        took = run.ended - last_signal
        out = run.output()
        world = run.world
        starts = {r: read_int(run_dir / f"start-rank{r}") for r in range(world)}
        exits = run.exits()
        launcher = run.launcher_exit_codes()
        timeouts = {r: (run_dir / f"timeout-rank{r}").read_text() for r in range(world) if ddp}
    print(f"{name}: {report}; launcher exited {rc}, {took:.1f} s after the last signal")  # (shown with -s)
    why = f"{name}: exited {rc}\n{out[-6000:]}"
    assert (rc != 0) if ddp else (rc == code), why  # (torchrun itself exits 1 when a rank failed)
    assert starts == dict.fromkeys(range(world), prev), f"{name}: did not resume from step {prev}: {starts}\n{why}"
    assert sorted(exits) == list(range(world)), f"{name}: ranks {sorted(exits)} recorded an exit\n{why}"
    assert {e["code"] for e in exits.values()} == {code}, f"{name}: {exits}\n{why}"
    steps = {e["step"] for e in exits.values()}
    assert len(steps) == 1, f"{name}: the ranks stopped at different steps: {exits}\n{why}"
    (stop,) = steps
    if ddp:  # what each rank's process really exited with, as torchrun saw it (it lists the failed ranks)
        assert launcher == dict.fromkeys(range(world), code), f"{name}: torchrun reports {launcher}\n{why}"
        assert set(timeouts.values()) == {"300.0"}, f"{name}: collective timeouts {timeouts} (default: 300 s on CPU)"
    assert took < EXIT_WITHIN, f"{name}: exited {took:.1f} s after the last signal\n{why}"
    # The next step boundary, or the one after where a rank was already past that step's all-reduce.
    assert prev < stop <= k_after + (2 if ddp else 1), (
        f"{name}: stopped at {stop}; resumed at {prev}, rank 0 had done step {k_after} when the signal was sent"
    )
    path = run_dir / "checkpoints" / f"step-{stop:08d}"
    assert _latest_step(run_dir) == stop and _problem(path) is None, f"{name}: checkpoint {path}: {_problem(path)}"
    what = "preempted (a preemption signal)" if code == 143 else "interrupted (Ctrl-C)"
    assert f"{what} at step {stop}: checkpoint saved to {path}" in out, why
    assert _equal(read_weights(path / "model.safetensors"), ref["steps"][stop]), f"{name}: checkpoint differs"
    return stop


def _finish(run_dir: Path, ref: dict, ddp: bool = True) -> None:
    """The chain's last launch: resume and run to the end, torch.equal to the uninterrupted run."""
    prev = _latest_step(run_dir)
    cmd = script_cmd(SCRIPT, run_dir, run_dir / "final.pt", ddp=ddp)
    with Run(cmd, run_dir, run_dir.parent / "finish.log") as run:
        rc = run.wait(WAIT)
        if rc != 0:
            run.fail(f"the resumed run exited {rc}")
    assert [read_int(run_dir / f"start-rank{r}") for r in range(run.world)] == [prev] * run.world
    final = torch.load(run_dir / "final.pt")
    diff = [k for k in final if not torch.equal(final[k], ref["final"][k])]
    assert not diff, f"resumed from step {prev}: {diff} differ from the uninterrupted run"


def _finish_with_a_late_signal(run_dir: Path, ref: dict) -> None:
    """Resume the finished run (fit ends at once: torch.equal to the uninterrupted run); rank 1 gets a SIGTERM
    inside on_fit_end, after fit's final agreement: that rank must end by that signal, not exit 0."""
    extra = ("--slow-fit-end", "3", "--slow-fit-end-rank", "1")
    with Run(
        script_cmd(SCRIPT, run_dir, run_dir / "final.pt", *extra, ddp=True), run_dir, run_dir.parent / "finish.log"
    ) as run:
        run.wait_until(lambda: (run_dir / "fit-end-rank1").exists(), WAIT, "rank 1 in on_fit_end")
        sent = run.signal(1, signal.SIGTERM)
        assert sent is not None
        rc = run.wait(EXIT_WITHIN)
        out, exits, launcher = run.output(), run.exits(), run.launcher_exit_codes()
    print(f"late signal: rank 1 SIGTERM in on_fit_end; launcher exited {rc}, torchrun reports {launcher}")
    assert rc != 0 and launcher.get(1) == -signal.SIGTERM, out[-4000:]
    assert exits == {0: {"code": 0, "step": STEPS}}, exits  # (rank 1 recorded nothing: it ended by the signal)
    # Rank 0 finished normally; torchrun SIGTERMs it if it is still tearing down when rank 1 has failed.
    assert launcher.get(0) in (None, -signal.SIGTERM), launcher
    final = torch.load(run_dir / "final.pt")
    assert _equal(final, ref["final"]), "the resumed finished run differs from the uninterrupted one"


# ---------------------------------------------------------------- scenarios


def _under_way(run: Run, prev: int) -> None:
    run.wait_until(lambda: run.step() >= prev + 2, WAIT, f"training past step {prev + 2}")


def one_rank(rank: int, times: int = 1, gap: float = 0.1, sig: int = signal.SIGTERM) -> Act:
    def act(run: Run, prev: int) -> tuple[float, int, str]:
        _under_way(run, prev)
        sent = run.signal(rank, sig)
        assert sent is not None
        k = run.step()
        for _ in range(times - 1):
            time.sleep(gap)
            again = run.signal(rank, sig)
            assert again is not None, f"rank {rank} had exited before signal {times}"
            sent = again
        return sent, k, f"{signal.Signals(sig).name} x{times} to rank {rank}"

    return act


def both_ranks(skew: float, first: int = 0) -> Act:
    """SIGTERM to rank ``first``, then ``skew`` seconds later (measured from the first send) to the other."""

    def act(run: Run, prev: int) -> tuple[float, int, str]:
        _under_way(run, prev)
        t0 = run.signal(first, signal.SIGTERM)
        assert t0 is not None
        k = run.step()
        time.sleep(max(0.0, t0 + skew - time.monotonic()))
        t1 = run.signal(1 - first, signal.SIGTERM)
        got = f"{t1 - t0:.3f} s" if t1 is not None else f"none: rank {1 - first} had exited"
        return t1 or t0, k, f"SIGTERM to rank {first}, then rank {1 - first}: skew asked {skew} s, measured {got}"

    return act


def inside(marker: str) -> Act:
    """SIGTERM to both ranks once both have written ``marker``-rank{R} (inside a save, or a validation)."""

    def act(run: Run, prev: int) -> tuple[float, int, str]:
        for r in (0, 1):
            run.wait_until(lambda r=r: (run.run_dir / f"{marker}-rank{r}").exists(), WAIT, f"{marker} on rank {r}")
        k = run.step()
        t0 = run.signal(0, signal.SIGTERM)
        t1 = run.signal(1, signal.SIGTERM)
        assert t0 is not None and t1 is not None
        return t1, k, f"SIGTERM to both while {marker} (rank 0 at step {k})"

    return act


# ---------------------------------------------------------------- the tests


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_or_both_stops_every_rank_at_one_step(tmp_path, ddp_reference):
    """Rank 1 only; rank 0 only; both at once; twice in a row to rank 1: each stop is agreed, 143 on every
    rank, a complete checkpoint; the chain of resumes ends torch.equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ref = ddp_reference
    _stopped(run_dir, "rank1", one_rank(1), ref)
    _stopped(run_dir, "rank0", one_rank(0), ref)
    _stopped(run_dir, "both-skew0", both_ranks(0.0), ref)
    _stopped(run_dir, "rank1-twice", one_rank(1, times=2), ref)
    _finish(run_dir, ref)


@pytest.mark.multiprocess
def test_sigterm_inside_saves_validation_and_with_skews(tmp_path, ddp_reference):
    """Inside a mid-epoch save (step 6), inside the epoch-end save (step 20), both ranks with skews of 0.3 s
    and 2 s, and inside the last validation (after the last step: the final agreement catches it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ref = ddp_reference
    # A signal inside the save of step K reaches the others through step K + 1's all-reduce: the stop.
    stop = _stopped(run_dir, "mid-epoch-save", inside("saving"), ref, "--slow-save-step", "6", "--slow-save", "3")
    assert stop == 7
    stop = _stopped(
        run_dir, "epoch-end-save", inside("saving"), ref, "--slow-save-step", str(EPOCH_END), "--slow-save", "3"
    )
    assert stop == EPOCH_END + 1
    _stopped(run_dir, "both-skew0.3", both_ranks(0.3, first=1), ref)
    _stopped(run_dir, "both-skew2", both_ranks(2.0), ref)
    # The last validation runs after the last step: no step's all-reduce is left to carry the flags.
    stop = _stopped(run_dir, "last-validation", inside("validating"), ref, "--slow-val", "0.4")
    assert stop == STEPS
    _finish_with_a_late_signal(run_dir, ref)


def test_ctrl_c_checkpoints_exits_130_and_a_second_aborts_at_once(tmp_path, one_reference):
    """One process: the first SIGINT checkpoints at the next step boundary, says where, exits 130; a second
    SIGINT (here inside the save the first one started) aborts at once; the resumed run ends torch.equal."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ref = one_reference
    _stopped(run_dir, "ctrl-c", one_rank(0, sig=signal.SIGINT), ref, ddp=False, code=130)

    # Two Ctrl-C: every save is slowed to 30 s, so the second lands inside one and must not wait for it.
    before = _latest_step(run_dir)
    cmd = script_cmd(
        SCRIPT, run_dir, run_dir / "final.pt", "--sleep", SLEEP, "--slow-save-step", "0", "--slow-save", "30", ddp=False
    )
    with Run(cmd, run_dir, tmp_path / "ctrl-c-twice.log") as run:
        run.wait_until(lambda: run.step() > before, WAIT, "the first step")  # (before a 30 s save can come)
        assert run.signal(0, signal.SIGINT) is not None
        run.wait_until(lambda: (run_dir / "saving-rank0").exists(), WAIT, "a save in progress")
        time.sleep(0.3)  # (two signals sent at once could merge into one)
        latest = _latest_step(run_dir)
        second = run.signal(0, signal.SIGINT)
        assert second is not None
        rc = run.wait(30)
        took = time.monotonic() - second
        out = run.output()
    print(f"ctrl-c-twice: exited {rc}, {took:.1f} s after the second SIGINT")
    assert rc not in (0, 130), out[-4000:]
    assert took < 15, f"the second Ctrl-C took {took:.1f} s (the save it interrupted sleeps 30 s)"
    assert (run_dir / "error-rank0.txt").read_text().startswith("KeyboardInterrupt"), out[-4000:]
    assert "interrupted (Ctrl-C) at step" not in out
    assert _latest_step(run_dir) == latest, "the interrupted save must not have been published"
    assert list((run_dir / "checkpoints").glob(".tmp-step-*")), "the interrupted save leaves only its staging dir"
    _finish(run_dir, ref, ddp=False)
