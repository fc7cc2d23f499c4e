"""python recipes/adder.py                                                    # one process
accelerate launch --config_file launch/cpu.yaml recipes/adder.py           # the default config's target run
accelerate launch --config_file launch/cpu_ddp.yaml recipes/adder.py       # 2 CPU processes (gloo), same steps
accelerate launch --config_file launch/gpu.yaml recipes/adder.py           # one GPU
python recipes/adder.py --micro-batch-size 64                              # 4 accumulated micro-batches per step
python recipes/adder.py --smoke --run-dir /tmp/adder                       # a few steps (CI)
python recipes/adder.py --config my.yaml --d-model 96                      # YAML file + overrides

A small decoder-only transformer (4 layers, 128 wide, 4 heads, pre-norm, causal
attention), written here in full, learns integer addition.

Problems: ``a+b=`` with operands of 1 to 4 digits (the digit count drawn uniformly,
then the value; no leading zeros), so prompt and answer lengths vary. The answer is
written with its digits reversed (least significant first, the order in which carries
are computed) and ends with an end-of-answer token: ``57+68=521$`` means 125.

Model input: token embeddings plus learned absolute positions plus, by default, an
embedding of each digit's place value (units, tens, ...; ``digit_places``), which tells
the model which digits line up across operands of different lengths. Measured here
(lr 1e-3, cosine decay over 1,500 steps, batch 256): with place embeddings, 0.9955 exact
match after 250 steps; without (``--digit-positions false``: positions alone), 0.13 after
500 steps and 0.55 after 1,000. So the default stops at 750 steps.

Loss: next-token cross-entropy on the answer tokens only. The prompt and the
padding are ignored (-100), and ``count_items`` returns the number of answer tokens
in a batch, so the item count varies per batch and the engine weighs micro-batches
and processes by it (docs/DESIGN.md, the exactness rule): accumulation and DDP give the
gradient of the mean over all answer tokens of the global batch.

Metric: ``val/exact_match`` over 2,000 held-out problems, none of which appears in
training (training problems are drawn with the held-out pairs rejected; as there are
only 100 one-digit + one-digit problems, about 75 of them are held out and never seen).
It counts a problem as solved when every answer token (the end token included) is
the argmax under teacher forcing, which equals greedy decoding (see ``compute_metrics``).
``val/token_acc`` is the per-answer-token accuracy.

Target: >= 0.99 exact match within 5 minutes on 2 CPU cores under
``accelerate launch --config_file launch/cpu.yaml recipes/adder.py``; ``max_time``
bounds the run. The measured result is in recipes/README.md.

Outputs go to ``--run-dir`` (default ``runs/adder``): ``metrics.jsonl``, ``config.json``
and ``recipe_config.yaml`` (pass it back with ``--config`` to rerun).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
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

    max_digits: int = 4  # operands have 1..max_digits digits
    train_size: int = 64_000  # generated training problems (held-out pairs excluded): 250 steps an epoch
    val_size: int = 2_000  # held-out problems for val/exact_match
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    digit_positions: bool = True  # also embed each digit's place value (units, tens, ...); see digit_places
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decay from lr to lr x this at max_steps (1.0: constant)
    batch_size: int = 256  # global: problems per optimizer step across all processes
    micro_batch_size: int | None = None  # per process per forward; None = batch_size / world_size
    max_steps: int = 750
    max_epochs: int = 100  # an upper bound; max_steps ends the run first
    max_time: float | None = 270.0  # seconds of training: a safety bound under the 5-minute target
    seed: int = 0
    data_seed: int = 1234
    log_every_n_steps: int = 50
    progress: bool = True
    run_dir: str | None = None  # default: runs/adder (-2, -3, ... once used; with --resume auto, the newest)
    checkpoint_every_n_steps: int | None = None  # also at every epoch end (the engine's default with a run dir)
    resume: str | None = None  # "auto": continue from the run dir's newest checkpoint (e.g. after a SLURM requeue)
    smoke: bool = False  # a few steps on a small set, for CI


# ---------------------------------------------------------------- data

VOCAB = "0123456789+=$_"  # digits, plus, equals, end-of-answer, padding
PLUS, EQUALS, END, PAD = (VOCAB.index(c) for c in "+=$_")
IGNORE = -100  # targets the loss and the metrics skip


def seq_len(max_digits: int) -> int:
    """Longest token sequence: a + b = (max_digits + 1 answer digits) $."""
    return 2 * max_digits + 2 + (max_digits + 1) + 1


def sample_operands(rng: np.random.Generator, n: int, max_digits: int) -> np.ndarray:
    """n operands: the digit count uniform in 1..max_digits, then the value uniform, no leading zeros."""
    digits = rng.integers(1, max_digits + 1, size=n)
    lo = np.where(digits == 1, 0, 10 ** (digits - 1))
    return rng.integers(lo, 10**digits)


def encode(a: np.ndarray, b: np.ndarray, max_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids for ``a+b=<reversed sum>$``, right-padded: (inputs, targets) shifted by one.

    Targets are the next tokens, with everything up to and including ``=`` and all
    padding set to IGNORE, so only the answer (and its end token) is learned and scored.
    """
    length = seq_len(max_digits)
    text = "".join(
        f"{x}+{y}={str(x + y)[::-1]}$".ljust(length, "_") for x, y in zip(a.tolist(), b.tolist(), strict=True)
    )
    lut = np.zeros(256, dtype=np.int64)
    lut[np.frombuffer(VOCAB.encode(), np.uint8)] = np.arange(len(VOCAB))
    tokens = torch.from_numpy(lut[np.frombuffer(text.encode(), np.uint8)].reshape(len(a), length))
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    pos = torch.arange(length - 1)
    equals_at = (inputs == EQUALS).int().argmax(1, keepdim=True)  # position of "=" in the inputs
    targets[(pos <= equals_at - 1) | (targets == PAD)] = IGNORE  # predict only what follows "="
    return inputs, targets


