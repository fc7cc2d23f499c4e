"""An exponential moving average of the parameters (``Engine(ema_decay=0.999)``).

After every applied optimizer step, ``ema = decay * ema + (1 - decay) * param`` (a ``lerp``, on the
device, no host sync), starting from the weights at fit start. With several optimizers stepping
jointly that is once per step, after all of them; with alternating phases it is once per global
batch, after the *last* phase's step (a GAN's generator), over every parameter: a skipped last
phase skips the update, a skipped earlier phase does not. Validation (and ``predict`` and
``validate`` during a fit) runs with the EMA weights swapped in; buffers (BatchNorm statistics) are
the model's own. Checkpoints hold the EMA (``ema.safetensors``, parameter names as in
``model.safetensors``); ``framework.load_weights(module, path, ema=True)`` loads it. Under DDP every
rank holds the same average of the same parameters; under FSDP each rank averages its own shards.
Under ``nan_check="deferred"`` the update is skipped on the device together with the step.

Example::

    engine = Engine(max_epochs=10, batch_size=64, ema_decay=0.999, run_dir="runs/ema")
    engine.fit(model, train, val)            # val/* measured with the EMA weights
    framework.load_weights(Classifier(), "runs/ema", ema=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class EMA:
    """The moving average of ``module``'s parameters (see the module docstring).

    Example::

        ema = EMA(module, decay=0.999)
        optimizer.step(); ema.update()
        with ema.applied():
            evaluate(module)
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r}; use a float strictly between 0 and 1, e.g. 0.999")
        self.decay = decay
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, found: torch.Tensor | None = None) -> None:
        """One step of the average; ``found`` (a 0-dim tensor, 1.0 for a step the optimizer skipped on the
        device) turns it into a no-op without a host read."""
        params = [p.detach() for p in self.params]
        if found is None:
            torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)
            return
        weight = (1.0 - found.to(self.shadow[0].dtype if self.shadow else torch.float32)) * (1.0 - self.decay)
        lerp: Any = torch._foreach_lerp_  # (a 0-dim tensor weight: skipped on the device, no host read)
        lerp(self.shadow, params, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run a block with the EMA weights in the parameters, then put the trained ones back."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], trained)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its average (what ``ema.safetensors`` holds)."""
        return dict(zip(self.names, self.shadow, strict=True))

    def check_state_dict(self, state: object) -> None:
        if not isinstance(state, dict) or sorted(state) != sorted(self.names):
            raise KeyError("the EMA's parameter names do not match the module's")
        for name, value in zip(self.names, self.shadow, strict=True):
            got = state[name]
            if not isinstance(got, torch.Tensor) or got.shape != value.shape:
                raise ValueError(f"EMA {name!r} has the wrong shape")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, value in zip(self.names, self.shadow, strict=True):
            saved = state[name]
            if isinstance(value, DTensor) and not isinstance(saved, DTensor):  # (whole tensors into shards)
                saved = distribute_tensor(
                    saved.to(value.device), value.device_mesh, value.placements, src_data_rank=None
                )
            value.copy_(saved)
