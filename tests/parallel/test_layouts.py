"""Every layout trains the same model to the same parameters, from the same initial bits, and a checkpoint of
one layout resumes on another (framework/parallel: layout, sharded, tp, build).

Two launches, once per session: 4 CPU processes (2 x 2 = dp_shard x tp, its resume, HSDP 2 x 2, HSDP with
activation checkpointing, FSDP 4 resuming the 2 x 2 checkpoint), then 2 (TP 2, and TP 2 resuming it); plus one
plain process here (the reference, and its resume of the 2 x 2 checkpoint). The token model weighs its loss
by tokens, its sequences have different lengths and the last window is partial, so the exactness rule is
what makes the layouts agree. Every run has two optimizers, an EMA, clipping, validation and the doctor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework import Callback, Engine
from framework.checkpoint import CheckpointReader, newest_complete, read_weights
from tests.helpers import ACCELERATE, ROOT, launch
from tests.procs import shared_dir
from tests.scripts.layouts_common import GLOBAL_BATCH, TokenLM, token_data

SCRIPT = ROOT / "tests" / "scripts" / "layouts_run.py"
TOL = 1e-5


class SaveInit(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, engine, module):
        engine.save_checkpoint(self.path)


def single(
    out: Path, name: str, resume: str | None = None, module: TokenLM | None = None, poison: bool = False, **kw
) -> TokenLM:
    """The token model on this one process, as layouts_run.py trains it elsewhere."""
    module = module or TokenLM(two_optimizers=True)
    module.poisoned = poison
    callbacks = [] if resume else [SaveInit(out / f"{name}-init")]
    engine = Engine(
        batch_size=GLOBAL_BATCH, max_epochs=2, seed=0, progress=False, ema_decay=0.9, clip_grad_norm=0.2,
        micro_batch_size=kw.pop("micro_batch_size", GLOBAL_BATCH), run_dir=str(out / name), resume=resume,
        callbacks=callbacks, **kw,
    )  # fmt: skip
    engine.fit(module, token_data(poison=5 if poison else None), token_data(40, seed=1))
    torch.save(engine.predict(module, token_data(40, seed=1)[0]), out / f"{name}-predict.pt")
    report = {"metrics": engine.metrics, "block_forwards": module.forward_calls, "skipped_steps": engine.skipped_steps}
    (out / f"{name}.json").write_text(json.dumps(report))
    return module


def _make(out: Path) -> None:
    launch(SCRIPT, "four", str(out), launcher_args=("--num_processes", "4"), timeout=420)
    launch(SCRIPT, "two", str(out), timeout=300)
    single(out, "single")
    single(out, "single-resumed", resume=str(out / "2x2" / "checkpoints" / "step-00000003"))
    single(out, "single-nan", poison=True, nan_policy="skip")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory, "layouts", _make)


def final(runs: Path, name: str) -> dict[str, torch.Tensor]:
    path = newest_complete(runs / name / "checkpoints")
    assert path is not None, name
    return read_weights(CheckpointReader(path))


def initial(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return read_weights(CheckpointReader(runs / f"{name}-init"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.multiprocess
def test_initial_weights_are_bitwise_identical_at_every_layout(runs):
    reference = initial(runs, "single")
    for name in ("2x2", "hsdp", "tp2"):
        got = initial(runs, name)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), name


@pytest.mark.multiprocess
def test_every_layout_reaches_the_one_process_parameters(runs):
    reference = final(runs, "single")
    for name in ("2x2", "hsdp", "tp2"):  # dp_shard 2 x tp 2 x (3 x 8); HSDP 2 x 2 x (1 x 12); TP 2 x (2 x 24)
        assert max_diff(final(runs, name), reference) <= TOL, name
    strategies = {n: json.loads((runs / f"{n}.json").read_text())["strategy"] for n in ("2x2", "hsdp", "tp2")}
    assert strategies == {"2x2": "fsdp+tp", "hsdp": "hsdp", "tp2": "tp"}


def test_the_tolerance_tells_a_wrong_weighting(tmp_path):
    # The same run with each micro-batch weighted as a mean over its sequences instead of its tokens (count_items
    # = sequences) ends more than the tolerance away: 1e-5 is not so loose that a wrong rule passes.
    class PerSequence(TokenLM):
        def count_items(self, batch):
            return len(batch[1])

    right = single(tmp_path, "right", micro_batch_size=8)
    wrong = single(tmp_path, "wrong", module=PerSequence(two_optimizers=True), micro_batch_size=8)
    reference = single(tmp_path, "reference")
    params = [dict(m.named_parameters()) for m in (right, wrong, reference)]
    diff = [max(float((a[k] - params[2][k]).detach().abs().max()) for k in a) for a in params[:2]]
    assert diff[0] <= TOL < diff[1], diff


@pytest.mark.multiprocess
def test_a_2x2_checkpoint_resumes_bitwise_there_and_within_tolerance_elsewhere(runs):
    uninterrupted = final(runs, "2x2")
    resumed = final(runs, "2x2-resumed")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    for name in ("single-resumed", "tp2-resumed", "fsdp4-resumed"):
        assert max_diff(final(runs, name), uninterrupted) <= TOL, name


@pytest.mark.multiprocess
def test_validation_ema_and_predict_agree_at_every_layout(runs):
    names = ("single", "2x2", "hsdp", "tp2")
    metrics = {n: json.loads((runs / f"{n}.json").read_text())["metrics"] for n in names}
    for n in names[1:]:
        for key in ("val/loss", "val/acc", "train/loss"):  # (validation runs with the EMA weights in)
            assert metrics[n][key] == pytest.approx(metrics["single"][key], abs=TOL), (n, key)
    rows = {n: torch.load(runs / f"{n}-predict.pt") for n in names}
    assert rows["single"].shape == (40, 12, 32)  # one row per item: no TP peer's duplicates, none missing
    for n in names[1:]:
        assert rows[n].shape == rows["single"].shape
        assert float((rows[n] - rows["single"]).abs().max()) <= 1e-4, n


@pytest.mark.multiprocess
def test_a_nan_in_one_micro_batch_skips_that_step_on_every_rank_at_every_layout(runs):
    reference = final(runs, "single-nan")
    for name in ("single-nan", "2x2-nan", "tp2-nan"):  # (the poisoned sequence is in one window per epoch)
        assert json.loads((runs / f"{name}.json").read_text())["skipped_steps"] == 2, name
    for name in ("2x2-nan", "tp2-nan"):
        assert max_diff(final(runs, name), reference) <= TOL, name
    assert max_diff(reference, final(runs, "single")) > 1e-3  # (two steps fewer: the skips are real)


@pytest.mark.multiprocess
def test_activation_checkpointing_changes_no_bit_and_recomputes_each_block_once(runs, tmp_path):
    # HSDP 2 x 2 with activation checkpointing against the same layout without it ...
    assert all(
        torch.equal(a, b) for a, b in zip(final(runs, "hsdp-ac").values(), final(runs, "hsdp").values(), strict=True)
    )
    calls = {n: json.loads((runs / f"{n}.json").read_text())["block_forwards"] for n in ("hsdp", "hsdp-ac")}
    assert calls["hsdp-ac"] == 2 * calls["hsdp"]  # each block's forward once more, in backward
    # ... and on one process.
    plain = single(tmp_path, "plain", micro_batch_size=8)
    recomputed = single(tmp_path, "ac", micro_batch_size=8, activation_checkpointing=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), recomputed.parameters(), strict=True))
    assert recomputed.forward_calls == 2 * plain.forward_calls


@pytest.mark.multiprocess
def test_a_sigterm_to_one_rank_stops_the_2x2_layout_at_one_step_and_it_resumes_bitwise(runs, tmp_path):
    import signal

    from tests.procs import Run

    cmd = [
        ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", "4",
        str(SCRIPT), "preempt", str(tmp_path),
    ]  # fmt: skip
    run_dir = tmp_path / "preempt"
    run_dir.mkdir()
    with Run(cmd, run_dir, tmp_path / "stopped.log", world=4) as run:
        run.wait_until(lambda: run.step() >= 2, 240, "training under way")
        assert run.signal(3, signal.SIGTERM) is not None  # one rank of the second TP pair
        assert run.wait(180) != 0
        exits = run.exits()
    assert {r: e["code"] for r, e in exits.items()} == {0: 143, 1: 143, 2: 143, 3: 143}, exits
    assert len({e["step"] for e in exits.values()}) == 1  # every rank at the same step
    stopped_at = exits[0]["step"]
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    with Run(cmd, run_dir, tmp_path / "resumed.log", world=4) as run:
        assert run.wait(240) == 0, run.output()[-3000:]
    resumed, uninterrupted = final(tmp_path, "preempt"), final(runs, "2x2")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
