"""python recipes/digits.py                                                   # MLP, one process
python recipes/digits.py --model cnn                                       # the small CNN
accelerate launch --config_file launch/cpu.yaml recipes/digits.py          # the same, via Accelerate
accelerate launch --config_file launch/cpu_ddp.yaml recipes/digits.py      # 2 CPU processes (gloo)
accelerate launch --config_file launch/gpu.yaml recipes/digits.py          # one GPU (bf16.yaml: bf16)
python recipes/digits.py --smoke --run-dir /tmp/digits                     # a few steps (CI)
python recipes/digits.py --config my.yaml --lr 3e-3                        # YAML file + overrides

Handwritten digit classification on scikit-learn's bundled 8x8 digits (1,797 images,
no download): a fixed, stratified 60/20/20 train/val/test split, pixels standardized
with the training set's statistics. ``--model mlp`` (default) is a 2-hidden-layer MLP;
``--model cnn`` a small 2-conv CNN over the 1x8x8 image.

Target: >= 0.97 validation accuracy in <= 60 s on 2 CPU cores (MLP default); the
measured figure is in recipes/README.md. The test accuracy is reported once, at the end,
through ``engine.validate``.

``batch_size`` is global (items per optimizer step over all processes), so the
DDP launch trains the same steps on the same batches as one process, and
``--micro-batch-size`` splits each process's share into accumulated micro-batches.
(Results match one process up to dropout, whose random masks are drawn per process
and per micro-batch; ``--dropout 0`` makes them match to float rounding.)

Outputs go to ``--run-dir`` (default ``runs/digits-<model>``): ``metrics.jsonl``,
``config.json`` (the engine's resolved config) and ``recipe_config.yaml`` (this
recipe's hyperparameters; pass it back with ``--config`` to rerun).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Make `import framework` work when run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework import Engine, LoopModule
from framework.cli.recipe import engine_options, parse_config, save_recipe_config, target_line
from framework.optim import fused_on_gpu


@dataclass
class Config:
    """Hyperparameters; every field is also a ``--flag`` (see ``--help``)."""

    model: Literal["mlp", "cnn"] = "mlp"
    hidden: int = 512  # MLP width / CNN classifier width
    dropout: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 64  # global: items per optimizer step across all processes
    micro_batch_size: int | None = None  # per process per forward; None = batch_size / world_size
    max_epochs: int = 40
    max_time: float | None = 60.0  # seconds; a safety bound, the target is reached well before
    seed: int = 0
    split_seed: int = 0  # the fixed train/val/test split
    log_every_n_steps: int = 20
    progress: bool = True
    run_dir: str | None = None  # default: runs/digits-<model> (-2, -3, ... once used; --resume auto: the newest)
    checkpoint_every_n_steps: int | None = None  # also at every epoch end (the engine's default with a run dir)
    resume: str | None = None  # "auto": continue from the run dir's newest checkpoint (e.g. after a SLURM requeue)
    smoke: bool = False  # a few steps on a small subset, for CI


class Classifier(LoopModule):
    """Any network from 64 standardized pixels to 10 logits, trained with cross-entropy."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float, epochs: int) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.epochs = lr, weight_decay, epochs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)  # the mean over the batch, as the engine expects

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"acc": (outputs.argmax(-1) == targets).float()}  # one value per image: an exact mean

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        # Fused on a GPU: it can skip a non-finite step on the device, so the NaN guard needs no sync per step.
        fused = fused_on_gpu(self.parameters())
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        # Cosine decay over the planned epochs, stepped once per epoch by the engine.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.epochs, 1))
        return {"optimizer": opt, "scheduler": sched, "interval": "epoch"}


def build_net(model: str, hidden: int, dropout: float) -> nn.Module:
    """``mlp``: 64 -> hidden -> hidden -> 10. ``cnn``: 1x8x8 -> conv32 -> conv64 -> max-pool -> hidden -> 10."""
    if model == "mlp":
        return nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),  # the data stays flat (64,) so both models share it
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 64 x 4 x 4
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(64 * 4 * 4, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def load_splits(split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed stratified 60/20/20 split of the bundled digits, standardized with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=split_seed, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=split_seed, stratify=y_rest
    )
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std == 0] = 1.0  # border pixels that are always 0 in training

    def prep(a, b):  # type: ignore[no-untyped-def]
        return torch.tensor((a - mean) / std, dtype=torch.float32), torch.tensor(b, dtype=torch.long)

    return {"train": prep(x_train, y_train), "val": prep(x_val, y_val), "test": prep(x_test, y_test)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.smoke:  # a few steps on a subset, but through every code path (fit, per-epoch validation, test)
        cfg.max_epochs, cfg.max_time, cfg.log_every_n_steps = 2, None, 1
    # Only the main process prints the summary and writes files; `accelerate launch` sets RANK.
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.monotonic()

    splits = load_splits(cfg.split_seed)
    train = splits["train"]
    if cfg.smoke:
        train = (train[0][:192], train[1][:192])
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    module = Classifier(build_net(cfg.model, cfg.hidden, cfg.dropout), cfg.lr, cfg.weight_decay, cfg.max_epochs)

    # The Engine arguments among the fields; it picks the run dir (a fresh -2 beside a used one).
    engine = Engine(**engine_options(cfg, run_dir=cfg.run_dir or f"runs/digits-{cfg.model}"))
    run_dir = engine.run_dir
    assert run_dir is not None
    if is_main:
        save_recipe_config(cfg, run_dir)
    engine.fit(module, train, splits["val"])
    # Every process takes part in validate (it all-reduces sums and counts); each gets the same numbers.
    val = engine.validate(module, splits["val"])
    test = engine.validate(module, splits["test"])
    wall = time.monotonic() - t0
    if is_main:
        print(
            f"digits/{cfg.model}: val/acc={val['acc']:.4f} test/acc={test['acc']:.4f} "
            f"val/loss={val['loss']:.4f} steps={engine.step} epochs={engine.epoch} wall={wall:.1f}s\n"
            f"{target_line(engine, val['acc'] >= 0.97, 'val/acc >= 0.97')}\n"
            f"outputs: {os.path.abspath(run_dir)} (metrics.jsonl, config.json, recipe_config.yaml)",
            flush=True,
        )
    return {"val/acc": val["acc"], "test/acc": test["acc"], "wall_s": wall}


if __name__ == "__main__":
    main()
