"""Checkpoints: atomic, verified, safe to load, and complete enough for bitwise-exact resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000120/``::

    model.safetensors        the module's weights (clean names, no DDP/compile prefixes)
    state.safetensors        optimizer, scheduler and GradScaler tensors
    state.json               their non-tensor parts, counters, data position, config, callbacks
    rng-rank{R}.json/.safetensors   each rank's torch/CUDA/numpy/python RNG states
    manifest.json            written last: every file with its size and SHA-256, the monitored value
    SHA256SUMS               the same hashes for ``sha256sum -c``

The file layer lives in its own modules, re-exported here: writing and verifying one checkpoint
(:mod:`framework.checkpoint_io`), the manifest format (:mod:`framework.manifest`), choosing,
pruning and branching a run's checkpoints (:mod:`framework.checkpoint_dir`), background writes
(:mod:`framework.async_checkpoint`), weights for inference (:mod:`framework.weights`), safe
file writes (:mod:`framework.files`) and the checks of what is read (:mod:`framework.schema`).
Nothing is ever unpickled: tensors come from safetensors and everything else from JSON, so a
planted pickle cannot run code.

This module keeps the engine's state <-> a checkpoint (:func:`save_engine`, :func:`load_engine`).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .async_checkpoint import AsyncCheckpointer
from .checkpoint_dir import (
    ABANDONED,
    CHECKPOINT_RE,
    LATEST,
    Found,
    abandon_newer,
    list_checkpoints,
    load_newest,
    newest_complete,
    prune,
    read_latest,
    validate,
    write_latest,
)
from .checkpoint_io import CheckpointReader, CheckpointWriter, staging_dir, verify
from .errors import CheckpointError, CorruptCheckpointError
from .manifest import MANIFEST, SUMS
from .schema import JSON, Bool, Float, Int, Keys, ListOf, MapOf, Maybe, Str, TupleOf, expect
from .weights import check_fits, load_weights, read_weights

__all__ = [
    "ABANDONED",
    "CHECKPOINT_RE",
    "LATEST",
    "MANIFEST",
    "SUMS",
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "CorruptCheckpointError",
    "Found",
    "abandon_newer",
    "list_checkpoints",
    "load_engine",
    "load_newest",
    "load_weights",
    "newest_complete",
    "prune",
    "read_latest",
    "read_weights",
    "save_engine",
    "seed_everything",
    "staging_dir",
    "validate",
    "verify",
    "write_latest",
]


# ---------------------------------------------------------------- tensors <-> JSON + safetensors


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in ``obj`` by a reference, collecting tensors under ``prefix``.

    Handles what optimizer/scheduler/scaler state dicts hold: dicts (any key type),
    lists, tuples, numbers, strings, None and tensors.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: flatten(v, tensors, f"{prefix}/{k}") for k, v in obj.items()}
        return {"__items__": [[_key(k), flatten(v, tensors, f"{prefix}/{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint; state dicts may hold tensors, "
        "numbers, strings, lists, tuples and dicts only"
    )


def _key(k: Any) -> Any:
    if isinstance(k, (bool, int, float, str)) or k is None:
        return k
    raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


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


# ---------------------------------------------------------------- RNG


def rng_state() -> tuple[Any, dict[str, torch.Tensor]]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as (JSON part, tensors)."""
    import numpy as np

    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return meta, tensors


