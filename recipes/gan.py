"""python recipes/gan.py                                                      # one process
accelerate launch --config_file launch/cpu.yaml recipes/gan.py             # the same, via Accelerate
accelerate launch --config_file launch/cpu_ddp.yaml recipes/gan.py         # 2 CPU processes (gloo)
accelerate launch --config_file launch/gpu.yaml recipes/gan.py             # one GPU
python recipes/gan.py --micro-batch-size 64                                # accumulated micro-batches
python recipes/gan.py --smoke --run-dir /tmp/gan                           # a few steps (CI)
python recipes/gan.py --config my.yaml --lr-g 5e-4                         # YAML file + overrides

A small GAN on a ring of 8 Gaussians in 2-D (radius 2, standard deviation 0.05), the toy problem
on which a GAN readily collapses onto a few of the modes. Generator and discriminator are MLPs
(3 hidden layers of 64; 2-D noise); both are trained by the update rule of PyTorch's DCGAN
example, as alternating phases of one LoopModule: ``compute_loss`` takes ``phase`` and
``configure_optimizers`` returns ``{"discriminator": ..., "generator": ...}``, so every global batch
runs

1. discriminator: zero its gradients; loss on the real points and on the generator's points
   (detached); backward; step;
2. generator: zero its gradients; non-saturating loss of the *updated* discriminator on the same
   generated points; backward; step.

The generator's forward runs once per micro-batch and both phases share it. The noise is drawn
in ``forward`` from torch's global generator, which the engine seeds per process and checkpoints.
Departures from the DCGAN example's settings, each measured here: an R1 penalty on the
discriminator's gradient at real points (``--r1``; Mescheder et al., 2018), Adam with betas
(0, 0.9) and lr 2e-3, and a cosine decay of both learning rates to 0 (one scheduler per phase).
Without R1 (betas (0.5, 0.999), lr 1e-3), seed 1 covered only 5 of the 8 modes.

Quality (``quality``): 10,000 points from the exponential moving average of the weights
(``Engine(ema_decay=0.99)``, updated after each generator step), each assigned to its nearest
mode. A point is *high quality* within 3 standard deviations (0.15) of its mode; a mode is
*covered* if at least ``min_mode_share`` (1%, an eighth of a fair share) of all points are
high-quality points of it. Target: 8/8 modes covered and >= 90% high-quality points within
2 minutes on 2 CPU cores; the measured figures are in recipes/README.md.

Outputs go to ``--run-dir`` (default ``runs/gan``): ``metrics.jsonl`` (``train/loss/discriminator``,
``train/loss/generator``, ``lr/<name>``), ``config.json``, ``recipe_config.yaml`` and checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Make `import framework` work when run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework import Engine, LoopModule
from framework.cli.recipe import engine_options, parse_config, save_recipe_config, target_line
from framework.optim import fused_on_gpu
from framework.schedules import warmup_cosine


@dataclass
class Config:
    """Hyperparameters; every field is also a ``--flag`` (see ``--help``)."""

    modes: int = 8  # Gaussians, evenly spaced on the ring
    radius: float = 2.0
    std: float = 0.05  # of each Gaussian; "high quality" = within 3 of them of a mode
    train_size: int = 65_536  # real points (a fixed set, reshuffled every epoch): 256 steps an epoch
    noise_dim: int = 2
    hidden: int = 64  # 3 hidden layers in each network
    lr_d: float = 2e-3  # each decays to 0 by the last step (a cosine, one scheduler per phase)
    lr_g: float = 2e-3
    beta1: float = 0.0  # Adam's betas (the DCGAN example's are 0.5, 0.999)
    beta2: float = 0.9
    r1: float = 0.1  # weight of the R1 penalty on the discriminator's gradient at real points (0: none)
    batch_size: int = 256  # global: real points per optimizer step across all processes
    micro_batch_size: int | None = None  # per process per forward; None = batch_size / world_size
    max_epochs: int = 12
    max_time: float | None = 100.0  # seconds of training: a safety bound under the 2-minute target
    ema_decay: float | None = 0.99  # evaluate the moving average of the weights (None: the last ones)
    eval_samples: int = 10_000
    min_mode_share: float = 0.01  # of all generated points, to count a mode as covered
    num_threads: int | None = 1  # torch's intra-op CPU threads (None: its default); these MLPs are too small to share
    seed: int = 0
    data_seed: int = 1234
    log_every_n_steps: int = 100
    progress: bool = True
    run_dir: str | None = None  # default: runs/gan (-2, -3, ... once used; with --resume auto, the newest)
    checkpoint_every_n_steps: int | None = None  # also at every epoch end (the engine's default with a run dir)
    resume: str | None = None  # "auto": continue from the run dir's newest checkpoint (e.g. after a SLURM requeue)
    smoke: bool = False  # a few steps on a small set, for CI


def mode_centers(cfg: Config) -> torch.Tensor:
    """The ``modes`` means, evenly spaced on the circle of ``radius``: shape [modes, 2]."""
    angles = torch.arange(cfg.modes, dtype=torch.float64) * (2 * math.pi / cfg.modes)
    return (cfg.radius * torch.stack([angles.cos(), angles.sin()], 1)).float()


def ring_data(cfg: Config, n: int) -> torch.Tensor:
    """``n`` real points: a uniformly drawn mode plus Gaussian noise of ``std`` (a fixed set: ``data_seed``)."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    which = torch.randint(0, cfg.modes, (n,), generator=g)
    return mode_centers(cfg)[which] + cfg.std * torch.randn(n, 2, generator=g)


def mlp(n_in: int, hidden: int, n_out: int, act: Callable[[], nn.Module]) -> nn.Sequential:
    """``n_in`` -> 3 hidden layers of ``hidden`` (activation ``act()``) -> ``n_out``."""
    return nn.Sequential(
        nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, hidden), act(),
        nn.Linear(hidden, n_out),
    )  # fmt: skip


