"""Checkpoints: atomic, safe to load, and complete enough for bitwise-exact resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000120/``::

    model.safetensors        the module's weights (clean names, no DDP/compile prefixes)
    state.safetensors        optimizer, scheduler and GradScaler tensors
    state.json               their non-tensor parts, counters, data position, config, callbacks
    rng-rank{R}.json/.safetensors   each rank's torch/CUDA/numpy/python RNG states
    manifest.json            written last: every file with its size

It is written into a temporary directory, fsync'ed, given its manifest, then
renamed into place in one atomic step; ``latest`` is updated atomically after
that, and old checkpoints are pruned only then. Nothing is ever unpickled:
tensors come from safetensors and everything else from JSON, so a planted
pickle cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^step-(\d{8,})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


def dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one, record the aliases."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and sig in seen:
            aliases[name] = seen[sig]
            continue
        seen[sig] = name
        unique[name] = t.contiguous()
    return unique, aliases


# ---------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
    _fsync(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)


def temp_dir(root: Path, name: str) -> Path:
    return root / f".tmp-{name}"


def finalize(root: Path, tmp: Path, name: str, monitor_value: float | None = None) -> Path:
    """Write the manifest last, rename into place atomically, then point ``latest`` at it."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    manifest = {"files": {f: (tmp / f).stat().st_size for f in files}, "format": 1, "monitor_value": monitor_value}
    write_json(tmp / MANIFEST, manifest)
    _fsync(tmp)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. a manual save): swap, never leave a gap without one
        trash = root / f".trash-{name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)
    return final


# ---------------------------------------------------------------- finding and validating


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


@dataclass
class Found:
    path: Path
    step: int


def list_checkpoints(root: Path) -> list[Found]:
    """Every checkpoint directory under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [Found(p, int(m.group(1))) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, key=lambda f: f.step)


def newest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning naming them."""
    for found in reversed(list_checkpoints(root)):
        problem = verify(found.path)
        if problem is None:
            return found.path
        warnings.warn(f"skipping incomplete checkpoint {found.path}: {problem}", stacklevel=3)
    return None