def set_rng_state(meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


_RNG_META = Keys(
    {
        "numpy": TupleOf(Str(choices=("MT19937",)), Int(0, 624), Int(0, 1), Float(finite=False)),
        "python": TupleOf(Int(), ListOf(Int(0, 2**32 - 1), min_len=625, max_len=625), Maybe(Float(finite=False))),
    }
)


def check_rng_state(meta: Any, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``where`` (and the key) unless ``meta`` and ``tensors``
    (an ``rng-rank{R}`` pair) are RNG states that :func:`set_rng_state` can apply whole: types and
    shapes first, then each state applied to a scratch generator (a state of the right size can
    still be invalid), so that a bad one fails before anything of the run changes.

    Example::

        check_rng_state(reader.json("rng-rank0.json"), reader.tensors("rng-rank0.safetensors"), where=ckpt)
    """
    import numpy as np

    expect(meta, _RNG_META, where=where, hint=_CORRUPT)
    tensor_file = where.with_suffix(".safetensors")
    expected = {"torch": (torch.uint8, [torch.get_rng_state().numel()]), "numpy": (torch.int32, [624])}
    for key, t in tensors.items():
        want = expected.get(key, (torch.uint8, [16]) if re.fullmatch(r"cuda/\d+", key) else None)
        if want is None:
            raise CorruptCheckpointError(f"{tensor_file}: {key}: not an RNG state this framework writes; {_CORRUPT}")
        if t.dtype != want[0] or list(t.shape) != want[1]:
            raise CorruptCheckpointError(
                f"{tensor_file}: {key}: expected {want[0]} of shape {want[1]}, got {t.dtype} of shape "
                f"{list(t.shape)}; {_CORRUPT}"
            )
    for key in expected:
        if key not in tensors:
            raise CorruptCheckpointError(f"{tensor_file}: {key}: missing; {_CORRUPT}")
    kind, pos, has_gauss, gauss = meta["numpy"]
    version, internal, gauss_next = meta["python"]
    try:
        torch.Generator().set_state(tensors["torch"])
        np.random.RandomState().set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    except (RuntimeError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{tensor_file}: not a valid RNG state ({e}); {_CORRUPT}") from None
    try:
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (ValueError, TypeError, OverflowError) as e:
        raise CorruptCheckpointError(f"{where}: python: not a valid RNG state ({e}); {_CORRUPT}") from None


# ---------------------------------------------------------------- the engine's state <-> a checkpoint


_KERNEL_FLAGS = ("foreach", "fused", "capturable")


def fingerprint(
    engine: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int | None
) -> dict[str, Any]:
    """What a checkpoint depends on: resuming with any of it changed is an error."""
    tensors: dict[str, torch.Tensor] = {}
    # (the kernel flags say how a step is computed, not what: a run may resume on other hardware)
    settings = {k: v for k, v in optimizer.defaults.items() if not callable(v) and k not in _KERNEL_FLAGS}
    defaults = flatten(settings, tensors, "defaults")
    return {
        "batch_size": batch_size,
        "seed": engine.seed,
        "shuffle": engine.shuffle,
        "model": {k: list(v.shape) for k, v in module.state_dict().items()},
        "optimizer": {"class": type(optimizer).__name__, "groups": len(optimizer.param_groups), "defaults": defaults},
    }


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"model.{name}: checkpoint {a.get(name)} vs now {b.get(name)}")
        else:
            out.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    return out


def save_engine(
    engine: Any,
    fit: Any,
    root: Path,
    name: str | None = None,
    monitor_value: float | None = None,
    saver: AsyncCheckpointer | None = None,
) -> Path:
    """Save everything a bitwise-exact resume needs. Collective: every rank calls it.

    ``monitor_value`` (epoch-end saves, right after validation) ranks the checkpoint for ``keep_best``.
    With ``saver`` (``checkpoint_async=True``) the state is copied now and written in the background.
    """
    rt = engine._rt
    name = name or f"step-{engine.step:08d}"
    where = dict(rank=rt.rank, world_size=rt.world_size, is_main=rt.is_main)
    writer = saver.writer(root, name, **where) if saver is not None else CheckpointWriter(root, name, **where)
    writer.prepare()
    rt.barrier()
    if rt.fsdp:  # gathering sharded state is itself collective
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model_state = rt.accelerator.get_state_dict(fit.model)
        optim_state = FSDP.optim_state_dict(fit.model, fit.opt.optimizer)
    else:
        model_state = fit.module.state_dict()
        optim_state = fit.opt.optimizer.state_dict()
    if rt.is_main:
        unique, aliases = dedup_shared(model_state)
        writer.tensors("model.safetensors", unique, {"aliases": json.dumps(aliases)})
        tensors: dict[str, torch.Tensor] = {}
        loader_rng = getattr(fit.source, "epoch_rng", None)
        state = {
            "optimizer": flatten(optim_state, tensors, "optimizer"),
            "scheduler": flatten(fit.opt.scheduler.state_dict(), tensors, "scheduler") if fit.opt.scheduler else None,
            "scaler": flatten(rt.scaler.state_dict(), tensors, "scaler") if rt.scaler is not None else None,
            "loader_epoch_rng": flatten(loader_rng, tensors, "loader_epoch_rng") if loader_rng is not None else None,
            "counters": {k: getattr(engine, k) for k in COUNTERS},
            "world_size": rt.world_size,
            "config": fit.fingerprint,
            "callbacks": [[type(cb).__name__, st] for cb in engine.callbacks if (st := cb.state_dict())],
            "metrics": engine.metrics,
            "monitor_value": monitor_value,
        }
        writer.tensors("state.safetensors", tensors)
        writer.json("state.json", state)
    meta, rng_tensors = rng_state()
    writer.json(f"rng-rank{rt.rank}.json", meta)
    writer.tensors(f"rng-rank{rt.rank}.safetensors", rng_tensors)
    writer.commit()  # (the main process waits for every rank's record in finalize: no barrier needed)
    if rt.is_main:
        writer.finalize(
            keep_last=engine.keep_last, keep_best=engine.keep_best, mode=engine.mode, monitor_value=monitor_value
        )
    rt.barrier()
    return root / name


COUNTERS = (
    "step", "epoch", "batch_in_epoch", "items_read", "micro_steps", "skipped_steps", "consecutive_skips", "should_stop",
)  # fmt: skip

# What load_engine accepts in state.json: a stand-in until the state layer brings its own schema.
# Known keys only: a crafted checkpoint must not set anything but these counters on the engine.
_STATE = Keys(
    {
        "optimizer": JSON(),
        "scheduler": JSON(),
        "scaler": JSON(),
        "loader_epoch_rng": JSON(),
        "counters": Keys({**{k: Int(min=0) for k in COUNTERS if k != "should_stop"}, "should_stop": Bool()}),
        "world_size": Int(min=1),
        "config": JSON(),
        "callbacks": ListOf(TupleOf(Str(), JSON())),
        "metrics": MapOf(Float(finite=False)),
        "monitor_value": Maybe(Float(finite=False)),
    }
)
_CORRUPT = "the checkpoint is damaged or was edited; nothing was applied. Resume from another checkpoint"


def _unflatten_checked(state: dict[str, Any], key: str, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    """unflatten, with a malformed reference (a missing tensor, a bad item list) named instead of raw."""
    try:
        return unflatten(state[key], tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{where}: {key}: a malformed entry ({type(e).__name__}: {e}); {_CORRUPT}"
        ) from None


def load_engine(engine: Any, fit: Any, path: Path) -> None:
    """Restore a checkpoint written by :func:`save_engine` into a prepared fit.

    Everything is read, verified and checked before anything is applied: a bad checkpoint raises
    (:class:`CorruptCheckpointError` for damaged or malformed files) and leaves the run untouched.
    """
    rt = engine._rt
    reader = CheckpointReader(path)  # (verifies every file's size and SHA-256)
    where = path / "state.json"
    state = expect(reader.json("state.json"), _STATE, where=where, hint=_CORRUPT)
    diffs = _differences(state["config"], fit.fingerprint)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the run's configuration differs from the checkpoint's:\n  "
            + "\n  ".join(diffs)
            + "\nrestore these settings, or start a new run_dir"
        )
    tensors = reader.tensors("state.safetensors")
    weights = read_weights(reader)
    check_fits(fit.module, weights, strict=True, where=path / "model.safetensors")
    rng_file = f"rng-rank{rt.rank}.json"
    same_world = state["world_size"] == rt.world_size and reader.has(rng_file)
    if same_world:
        rng_meta = reader.json(rng_file)
        rng_tensors = reader.tensors(f"rng-rank{rt.rank}.safetensors")
        check_rng_state(rng_meta, rng_tensors, where=path / rng_file)
    optim_state = _unflatten_checked(state, "optimizer", tensors, where)
    resolved = {k: _unflatten_checked(state, k, tensors, where) for k in ("scheduler", "scaler", "loader_epoch_rng")}
    if resolved["scheduler"] is not None and fit.opt.scheduler is None:
        raise CheckpointError(f"{path} has LR scheduler state but configure_optimizers returned no scheduler")
    # Stateful callbacks are matched by class, in order; a stateless or newly added one starts fresh.
    remaining, matched = list(engine.callbacks), []
    for cb_name, cb_state in state["callbacks"]:
        match = next((cb for cb in remaining if type(cb).__name__ == cb_name), None)
        if match is None:
            raise CheckpointError(
                f"cannot resume from {path}: it holds state for a {cb_name} callback, but this run has none; "
                f"pass the same callbacks as the run that saved it (now: {[type(cb).__name__ for cb in engine.callbacks]})"
            )
        remaining.remove(match)
        matched.append((match, cb_state))

    # Apply. The optimizer first: load_state_dict checks its groups before it changes anything.
    if rt.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optim_state = FSDP.optim_state_dict_to_load(fit.model, fit.opt.optimizer, optim_state)
    try:
        fit.opt.optimizer.load_state_dict(optim_state)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: optimizer: {e}; {_CORRUPT}") from None
    fit.module.load_state_dict(weights)
    if resolved["scheduler"] is not None:
        fit.opt.scheduler.load_state_dict(resolved["scheduler"])
    if resolved["scaler"] is not None and rt.scaler is not None:
        rt.scaler.load_state_dict(resolved["scaler"])
    if resolved["loader_epoch_rng"] is not None and hasattr(fit.source, "resume_rng"):
        fit.source.resume_rng = resolved["loader_epoch_rng"]
    for k in COUNTERS:  # (only these: the schema allowed no other key)
        setattr(engine, k, state["counters"][k])
    engine.metrics = dict(state["metrics"])
    for cb, cb_state in matched:
        cb.load_state_dict(cb_state)
    if same_world:
        set_rng_state(rng_meta, rng_tensors)
    else:
        # Elastic resume: the data order and global batch carry over exactly, but
        # per-rank random streams (dropout, augmentation) cannot be re-split.
        if rt.is_main:
            warnings.warn(
                f"resuming a {state['world_size']}-process checkpoint on {rt.world_size} process(es): data order, "
                "global batch and optimizer state carry over exactly, but per-rank RNG streams (dropout, random "
                "augmentation) cannot; they are re-seeded from (seed, step, rank)",
                stacklevel=3,
            )
        seed_everything(engine.seed * 1_000_003 + engine.step * 101 + rt.rank)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``.

    Example::

        seed_everything(0)
    """
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
