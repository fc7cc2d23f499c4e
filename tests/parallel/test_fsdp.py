"""framework/strategies/fsdp.py: sharded training (torch's FSDP2) on 2 and 3 CPU processes over gloo.

Exactness against one process (global batch 48: 1 process x micro 48 == 2 FSDP processes x 3 x 8,
clipping on), real sharding, validate/predict sharded, launch config == strategy in code, sharded
checkpoints that resume bitwise on 2 processes and within 1e-5 on 1 and 3 after a kill -9, the NaN
guard agreeing across ranks, and weights read back from a sharded run dir on one plain process.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import framework
from framework import Engine
from framework.checkpoint import CheckpointError
from framework.checkpoint.shards import UnsafeMetadata, read_metadata
from framework.cli import main as cli
from tests.helpers import ACCELERATE, ROOT, launch, reseal
from tests.procs import Run
from tests.scripts.exact_common import TokenModel, token_data
from tests.scripts.fsdp_run import EVERY, STEPS, NanTokenModel, data

SCRIPT = ROOT / "tests" / "scripts" / "fsdp_run.py"
TOL = 1e-5

pytestmark = pytest.mark.multiprocess


def reference(tmp: Path, nan: bool = False) -> tuple[dict[str, torch.Tensor], Engine, TokenModel]:
    """The same run on this one process, the whole global batch in one forward."""
    model = NanTokenModel() if nan else TokenModel()
    engine = Engine(
        max_steps=STEPS, batch_size=48, clip_grad_norm=0.3, seed=0, progress=False, doctor="off",
        nan_policy="skip" if nan else "raise",
    )  # fmt: skip
    engine.fit(model, data(nan), token_data(61, seed=2))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, engine, model


def result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=False)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_sharded_training_matches_one_process_and_the_strategy_in_code(tmp_path):
    launch(SCRIPT, tmp_path / "config", config="launch/cpu_fsdp.yaml", timeout=240)
    launch(SCRIPT, tmp_path / "code", "--strategy", "fsdp", config="launch/cpu_ddp.yaml", timeout=240)
    by_config, in_code = result(tmp_path / "config"), result(tmp_path / "code")
    assert by_config["strategy"] == in_code["strategy"] == "fsdp" and by_config["world_size"] == 2
    # The parameters really are sharded: each rank holds about half of every parameter's elements.
    whole = {k: v.numel() for k, v in by_config["params"].items()}
    for rank_shards in by_config["shards"]:
        for name, local in rank_shards.items():
            assert abs(local - whole[name] / 2) <= 1 + whole[name] * 0.02, (name, local, whole[name])
    # The launch config and Engine(strategy="fsdp") are the same run.
    assert all(torch.equal(by_config["params"][k], in_code["params"][k]) for k in whole)
    # Exactness: 2 processes x (3 micro-batches of 8) == 1 process x 48, clipping by the global norm.
    ref, engine, model = reference(tmp_path)
    assert max_diff(by_config["params"], ref) <= TOL
    # A naive accumulation (each micro-batch's mean / accumulation steps) would be far off: the check can fail.
    assert max_diff(by_config["params"], {k: torch.zeros_like(v) for k, v in ref.items()}) > 100 * TOL
    # validate and predict ran sharded, and agree with one process.
    val = engine.validate(model, token_data(61, seed=2))
    assert by_config["validate"].keys() == val.keys()
    assert all(abs(by_config["validate"][k] - val[k]) <= 1e-5 for k in val)
    assert by_config["predict"].shape == (61, 12, 50)
    assert float((by_config["predict"] - engine.predict(model, token_data(61, seed=2)[0])).abs().max()) <= 1e-4
    # One plain process assembles the whole weights from the sharded checkpoint (no process group).
    loaded = framework.load_weights(TokenModel(), tmp_path / "config" / "run")
    assert all(torch.equal(loaded.state_dict()[k], by_config["params"][k]) for k in whole)
    # `python -m framework export` writes the same whole weights from it, as one safetensors file.
    out = tmp_path / "exported.safetensors"
    assert cli(["export", str(tmp_path / "config" / "run"), "-o", str(out)]) == 0
    exported = load_file(str(out))
    assert exported.keys() == whole.keys() and all(torch.equal(exported[k], by_config["params"][k]) for k in whole)


def test_kill_9_then_resume_bitwise_on_2_processes_and_within_1e5_on_1_and_3(tmp_path):
    launch(SCRIPT, tmp_path / "straight", config="launch/cpu_fsdp.yaml", timeout=240)
    straight = result(tmp_path / "straight")["params"]
    killed = tmp_path / "killed"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu_fsdp.yaml"), str(SCRIPT), str(killed)]
    proc = subprocess.run([*cmd, "--kill-at", "6"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and not (killed / "result.pt").exists()
    latest = (killed / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{EVERY:08d}"  # the kill came between two checkpoints
    assert (killed / "run" / "checkpoints" / latest / ".metadata").is_file()
    for copy in ("one", "three"):
        shutil.copytree(killed, tmp_path / copy)
    launch(SCRIPT, killed, "--resume", config="launch/cpu_fsdp.yaml", timeout=240)
    resumed = result(killed)
    assert resumed["step"] == STEPS and all(torch.equal(resumed["params"][k], straight[k]) for k in straight)
    # Elastic: the same global batches and data order on another world size, up to float rounding.
    one = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one"), "--resume"], cwd=ROOT, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert result(tmp_path / "one")["world_size"] == 1 and max_diff(result(tmp_path / "one")["params"], straight) <= TOL
    launch(
        SCRIPT, tmp_path / "three", "--resume", config="launch/cpu_fsdp.yaml", timeout=240,
        launcher_args=("--num_processes", "3"),
    )  # fmt: skip
    three = result(tmp_path / "three")
    assert three["world_size"] == 3 and max_diff(three["params"], straight) <= TOL


def test_a_non_finite_step_is_skipped_on_every_rank(tmp_path):
    launch(SCRIPT, tmp_path / "nan", "--nan", config="launch/cpu_fsdp.yaml", timeout=240)
    sharded = result(tmp_path / "nan")
    ref, engine, _ = reference(tmp_path, nan=True)
    assert sharded["skipped"] == engine.skipped_steps == 1  # (rank 0 reports; both ranks ended at step 12)
    assert max_diff(sharded["params"], ref) <= TOL


def test_a_planted_pickle_in_the_shard_index_is_refused_and_never_runs(tmp_path):
    # A sharded checkpoint from FSDP on one plain process (a process group of one), in bf16 (the
    # MixedPrecisionPolicy path: bf16 compute, fp32 master weights and reduction), in a subprocess.
    made = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "a"), "--strategy", "fsdp", "--bf16"], cwd=ROOT,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    bf16 = result(tmp_path / "a")
    assert bf16["strategy"] == "fsdp" and all(v.dtype == torch.float32 for v in bf16["params"].values())
    fp32, _, _ = reference(tmp_path)
    assert 1e-6 < max_diff(bf16["params"], fp32) < 0.05  # bf16 compute: close to fp32, not equal
    ckpt = tmp_path / "a" / "run" / "checkpoints" / f"step-{STEPS:08d}"
    meta = ckpt / ".metadata"
    assert read_metadata(meta).state_dict_metadata  # the genuine index reads
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    meta.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeMetadata, match=r"refusing (posix|os)\.system"):
        read_metadata(meta)
    # The checkpoint's manifest no longer matches the planted file: refused before anything is read ...
    with pytest.raises(CheckpointError):
        framework.load_weights(TokenModel(), ckpt)
    # ... and with the manifest and SHA256SUMS forged to match, the restricted unpickler still refuses it.
    reseal(ckpt)
    with pytest.raises(UnsafeMetadata):
        framework.load_weights(TokenModel(), ckpt)
    assert not marker.exists()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """A finished 2-process FSDP run (checkpoints at steps 4, 8, 12; each rank's shards in __R_0.distcp)."""
    out = tmp_path_factory.mktemp("fsdp2")
    launch(SCRIPT, out, config="launch/cpu_fsdp.yaml", timeout=240)
    return out


def _bad_rng_of_rank_1(ckpt: Path) -> None:
    rng = json.loads((ckpt / "rng-rank1.json").read_text())
    rng["numpy"][1] = 9999  # (only rank 1 reads its RNG state: the other rank's checks all pass)
    (ckpt / "rng-rank1.json").write_text(json.dumps(rng))
    reseal(ckpt)


def _nan_in_rank_1s_optimizer_shard(ckpt: Path) -> None:
    """A NaN in rank 1's half of an Adam moment (its own __1_0.distcp item, rewritten as DCP wrote it): only
    rank 1 sees it, after the collective read."""
    meta = read_metadata(ckpt / ".metadata")
    key = "optimizer/state/emb.weight/exp_avg"
    (info,) = [i for x, i in meta.storage_data.items() if x.fqn == key and i.relative_path == "__1_0.distcp"]
    shard = bytearray((ckpt / "__1_0.distcp").read_bytes())
    chunk = torch.load(io.BytesIO(bytes(shard[info.offset : info.offset + info.length])), weights_only=True)
    chunk[0, 0] = float("nan")
    buf = io.BytesIO()
    torch.save(chunk, buf)
    assert len(buf.getvalue()) == info.length
    shard[info.offset : info.offset + info.length] = buf.getvalue()
    (ckpt / "__1_0.distcp").write_bytes(bytes(shard))
    reseal(ckpt)


@pytest.mark.parametrize(
    ("change", "rank_1_says"),
    [
        (_bad_rng_of_rank_1, "rng-rank1.json: numpy[1]"),
        (_nan_in_rank_1s_optimizer_shard, "__1_0.distcp: optimizer/state/emb.weight/exp_avg: holds NaN or inf"),
    ],
    ids=["rng-rank1.json", "rank 1's shard"],
)
def test_a_checkpoint_only_one_rank_refuses_is_skipped_by_every_rank_without_a_hang(
    two_ranks, tmp_path, change, rank_1_says
):
    """resume="auto" under FSDP: the ranks agree before the collective read (the RNG case: rank 1 alone would
    fall back and wait in a collective the others never join, for the whole 300 s timeout) and after it
    (the shard case), so every rank resumes the older checkpoint, and the run ends bitwise equal to the
    uninterrupted one."""
    out = tmp_path / "out"
    shutil.copytree(two_ranks, out)
    (out / "result.pt").unlink()
    newest = out / "run" / "checkpoints" / f"step-{STEPS:08d}"
    change(newest)
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu_fsdp.yaml"), str(SCRIPT), str(out), "--resume"]
    started = time.monotonic()
    with Run(cmd, out / "run", tmp_path / "resume.log", world=2) as run:
        rc = run.wait(120)
        output = run.output()
    assert rc == 0 and time.monotonic() - started < 60, output[-4000:]
    skips = [line for line in output.splitlines() if "fail verification" in line]
    assert len(skips) == 2 and all(f"Using the older step-{2 * EVERY:08d}" in line for line in skips), output[-4000:]
    assert sum(rank_1_says in line for line in skips) == 1, skips
    assert sum("rank(s) [1] could not use this checkpoint" in line for line in skips) == 1, skips
    resumed, straight = result(out), result(two_ranks)
    assert resumed["step"] == STEPS and all(
        torch.equal(resumed["params"][k], straight["params"][k]) for k in straight["params"]
    )
    assert (out / "run" / "checkpoints" / "abandoned" / f"step-{STEPS:08d}").is_dir()


@pytest.mark.multiprocess
def test_when_no_checkpoint_is_usable_on_one_rank_every_rank_stops_with_a_checkpoint_error_at_once(two_ranks, tmp_path):
    # Every checkpoint fails rank 1's check only: resume="auto" must not start over on top of them, and must
    # not hang either: every rank raises CheckpointError, well inside the collective timeout (300 s).
    out = tmp_path / "out"
    shutil.copytree(two_ranks, out)
    (out / "result.pt").unlink()
    checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 3
    for ckpt in checkpoints:
        _bad_rng_of_rank_1(ckpt)
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu_fsdp.yaml"), str(SCRIPT), str(out), "--resume"]
    started = time.monotonic()
    with Run(cmd, out / "run", tmp_path / "resume.log", world=2) as run:
        rc = run.wait(120)
        output = run.output()
    assert rc != 0 and time.monotonic() - started < 60, output[-4000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: framework.checkpoint.files.CheckpointError: no checkpoint under" in output, output[
            -4000:
        ]
    assert not (out / "result.pt").exists()
