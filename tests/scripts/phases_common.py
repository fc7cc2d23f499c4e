"""Shared by tests/test_phases.py, tests/test_joint_optimizers.py and the 2-process script they launch.

Alternating phases: a small GAN (MLP generator and discriminator, Adam) on points of a ring of
8 Gaussians, and :func:`dcgan_loop`, the update rule of PyTorch's DCGAN example (pytorch/examples,
dcgan/main.py) written by hand in plain PyTorch. The noise is part of the data, so both
implementations see the same noise. A third column of the data, ``flag``, makes a phase's loss
NaN on the batches that hold a flagged item (1: the discriminator's, 2: the generator's), which
tests the NaN guard per phase on one process and under DDP alike.

Joint optimizers: an MLP regressor whose matrices are stepped by Muon and everything else by
AdamW, and :func:`joint_loop`, the hand-written loop that zeroes both, backwards once, steps both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopModule

NZ, HIDDEN = 4, 32
N_ITEMS, BATCH, EPOCHS = 616, 64, 3  # 9 full windows and one of 40 items per epoch: 30 optimizer steps
TOL = 1e-6  # one process, one micro-batch per window: the hand-written rule
SPLIT_TOL = 1e-5  # accumulation and 2 processes against 1 process x 1 micro-batch
LR = 2e-3
D_FLAG, G_FLAG = 1.0, 2.0  # a batch holding an item with this flag gets a NaN loss in that phase


# ---------------------------------------------------------------- alternating phases


def ring_data(n: int = N_ITEMS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real points, noise, flags): a ring of 8 Gaussians of radius 2 and std 0.05, standard normal noise, no flags."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    real = 2.0 * torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)
    return real, torch.randn(n, NZ, generator=g), torch.zeros(n)


def flagged(data: tuple[torch.Tensor, ...], marks: dict[int, float]) -> tuple[torch.Tensor, ...]:
    """``data`` with item i flagged ``marks[i]`` (D_FLAG or G_FLAG)."""
    flags = data[2].clone()
    for i, code in marks.items():
        flags[i] = code
    return data[0], data[1], flags


def schedulers(opt_d: torch.optim.Optimizer, opt_g: torch.optim.Optimizer) -> tuple[Any, Any]:
    """A per-step scheduler for each phase, different from each other (so a swapped pair would show)."""
    return (
        torch.optim.lr_scheduler.StepLR(opt_d, step_size=7, gamma=0.5),
        torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / 10)),  # a linear warm-up
    )


class GAN(LoopModule):
    """``forward`` runs the generator once; ``compute_loss(..., phase)`` is the DCGAN example's two losses."""

    def __init__(self, with_schedulers: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same initial weights in every process and every run
        self.G = nn.Sequential(nn.Linear(NZ, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2))
        self.D = nn.Sequential(nn.Linear(2, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))
        self.with_schedulers = with_schedulers

    def split_batch(self, batch: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        real, noise, flags = batch
        return (real, noise), flags

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        real, noise = inputs
        return real, self.G(noise)

    def compute_loss(self, outputs: Any, targets: torch.Tensor, phase: str) -> torch.Tensor:
        real, fake = outputs
        if phase == "discriminator":
            d_real, d_fake = self.D(real), self.D(fake.detach())
            loss = _bce(d_real, 1.0) + _bce(d_fake, 0.0)  # errD = errD_real + errD_fake
        else:
            loss = _bce(self.D(fake), 1.0)  # the updated D: this phase runs after D's step
        code = D_FLAG if phase == "discriminator" else G_FLAG
        return loss * torch.where((targets == code).any(), math.nan, 1.0)

    def configure_optimizers(self) -> dict[str, Any]:
        opt_d, opt_g = _adam(self.D), _adam(self.G)
        if not self.with_schedulers:
            return {"discriminator": opt_d, "generator": opt_g}
        sched_d, sched_g = schedulers(opt_d, opt_g)
        return {"discriminator": (opt_d, sched_d), "generator": {"optimizer": opt_g, "scheduler": sched_g}}


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def _adam(net: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=LR, betas=(0.5, 0.999))  # the DCGAN example's betas


def dcgan_loop(
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int = EPOCHS,
    stale_d: bool = False,
    zero_g: bool = True,
    with_schedulers: bool = False,
    clip: float | None = None,
    ema_decay: float | None = None,
    ema_every_phase: bool = False,
    stop_at: tuple[str, int] | None = None,
    lrs: list[tuple[float, float]] | None = None,
) -> tuple[GAN, list[torch.Tensor] | None]:
    """The DCGAN example's update rule over global batches of BATCH in order (shuffle=False).

    Per batch: D.zero_grad(); errD_real.backward(); errD_fake.backward() (on fake.detach()); D step;
    G.zero_grad(); errG.backward() (through the updated D); G step. A batch flagged for a phase skips
    that phase's step (the engine's nan_policy="skip"); ``stop_at=(phase, step)`` returns just before
    that phase's step (nan_policy="raise"). ``clip``: each phase's gradients clipped by their own norm.
    ``ema_decay``: an EMA of every parameter, updated after each applied generator step. Wrong rules, to
    show the tolerance catches them: ``stale_d`` (G's loss from D before its step), ``zero_g=False``,
    ``ema_every_phase`` (the EMA also updated after D's step).
    ``lrs`` receives (lr_d, lr_g) after every step (with their schedulers).
    """
    model = GAN(with_schedulers)
    opt_d, opt_g = _adam(model.D), _adam(model.G)
    sched_d, sched_g = schedulers(opt_d, opt_g) if with_schedulers else (None, None)
    ema = [p.detach().clone() for p in model.parameters()] if ema_decay is not None else None

    def update_ema() -> None:
        _update_ema(ema, model, ema_decay)

    real, noise, flags = data
    step = 0
    for _ in range(epochs):
        for s in range(0, len(real), BATCH):
            x, z, f = real[s : s + BATCH], noise[s : s + BATCH], flags[s : s + BATCH]
            # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
            opt_d.zero_grad(set_to_none=True)
            _bce(model.D(x), 1.0).backward()
            fake = model.G(z)
            _bce(model.D(fake.detach()), 0.0).backward()
            if stop_at == ("discriminator", step):
                return model, ema
            if stale_d:  # the bug: G's gradient from D before D's step (a simultaneous update)
                stale = torch.autograd.grad(_bce(model.D(fake), 1.0), list(model.G.parameters()))
            if not (f == D_FLAG).any():
                _step(model.D, opt_d, sched_d, clip)
                if ema_every_phase:
                    update_ema()
            # (2) Update G: maximize log(D(G(z))), with the D just updated
            if zero_g:
                opt_g.zero_grad(set_to_none=True)
            if stale_d:
                for p, g in zip(model.G.parameters(), stale, strict=True):
                    p.grad = g
            else:
                _bce(model.D(fake), 1.0).backward()
            if stop_at == ("generator", step):
                return model, ema
            if not (f == G_FLAG).any():
                _step(model.G, opt_g, sched_g, clip)
                update_ema()
            if lrs is not None:
                lrs.append((opt_d.param_groups[0]["lr"], opt_g.param_groups[0]["lr"]))
            step += 1
    return model, ema


def _update_ema(ema: list[torch.Tensor] | None, model: nn.Module, decay: float | None) -> None:
    if ema is None or decay is None:
        return
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            e.mul_(decay).add_(p, alpha=1 - decay)


def _step(net: nn.Module, opt: torch.optim.Optimizer, sched: Any, clip: float | None) -> None:
    """One phase's step: its gradients clipped by their own norm, its optimizer, then its scheduler."""
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()


def phase_trace(steps: int, micro: int, with_schedulers: bool = False, last_micro: int | None = None) -> list:
    """The trace alternating phases must leave: per step, for each phase in order, zero_grad, then loss and
    backward per micro-batch (the forward only in the first phase: the later ones reuse it), then
    optimizer_step (and scheduler_step); every event a 4-tuple naming its phase."""
    events: list[tuple[str, int, int, str]] = []
    for step in range(steps):
        k = last_micro if (last_micro is not None and step == steps - 1) else micro
        for phase in ("discriminator", "generator"):
            events.append(("zero_grad", step, 0, phase))
            for i in range(k):
                if phase == "discriminator":
                    events.append(("forward", step, i, phase))
                events += [("loss", step, i, phase), ("backward", step, i, phase)]
            events.append(("optimizer_step", step, k, phase))
            if with_schedulers:
                events.append(("scheduler_step", step, k, phase))
    return events


# ---------------------------------------------------------------- joint optimizers


class Joint(LoopModule):
    """An MLP regressor: Muon steps its weight matrices (Muon takes 2-D parameters only), AdamW the rest."""

    def __init__(self, dtype: torch.dtype = torch.float32, with_schedulers: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.net.to(dtype)
        self.with_schedulers = with_schedulers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def configure_optimizers(self) -> dict[str, Any]:
        muon, adamw = joint_optimizers(self)
        if not self.with_schedulers:
            return {"muon": muon, "adamw": adamw}
        step_sched, epoch_sched = joint_schedulers(muon, adamw)
        return {
            "muon": (muon, step_sched),
            "adamw": {"optimizer": adamw, "scheduler": epoch_sched, "interval": "epoch"},
        }


def joint_optimizers(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-2)


def joint_schedulers(muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> tuple[Any, Any]:
    """Muon's per optimizer step, AdamW's per epoch."""
    return torch.optim.lr_scheduler.StepLR(muon, step_size=3, gamma=0.5), torch.optim.lr_scheduler.ExponentialLR(
        adamw, gamma=0.7
    )


def regression_data(n: int = 232, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """232 items: 3 full global batches of 64 and one of 40 per epoch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2]
    return x.to(dtype), y.to(dtype)


def joint_loop(
    data: tuple[torch.Tensor, ...],
    *,
    dtype: torch.dtype = torch.float32,
    epochs: int = EPOCHS,
    with_schedulers: bool = False,
    clip: float | None = None,
    zero_adamw: bool = True,
    micro: int | None = None,
    lrs: list[tuple[float, float]] | None = None,
) -> Joint:
    """The hand-written joint step over global batches of BATCH in order: zero both, one forward and backward
    over the whole batch, (clip all gradients by their one global norm,) step Muon, step AdamW, per-step
    scheduler; the per-epoch scheduler at each epoch end. Wrong rules: ``zero_adamw=False`` (AdamW's
    gradients never reset); ``micro=k``: each micro-batch's mean / the accumulation steps (naive scaling).
    ``lrs`` receives (lr_muon, lr_adamw) after every step."""
    model = Joint(dtype)
    muon, adamw = joint_optimizers(model)
    step_sched, epoch_sched = joint_schedulers(muon, adamw) if with_schedulers else (None, None)
    x, y = data
    for _ in range(epochs):
        for s in range(0, len(x), BATCH):
            xb, yb = x[s : s + BATCH], y[s : s + BATCH]
            muon.zero_grad(set_to_none=True)
            if zero_adamw:
                adamw.zero_grad(set_to_none=True)
            if micro is None:
                model.compute_loss(model(xb), yb).backward()
            else:
                for m in range(0, len(xb), micro):
                    (model.compute_loss(model(xb[m : m + micro]), yb[m : m + micro]) / (BATCH // micro)).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            muon.step()
            adamw.step()
            if step_sched is not None:
                step_sched.step()
            if lrs is not None:
                lrs.append((muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]))
        if epoch_sched is not None:
            epoch_sched.step()
    return model


# ---------------------------------------------------------------- both


def fit_state(engine: Any) -> dict[str, Any]:
    """Every optimizer's and scheduler's state dict, and the EMA, of an engine's (last) fit."""
    run = engine._fit
    assert run is not None
    out: dict[str, Any] = {}
    for o in run.optimizers:
        out[f"optimizer/{o.name}"] = o.optimizer.state_dict()
        if o.scheduler is not None:
            out[f"scheduler/{o.name}"] = o.scheduler.state_dict()
    if run.ema is not None:
        out["ema"] = run.ema.state_dict()
    return out


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """torch.equal on every tensor of two nested states, == on everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu().double() for p in module.parameters()])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
