"""The one boundary with Accelerate: device, process group, precision and model wrapping.

We take from Accelerate what it does well (reading the ``accelerate launch``
config, setting up the process group, device, autocast, GradScaler, DDP/FSDP
wrapping) and nothing that costs per step: no prepared optimizer, scheduler or
dataloader wrappers, and no ``accelerator.backward``, whose division by the
accumulation steps is what the exactness rule replaces. One plain process needs
none of that: it gets the same device, autocast and GradScaler without an
Accelerator (:func:`make_runtime`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .layout import Layout

_NULL = contextlib.nullcontext()  # reusable: the no-op context of the common path, without a new object per step


class Runtime:
    """Where and how this process runs: device, world, precision, collectives. Build it with
    :func:`make_runtime`; how the model is spread over the processes is the strategy's
    (:mod:`framework.strategies`).

    ``accelerator`` is the ``accelerate.Accelerator`` behind it, or None where none is needed (one
    plain process; FSDP, which the engine applies itself).

    Example:

        >>> rt = make_runtime(mixed_precision="no")
        >>> rt.world_size, rt.rank, rt.layout.name, rt.accelerator   # one plain process: no Accelerator
        (1, 0, 'single', None)
    """

    def __init__(
        self,
        accelerator: Any = None,
        *,
        device: torch.device | None = None,
        mixed_precision: str = "no",
        autocast: bool = True,
        layout: Layout | None = None,
    ):
        self.accelerator = accelerator
        if accelerator is None:  # what Accelerate would pick for this process, without Accelerate
            assert device is not None
            self.device: torch.device = device
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            self.world_size = torch.distributed.get_world_size() if distributed else 1
            self.rank = torch.distributed.get_rank() if distributed else 0
            self.is_main = self.rank == 0
            self.mixed_precision: str = mixed_precision
            self.scaler: Any = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None
        else:
            self.device = accelerator.device
            self.world_size = accelerator.num_processes
            self.rank = accelerator.process_index
            self.is_main = accelerator.is_main_process
            self.mixed_precision = accelerator.mixed_precision
            self.scaler = accelerator.scaler  # a GradScaler under fp16, else None
        self.layout = layout if layout is not None else Layout.resolve(self.world_size)
        self._on_cpu = self.device.type == "cpu"
        # (FSDP2 casts parameters itself, MixedPrecisionPolicy: then forward runs without autocast)
        self._amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision) if autocast else None
        )

    def to_device(self, batch: Any) -> Any:
        """Send a batch to this process's device (a no-op on CPU); see :func:`send_to_device`."""
        if self._on_cpu:
            return batch
        return send_to_device(batch, self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for forward + loss under bf16/fp16, else a no-op."""
        if self._amp_dtype is None:
            return _NULL
        if self.accelerator is None:
            return torch.autocast(self.device.type, dtype=self._amp_dtype)  # = Accelerate's, for one process
        return self.accelerator.autocast()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes in place (a no-op on one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``tensor`` over all processes, in place (a no-op on one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def broadcast(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values, one message per dtype."""
        if self.world_size == 1 or not tensors:
            return
        from .grads import flatten_dense, unflatten_dense

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = flatten_dense([t.detach() for t in group])
            torch.distributed.broadcast(flat, src)
            with torch.no_grad():
                for t, value in zip(group, unflatten_dense(flat, group), strict=True):
                    t.copy_(value)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def send_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``, structure kept, as Accelerate's ``send_to_device``:
    tensors (and anything else with a ``.to``, e.g. a tokenizer's ``BatchEncoding``) anywhere in
    tuples, lists, namedtuples and mappings; other values as they are.

    Example:

        >>> send_to_device((torch.zeros(2), {"labels": torch.ones(2)}, "a name"), torch.device("cpu"))
        (tensor([0., 0.]), {'labels': tensor([1., 1.])}, 'a name')
    """
    to = getattr(batch, "to", None)
    if callable(to):
        try:
            return to(device, non_blocking=True)
        except TypeError:  # (a .to without non_blocking)
            return to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(send_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(send_to_device(v, device) for v in batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: send_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    return batch


def make_runtime(
    mixed_precision: str | None = None,
    log_with: Any = None,
    project_dir: str | None = None,
    *,
    strategy: str = "auto",
    timeout: float | None = None,
    dp_replicate_size: int | None = None,
    dp_shard_size: int | None = None,
    tp_size: int | None = None,
) -> Runtime:
    """The runtime for this process, from ``accelerate launch``'s environment and our arguments.

    Several processes: the engine creates the process group itself, with a collective timeout
    (``timeout`` seconds; default 300 on CPU, 600 on GPU), so that a dead or absent peer is an error
    within minutes, not torch's 30 minutes of silence. Under DDP (and for trackers) an
    Accelerator then adopts that group; without a CUDA device we ask Accelerate for CPU, which makes a
    multi-process launch (launch/cpu_ddp.yaml) run over gloo instead of silently running one plain
    process. FSDP (``strategy="fsdp"``, or a launch config with ``distributed_type: FSDP``) gets no
    Accelerator: Accelerate's FSDP plugin does not shard on CPU, so the engine applies torch's
    ``fully_shard`` itself (:mod:`framework.strategies`).

    One plain process (``python script.py``, or ``accelerate launch`` of one process) needs no
    Accelerator: the device (CUDA if present and not ``ACCELERATE_USE_CPU``, else CPU), autocast
    and GradScaler are what Accelerate would pick, without importing it (about 5 MiB of resident
    memory and 0.1 s of start-up that it would not earn back).

    Example:

        >>> make_runtime("bf16").mixed_precision
        'bf16'
        >>> make_runtime("fp32")
        Traceback (most recent call last):
        ...
        ValueError: mixed_precision='fp32'; use "no", "bf16" or "fp16"
    """
    use_cpu = _env_flag("ACCELERATE_USE_CPU")  # (read even without a GPU: a bad value is an error anywhere)
    cuda = torch.cuda.is_available() and not use_cpu
    requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested not in ("no", "bf16", "fp16"):
        raise ValueError(f'mixed_precision={requested!r}; use "no", "bf16" or "fp16"')
    if requested == "fp16" and not cuda:
        raise ValueError(
            'mixed_precision="fp16" needs a CUDA GPU (its GradScaler guards fp16 overflow); '
            'on CPU use mixed_precision="bf16" or "no"'
        )
    engines = [k for k in _ACCELERATE_ENGINES if _env_flag(k)]
    if engines:  # (they need accelerator.backward and their own optimizer wrappers, which the exact step replaces)
        raise ValueError(
            f"the launch config asks for {engines[0].removeprefix('ACCELERATE_USE_').replace('_', '-')}, which the "
            "engine does not run; shard with FSDP instead: accelerate launch --config_file launch/fsdp.yaml "
            "(launch/cpu_fsdp.yaml on CPU), or Engine(strategy='fsdp')"
        )
    fsdp = wants_fsdp(strategy)
    sizes: dict[str, Any] = dict(dp_replicate_size=dp_replicate_size, dp_shard_size=dp_shard_size, tp_size=tp_size)
    launched = _launched()
    if not log_with and not launched and (not fsdp or strategy == "auto") and _no_accelerate_engine():
        layout = Layout.resolve(1, **sizes, strategy=strategy)  # (sizes that need several processes are refused)
        return Runtime(device=torch.device("cuda" if cuda else "cpu"), mixed_precision=requested, layout=layout)
    if launched or fsdp:
        _init_process_group(cuda, timeout)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    layout = Layout.resolve(world, **sizes, strategy=strategy, launch_fsdp=fsdp)
    if (fsdp or layout.shards) and requested == "fp16":
        raise ValueError(
            f'mixed_precision="fp16" with a sharded layout ({layout.name}) needs a sharded GradScaler; use '
            'mixed_precision="bf16"'
        )
    if fsdp or layout.shards:  # (the engine applies fully_shard and TP itself: Accelerate's plugin is not used)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # FSDP2 casts parameters itself (MixedPrecisionPolicy): forward then runs without autocast.
        autocast = not (fsdp or layout.dp_shard > 1 or (layout.tp > 1 and layout.dp_size > 1))
        accelerator = _accelerator(cuda, requested, log_with, project_dir, hide_layout=True) if log_with else None
        if accelerator is None:
            return Runtime(device=device, mixed_precision=requested, autocast=autocast, layout=layout)
        return Runtime(accelerator, autocast=autocast, layout=layout)
    # (DDP: the layout is the engine's, so Accelerate sees no FSDP or parallelism request of the launch config)
    return Runtime(_accelerator(cuda, requested, log_with, project_dir, hide_layout=True), layout=layout)


def wants_fsdp(strategy: str) -> bool:
    """Does this run shard with FSDP: ``strategy="fsdp"``, or ``"auto"`` under a launch config asking for FSDP
    (``distributed_type: FSDP``, which ``accelerate launch`` passes on as ``ACCELERATE_USE_FSDP``) with
    several processes.

    Example:

        >>> wants_fsdp("fsdp"), wants_fsdp("auto")   # "auto" in a plain process; True under launch/cpu_fsdp.yaml
        (True, False)
    """
    if strategy == "fsdp":
        return True
    return strategy == "auto" and _env_flag("ACCELERATE_USE_FSDP") and _launched()


def _accelerator(cuda: bool, precision: str, log_with: Any, project_dir: str | None, hide_layout: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several engines may live in one process (tests, notebooks) with different
    # precisions; Accelerate's shared state would refuse the second one.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # Where the engine lays the model out itself (or DDP is forced), Accelerate must not read the launch
    # config's FSDP or parallelism request: its plugin refuses CPU and would otherwise wrap the model its own way.
    hidden = {k: os.environ.pop(k) for k in _LAYOUT_FLAGS if k in os.environ} if hide_layout else {}
    try:
        accelerator = Accelerator(
            cpu=not cuda,
            mixed_precision=precision,
            step_scheduler_with_optimizer=False,
            log_with=log_with,
            project_dir=project_dir,
        )
    finally:
        os.environ.update(hidden)
    _accelerators.add(accelerator)
    _destroy_process_group_at_exit()
    return accelerator


def _init_process_group(cuda: bool, timeout: float | None) -> None:
    """Create the default process group (from the launcher's RANK/WORLD_SIZE/MASTER_* variables, or a group
    of one for FSDP in a plain process) with the collective timeout, unless one exists. Either way it is torn
    down before the interpreter is (:func:`_destroy_process_group_at_exit`)."""
    import datetime

    if torch.distributed.is_initialized():  # (the script's own group: adopted, and torn down at exit all the same)
        _destroy_process_group_at_exit()
        return
    seconds = timeout if timeout is not None else (600.0 if cuda else 300.0)
    kwargs: dict[str, Any] = {"backend": "nccl" if cuda else "gloo", "timeout": datetime.timedelta(seconds=seconds)}
    if "RANK" not in os.environ:  # (FSDP in one plain process: a world of one)
        kwargs.update(store=torch.distributed.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(**kwargs)
    _destroy_process_group_at_exit()


# World sizes that launchers (torchrun, accelerate launch, mpirun) leave in the environment, and
# the engines Accelerate sets up even for one process.
_WORLD_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_ACCELERATE_ENGINES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")
_LAYOUT_FLAGS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_PARALLELISM_CONFIG")


def _launched() -> bool:
    """A launcher started this process (torchrun also sets LOCAL_RANK for one process: a process group of one,
    which user code may expect), or a process group exists already."""
    if "LOCAL_RANK" in os.environ or any(os.environ.get(k, "1") != "1" for k in _WORLD_SIZES):
        return True
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _no_accelerate_engine() -> bool:
    """Nothing in Accelerate's settings that the plain runtime would not honour: a device of its choosing
    (ACCELERATE_TORCH_DEVICE), a dynamo backend (with which it also turns TF32 on); DeepSpeed/Megatron are
    refused by :func:`make_runtime`."""
    if any(_env_flag(k) for k in _ACCELERATE_ENGINES) or os.environ.get("ACCELERATE_TORCH_DEVICE"):
        return False
    return os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower() in ("no", "")


def _one_plain_process() -> bool:
    """One process that needs no Accelerator (see :func:`make_runtime`)."""
    return not _launched() and not _env_flag("ACCELERATE_USE_FSDP") and _no_accelerate_engine()


def _env_flag(name: str) -> bool:
    """A boolean environment variable, read as Accelerate reads it (an unknown value is an error)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "n", "off", "f"):
        return False
    if value in ("1", "true", "yes", "y", "on", "t"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}; use true or false (1/0, yes/no, on/off)")


_exit_hook_registered = False
_accelerators: weakref.WeakSet[Any] = weakref.WeakSet()  # whose DDP wrappers to free at exit


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does.

    A process that exits with a gloo process group still alive can die in gloo's
    C++ threads during interpreter teardown ("terminate called without an active
    exception", SIGABRT), turning a finished run into a failed launch (seen in
    about 1 of 4 two-process CPU runs). Destroying it while Python is intact avoids that.
    """
    global _exit_hook_registered
    if _exit_hook_registered or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    import atexit

    def destroy() -> None:
        # Free the DDP wrappers Accelerate keeps (their Reducer holds the process group) first:
        # destroy_process_group alone leaves the group alive until interpreter teardown, which
        # still aborted about 1 in 10 two-process runs; with this, 0 in 32.
        for accelerator in list(_accelerators):
            getattr(accelerator, "_models", []).clear()
        gc.collect()
        # Wrappers still referenced elsewhere (an engine alive at exit) keep their Reducer, and with
        # it the group and gloo's worker threads, into interpreter teardown, which aborted about 1 in
        # 100 launches on a loaded machine: drop those references too (nothing runs after this).
        from torch.nn.parallel import DistributedDataParallel

        for obj in gc.get_objects():
            # (type(), not isinstance: that reads __class__, and torch.distributed.reduce_op's warns)
            if issubclass(type(obj), DistributedDataParallel):
                obj.__dict__.pop("reducer", None)
                obj.__dict__.pop("process_group", None)
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)
    _exit_hook_registered = True


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Run a block without disturbing the global torch RNG streams (CPU and this CUDA device)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
