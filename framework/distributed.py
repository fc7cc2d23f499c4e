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
from torch import nn

_NULL = contextlib.nullcontext()  # reusable: the no-op context of the common path, without a new object per step


class Runtime:
    """Where and how this process runs. Build it with :func:`make_runtime`.

    ``accelerator`` is the ``accelerate.Accelerator`` behind it, or None for one plain process,
    which needs none (see :func:`make_runtime`).

    Example::

        rt = make_runtime(mixed_precision="no")
        model = rt.wrap(module)
        print(rt.world_size, rt.rank, rt.device)
    """

    def __init__(self, accelerator: Any = None, *, device: torch.device | None = None, mixed_precision: str = "no"):
        self.accelerator = accelerator
        if accelerator is None:  # one plain process: what Accelerate would pick for it, without Accelerate
            assert device is not None
            self.device: torch.device = device
            self.world_size, self.rank, self.is_main = 1, 0, True
            self.fsdp = False
            self.mixed_precision: str = mixed_precision
            self.scaler: Any = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None
        else:
            from accelerate.utils import DistributedType

            self.device = accelerator.device
            self.world_size = accelerator.num_processes
            self.rank = accelerator.process_index
            self.is_main = accelerator.is_main_process
            self.fsdp = accelerator.distributed_type == DistributedType.FSDP
            self.mixed_precision = accelerator.mixed_precision
            self.scaler = accelerator.scaler  # a GradScaler under fp16, else None
        self._on_cpu = self.device.type == "cpu"
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    def wrap(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device and wrap it for DDP/FSDP when several processes run.

        One process gets the module itself back: no wrapper, no per-step cost.
        """
        if self.world_size == 1 and not self.fsdp:
            return module.to(self.device)
        model = self.accelerator.prepare_model(module)
        # Accelerate patches forward with autocast + fp32 outputs under mixed
        # precision; the engine autocasts forward *and* loss itself, so undo it
        # and leave the user's module as it was.
        if "_original_forward" in module.__dict__:
            module.__dict__.pop("forward", None)
            del module.__dict__["_original_forward"]
        return model

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

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip DDP/FSDP's gradient all-reduce for every micro-batch but the window's last."""
        if sync or self.world_size == 1 or not hasattr(model, "no_sync"):
            return _NULL
        no_sync: Any = model.no_sync  # DDP and FSDP both have it; nn.Module does not declare it
        ctx: contextlib.AbstractContextManager[Any] = no_sync()
        return ctx

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes in place (a no-op on one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def send_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``, structure kept, as Accelerate's ``send_to_device``:
    tensors (and anything else with a ``.to``, e.g. a tokenizer's ``BatchEncoding``) anywhere in
    tuples, lists, namedtuples and mappings; other values as they are.

    Example::

        inputs, targets = send_to_device((x, {"labels": y}), torch.device("cuda"))
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


def make_runtime(mixed_precision: str | None = None, log_with: Any = None, project_dir: str | None = None) -> Runtime:
    """The runtime for this process, from ``accelerate launch``'s environment and our arguments.

    Several processes (and FSDP, DeepSpeed, trackers): an Accelerator sets them up. Without a
    CUDA device we ask Accelerate for CPU, which makes a multi-process launch
    (launch/cpu_ddp.yaml) run over gloo instead of silently running one plain process.

    One plain process (``python script.py``, or ``accelerate launch`` of one process) needs no
    Accelerator: the device (CUDA if present and not ``ACCELERATE_USE_CPU``, else CPU), autocast
    and GradScaler are what Accelerate would pick, without importing it (about 5 MiB of resident
    memory and 0.1 s of start-up that it would not earn back).

    Example::

        rt = make_runtime("bf16")
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
    if not log_with and _one_plain_process():
        return Runtime(device=torch.device("cuda" if cuda else "cpu"), mixed_precision=requested)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Several engines may live in one process (tests, notebooks) with different
    # precisions; Accelerate's shared state would refuse the second one.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=requested,
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_dir=project_dir,
    )
    _accelerators.add(accelerator)
    _destroy_process_group_at_exit()
    return Runtime(accelerator)


# World sizes that launchers (torchrun, accelerate launch, mpirun) leave in the environment, and
# the engines Accelerate sets up even for one process.
_WORLD_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_ACCELERATE_ENGINES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


def _one_plain_process() -> bool:
    """No launcher started several processes (torchrun also sets LOCAL_RANK for one: Accelerate then
    builds a process group of one, which user code may expect), no FSDP/DeepSpeed, no process group,
    and nothing else in Accelerate's settings that the plain runtime would not honour: a device of
    its choosing (ACCELERATE_TORCH_DEVICE), a dynamo backend (with which it also turns TF32 on)."""
    if "LOCAL_RANK" in os.environ or any(os.environ.get(k, "1") != "1" for k in _WORLD_SIZES):
        return False
    if any(_env_flag(k) for k in _ACCELERATE_ENGINES) or os.environ.get("ACCELERATE_TORCH_DEVICE"):
        return False
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower() not in ("no", ""):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


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
            accelerator._models.clear()
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
