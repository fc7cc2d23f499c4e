"""The token model and data that every layout trains in tests/parallel/test_layouts.py.

A language-model-shaped module built in ``configure_model`` (so it is on the meta device where the layout
shards): an embedding, blocks of LayerNorm -> up (Linear d->4d) -> GELU -> down (Linear 4d->d) with a residual,
a LayerNorm and a head. ``tp_plan`` splits ``up`` column-wise and ``down`` row-wise. The loss is a mean over
the tokens that count (targets -100 are padding), and ``count_items`` counts those tokens, so micro-batches
weigh very differently: the exactness rule must weigh them by tokens at every layout.

Example::

    module = TokenLM()
    Engine(max_epochs=2, batch_size=48, micro_batch_size=8, tp_size=2).fit(module, token_data())
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework import LoopModule

VOCAB, DIM, HIDDEN, BLOCKS, SEQ = 32, 16, 64, 2, 12
GLOBAL_BATCH = 48
ITEMS = 120  # windows of 48, 48 and a partial 24


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.ln(x))))


class TokenLM(LoopModule):
    def __init__(self, tp: bool = False, lr: float = 0.2, two_optimizers: bool = False) -> None:
        super().__init__()
        self.tp, self.lr, self.two_optimizers = tp, lr, two_optimizers
        self.poisoned = False  # a sequence of nothing but the last token id turns its micro-batch's loss NaN
        self.forward_calls = 0  # block forwards in training (activation checkpointing recomputes each once more)

    def configure_model(self) -> None:
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(DIM, HIDDEN) for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        for block in self.blocks:
            block.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # (training, and its recomputation in backward; not validation)
            self.forward_calls += 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        if self.poisoned:  # (on the device: no host read)
            x = x * torch.where((ids == VOCAB - 1).all(dim=1).any(), float("nan"), 1.0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def count_items(self, batch: Any) -> torch.Tensor:
        return (batch[1] != -100).sum()

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = targets != -100
        return {"acc": (outputs.argmax(-1) == targets)[keep].float()}  # one value per token

    def tp_plan(self) -> dict[str, str] | None:
        return {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"} if self.tp else None

    def fsdp_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def configure_optimizers(self) -> Any:
        # SGD with momentum: Adam's first steps divide by |g|, which turns float-rounding differences between
        # layouts (reductions in another order) into 1e-5-size parameter differences where g is near 0.
        if not self.two_optimizers:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        blocks = list(self.blocks.parameters())
        ids = {id(p) for p in blocks}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return {
            "blocks": torch.optim.SGD(blocks, lr=self.lr, momentum=0.9),
            "rest": torch.optim.SGD(rest, lr=self.lr / 2),
        }


def token_data(n: int = ITEMS, seed: int = 0, poison: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of SEQ tokens whose targets are the next token, with 2..SEQ of them counting (the rest
    padding, -100): micro-batches hold very different token counts. ``poison``: that sequence is all the last
    token id (a poisoned TokenLM's loss goes NaN on its micro-batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    inputs, targets = ids[:, :-1].clone(), ids[:, 1:].clone()
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    targets[torch.arange(SEQ)[None, :] >= lengths[:, None]] = -100
    if poison is not None:
        inputs[poison] = VOCAB - 1
    return inputs, targets
