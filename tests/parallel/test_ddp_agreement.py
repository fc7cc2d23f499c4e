"""What two DDP processes must agree on, and a dead peer that must not hang the other.

One launch of tests/scripts/ddp_agreement.py (tests/procs.agreement_launch, once per session) runs every
case: BatchNorm buffers, an unused layer with and without find_unused_parameters, an infinite loss on one
rank under both NaN policies, the collective timeout, and last a rank killed with SIGKILL mid-run. The
tests below compare what each rank saw with one-process runs in this process.
"""

from __future__ import annotations

import json

import pytest
import torch

import framework
from framework import Engine
from tests.procs import agreement_launch
from tests.scripts.ddp_agreement import NAN_STEP, BNNet, UnusedNet, data

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]


@pytest.fixture(scope="session")
def ranks(tmp_path_factory):
    """{case: [rank 0's record, rank 1's record]} from the one launch, its directory and its output."""
    d = agreement_launch(tmp_path_factory)
    cases = ("bn", "nan_skip", "unused_find", "nan_raise", "unused", "timeout")
    found = {c: [torch.load(d / f"{c}-rank{r}.pt") for r in (0, 1)] for c in cases}
    return found, d, (d / "log").read_text()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_process_validation(weights, buffers=None) -> float:
    """A 1-process validation of ``weights`` (a checkpoint directory), optionally with other buffers."""
    module = framework.load_weights(BNNet(), weights)
    if buffers is not None:
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
    return Engine(batch_size=16, progress=False).validate(module, data(72, 2))["loss"]


def test_batchnorm_validation_uses_rank0_buffers_as_the_checkpoint_does(ranks):
    """The logged val/loss and engine.validate's equal a 1-process validation of the checkpoint to 1e-6; a
    validation on each rank's own buffers (no agreement) does not."""
    found, d, _ = ranks
    r0, r1 = found["bn"]
    checkpoint = framework.checkpoint.newest_complete(d / "bn" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step-{r0['step']:08d}"
    one = _one_process_validation(checkpoint)
    logs = [json.loads(line) for line in (d / "bn" / "metrics.jsonl").read_text().splitlines()]
    logged = [rec["val/loss"] for rec in logs if "val/loss" in rec][-1]
    print(f"bn: 1 process {one!r}; logged {logged!r}; validate {r0['validated']!r}; unagreed {r0['unagreed']!r}")
    for r in (r0, r1):
        assert abs(r["logged"] - one) <= 1e-6 and abs(r["validated"] - one) <= 1e-6, (r, one)
    assert abs(logged - one) <= 1e-6
    # Without the agreement the numbers move: what this test would catch.
    assert abs(r0["unagreed"] - one) > 1e-6, "the ranks' own buffers should give another validation loss"
    own = [_one_process_validation(checkpoint, r["own_buffers"]) for r in (r0, r1)]
    assert abs(own[0] - one) <= 1e-6  # rank 0's own buffers are the agreed ones (DDP broadcasts them)
    assert abs(own[1] - one) > 1e-6, f"rank 1's own buffers give {own[1]!r}, the checkpoint {one!r}"


def test_an_unused_parameter_stops_ddp_at_step_1_naming_it(ranks):
    found, _, out = ranks
    for rank, r in enumerate(found["unused"]):
        error = r["error"]
        assert error is not None and error.startswith("LoopError"), (rank, error)
        assert "idle.weight" in error and "idle.bias" in error and "find_unused_parameters=True" in error, error
        assert "used.weight" not in error.replace("idle.", "")  # (only the idle ones are named)
        assert r["step"] == 0, "no optimizer step was taken"
        assert _equal(r["before"], r["after"]), f"rank {rank}: parameters changed"
    assert "Expected to have finished reduction" not in out


def test_find_unused_parameters_trains_and_matches_one_process(ranks):
    found, _, _ = ranks
    r0, r1 = found["unused_find"]
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert _equal(r0["after"], r1["after"]), "the ranks' parameters differ"
    torch.manual_seed(0)
    module = UnusedNet()
    Engine(max_epochs=1, batch_size=16, seed=0, progress=False, doctor="off").fit(module, data(320, 4))
    one = {k: p.detach() for k, p in module.named_parameters()}
    worst = max((r0["after"][k] - one[k]).abs().max().item() for k in one)
    print(f"unused_find: max |2 processes - 1 process| = {worst:.3g}")
    assert worst <= 1e-5
    assert not torch.equal(r0["after"]["used.weight"], r0["before"]["used.weight"])  # it trained
    assert torch.equal(r0["after"]["idle.weight"], r0["before"]["idle.weight"])  # the idle layer did not


def test_an_infinite_loss_on_one_rank_raises_on_every_rank_before_any_change(ranks):
    found, _, _ = ranks
    for rank, r in enumerate(found["nan_raise"]):
        error = r["error"]
        assert error is not None and error.startswith("NonFiniteError"), (rank, error)
        assert f"optimizer step {NAN_STEP} " in error, error
        if rank == 1:  # (the rank whose loss it was names it as it was: inf, not the NaN that carried it over)
            assert "compute_loss returned inf" in error, error
        assert r["step"] == NAN_STEP
        assert _equal(r["after"], r["params"][NAN_STEP]), f"rank {rank}: parameters changed by the bad step"


def test_an_infinite_loss_on_one_rank_is_skipped_by_every_rank(ranks):
    found, _, _ = ranks
    r0, r1 = found["nan_skip"]
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        assert r["skipped"] == [NAN_STEP] and r["skipped_steps"] == 1, r["skipped"]
        assert _equal(r["params"][NAN_STEP + 1], r["params"][NAN_STEP]), "the skipped step changed parameters"
        assert not _equal(r["params"][NAN_STEP + 2], r["params"][NAN_STEP + 1])  # and training went on
    assert r0["step"] == r1["step"] == 12
    assert _equal(r0["after"], r1["after"]), "the ranks ended with different parameters"


def test_the_process_group_has_the_collective_timeout_passed(ranks):
    """The launch's first Engine passed collective_timeout=20 (tests/parallel/test_preemption.py checks the default)."""
    found, _, _ = ranks
    assert [r["seconds"] for r in found["timeout"]] == [20.0, 20.0]


def test_a_killed_peer_does_not_hang_the_other(ranks):
    """SIGKILL rank 1 mid-run: rank 0 fails on its next collective (gloo sees the closed connection, or the
    20 s collective timeout ends the wait) and exits non-zero; so does the launcher.

    torchrun SIGTERMs the survivor as soon as it sees the dead rank; --note-sigterm makes that SIGTERM harmless
    outside fit (inside, fit's handler only sets a flag), so only the engine's own failure ends rank 0: a hang
    would show (torchrun's SIGKILL comes 30 s later, with no error written)."""
    _, d, out = ranks
    dead = json.loads((d / "dead-peer.json").read_text())
    print(f"dead peer: {dead}")
    assert dead["rc"] != 0, out[-4000:]
    assert dead["error"] is not None, f"rank 0 left no error of its own (killed by the launcher?)\n{out[-4000:]}"
    assert dead["error"].startswith(("RuntimeError", "Dist")), dead["error"]  # (gloo's, or the timeout's)
    assert dead["seconds"] < 20 + 10, f"{dead['seconds']:.1f} s: more than the collective timeout"
    assert not dead["exit_recorded"], "rank 0 must not exit as if stopped or finished"
