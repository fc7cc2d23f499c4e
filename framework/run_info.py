"""What a run records about itself: the resolved config (``config.json``) and the model summary."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from torch import nn

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


def summary(module: nn.Module, rt: Runtime, batching: Batching) -> str:
    """The model summary printed at fit start: parameters per top-level child, precision, world, batching.

    Example::

        print(summary(module, runtime, batching))
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
        f"accumulation={batching.accumulation}"
    )
    return "\n".join(lines)
