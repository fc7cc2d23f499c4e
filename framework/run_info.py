"""What a run records about itself: the resolved config (``config.json``) and the model summary; and
whether a run dir already holds another run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .checkpoint import list_checkpoints
from .data import Batching
from .distributed import Runtime
from .optim import Optimization

if TYPE_CHECKING:
    from .engine import Engine

# Engine attributes that are run state, not configuration.
STATE_KEYS = {
    "step", "epoch", "batch_in_epoch", "items_read", "micro_steps", "skipped_steps",
    "consecutive_skips", "should_stop", "metrics", "trace", "callbacks", "doctor",
}  # fmt: skip


def earlier_run(run_dir: str | os.PathLike[str]) -> str | None:
    """What in ``run_dir`` shows that a run used it (its checkpoints, or its metrics.jsonl), or None.

    Example::

        earlier_run("runs/digits")   # "checkpoints up to step-00000270", or None for a new dir
    """
    root = Path(run_dir)
    found = list_checkpoints(root / "checkpoints")
    if found:
        return f"checkpoints up to {found[-1].path.name}"
    metrics = root / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics.jsonl"
    return None


def refuse_earlier_run(run_dir: str | os.PathLike[str] | None) -> None:
    """Raise if a fresh run (no ``resume``) would start in a run dir that holds another run.

    Its checkpoints there would be pruned as older than the earlier run's higher-numbered ones,
    ``resume="auto"`` would then continue the earlier run, and ``metrics.jsonl`` would mix both.

    Example::

        refuse_earlier_run("runs/digits")   # ValueError if runs/digits/checkpoints/step-* exist
    """
    what = earlier_run(run_dir) if run_dir is not None else None
    if what is not None:
        raise ValueError(
            f"run_dir={str(run_dir)!r} already holds an earlier run ({what}); a fresh run there would mix its "
            "checkpoints and metrics with that run's (keep_last would prune the new checkpoints first, and "
            "resume='auto' would pick the old ones). Fix: pass resume='auto' to continue that run, or use a "
            "new run_dir (or delete the old one)"
        )


def next_free_run_dir(base: str) -> str:
    """``base`` if no run has used it, else the first of ``base-2``, ``base-3``, ... that none has: a
    default run dir for recipes, so that running a command again starts a new run beside the old one.

    Example::

        next_free_run_dir("runs/digits-mlp")   # "runs/digits-mlp", then "runs/digits-mlp-2", ...
    """
    candidate, n = base, 1
    while earlier_run(candidate) is not None:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def recipe_run_dir(explicit: str | None, default: str, resume: str | None) -> str:
    """The run dir a recipe writes to, refused before it writes anything there (its own config
    included) where a fresh run would land in another run's dir: ``explicit`` if given, else
    ``default`` to resume, else the first free of ``default``, ``default-2``, ...

    Example::

        run_dir = recipe_run_dir(cfg.run_dir, "runs/adder", cfg.resume)
    """
    if explicit is None:
        return default if resume else next_free_run_dir(default)
    if not resume:
        refuse_earlier_run(explicit)
    return explicit


def write_config(
    engine: Engine, module: nn.Module, opt: Optimization, batching: Batching, rt: Runtime
) -> dict[str, Any]:
    """Write ``config.json`` (rank 0, with a run_dir) and return the config (the trackers get it too).

    Example::

        config = write_config(engine, module, opt, batching, runtime)
        config["accumulation"]
    """
    config = {k: jsonable(v) for k, v in vars(engine).items() if not k.startswith("_") and k not in STATE_KEYS}
    config.update(
        doctor=engine.doctor.level,
        module=type(module).__name__,
        optimizer=type(opt.optimizer).__name__,
        scheduler=type(opt.scheduler).__name__ if opt.scheduler is not None else None,
        world_size=rt.world_size,
        accumulation=batching.accumulation,
        global_batch=batching.batch_size,
        micro_batch_size=batching.micro_batch_size,
        mixed_precision=rt.mixed_precision,
        device=str(rt.device),
    )
    if engine.run_dir is None or not rt.is_main:
        return config
    os.makedirs(engine.run_dir, exist_ok=True)
    with open(os.path.join(engine.run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def jsonable(v: Any) -> Any:
    """A JSON-friendly stand-in for a config value (callables and objects by name)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return getattr(v, "__name__", type(v).__name__)


def summary(module: nn.Module, rt: Runtime, batching: Batching, nan_check: str = "step") -> str:
    """The model summary printed at fit start: parameters per top-level child, precision, world, batching,
    and when the NaN guard's verdict is read (``nan_check``: "step" or "deferred").

    Example::

        print(summary(module, runtime, batching, nan_check="step"))
    """
    lines = [f"{type(module).__name__}: parameters (total / trainable) per top-level child"]
    for name, child in module.named_children():
        total = sum(p.numel() for p in child.parameters())
        train = sum(p.numel() for p in child.parameters() if p.requires_grad)
        lines.append(f"  {name:<20} {total:>12,} {train:>12,}")
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    lines.append(f"  {'total':<20} {total:>12,} {train:>12,}")
    lines.append(
        f"precision={rt.mixed_precision} world_size={rt.world_size} device={rt.device} "
        f"global_batch={batching.batch_size} micro_batch={batching.micro_batch_size} "
        f"accumulation={batching.accumulation} nan_check={nan_check}"
    )
    return "\n".join(lines)
