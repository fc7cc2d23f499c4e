"""python recipes/hf_causal_lm.py                                                 # one process
accelerate launch --config_file launch/cpu_ddp.yaml recipes/hf_causal_lm.py    # the target run: 2 CPU processes (gloo)
accelerate launch --config_file launch/cpu.yaml recipes/hf_causal_lm.py        # 1 process (1 thread), same steps
accelerate launch --config_file launch/gpu.yaml recipes/hf_causal_lm.py        # one GPU
accelerate launch --config_file launch/cpu_2d.yaml recipes/hf_causal_lm.py     # 4 processes: dp_shard 2 x tensor parallel 2
accelerate launch --config_file launch/cpu_ddp.yaml recipes/hf_causal_lm.py --tp-size 2   # tensor parallel over 2 processes
python recipes/hf_causal_lm.py --micro-batch-size 8                            # 4 accumulated micro-batches per step
python recipes/hf_causal_lm.py --smoke --run-dir /tmp/hf_causal_lm             # a few steps (CI)
python recipes/hf_causal_lm.py --config my.yaml --hidden-size 256              # YAML file + overrides
python -m framework export runs/hf_causal_lm --hf exported/                    # then AutoModelForCausalLM.from_pretrained

A real HuggingFace ``transformers`` causal LM (``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU,
tied embeddings), built from a small config with random weights, wrapped in a LoopModule
(``self.lm``) and trained from scratch on Python source code. Nothing is downloaded.

Data: the ``.py`` files at the top level of this Python's standard library (``--text-dir``
picks another folder), sorted by name; every ``held_out_every``-th file is held out, so
validation measures how well the model predicts files it never saw. A byte-level BPE
tokenizer (HF ``tokenizers``, ``vocab_size`` tokens) is trained here on the training files
only, then wrapped as a ``PreTrainedTokenizerFast``. Each file becomes ``<bos> tokens <eos>``,
cut into sequences of at most ``block_size`` tokens that end at a line break, so sequences
have different lengths; ``DataCollatorForLanguageModeling(mlm=False)`` pads each micro-batch
and sets the labels of padding to -100.

Loss: the model's own (``self.lm(**batch).loss``): next-token cross-entropy, averaged over
the labels that are not -100 *after* the causal shift (transformers shifts the labels left
by one inside the loss). ``count_items`` counts exactly those tokens,
``(labels[:, 1:] != -100).sum()``, so the engine weighs micro-batches and processes by them
(DESIGN.md's exactness rule): accumulation and DDP give the gradient of the mean over every
predicted token of the global batch.

Metric: ``val/loss`` (nats per predicted token, exact over the held-out set) and its
perplexity ``exp(val/loss)``; ``val/token_acc`` (top-1 next-token accuracy). For scale, a
unigram model of the training tokens (no context) is printed next to it.

Target: held-out perplexity <= 16 (per token of this 512-token vocabulary; about 1.8 bits
per byte) within 5 minutes on 2 CPU cores under
``accelerate launch --config_file launch/cpu_ddp.yaml recipes/hf_causal_lm.py`` (2 processes,
one core each: ``accelerate launch`` gives every process one thread, so launch/cpu.yaml would
use one core). The numbers are for Python 3.11's stdlib (another version has other files).
The same 600 steps on the same global batches run at any world size, so the quality does
not depend on the launch (up to float rounding); ``max_time`` bounds the training (a slower machine stops earlier,
with a higher perplexity). The measured result is in recipes/README.md.

Outputs go to ``--run-dir`` (default ``runs/hf_causal_lm``): ``metrics.jsonl``,
``config.json``, ``recipe_config.yaml``, checkpoints, and ``hf/`` (the model's HF config and
the tokenizer, written by ``framework.checkpoint.weights.save_hf_artifacts``), from which
``python -m framework export RUN_DIR --hf OUT_DIR`` writes a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
"""

from __future__ import annotations

import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Make `import framework` work when run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework import Engine, LoopModule
from framework.checkpoint.weights import save_hf_artifacts
from framework.cli.recipe import engine_options, parse_config, save_recipe_config, target_line
from framework.optim import fused_on_gpu
from framework.parallel.tp import hf_tp_plan
from framework.schedules import warmup_cosine

IGNORE = -100  # labels the loss and the metrics skip (transformers' convention)
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"  # ids 0, 1, 2; the padding id differs from <eos>, which is learned