def prune(root: Path, keep_last: int, keep_best: int, mode: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the ``keep_best`` best ones.

    Called only after a new checkpoint is complete, so there is always one to resume from.
    """
    complete = [f for f in list_checkpoints(root) if verify(f.path) is None]
    keep = {f.path for f in complete[-keep_last:]} if keep_last > 0 else set()
    if keep_best > 0:
        scored = []
        for f in complete:
            value = json.loads((f.path / MANIFEST).read_text()).get("monitor_value")
            if value is not None:
                scored.append((value if mode == "min" else -value, f.step, f.path))
        keep |= {p for _, _, p in sorted(scored)[:keep_best]}
    for f in complete:
        if f.path not in keep:
            shutil.rmtree(f.path, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- reading


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file; anything else (a planted pickle, say) is refused, never executed."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({e}); the checkpoint is corrupt or was replaced. "
            "Nothing was loaded and nothing was executed; resume from another checkpoint"
        ) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None


def load_weights(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    prefix: str | None = None,
    strict: bool = True,
    ema: bool = False,
) -> torch.nn.Module:
    """Load weights from a checkpoint directory, a ``.safetensors`` file, or ``RUN_DIR`` (its newest checkpoint).

    A sharded (FSDP) checkpoint is assembled into whole tensors in this process, no process group
    needed. Never unpickles: a file that is not safetensors is refused.

    Example::

        model = Classifier()
        framework.load_weights(model, "runs/digits")          # newest checkpoint of the run
        framework.load_weights(model, "runs/digits/checkpoints/step-00000120")
    """
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        newest = newest_complete(p / "checkpoints")
        if newest is None:
            raise CheckpointError(f"no complete checkpoint under {p / 'checkpoints'}")
        p = newest
    if p.is_dir():
        weights = checkpoint_weights(p, ema=ema)
    elif p.is_file():
        weights = read_weights(p)
    else:
        raise CheckpointError(f"{p} does not exist; pass a checkpoint directory, a run dir or a .safetensors file")
    if prefix:
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    module.load_state_dict(weights, strict=strict)
    return module


def checkpoint_weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The module's whole weights in one checkpoint directory (verified first): ``model.safetensors``, or the
    ``model/`` tensors of a sharded checkpoint (``shards/``, written by torch.distributed.checkpoint) plus its
    unsharded buffers. ``ema=True``: the EMA of the parameters instead (buffers from the model).

    Example::

        weights = checkpoint_weights(Path("runs/a/checkpoints/step-00000120"))
    """
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    name = "ema" if ema else "model"
    if (path / "shards" / ".metadata").is_file():
        from . import dcp

        weights = dcp.load_full(path / "shards", prefix=f"{name}/")
        unsharded = read_tensors(path / "state.safetensors")[0]
        for key, tensor in unsharded.items():
            if key.startswith("model/") and key[6:] not in weights:
                weights[key[6:]] = tensor  # (buffers, which FSDP does not shard)
        if ema and not weights:
            raise CheckpointError(f"{path} holds no EMA weights; train with Engine(ema_decay=...)")
        return weights
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path} holds no EMA weights; train with Engine(ema_decay=...)")
        averaged = read_weights(path / "ema.safetensors")
        return {**read_weights(path / "model.safetensors"), **averaged}
    return read_weights(path / "model.safetensors")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``model.safetensors`` as a state dict, with tied weights (stored once) shared again."""
    tensors, meta = read_tensors(path)
    for name, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    return tensors


# ---------------------------------------------------------------- one checkpoint, written and read


class CheckpointWriter:
    """Writes the files of one checkpoint into a staging dir; :meth:`finalize` publishes it atomically.

    Every rank writes its own files, then :meth:`commit`; the main process then :meth:`finalize` s
    (manifest last, rename, ``latest``, prune). No collective inside: callers barrier.

    Example::

        w = CheckpointWriter(root, "step-00000120", rank=0, world_size=1, is_main=True)
        w.prepare()
        w.json("state.json", {...}); w.tensors("model.safetensors", weights)
        w.commit()
        path = w.finalize(keep_last=3, keep_best=0, mode="min", monitor_value=None)
    """

    def __init__(self, root: Path, name: str, *, rank: int, world_size: int, is_main: bool) -> None:
        self.root, self.name, self.rank, self.world_size, self.is_main = root, name, rank, world_size, is_main
        self.staging = temp_dir(root, name)

    def prepare(self) -> None:
        """Main process: a fresh, empty staging dir (the other ranks wait at a barrier after it)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def json(self, filename: str, obj: Any) -> None:
        write_json(self.staging / filename, obj)

    def tensors(self, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        write_tensors(self.staging / filename, tensors, metadata)

    def external(self, filename: str) -> None:
        """A file written into the staging dir by something else (torch.distributed.checkpoint's shards)."""
        _fsync(self.staging / filename)

    def commit(self) -> None:
        """This rank's files are written and flushed."""

    def finalize(self, *, keep_last: int, keep_best: int, mode: str, monitor_value: float | None) -> Path:
        """Main process: publish the checkpoint (manifest last, atomic rename, ``latest``), then prune."""
        final = finalize(self.root, self.staging, self.name, monitor_value)
        prune(self.root, keep_last, keep_best, mode)
        return final


class CheckpointReader:
    """One complete checkpoint, checked against its manifest before anything is read.

    Example::

        r = CheckpointReader(path)
        state = r.json("state.json"); weights = r.tensors("model.safetensors")
    """

    def __init__(self, path: Path) -> None:
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"cannot use {path}: {problem}; pass a complete checkpoint or resume='auto'")
        self.path = path
        self.files = sorted(json.loads((path / MANIFEST).read_text())["files"])

    def has(self, filename: str) -> bool:
        return filename in self.files

    def json(self, filename: str) -> Any:
        return read_json(self.path / filename)

    def tensors(self, filename: str) -> dict[str, torch.Tensor]:
        return read_tensors(self.path / filename)[0]
