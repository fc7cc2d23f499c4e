"""The Engine's arguments, validated once: :class:`EngineConfig`.

``Engine(max_epochs=10, batch_size=64, ...)`` keeps its flat keyword arguments (the contract);
they are gathered here into one typed, nested object and every one is checked at construction
(type, range, choices), with a message that names the argument and the fix. Everything else
reads the config: the loop, ``config.json`` (:meth:`EngineConfig.to_json`) and the resume
fingerprint. Each field's documentation lives once, in its ``doc`` metadata;
:func:`describe` renders it (the README's argument table is tested against it).

Example:

    >>> config = EngineConfig.from_options(max_epochs=10, batch_size=64, run_dir="runs/a")
    >>> config.stop.max_epochs, config.data.batch_size, config.checkpoint.keep_last
    (10, 64, 3)
    >>> framework.Engine(keep_last=0)
    Traceback (most recent call last):
    ...
    ValueError: keep_last=0; use an int >= 1, e.g. keep_last=3
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .data.sources import DEFAULT_PREFETCH

# ---------------------------------------------------------------- checks (each names the fix)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(example: int) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        if value is None or (_int(value) and value >= 1):
            return None
        if isinstance(value, float) and value.is_integer():
            return f"use an int, e.g. {name}={int(value)}"
        if isinstance(value, float):
            return f"use a whole number, e.g. {name}={max(1, math.ceil(value))}"
        return f"use a positive int, e.g. {name}={example}, or None"

    return check


def _count_at_least(minimum: int, example: int) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        if _int(value) and value >= minimum:
            return None
        return f"use an int >= {minimum}, e.g. {name}={example}"

    return check


def _positive_number(example: float) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return None
        return f"use a positive finite number, e.g. {name}={example}, or None"

    return check


def _fraction(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and 0.0 < value < 1.0:
        return None
    return f"use a float strictly between 0 and 1, e.g. {name}=0.999, or None for no EMA"


def _flag(name: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else f"use True or False, e.g. {name}=True"


def _flag_or_none(name: str, value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "use True, False or None (automatic)"


def _choices(*options: Any) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        if value in options and (value is None or type(value) is str):
            return None
        names = [f'"{o}"' for o in options if o is not None]
        shown = ", ".join(names[:-1]) + f" or {names[-1]}" + (" (or None)" if None in options else "")
        near = difflib.get_close_matches(str(value), [str(o) for o in options if o is not None], n=1)
        return f"use {shown}" + (f" (did you mean {near[0]!r}?)" if near else "")

    return check


def _seed(name: str, value: Any) -> str | None:
    if _int(value) and 0 <= value < 2**63:
        return None
    return f"use a non-negative int below 2**63, e.g. {name}=0"


def _path_or_none(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not ((isinstance(value, str) and value) or hasattr(value, "__fspath__")):
        return f"use a directory path (str), e.g. {name}='runs/exp1', or None"
    # (a stat, nothing written: a file where the dir would go fails later, after the run dir's lock, as a
    # raw FileExistsError; said here, with the fix)
    path = os.path.abspath(os.fspath(value))
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        what = "is an existing file" if path == os.path.abspath(os.fspath(value)) else f"is inside {path}, a file"
        return f"the path {what}, not a directory; pass a directory (a new one, or an earlier run's run_dir)"
    return None


def _resume(name: str, value: Any) -> str | None:
    if value is None or value == "auto" or hasattr(value, "__fspath__"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":  # ("AUTO" would be read as a path)
        return "use 'auto' (lowercase) for the newest complete checkpoint in run_dir; a dir of that name: './AUTO'"
    if isinstance(value, str) and value:
        return None
    return "use None (a fresh run), 'auto' (the newest complete checkpoint in run_dir) or a checkpoint path"


def _text(name: str, value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"use a non-empty str, e.g. {name}='val/loss'"


# The signals that ask a process to stop (a scheduler's preemption notice, a terminal hang-up, a CPU-time
# limit): the only ones a checkpoint-and-exit handler may take over. The others keep their own meaning.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU")
_NOT_STOP = {
    **dict.fromkeys(("SIG_DFL", "SIG_IGN"), "is a signal handler constant, not a signal"),
    **dict.fromkeys(("SIG_BLOCK", "SIG_UNBLOCK", "SIG_SETMASK"), "is a signal-mask constant, not a signal"),
    **dict.fromkeys(("SIGKILL", "SIGSTOP"), "cannot be caught"),
    **dict.fromkeys(
        ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGIOT", "SIGTRAP", "SIGSYS", "SIGSTKFLT"),
        "reports a crash; handling it would leave a crashed process running (a segfault would hang, not die)",
    ),
}


def _signals(name: str, value: Any) -> str | None:
    if isinstance(value, str):
        return f"use a tuple of signal names, e.g. {name}=({value!r},), not a bare string"
    if not isinstance(value, (tuple, list)):
        return f"use a tuple of signal names, e.g. {name}=('SIGTERM', 'SIGUSR1'), or () for none"
    allowed = ", ".join(repr(s) for s in STOP_SIGNALS)
    for s in value:
        if isinstance(s, str) and s in STOP_SIGNALS and hasattr(signal, s):
            continue
        if isinstance(s, str) and s in _NOT_STOP:
            why = _NOT_STOP[s]
        elif isinstance(s, str) and hasattr(signal, s) and s.startswith("SIG"):
            why = "does not ask a process to stop (the process relies on its usual meaning)"
        else:
            why = "is not a signal name"
        return f"{s!r} {why}; preemption_signals takes signals that mean 'stop': {allowed}"
    return None


def _trackers(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, (str, list, tuple)):
        return None
    return f"use a tracker name or a list of them, e.g. {name}=['tensorboard'], or None"


def _callable_or_none(name: str, value: Any) -> str | None:
    return None if value is None or callable(value) else "use a function (list of samples -> batch) or None"


def _accumulation_hint(name: str, options: Mapping[str, Any]) -> str:
    steps, batch = options[name], options.get("batch_size")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rule = "accumulation = batch_size / (micro_batch_size x world_size)"
    if _int(steps) and steps >= 1 and _int(batch) and batch % (steps * world) == 0:
        on = f"{world} processes" if world > 1 else "1 process"
        return (f"the engine derives accumulation from the batch sizes ({rule}): for {steps} steps on {on}, pass "
                f"micro_batch_size={batch // (steps * world)} with batch_size={batch}")  # fmt: skip
    return (f"the engine derives accumulation from the batch sizes ({rule}): pass micro_batch_size = batch_size / "
            f"({name} x world_size), e.g. batch_size=64, micro_batch_size=16 for 4 steps on 1 process")  # fmt: skip


_PRECISIONS = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16": "fp16", "32": "no", "32-true": "no"}


def _precision_hint(name: str, options: Mapping[str, Any]) -> str:
    value = str(options[name])
    mapped = _PRECISIONS.get(value, value if value in ("bf16", "fp16", "no") else None)
    example = f"mixed_precision={mapped!r}" if mapped else "mixed_precision='bf16'"
    return f"use {example} ('no' | 'bf16' | 'fp16': autocast for forward and loss, fp32 master weights)"


_OPTIMIZER = "the optimizer is the module's: return it from configure_optimizers, e.g. torch.optim.AdamW(self.parameters(), {}) (default: AdamW, lr=1e-3)"
_LAUNCHER = ("processes come from the launcher, not from the Engine: accelerate launch --config_file "
             "launch/cpu_ddp.yaml (2 CPU processes), launch/ddp.yaml (every GPU of a machine), launch/multinode.yaml "
             "(several machines) script.py; the script does not change")  # fmt: skip

# Arguments users bring from Lightning, Accelerate and the HF Trainer: what to write here instead.
_HABITS: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    "gradient_accumulation_steps": _accumulation_hint,
    "accumulate_grad_batches": _accumulation_hint,
    "lr": lambda n, o: _OPTIMIZER.format(f"lr={o[n]!r}"),
    "learning_rate": lambda n, o: _OPTIMIZER.format(f"lr={o[n]!r}"),
    "weight_decay": lambda n, o: _OPTIMIZER.format(f"weight_decay={o[n]!r}"),
    "optimizer": lambda n, o: _OPTIMIZER.format("lr=3e-4"),
    "precision": _precision_hint,
    "devices": lambda n, o: _LAUNCHER,
    "num_nodes": lambda n, o: _LAUNCHER,
    "gpus": lambda n, o: _LAUNCHER,
    "num_processes": lambda n, o: _LAUNCHER,
    "accelerator": lambda n, o: "the device is picked for you (CUDA if present, else CPU; launch/cpu.yaml forces CPU)",
    "gradient_clip_val": lambda n, o: f"use clip_grad_norm={o[n]!r} (the global norm; clip_grad_value clips elements)",
    "max_grad_norm": lambda n, o: f"use clip_grad_norm={o[n]!r}",
    "num_train_epochs": lambda n, o: f"use max_epochs={o[n]!r}",
    "per_device_train_batch_size": lambda n, o: f"use micro_batch_size={o[n]!r} (and batch_size: the global batch)",
    "output_dir": lambda n, o: f"use run_dir={o[n]!r}",
    "default_root_dir": lambda n, o: f"use run_dir={o[n]!r}",
    "ckpt_path": lambda n, o: "use resume='auto' (the newest checkpoint of run_dir) or resume=<a checkpoint dir>",
    "resume_from_checkpoint": lambda n, o: "use resume='auto' or resume=<a checkpoint dir>",
    "enable_progress_bar": lambda n, o: f"use progress={o[n]!r}",
    "logging_steps": lambda n, o: f"use log_every_n_steps={o[n]!r}",
    "save_steps": lambda n, o: f"use checkpoint_every_n_steps={o[n]!r}",
    "val_check_interval": lambda n, o: "use val_every_n_steps=<optimizer steps> (validation at epoch ends otherwise)",
}


def _hints(unknown: list[str], options: Mapping[str, Any]) -> str:
    """``'name' (what to do instead); ...``: a habit's translation, else the closest argument's name; names
    with the same advice share it (``'devices', 'num_nodes' (processes come from the launcher ...)``)."""
    advice: dict[str, list[str]] = {}
    for name in unknown:
        habit = _HABITS.get(name)
        near = difflib.get_close_matches(name, list(_FLAT), n=1)
        text = habit(name, options) if habit is not None else (f"did you mean {near[0]!r}?" if near else "")
        advice.setdefault(text, []).append(repr(name))
    return "; ".join(", ".join(names) + (f" ({text})" if text else "") for text, names in advice.items())


def _step_range(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_int(v) for v in value):
        return (
            f"use a pair of optimizer steps (start, stop), e.g. {name}=(3, 5): steps 3 and 4, counted from 0, or None"
        )
    start, stop = value
    if start < 0:
        return f"optimizer steps count from 0: use a start >= 0, e.g. {name}=(0, {max(stop, 1)})"
    if stop <= start:
        low, high = min(start, stop), max(start, stop)
        return f"stop comes after start, as in range(start, stop): use e.g. {name}=({low}, {high if high > low else low + 1})"
    return None


def _option(default: Any, check: Callable[[str, Any], str | None], doc: str) -> Any:
    """A config field: its default, its check and its one-line documentation."""
    return field(default=default, metadata={"check": check, "doc": doc})


# ---------------------------------------------------------------- the groups


@dataclass(frozen=True)
class StopConfig:
    """When training stops (set ``max_epochs`` or ``max_steps`` for ``fit``).

    Example:

        >>> EngineConfig.from_options(max_steps=100).stop
        StopConfig(max_epochs=None, max_steps=100, max_time=None)
    """

    max_epochs: int | None = _option(None, _positive_int(10), "epochs to train")
    max_steps: int | None = _option(None, _positive_int(1000), "optimizer steps to train")
    max_time: float | None = _option(
        None, _positive_number(3600.0), "seconds of training, then stop at a step boundary"
    )


@dataclass(frozen=True)
class DataConfig:
    """Global batches and how Dataset inputs are read.

    Example:

        >>> data = EngineConfig.from_options(batch_size=64, micro_batch_size=16).data  # 4 micro-batches per step
        >>> data.batch_size, data.micro_batch_size, data.shuffle, data.drop_last
        (64, 16, True, False)
        >>> EngineConfig.from_options(batch_size=64.0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size=64.0; use an int, e.g. batch_size=64
    """

    batch_size: int | None = _option(
        None, _positive_int(64), "global items per optimizer step, over all processes (Dataset and tensor inputs)"
    )
    micro_batch_size: int | None = _option(
        None,
        _positive_int(16),
        "items per forward on one device (default batch_size / world_size); accumulation = batch_size / (micro_batch_size x world_size), whole; a DataLoader's batch_size is it",
    )
    shuffle: bool = _option(True, _flag, "seeded per epoch; the same global order at any world size")
    drop_last: bool = _option(
        False, _flag, "leave out each epoch's partial last global batch (training only; the same at any world size)"
    )
    prefetch: int = _option(
        DEFAULT_PREFETCH,
        _count_at_least(0, 2),
        "windows (one optimizer step's input each) prepared while the step computes; 0: none",
    )
    num_workers: int = _option(0, _count_at_least(0, 2), "worker processes reading a Dataset")
    collate_fn: Callable[..., Any] | None = _option(None, _callable_or_none, "turns a list of samples into a batch")
    pin_memory: bool = _option(False, _flag, "pinned host memory for GPU copies")
    stream_sharded: bool = _option(False, _flag, "an IterableDataset that already yields only this rank's items")
    limit_train_batches: int | None = _option(
        None, _positive_int(10), "debug: each epoch trains on its first n global batches"
    )
    limit_val_batches: int | None = _option(None, _positive_int(10), "debug: global batches per validation")
    overfit_batches: int | None = _option(
        None, _positive_int(1), "debug: every epoch trains on the same first n global batches"
    )


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerics of the step: precision, compilation.

    Example:

        >>> EngineConfig.from_options(mixed_precision="bf16").precision
        PrecisionConfig(mixed_precision='bf16', compile=False)
        >>> EngineConfig.from_options(precision="bf16-mixed")  # Lightning's name: the message translates it
        Traceback (most recent call last):
        ...
        TypeError: Engine got unknown argument(s) 'precision' (use mixed_precision='bf16' ...
    """

    mixed_precision: str | None = _option(
        None,
        _choices(None, "no", "bf16", "fp16"),
        "'no' | 'bf16' (CPU and CUDA) | 'fp16' (CUDA, with a GradScaler); default: the launch config's, else 'no'",
    )
    compile: bool = _option(False, _flag, "wrap the model in torch.compile")


@dataclass(frozen=True)
class StepConfig:
    """The optimizer step: clipping, the NaN guard, EMA.

    Example:

        >>> EngineConfig.from_options(clip_grad_norm=1.0, ema_decay=0.999).step
        StepConfig(clip_grad_norm=1.0, clip_grad_value=None, nan_policy='raise', max_consecutive_skips=10,
                   nan_check='auto', ema_decay=0.999)
    """

    clip_grad_norm: float | None = _option(None, _positive_number(1.0), "clip the global gradient norm")
    clip_grad_value: float | None = _option(None, _positive_number(1.0), "clip each gradient element")
    nan_policy: str = _option(
        "raise",
        _choices("raise", "skip"),
        "a non-finite loss or gradient norm raises (parameters untouched) or drops the step on every rank",
    )
    max_consecutive_skips: int = _option(10, _count_at_least(1, 10), "skipped steps in a row before raising")
    nan_check: str = _option(
        "auto",
        _choices("auto", "step", "deferred"),
        "when that verdict is read: 'step' (at once), 'deferred' (a step late, no sync; a fused optimizer), 'auto' (deferred on a GPU where possible)",
    )
    ema_decay: float | None = _option(
        None, _fraction, "keep an EMA of the parameters (ema = d * ema + (1 - d) * param); validation uses it"
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run writes and what it keeps.

    Example:

        >>> ck = EngineConfig.from_options(run_dir="runs/a", keep_best=1).checkpoint
        >>> ck.run_dir, ck.keep_last, ck.keep_best, ck.monitor, ck.mode
        ('runs/a', 3, 1, 'val/loss', 'min')
        >>> EngineConfig.from_options(keep_best=1)
        Traceback (most recent call last):
        ...
        ValueError: checkpointing and resume need a run_dir, e.g. Engine(run_dir='runs/exp1', ...)
    """

    run_dir: str | None = _option(
        None,
        _path_or_none,
        "metrics.jsonl, config.json and checkpoints/ go here; where it holds an earlier run, a fresh run uses run_dir-2, -3, ... (engine.run_dir)",
    )
    checkpoint_every_n_steps: int | None = _option(None, _positive_int(500), "also checkpoint every n optimizer steps")
    checkpoint_every_epoch: bool | None = _option(
        None, _flag_or_none, "checkpoint at epoch ends (default: with run_dir)"
    )
    checkpoint_async: bool = _option(False, _flag, "write checkpoints in a background thread")
    keep_last: int = _option(3, _count_at_least(1, 3), "newest checkpoints kept")
    keep_best: int = _option(
        0,
        _count_at_least(0, 1),
        "best checkpoints kept, ranked by monitor (engine.best_checkpoint, load_weights(which='best'))",
    )
    monitor: str = _option(
        "val/loss", _text, "the validation key keep_best ranks by (an error at the first validation if not logged)"
    )
    mode: str = _option("min", _choices("min", "max"), "whether lower or higher monitor is better")
    resume: str | None = _option(
        None,
        _resume,
        "None (fresh) | 'auto' (the newest complete checkpoint of the newest run of run_dir, -2, -3, ..., else fresh) | a checkpoint path",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """What the run reports, and how often.

    Example:

        >>> log = EngineConfig.from_options(log_every_n_steps=10, progress=False).logging
        >>> log.log_every_n_steps, log.progress, log.doctor
        (10, False, 'basic')
        >>> EngineConfig.from_options(doctor="ful")
        Traceback (most recent call last):
        ...
        ValueError: doctor='ful'; use "basic", "full" or "off" (did you mean 'full'?)
    """

    log_every_n_steps: int = _option(50, _count_at_least(1, 50), "train records every n steps")
    progress: bool = _option(True, _flag, "progress bar / lines on rank 0")
    log_with: Any = _option(None, _trackers, "Accelerate trackers, e.g. ['tensorboard'] or 'wandb'")
    trace: bool = _option(False, _flag, "record the step events in engine.trace")
    doctor: str = _option(
        "basic",
        _choices("basic", "full", "off"),
        "the loop doctor: 'basic' (sparse checks), 'full' (every step, costly probes), 'off'",
    )
    throughput: bool = _option(
        True,
        _flag,
        "train/step_time, train/tflops, train/mfu and train/memory_mb on log steps (the model's FLOPs counted once, on the first step)",
    )
    peak_tflops: float | None = _option(
        None,
        _positive_number(989.0),
        "peak TFLOP/s of one device at the run's precision, for train/mfu (default: a table of known GPUs; none on CPU)",
    )
    profile_steps: tuple[int, int] | None = _option(
        None,
        _step_range,
        "torch.profiler over the optimizer steps start..stop-1 (from 0): RUN_DIR/profile/rank{R}.trace.json and a table of where the time went",
    )
    profile_memory: bool = _option(
        False,
        _flag,
        "memory in the profile; on CUDA also the allocator's history from fit start (RUN_DIR/profile/rank{R}.memory.pickle; rank{R}.oom.pickle on an out-of-memory error)",
    )


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes: the strategy, and how stops and failures are agreed.

    Example:

        >>> dist = EngineConfig.from_options(strategy="fsdp").distributed
        >>> dist.strategy, dist.preemption_signals
        ('fsdp', ('SIGTERM', 'SIGUSR1'))
    """

    strategy: str = _option(
        "auto",
        _choices("auto", "ddp", "fsdp"),
        "'auto': plain for one process, DDP for several, FSDP where the launch config asks, else what the sizes below say; 'ddp' (dp_replicate = world) or 'fsdp' (dp_shard = world) forces one",
    )
    dp_replicate_size: int | None = _option(
        None,
        _positive_int(2),
        "data-parallel groups that each hold a whole (or whole sharded) copy: DDP, or HSDP across nodes",
    )
    dp_shard_size: int | None = _option(
        None, _positive_int(2), "data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2)"
    )
    tp_size: int | None = _option(
        None,
        _positive_int(2),
        "ranks that split each layer of LoopModule.tp_plan() (tensor parallel); dp_replicate x dp_shard x tp = world",
    )
    activation_checkpointing: bool = _option(
        False, _flag, "recompute each block (the FSDP units) in backward instead of keeping its activations"
    )
    find_unused_parameters: bool | None = _option(
        None, _flag_or_none, "DDP: parameters some steps do not use (None: an error naming them at step 1)"
    )
    collective_timeout: float | None = _option(
        None, _positive_number(300.0), "seconds a collective waits for a peer (default 300 CPU, 600 GPU)"
    )
    preemption_signals: tuple[str, ...] = _option(
        ("SIGTERM", "SIGUSR1"),
        _signals,
        "on any rank: a checkpoint at one agreed step boundary, then exit 143 on every rank (Ctrl-C: 130)",
    )


@dataclass(frozen=True)
class EngineConfig:
    """Every Engine argument, validated; build it with :meth:`from_options`.

    Example:

        >>> config = EngineConfig.from_options(max_steps=100, batch_size=32)
        >>> config.stop.max_steps, config.data.batch_size, config.seed
        (100, 32, 0)
        >>> framework.Engine(max_steps=100, batch_size=32).config == config  # what the Engine holds
        True
    """

    stop: StopConfig = field(default_factory=StopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    step: StepConfig = field(default_factory=StepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = _option(
        0,
        _seed,
        "seeds the data order, and every RNG per rank at fit start (seed_everything before building the model)",
    )
    val_every_n_steps: int | None = _option(
        None, _positive_int(500), "validate every n optimizer steps (instead of at epoch ends)"
    )

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build and check the config from ``Engine``'s flat keyword arguments.

        Example:

            >>> EngineConfig.from_options(max_epochs=2, batch_size=8).stop.max_epochs
            2
            >>> EngineConfig.from_options(lr=1e-3)  # a habit from another trainer: the message says where it goes
            Traceback (most recent call last):
            ...
            TypeError: Engine got unknown argument(s) 'lr' (the optimizer is the module's: return it from
            configure_optimizers, e.g. torch.optim.AdamW(self.parameters(), lr=0.001) (default: AdamW, lr=1e-3)); ...
        """
        groups = _group_fields()
        unknown = [k for k in options if k not in _FLAT]
        if unknown:
            raise TypeError(f"Engine got unknown argument(s) {_hints(unknown, options)}; the arguments are listed in "
                            "framework.config")  # fmt: skip
        for name, value in options.items():
            check = _FLAT[name].metadata["check"]
            problem = check(name, value)
            if problem is not None:
                raise ValueError(f"{name}={value!r}; {problem}")
        built: dict[str, Any] = {}
        for group, names in groups.items():
            kw = {n: options[n] for n in names if n in options}
            built[group] = _GROUP_TYPES[group](**kw)
        top = {n: options[n] for n in ("seed", "val_every_n_steps") if n in options}
        config = cls(**built, **top)
        config._check_together()
        return config

    def _check_together(self) -> None:
        """Checks that involve several arguments."""
        ck = self.checkpoint
        wants_dir = ck.checkpoint_every_n_steps or ck.checkpoint_every_epoch or ck.keep_best or ck.resume
        if wants_dir and ck.run_dir is None:
            raise ValueError("checkpointing and resume need a run_dir, e.g. Engine(run_dir='runs/exp1', ...)")
        trackers = [self.logging.log_with] if isinstance(self.logging.log_with, str) else self.logging.log_with or []
        if "tensorboard" in list(trackers) and ck.run_dir is None:
            raise ValueError("log_with=['tensorboard'] writes its event files under run_dir; pass Engine(run_dir=...)")
        self._check_profile()

    def _check_profile(self) -> None:
        log, max_steps = self.logging, self.stop.max_steps
        if (log.profile_steps is not None or log.profile_memory) and self.checkpoint.run_dir is None:
            what = "profile_steps" if log.profile_steps is not None else "profile_memory"
            raise ValueError(f"{what} writes to RUN_DIR/profile/; pass Engine(run_dir=...)")
        if log.profile_steps is not None and max_steps is not None and log.profile_steps[1] > max_steps:
            start, stop = log.profile_steps
            fix = f"e.g. profile_steps=({max(0, max_steps - (stop - start))}, {max_steps})"
            raise ValueError(
                f"profile_steps=({start}, {stop}) reaches past max_steps={max_steps}, where the fit ends; profile steps "
                f"below it, {fix}, or raise max_steps"
            )

    @property
    def checkpoint_every_epoch(self) -> bool:
        """``checkpoint_every_epoch`` resolved: on by default when there is a run_dir.

        Example:

            >>> EngineConfig.from_options(run_dir="runs/a").checkpoint_every_epoch
            True
            >>> EngineConfig.from_options().checkpoint_every_epoch
            False
        """
        ck = self.checkpoint
        return ck.run_dir is not None if ck.checkpoint_every_epoch is None else ck.checkpoint_every_epoch

    def flat(self) -> dict[str, Any]:
        """Every argument by its Engine keyword.

        Example:

            >>> flat = EngineConfig.from_options(seed=3, max_steps=10).flat()
            >>> flat["seed"], flat["max_steps"], flat["keep_last"]
            (3, 10, 3)
        """
        out: dict[str, Any] = {}
        for group in _GROUP_TYPES:
            out.update({f.name: getattr(getattr(self, group), f.name) for f in dataclasses.fields(_GROUP_TYPES[group])})
        out.update(seed=self.seed, val_every_n_steps=self.val_every_n_steps)
        return out

    def to_json(self) -> dict[str, Any]:
        """:meth:`flat` with JSON-friendly values (objects by name): what ``config.json`` records.

        Example:

            >>> config = EngineConfig.from_options(max_steps=5, collate_fn=torch.stack)
            >>> config.to_json()["max_steps"], config.to_json()["collate_fn"]
            (5, 'stack')
        """
        return {k: jsonable(v) for k, v in self.flat().items()}


_GROUP_TYPES: dict[str, Any] = {
    "stop": StopConfig,
    "data": DataConfig,
    "precision": PrecisionConfig,
    "step": StepConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "distributed": DistributedConfig,
}


def _group_fields() -> dict[str, list[str]]:
    return {g: [f.name for f in dataclasses.fields(t)] for g, t in _GROUP_TYPES.items()}


# Every Engine keyword -> its dataclass field (names are unique across groups).
_FLAT: dict[str, dataclasses.Field[Any]] = {
    **{f.name: f for t in _GROUP_TYPES.values() for f in dataclasses.fields(t)},
    **{f.name: f for f in dataclasses.fields(EngineConfig) if f.name in ("seed", "val_every_n_steps")},
}


def describe() -> list[tuple[str, str, Any, str]]:
    """One row per Engine argument: ``(name, group, default, doc)``, in declaration order.

    Example:

        >>> describe()[0]
        ('max_epochs', 'stop', None, 'epochs to train')
        >>> for name, group, default, doc in describe()[:3]:
        ...     print(f"{name:<10} {default!r:<5} {doc}")
        max_epochs None  epochs to train
        max_steps  None  optimizer steps to train
        max_time   None  seconds of training, then stop at a step boundary
    """
    rows = []
    for group, t in _GROUP_TYPES.items():
        rows += [(f.name, group, f.default, f.metadata["doc"]) for f in dataclasses.fields(t)]
    rows += [(n, "run", _FLAT[n].default, _FLAT[n].metadata["doc"]) for n in ("seed", "val_every_n_steps")]
    return rows


def markdown_table() -> str:
    """The README's table of Engine arguments, generated from the fields' docs (the one place they are written).

    Example:

        >>> for line in markdown_table().splitlines()[:4]:
        ...     print(line)
        | group | argument | default | meaning |
        |---|---|---|---|
        | stop | `max_epochs` | – | epochs to train |
        | stop | `max_steps` | – | optimizer steps to train |
    """
    lines = ["| group | argument | default | meaning |", "|---|---|---|---|"]
    for name, group, default, doc in describe():
        shown = "–" if default is None else f"`{default!r}`"
        lines.append(f"| {group} | `{name}` | {shown} | {doc} |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """A JSON-friendly stand-in for a config value (callables and objects by name).

    Example:

        >>> jsonable(("SIGTERM",)), jsonable(len)
        (['SIGTERM'], 'len')
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "__fspath__"):
        return str(value)
    return getattr(value, "__name__", type(value).__name__)


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EngineConfig",
    "LoggingConfig",
    "PrecisionConfig",
    "StepConfig",
    "StopConfig",
    "describe",
    "jsonable",
    "markdown_table",
]