class GAN(LoopModule):
    """Generator ``G`` (noise -> point) and discriminator ``D`` (point -> logit), trained in alternating phases."""

    def __init__(self, cfg: Config, total_steps: int) -> None:
        super().__init__()
        self.noise_dim, self.lr_d, self.lr_g, self.r1 = cfg.noise_dim, cfg.lr_d, cfg.lr_g, cfg.r1
        self.betas = (cfg.beta1, cfg.beta2)
        self.total_steps = total_steps
        self.G = mlp(cfg.noise_dim, cfg.hidden, 2, nn.ReLU)
        self.D = mlp(2, cfg.hidden, 1, lambda: nn.LeakyReLU(0.2))

    def split_batch(self, batch: Any) -> tuple[torch.Tensor, None]:
        return batch[0], None  # real points only; there are no targets

    def count_items(self, batch: Any) -> int:
        return len(batch[0])

    def forward(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The engine seeds torch's generator per process (and checkpoints it), so the noise resumes exactly.
        noise = torch.randn(len(real), self.noise_dim, device=real.device)
        return real, self.G(noise)

    def compute_loss(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: None, phase: str) -> torch.Tensor:
        real, fake = outputs
        if phase == "discriminator":
            # fake.detach(): this phase steps D only; the generator's forward stays for the next phase.
            real = real.detach().requires_grad_(self.r1 > 0)
            d_real, d_fake = self.D(real), self.D(fake.detach())
            loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            loss = loss + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            if self.r1 > 0:
                # R1: penalise D's slope at the real points, so D cannot grow a cliff G keeps jumping over
                # (create_graph: the penalty's own gradient reaches D's parameters in this phase's backward).
                (slope,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
                loss = loss + self.r1 / 2 * slope.pow(2).sum(1).mean()
            return loss
        # The generator's phase runs after the discriminator's step: self.D is the updated one.
        d_fake = self.D(fake)
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))  # non-saturating

    def configure_optimizers(self) -> dict[str, Any]:
        # The dict's order is the phases' order: the discriminator first, as in the DCGAN example. Each
        # phase has its own scheduler; decaying both to 0 tightens the generated modes at the end.
        d, g = (
            torch.optim.Adam(net.parameters(), lr=lr, betas=self.betas, fused=fused_on_gpu(net.parameters()))
            for net, lr in ((self.D, self.lr_d), (self.G, self.lr_g))
        )
        return {
            "discriminator": (d, warmup_cosine(d, warmup_steps=0, total_steps=self.total_steps)),
            "generator": (g, warmup_cosine(g, warmup_steps=0, total_steps=self.total_steps)),
        }

    def predict_step(self, batch: Any) -> torch.Tensor:
        return self.G(batch[0])  # a batch of noise -> generated points


def quality(points: torch.Tensor, cfg: Config) -> dict[str, float]:
    """Mode coverage and sample quality of generated ``points`` (see the module docstring)."""
    dist = torch.cdist(points.double(), mode_centers(cfg).double())  # [n, modes]
    nearest_dist, nearest = dist.min(1)
    good = nearest_dist <= 3 * cfg.std
    share = torch.bincount(nearest[good], minlength=cfg.modes).double() / len(points)
    return {
        "modes_covered": int((share >= cfg.min_mode_share).sum()),
        "high_quality": good.double().mean().item(),
        "min_mode_share": share.min().item(),
        "max_mode_share": share.max().item(),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.smoke:  # a few steps on a small set, but through every code path (fit, checkpoints, evaluation)
        cfg.train_size, cfg.max_epochs, cfg.max_time, cfg.log_every_n_steps, cfg.eval_samples = 1024, 2, None, 2, 1000
    # Only the main process prints the summary and writes files; `accelerate launch` sets RANK.
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.monotonic()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)  # (on a shared CPU, more threads per process only wait for each other)

    real = ring_data(cfg, cfg.train_size)  # deterministic: every process builds the same set
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    module = GAN(cfg, total_steps=cfg.max_epochs * math.ceil(cfg.train_size / cfg.batch_size))
    # The Engine arguments among the fields; it picks the run dir (a fresh runs/gan-2 beside a used runs/gan).
    engine = Engine(**engine_options(cfg, run_dir=cfg.run_dir or "runs/gan"))
    run_dir = engine.run_dir
    assert run_dir is not None
    if is_main:
        save_recipe_config(cfg, run_dir)
    engine.fit(module, (real,))
    t_fit = time.monotonic() - t0
    # The same noise on every process and every run; predict uses the EMA weights (if any) and gives
    # every process all the rows.
    noise = torch.randn(cfg.eval_samples, cfg.noise_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    result = quality(engine.predict(module, noise).cpu(), cfg)
    wall = time.monotonic() - t0
    reached = result["modes_covered"] == cfg.modes and result["high_quality"] >= 0.90
    if is_main:
        print(
            f"gan: modes_covered={result['modes_covered']}/{cfg.modes} high_quality={result['high_quality']:.4f} "
            f"mode_share={result['min_mode_share']:.4f}..{result['max_mode_share']:.4f} steps={engine.step} "
            f"epochs={engine.epoch} fit={t_fit:.1f}s wall={wall:.1f}s\n"
            f"{target_line(engine, reached, f'{cfg.modes}/{cfg.modes} modes and high_quality >= 0.90')}\n"
            f"outputs: {os.path.abspath(run_dir)} (metrics.jsonl, config.json, recipe_config.yaml)",
            flush=True,
        )
    return {**result, "steps": engine.step, "wall_s": wall}


if __name__ == "__main__":
    main()
