"""Shared by tests/test_exactness.py and the 2-process script it launches.

A token-level model (embedding + linear) with cross-entropy over variable-length,
``ignore_index``-padded sequences: the case where "mean of micro-batch means" is
wrong even for full windows, because every micro-batch holds a different number
of counted tokens. Everything here is plain PyTorch except the LoopModule shell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from framework import LoopModule

VOCAB, DIM, MAX_LEN, PAD = 50, 16, 12, -100
N_TRAIN, N_VAL, GLOBAL_BATCH, EPOCHS, LR = 1000, 103, 64, 2, 1e-2
TOL = 1e-5  # the bound on max |param difference|
VAL_TOL = 1e-6
CANONICAL = ("zero_grad", "forward", "loss", "backward", "optimizer_step", "scheduler_step")


class TokenModel(LoopModule):
    """Embedding + linear; loss is the mean over non-padding tokens, so count_items counts those."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # same initial parameters in every process and every run
        self.emb = nn.Embedding(VOCAB, DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Padding positions hold token 0 in the input; their targets are PAD, so they add nothing.
        return self.out(self.emb(inputs))

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=PAD)

    def count_items(self, batch: Any) -> torch.Tensor:
        return (batch[1] != PAD).sum()

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = targets != PAD
        # One value per counted token, and one per sequence: two different denominators,
        # so a per-rank or per-batch mean would show up in either.
        tok_acc = (outputs.argmax(-1) == targets)[keep].float()
        seq_len = keep.sum(1).float()
        return {"tok_acc": tok_acc, "seq_len": seq_len}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.01)


def token_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of random length 1..MAX_LEN; the target is a function of the token, with
    30% label noise so accuracy stays well below 1 (a metric stuck at 1.0 would hide a wrong mean)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, MAX_LEN), generator=g)
    lengths = torch.randint(1, MAX_LEN + 1, (n,), generator=g)
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    noisy = torch.rand(n, MAX_LEN, generator=g) < 0.3
    labels = torch.where(noisy, torch.randint(0, VOCAB, (n, MAX_LEN), generator=g), (tokens * 7 + 3) % VOCAB)
    targets = torch.where(mask, labels, torch.full_like(tokens, PAD))
    inputs = torch.where(mask, tokens, torch.zeros_like(tokens))
    return inputs, targets


def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    return token_data(N_TRAIN, seed=1)


def val_data() -> tuple[torch.Tensor, torch.Tensor]:
    return token_data(N_VAL, seed=2)


class TokenStream(IterableDataset):
    """The training set as a stream, in order, without a length (every rank reads all of it)."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.data = data

    def __iter__(self):
        return zip(*self.data, strict=True)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hand_loop(data: tuple[torch.Tensor, torch.Tensor], micro: int | None = None, naive: bool = False) -> TokenModel:
    """A plain PyTorch loop over global batches of 64 in order (shuffle=False).

    ``micro=None``: one forward per global batch, token mean over the whole batch (the reference).
    ``micro=k, naive=True``: the common accumulation bug: each micro-batch's token mean divided
    by the accumulation steps (what Accelerate's backward and HF Transformers before the 2024
    fix did), i.e. a mean of micro-batch means, wrong whenever token counts differ.
    """
    model = TokenModel()
    opt = model.configure_optimizers()
    x, y = data
    accumulation = GLOBAL_BATCH // micro if micro else 1
    for _ in range(EPOCHS):
        for start in range(0, len(x), GLOBAL_BATCH):
            xb, yb = x[start : start + GLOBAL_BATCH], y[start : start + GLOBAL_BATCH]
            opt.zero_grad(set_to_none=True)
            if micro is None:
                model.compute_loss(model(xb), yb).backward()
            else:
                assert naive, "only the naive variant is implemented here"
                for s in range(0, len(xb), micro):
                    loss = model.compute_loss(model(xb[s : s + micro]), yb[s : s + micro])
                    (loss / accumulation).backward()
            opt.step()
    return model


def direct_metrics(model: TokenModel, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Loss and metrics over the whole set in one forward: the exact means validation must match."""
    x, y = data
    with torch.no_grad():
        out = model(x)
        metrics = {k: v.double().mean().item() for k, v in model.compute_metrics(out, y).items()}
        metrics["loss"] = model.compute_loss(out, y).item()
    return metrics


def order_errors(trace: list[tuple[str, int, int]], has_scheduler: bool = False) -> list[str]:
    """Every way ``trace`` departs from the canonical order; empty when it follows it.

    Per optimizer step: zero_grad once, then (forward, loss, backward) for micro 0..k-1,
    then optimizer_step, then scheduler_step iff ``has_scheduler``. Steps numbered 0, 1, 2, ...
    """
    errors: list[str] = []
    steps: dict[int, list[tuple[str, int]]] = {}
    order_of_steps: list[int] = []
    for name, step, micro in trace:
        if name not in CANONICAL:
            errors.append(f"unknown event {name!r}")
        if step not in steps:
            steps[step] = []
            order_of_steps.append(step)
        steps[step].append((name, micro))
    if order_of_steps != list(range(len(order_of_steps))):
        errors.append(f"steps not contiguous from 0 in trace order: {order_of_steps[:10]}...")
    for step, events in steps.items():
        names = [n for n, _ in events]
        k = names.count("forward")
        expected = ["zero_grad"] + ["forward", "loss", "backward"] * k + ["optimizer_step"]
        expected += ["scheduler_step"] if has_scheduler else []
        micros = [m for n, m in events if n in ("forward", "loss", "backward")]
        if k == 0 or names != expected:
            errors.append(f"step {step}: {names}")
        elif micros != [i for i in range(k) for _ in range(3)]:
            errors.append(f"step {step}: micro indices {micros}")
    return errors


def save(obj: Any, path: Path | str) -> None:
    torch.save(obj, str(path))
