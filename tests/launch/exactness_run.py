"""A small exactness run, launched by tests/launch/test_multinode.py on 2 loopback "nodes".

    accelerate launch --config_file launch/multinode.yaml --machine_rank R ... tests/launch/exactness_run.py OUT.pt

Token-level loss over variable-length sequences (count_items = non-padding tokens), global
batch 64 in micro-batches of 16, a partial last window each epoch, 2 epochs, shuffled.
Each rank saves OUT.pt.rank<R>: the final flat parameters, the world size and its node rank; the test compares
them with the same run in 1 process (``run`` below, called in the test process).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `framework`

from framework import Engine, LoopModule

VOCAB, DIM, MAX_LEN, IGNORE = 20, 8, 10, -100


class TokenModel(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial parameters in every process
        self.emb = nn.Embedding(VOCAB, DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(inputs)))

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE)

    def count_items(self, batch: Any) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def data(n: int = 232) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of 1..MAX_LEN tokens, right-padded; 232 = 3 full windows of 64 + one of 40."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (n, MAX_LEN), generator=g)
    y = (x * 7 + 3) % VOCAB
    lengths = torch.randint(1, MAX_LEN + 1, (n, 1), generator=g)
    y[torch.arange(MAX_LEN) >= lengths] = IGNORE
    return x, y


def run() -> tuple[torch.Tensor, int]:
    """Train; return (flat final parameters, world size)."""
    model = TokenModel()
    engine = Engine(max_epochs=2, batch_size=64, micro_batch_size=16, seed=0, progress=False)
    engine.fit(model, data())
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), world


if __name__ == "__main__":
    import os

    params, world = run()
    rank = int(os.environ.get("RANK", "0"))
    # GROUP_RANK is torchrun's node (machine) rank: it shows each process ran as its own node.
    info = {"params": params, "world_size": world, "rank": rank, "node_rank": int(os.environ.get("GROUP_RANK", "-1"))}
    torch.save(info, f"{sys.argv[1]}.rank{rank}")