@dataclass
class Config:
    """Hyperparameters; every field is also a ``--flag`` (see ``--help``)."""

    text_dir: str | None = None  # folder of .py files to learn; None = this Python's standard library
    max_files: int | None = None  # use only the first N files (sorted by name); None = all
    held_out_every: int = 20  # file i is held out when i % held_out_every == 0 (9 of 168 stdlib files)
    vocab_size: int = 512  # BPE tokens, special ones included
    block_size: int = 128  # tokens per sequence at most
    hidden_size: int = 128
    intermediate_size: int = 384  # SwiGLU width
    n_layer: int = 4
    n_head: int = 2  # head size 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    warmup_steps: int = 30
    final_lr_ratio: float = 0.1  # cosine decay from lr to lr x this at max_steps
    batch_size: int = 32  # global: sequences per optimizer step across all processes
    micro_batch_size: int | None = None  # per process per forward; None = batch_size / world_size
    max_steps: int = 600
    max_epochs: int = 10  # an upper bound; max_steps ends the run first
    max_time: float | None = 240.0  # seconds of training: a safety bound under the 5-minute target
    seed: int = 0
    log_every_n_steps: int = 25
    sample_tokens: int = 48  # after training, greedily continue a prompt this far (0: no sample)
    progress: bool = True
    run_dir: str | None = None  # default: runs/hf_causal_lm (-2, -3, ... once used; --resume auto: the newest)
    checkpoint_every_n_steps: int | None = None  # also at every epoch end and when fit ends
    resume: str | None = None  # "auto": continue from the run dir's newest checkpoint (e.g. after a SLURM requeue)
    tp_size: int | None = None  # split attention and MLP over this many processes (the model's own HF plan)
    smoke: bool = False  # a few steps of a tiny model on a few files, for CI


# ---------------------------------------------------------------- data


def source_files(cfg: Config) -> tuple[list[str], list[str]]:
    """The texts of the training files and of the held-out files, in name order."""
    folder = Path(cfg.text_dir or sysconfig.get_paths()["stdlib"])
    paths = sorted(folder.glob("*.py"))[: cfg.max_files]
    if len(paths) < 2:
        raise ValueError(
            f"{folder} holds {len(paths)} .py file(s); --text-dir needs a folder with at least 2 (one is held out)"
        )
    if cfg.held_out_every < 2:
        raise ValueError(f"held_out_every={cfg.held_out_every}: use 2 or more (1 would hold out every file)")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    train = [t for i, t in enumerate(texts) if i % cfg.held_out_every != 0]
    val = [t for i, t in enumerate(texts) if i % cfg.held_out_every == 0]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic: every process trains the same one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # any byte encodes, no <unk>
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def chunk(ids: list[int], ends_line: np.ndarray, block_size: int) -> list[list[int]]:
    """Cut one file's ids into pieces of at most ``block_size`` that end at a line break.

    A piece ends after the last token holding a newline in the second half of its window
    (so a piece rarely starts mid-line), or at ``block_size`` if there is none; a piece of
    one token predicts nothing and is dropped.
    """
    pieces, start, n = [], 0, len(ids)
    while start < n:
        end = min(start + block_size, n)
        if end < n:
            half = start + block_size // 2
            breaks = np.flatnonzero(ends_line[ids[half:end]])
            if len(breaks):
                end = half + int(breaks[-1]) + 1
        if end - start >= 2:
            pieces.append(ids[start:end])
        start = end
    return pieces


def make_data(cfg: Config) -> tuple[Any, list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """(tokenizer, training sequences, held-out sequences); each sequence is ``{"input_ids": [...]}``."""
    train_texts, val_texts = source_files(cfg)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    ends_line = np.array(["\n" in tokenizer.decode([i]) for i in range(len(tokenizer))])

    def sequences(texts: list[str]) -> list[dict[str, list[int]]]:
        out = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            whole = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
            out += [{"input_ids": piece} for piece in chunk(whole, ends_line, cfg.block_size)]
        return out

    return tokenizer, sequences(train_texts), sequences(val_texts)


def make_collator(tokenizer: Any) -> Any:
    """Pads a micro-batch on the right; labels = input_ids, with padding set to -100."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)


def bytes_per_token(tokenizer: Any, sequences: list[dict[str, list[int]]]) -> float:
    """Text bytes per predicted token (special tokens count 0), to turn nats per token into bits per byte.

    Byte-level BPE writes each byte of a token as one character of its vocabulary string.
    """
    special = set(tokenizer.all_special_ids)
    size = np.array(
        [0 if i in special else len(t) for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))]
    )
    targets = np.concatenate([s["input_ids"][1:] for s in sequences])
    return float(size[targets].mean())


def unigram_loss(train: list[dict[str, list[int]]], val: list[dict[str, list[int]]], vocab: int) -> float:
    """Held-out loss (nats per predicted token) of token frequencies alone: the no-context baseline."""
    counts = np.bincount(np.concatenate([s["input_ids"][1:] for s in train]), minlength=vocab) + 1.0  # add-one
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([s["input_ids"][1:] for s in val])
    return float(-logp[targets].mean())


# ---------------------------------------------------------------- model


class CausalLM(LoopModule):
    """``LlamaForCausalLM`` from a small config, trained with its own loss on dict batches."""

    def __init__(self, cfg: Config, tokenizer: Any) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.cfg = cfg
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.block_size,
            tie_word_embeddings=True,  # the input and output embeddings share one matrix (fewer parameters)
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        self.lm = LlamaForCausalLM(config)

    def tp_plan(self) -> dict[str, str] | None:
        # The model's own plan (attention and MLP projections; the tied embedding stays whole), when the layout
        # has tensor parallelism: --tp-size, or the launch config's parallelism_config.
        tp = self.cfg.tp_size or int(os.environ.get("PARALLELISM_CONFIG_TP_SIZE", "1"))
        return hf_tp_plan(self.lm, prefix="lm.") if tp > 1 else None

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        # The whole collated dict: input_ids, attention_mask and labels, so the model computes its loss.
        return self.lm(**inputs)

    def compute_loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        # transformers' causal-LM loss: the mean over the labels != -100 after the shift (count_items' tokens).
        return outputs.loss

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Position t predicts label t + 1, so the first label is never a target: after the shift the
        # loss averages over labels[:, 1:] that are not -100. A tensor: counting never syncs the host.
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def compute_metrics(self, outputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``token_acc``: one value per predicted token (whether the argmax is the next token)."""
        predicted, next_tokens = outputs.logits[:, :-1].argmax(-1), targets[:, 1:]
        keep = next_tokens != IGNORE
        return {"token_acc": (predicted == next_tokens)[keep].float()}

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        # Weight decay on matrices only; the (tied) embedding and the norms' scales are not decayed.
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            eps=cfg.adam_eps,
            # On a GPU: it can skip a non-finite step on the device, so the NaN guard needs no sync per step.
            fused=fused_on_gpu(self.parameters()),
        )
        return opt, warmup_cosine(opt, cfg.warmup_steps, max(cfg.max_steps, cfg.warmup_steps + 1), cfg.final_lr_ratio)


