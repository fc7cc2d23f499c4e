"""Crafted torch.distributed.checkpoint files with a valid hash (manifest.json and SHA256SUMS resealed to
match, as a careful tamperer would) are refused like any other corrupt checkpoint: a CorruptCheckpointError
naming the file, raised by load_weights and by `python -m framework export` (exit 2, "export: error: ..."),
and skipped by resume="auto", which resumes the older intact checkpoint, on one plain process (the shards
assembled whole) and under FSDP (the collective read). The index is checked against the files before DCP
reads or allocates anything: a tensor larger than the shard files is never allocated, no storage item
points outside the checkpoint, no planted pickle runs.

The sharded run is made once per module by tests/scripts/fsdp_run.py on one process (FSDP over a process
group of one): checkpoints at steps 4, 8 and 12; each case breaks step 12.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import framework
from framework import Engine
from framework.checkpoint import CorruptCheckpointError
from framework.checkpoint.shards import read_metadata
from framework.cli import main as cli
from tests.helpers import ROOT, reseal
from tests.scripts.exact_common import TokenModel, token_data
from tests.scripts.fsdp_run import EVERY, STEPS, data

SCRIPT = ROOT / "tests" / "scripts" / "fsdp_run.py"
MARKER = Path("/tmp/framework_dcp_pickle_marker_should_not_exist")
NEWEST = f"step-{STEPS:08d}"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--strategy", "fsdp"], cwd=ROOT, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "run" / "checkpoints" / NEWEST / ".metadata").is_file()
    return out


# ---------------------------------------------------------------- how each case breaks step 12 (then reseals it)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _edit_index(change: Callable[[object], object]) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        meta = read_metadata(ckpt / ".metadata")  # (the genuine index, through the allow-list)
        result = change(meta)
        (ckpt / ".metadata").write_bytes(pickle.dumps(meta if result is None else result))
        reseal(ckpt)

    return do


def _first_item(meta) -> object:
    return next(iter(meta.storage_data.values()))


def _point_at(name: str) -> Callable[[object], None]:
    def change(meta) -> None:
        _first_item(meta).relative_path = name

    return change


def _huge_tensor(meta) -> None:
    item = meta.state_dict_metadata["model/emb.weight"]  # float32 [50, 16] -> [2**20, 2**20]: 4 TiB
    item.size = torch.Size([2**20, 2**20])


def _past_the_end(meta) -> None:
    _first_item(meta).length = 10**12


def _shard_bytes(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        shard = ckpt / "__0_0.distcp"
        shard.write_bytes(make(shard.read_bytes()))
        reseal(ckpt)

    return do


def _same_size_pickle(original: bytes) -> bytes:
    planted = pickle.dumps(_Evil())
    return planted + b"\0" * (len(original) - len(planted))  # (same size: only its contents give it away)


# (case id, how step 12 breaks, the file the error names, what it says; also through a real FSDP resume)
CASES = [
    ("index: a pickle of a plain dict", _edit_index(lambda m: {"state_dict_metadata": {}}), ".metadata",
     "does not hold a DCP Metadata object", False),
    ("index: a planted pickle that would run a command", _edit_index(lambda m: _Evil()), ".metadata",
     "refusing", True),
    ("index: a storage item outside the checkpoint", _edit_index(_point_at("../../outside.distcp")), ".metadata",
     "points at '../../outside.distcp', which is not a .distcp file of this checkpoint", False),
    ("index: a storage item at another file of it", _edit_index(_point_at("state.json")), ".metadata",
     "points at 'state.json'", False),
    ("index: a 4 TB tensor", _edit_index(_huge_tensor), ".metadata",
     "claims shape [1048576, 1048576] (torch.float32), more than all shard files hold", True),
    ("index: an item past the end of its file", _edit_index(_past_the_end), ".metadata",
     "claims bytes 0+1000000000000 of __0_0.distcp", False),
    ("shard truncated", _shard_bytes(lambda b: b[: len(b) // 2]), ".metadata", "of __0_0.distcp, which has", True),
    ("shard a planted pickle", _shard_bytes(lambda b: pickle.dumps(_Evil())), ".metadata", "of __0_0.distcp", False),
    ("shard a planted pickle of the same size", _shard_bytes(_same_size_pickle), "__0_0.distcp",
     "the item at byte 0 is not a tensor record", True),
]  # fmt: skip


def _broken(sharded: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    (out / "result.pt").unlink()
    change(out / "run" / "checkpoints" / NEWEST)
    return out


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize(("change", "file", "says", "fsdp"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_crafted_shard_file_is_a_corrupt_checkpoint_everywhere(sharded, tmp_path, capsys, change, file, says, fsdp):
    out = _broken(sharded, tmp_path, change)
    run, ckpt = out / "run", out / "run" / "checkpoints" / NEWEST

    # load_weights: a CorruptCheckpointError naming the file; nothing loaded.
    model = TokenModel(seed=5)
    before = _params(model)
    with pytest.raises(CorruptCheckpointError) as info:
        framework.load_weights(model, ckpt)
    message = str(info.value)
    assert f"{ckpt / file}" in message and says in message, message
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))

    # export: "export: error: ..." naming the file, exit 2, no file written.
    target = tmp_path / "exported.safetensors"
    assert cli(["export", str(run), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: ") and file in err and "Traceback" not in err, err
    assert not target.exists()

    # resume="auto" on one plain process (the shards read whole): one warning, the older step 8 resumed.
    val = token_data(61, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(
            max_steps=STEPS, batch_size=48, micro_batch_size=8, clip_grad_norm=0.3, seed=0, progress=False,
            doctor="off", run_dir=str(run), checkpoint_every_n_steps=EVERY, resume="auto",
        )  # fmt: skip
        engine.fit(TokenModel(), data(False), val)
    skips = [str(w.message) for w in caught if "fail verification" in str(w.message)]
    assert len(skips) == 1 and NEWEST in skips[0] and file in skips[0], skips
    assert f"Using the older step-{2 * EVERY:08d}" in skips[0]
    assert engine.step == STEPS and (run / "checkpoints" / "abandoned" / NEWEST).is_dir()
    assert not MARKER.exists()

    if fsdp:  # the same under FSDP (a process group of one): the index is checked before the collective read
        again = _broken(sharded, tmp_path / "fsdp", change)
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(again), "--strategy", "fsdp", "--resume"], cwd=ROOT,
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"Using the older step-{2 * EVERY:08d}" in proc.stderr and says in proc.stderr, proc.stderr[-3000:]
        assert torch.load(again / "result.pt", weights_only=False)["step"] == STEPS
        assert not MARKER.exists()
