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
import random
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


def finalize(root: Path, tmp: Path, name: str) -> Path:
    """Write the manifest last, rename into place atomically, then point ``latest`` at it."""
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    write_json(tmp / MANIFEST, {"files": {f: (tmp / f).stat().st_size for f in files}, "format": 1})
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


def validate(path: Path) -> str | None:
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
        problem = validate(found.path)
        if problem is None:
            return found.path
        warnings.warn(f"skipping incomplete checkpoint {found.path}: {problem}", stacklevel=3)
    return None


def prune(root: Path, keep_last: int, keep_best: int, mode: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the ``keep_best`` best ones.

    Called only after a new checkpoint is complete, so there is always one to resume from.
    """
    complete = [f for f in list_checkpoints(root) if validate(f.path) is None]
    keep = {f.path for f in complete[-keep_last:]} if keep_last > 0 else set()
    if keep_best > 0:
        scored = []
        for f in complete:
            value = json.loads((f.path / "state.json").read_text()).get("monitor_value")
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


def load_weights(module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True) -> torch.nn.Module:
    """Load weights from a checkpoint directory, a ``.safetensors`` file, or ``RUN_DIR`` (its newest checkpoint).

    Never unpickles: a file that is not safetensors is refused.

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
        problem = validate(p)
        if problem is not None:
            raise CheckpointError(f"{p} is not a complete checkpoint: {problem}")
        p = p / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist; pass a checkpoint directory, a run dir or a .safetensors file")
    module.load_state_dict(read_weights(p), strict=strict)
    return module


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``model.safetensors`` as a state dict, with tied weights (stored once) shared again."""
    tensors, meta = read_tensors(path)
    for name, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[name] = tensors[target]
    return tensors


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


def save_engine(engine: Any, fit: Any, root: Path, name: str | None = None, monitor_value: float | None = None) -> Path:
    """Save everything a bitwise-exact resume needs. Collective: every rank calls it.

    ``monitor_value`` (epoch-end saves, right after validation) ranks the checkpoint for ``keep_best``.
    """
    rt = engine._rt
    name = name or f"step-{engine.step:08d}"
    tmp = temp_dir(root, name)
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        write_tensors(tmp / "model.safetensors", unique, {"aliases": json.dumps(aliases)})
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
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", state)
    meta, rng_tensors = rng_state()
    write_json(tmp / f"rng-rank{rt.rank}.json", meta)
    write_tensors(tmp / f"rng-rank{rt.rank}.safetensors", rng_tensors)
    rt.barrier()
    if rt.is_main:
        finalize(root, tmp, name)
        prune(root, engine.keep_last, engine.keep_best, engine.mode)
    rt.barrier()
    return root / name


COUNTERS = (
    "step", "epoch", "batch_in_epoch", "items_read", "micro_steps", "skipped_steps", "consecutive_skips", "should_stop",
)  # fmt: skip


def load_engine(engine: Any, fit: Any, path: Path) -> None:
    """Restore a checkpoint written by :func:`save_engine` into a prepared fit."""
    rt = engine._rt
    problem = validate(path)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: {problem}; pass a complete checkpoint or resume='auto'")
    state = read_json(path / "state.json")
    diffs = _differences(state["config"], fit.fingerprint)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the run's configuration differs from the checkpoint's:\n  "
            + "\n  ".join(diffs)
            + "\nrestore these settings, or start a new run_dir"
        )
    # Read and check every file before changing anything, so a bad checkpoint leaves the run untouched.
    tensors, _ = read_tensors(path / "state.safetensors")
    weights = read_weights(path / "model.safetensors")
    rng_file = path / f"rng-rank{rt.rank}.json"
    same_world = state["world_size"] == rt.world_size and rng_file.is_file()
    if same_world:
        rng_meta, rng_tensors = read_json(rng_file), read_tensors(path / f"rng-rank{rt.rank}.safetensors")[0]
    fit.module.load_state_dict(weights)
    optim_state = unflatten(state["optimizer"], tensors)
    if rt.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optim_state = FSDP.optim_state_dict_to_load(fit.model, fit.opt.optimizer, optim_state)
    fit.opt.optimizer.load_state_dict(optim_state)
    if state["scheduler"] is not None:
        if fit.opt.scheduler is None:
            raise CheckpointError(f"{path} has LR scheduler state but configure_optimizers returned no scheduler")
        fit.opt.scheduler.load_state_dict(unflatten(state["scheduler"], tensors))
    if state["scaler"] is not None and rt.scaler is not None:
        rt.scaler.load_state_dict(unflatten(state["scaler"], tensors))
    if state["loader_epoch_rng"] is not None and hasattr(fit.source, "resume_rng"):
        fit.source.resume_rng = unflatten(state["loader_epoch_rng"], tensors)
    for k, v in state["counters"].items():
        setattr(engine, k, v)
    engine.metrics = dict(state["metrics"])
    # Stateful callbacks are matched by class, in order; a stateless or newly added one starts fresh.
    remaining = list(engine.callbacks)
    for cb_name, cb_state in state["callbacks"]:
        match = next((cb for cb in remaining if type(cb).__name__ == cb_name), None)
        if match is None:
            raise CheckpointError(
                f"cannot resume from {path}: it holds state for a {cb_name} callback, but this run has none; "
                f"pass the same callbacks as the run that saved it (now: {[type(cb).__name__ for cb in engine.callbacks]})"
            )
        remaining.remove(match)
        match.load_state_dict(cb_state)
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