def sample(module: CausalLM, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` with transformers' ``generate`` (no sampling: reproducible)."""
    device = next(module.parameters()).device
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1).to(device)
    module.eval()
    with torch.no_grad():
        out = module.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, 1:]))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.smoke:  # every code path (fit, per-epoch validation, final validate, hf/ files) in a few steps
        cfg.max_files, cfg.held_out_every, cfg.vocab_size, cfg.block_size = 12, 4, 384, 64
        cfg.hidden_size, cfg.intermediate_size, cfg.n_layer, cfg.n_head = 64, 128, 2, 2
        cfg.batch_size, cfg.max_steps, cfg.max_time, cfg.warmup_steps, cfg.log_every_n_steps = 16, 8, None, 2, 2
        cfg.sample_tokens = min(cfg.sample_tokens, 8)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the Hub
    # Only the main process prints the summary and writes files; `accelerate launch` sets RANK.
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.monotonic()

    tokenizer, train, val = make_data(cfg)  # deterministic: every process builds the same sets
    if cfg.smoke:  # a few optimizer steps that cross an epoch end, and a small held-out set
        train, val = train[: 3 * cfg.batch_size - 5], val[:40]
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    module = CausalLM(cfg, tokenizer)
    # The Engine arguments among the fields, and the batching this data needs.
    # (the Engine picks the run dir: a fresh runs/hf_causal_lm-2 beside a used runs/hf_causal_lm)
    engine = Engine(
        **engine_options(cfg, run_dir=cfg.run_dir or "runs/hf_causal_lm"), collate_fn=make_collator(tokenizer)
    )
    run_dir = engine.run_dir
    assert run_dir is not None
    if is_main:
        save_recipe_config(cfg, run_dir)
        # What `python -m framework export RUN_DIR --hf OUT_DIR` needs besides the checkpoint's weights.
        save_hf_artifacts(run_dir, module.lm, prefix="lm.", tokenizer=tokenizer)
    engine.fit(module, train, val)
    # The final score, whether the run ended on max_steps, at an epoch end or on max_time.
    # Every process takes part (validate all-reduces sums and counts) and gets the same numbers.
    result = engine.validate(module, val)
    wall = time.monotonic() - t0
    baseline = unigram_loss(train, val, len(tokenizer))
    bpb = result["loss"] / math.log(2) / bytes_per_token(tokenizer, val)
    # Every process generates (under FSDP or TP each forward is a collective); the main one prints.
    text = sample(module, tokenizer, "def ", cfg.sample_tokens) if cfg.sample_tokens else ""
    if is_main:
        n_tokens = sum(len(s["input_ids"]) - 1 for s in val)
        print(
            f"hf_causal_lm: val/ppl={math.exp(result['loss']):.2f} val/loss={result['loss']:.4f} "
            f"val/token_acc={result['token_acc']:.4f} val/bits_per_byte={bpb:.3f} on {n_tokens} held-out tokens "
            f"(unigram baseline ppl {math.exp(baseline):.1f}); steps={engine.step} wall={wall:.1f}s\n"
            f"greedy sample: {text!r}\n"
            f"{target_line(engine, math.exp(result['loss']) <= 16, 'val/ppl <= 16')}\n"
            f"outputs: {os.path.abspath(run_dir)} (metrics.jsonl, config.json, recipe_config.yaml, checkpoints, hf/);"
            f" export with: python -m framework export {run_dir} --hf OUT_DIR",
            flush=True,
        )
    return {
        "val/ppl": math.exp(result["loss"]),
        "val/loss": result["loss"],
        "val/token_acc": result["token_acc"],
        "val/bits_per_byte": bpb,
        "unigram_ppl": math.exp(baseline),
        "steps": engine.step,
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