def make_data(cfg: Config) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Held-out problems first (distinct pairs), then training problems with those pairs rejected."""
    rng = np.random.default_rng(cfg.data_seed)
    val_keys: np.ndarray = np.array([], dtype=np.int64)
    while len(val_keys) < cfg.val_size:  # distinct (a, b) pairs, in draw order
        a = sample_operands(rng, cfg.val_size, cfg.max_digits)
        b = sample_operands(rng, cfg.val_size, cfg.max_digits)
        keys = np.concatenate([val_keys, a * 10**cfg.max_digits + b])
        _, first = np.unique(keys, return_index=True)
        val_keys = keys[np.sort(first)][: cfg.val_size]
    base = 10**cfg.max_digits
    val = encode(val_keys // base, val_keys % base, cfg.max_digits)

    a_parts, b_parts, have = [], [], 0
    while have < cfg.train_size:
        a = sample_operands(rng, cfg.train_size, cfg.max_digits)
        b = sample_operands(rng, cfg.train_size, cfg.max_digits)
        keep = ~np.isin(a * base + b, val_keys)  # never train on a held-out problem
        a_parts.append(a[keep])
        b_parts.append(b[keep])
        have += int(keep.sum())
    a_train = np.concatenate(a_parts)[: cfg.train_size]
    b_train = np.concatenate(b_parts)[: cfg.train_size]
    return encode(a_train, b_train, cfg.max_digits), val


# ---------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each residual."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # Causal: position t sees tokens <= t only. Padding sits at the end (right), so no
        # real position ever attends to it and no padding mask is needed.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


def digit_places(inputs: torch.Tensor) -> torch.Tensor:
    """Each token's place value within its number: 1 = units, 2 = tens, ...; 0 for non-digits.

    Operands are written most significant digit first, so their places count from the
    right end of each run of digits; the answer is written reversed (units first), so its
    places count from the left, from "=" on. Only the prompt is looked at from the right,
    and it is complete before the first answer token: the places of answer positions
    depend on earlier tokens only, so the model stays causal (see compute_metrics).
    Embedding places tells the model which digits line up (a learned-from-scratch
    alternative is to infer it from absolute positions, which takes several times more steps).
    """
    digit = inputs < 10
    answer = (inputs == EQUALS).cumsum(1) > 0  # "=" and everything after it
    places = torch.zeros_like(inputs)
    run = torch.zeros_like(inputs[:, 0])
    for t in reversed(range(inputs.shape[1])):  # operands: count from the right of each number
        run = torch.where(digit[:, t] & ~answer[:, t], run + 1, 0)
        places[:, t] = run
    run = torch.zeros_like(run)
    for t in range(inputs.shape[1]):  # the reversed answer: count from the left
        run = torch.where(digit[:, t] & answer[:, t], run + 1, 0)
        places[:, t] += run
    return places


class Adder(LoopModule):
    """A decoder-only transformer over the 14-token vocabulary, trained on answer tokens only."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(len(VOCAB), cfg.d_model)
        self.pos = nn.Embedding(seq_len(cfg.max_digits), cfg.d_model)  # learned absolute positions
        self.place = nn.Embedding(cfg.max_digits + 2, cfg.d_model) if cfg.digit_positions else None
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, len(VOCAB), bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab), T = the longest real sequence in the batch (the shared padding is cut)."""
        # Cut the batch's all-padding tail: it changes nothing (padding is at the end and attention
        # is causal) and saves compute on CPU. Not on GPU, where reading the length to the host
        # would be a sync point on every forward, costing more than the few columns save.
        T = int((inputs != PAD).sum(1).max()) if inputs.device.type == "cpu" else inputs.shape[1]
        inputs = inputs[:, :T]
        x = self.tok(inputs) + self.pos.weight[:T]
        if self.place is not None:
            x = x + self.place(digit_places(inputs))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The mean over this batch's answer tokens; the cut tail of targets is all IGNORE (padding).
        targets = targets[:, : outputs.shape[1]]
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)

    def count_items(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # The items compute_loss averages over: the answer tokens. Varies per batch (answers
        # have 1 to max_digits + 1 digits); a tensor, so counting never forces a host sync.
        return (batch[1] != IGNORE).sum()

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``exact_match``: one value per problem; ``token_acc``: one value per answer token.

        Why teacher-forced exact match equals greedy decoding's: the model is causal, so
        the logits at position t depend only on tokens <= t. Greedy decoding starts from
        the same prompt and at each answer position feeds back its own argmax. If every
        answer token is the argmax under teacher forcing (the true prefix fed in), then by
        induction greedy decoding feeds exactly the true prefix at every step, so it emits
        the true answer, the end token included (hence also the right length). Conversely,
        if greedy decoding emits the true answer, the prefixes it fed were the true ones,
        so teacher forcing sees the same logits and every argmax is right. One batched
        forward therefore scores whole answers, with no decoding loop.
        """
        targets = targets[:, : outputs.shape[1]]
        mask = targets != IGNORE
        hit = outputs.argmax(-1) == targets
        return {
            "exact_match": (hit | ~mask).all(1).float(),  # every answer token right, per problem
            "token_acc": hit[mask].float(),
        }

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "pos" not in n and "tok" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "pos" not in n and "tok" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            # On a GPU: it can skip a non-finite step on the device, so the NaN guard needs no sync per step.
            fused=fused_on_gpu(self.parameters()),
        )

        def schedule(step: int) -> float:  # linear warmup, then cosine decay to final_lr_ratio at max_steps
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
            low = cfg.final_lr_ratio
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.smoke:  # every code path (fit, per-epoch validation, final validate) in a few steps
        cfg.train_size, cfg.val_size, cfg.batch_size = 256, 256, 64
        cfg.max_steps, cfg.max_epochs, cfg.max_time, cfg.warmup_steps, cfg.log_every_n_steps = 8, 2, None, 2, 2
    # Only the main process prints the summary and writes files; `accelerate launch` sets RANK.
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.monotonic()

    train, val = make_data(cfg)  # deterministic: every process builds the same sets
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    module = Adder(cfg)
    # The Engine arguments among the fields; it picks the run dir (a fresh runs/adder-2 beside a used runs/adder).
    engine = Engine(**engine_options(cfg, run_dir=cfg.run_dir or "runs/adder"))
    run_dir = engine.run_dir
    assert run_dir is not None
    if is_main:
        save_recipe_config(cfg, run_dir)
    engine.fit(module, train, val)
    # The final score, whether the run ended on max_steps, at an epoch end or on max_time.
    # Every process takes part (validate all-reduces sums and counts) and gets the same numbers.
    result = engine.validate(module, val)
    wall = time.monotonic() - t0
    if is_main:
        print(
            f"adder: val/exact_match={result['exact_match']:.4f} val/token_acc={result['token_acc']:.4f} "
            f"val/loss={result['loss']:.4f} on {len(val[0])} held-out problems; steps={engine.step} wall={wall:.1f}s\n"
            f"{target_line(engine, result['exact_match'] >= 0.99, 'val/exact_match >= 0.99')}\n"
            f"outputs: {os.path.abspath(run_dir)} (metrics.jsonl, config.json, recipe_config.yaml)",
            flush=True,
        )
    return {
        "val/exact_match": result["exact_match"],
        "val/token_acc": result["token_acc"],
        "steps": engine.step,
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
