"""The one boundary with Accelerate: device, process group, precision and model wrapping.

We take from Accelerate what it does well (reading the ``accelerate launch``
config, setting up the process group, device, autocast, GradScaler, DDP/FSDP
wrapping) and nothing that costs per step: no prepared optimizer, scheduler or
dataloader wrappers, and no ``accelerator.backward``, whose division by the
accumulation steps is what the exactness rule replaces.
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_NULL = contextlib.nullcontext()  # reusable: the no-op context of the common path, without a new object per step


class Runtime:
    """Where and how this process runs. Build it with :func:`make_runtime`.

    Example::

        rt = make_runtime(mixed_precision="no")
        model = rt.wrap(module)
        print(rt.world_size, rt.rank, rt.device)
    """

    def __init__(self, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.device: torch.device = accelerator.device
        self.world_size: int = accelerator.num_processes
        self.rank: int = accelerator.process_index
        self.is_main: bool = accelerator.is_main_process
        self.distributed_type = accelerator.distributed_type
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.mixed_precision: str = accelerator.mixed_precision
        self.scaler: Any = accelerator.scaler  # a GradScaler under fp16, else None
        self._on_cpu = self.device.type == "cpu"

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
        """Send a batch to this process's device (a no-op on CPU)."""
        if self._on_cpu:
            return batch
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for forward + loss under bf16/fp16, else a no-op."""
        if self.mixed_precision == "no":
            return _NULL
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


def make_runtime(mixed_precision: str | None = None, log_with: Any = None, project_dir: str | None = None) -> Runtime:
    """Create the Accelerator from ``accelerate launch``'s environment and our arguments.

    Without a CUDA device we ask Accelerate for CPU, which makes a multi-process
    launch (launch/cpu_ddp.yaml) run over gloo instead of silently running one
    plain process.

    Example::

        rt = make_runtime("bf16")
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    cuda = torch.cuda.is_available()
    requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested not in ("no", "bf16", "fp16"):
        raise ValueError(f'mixed_precision={requested!r}; use "no", "bf16" or "fp16"')
    if requested == "fp16" and not cuda:
        raise ValueError(
            'mixed_precision="fp16" needs a CUDA GPU (its GradScaler guards fp16 overflow); '
            'on CPU use mixed_precision="bf16" or "no"'
        )
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
            if isinstance(obj, DistributedDataParallel):
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
