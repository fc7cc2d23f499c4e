"""Checkpoints: atomic, verified, safe to load, and complete enough for bitwise-exact resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000120/``::

    model.safetensors        the module's weights (clean names, no DDP/compile prefixes)
    ema.safetensors          the EMA of the parameters (with Engine(ema_decay=...))
    state.safetensors        optimizer, scheduler, GradScaler, callback tensors
    state.json               their non-tensor parts, counters, data position, the run's fingerprint
    shards/                  under FSDP: the sharded tensors (torch.distributed.checkpoint)
    rng-rank{R}.json/.safetensors   each rank's torch/CUDA/numpy/python RNG states
    manifest.json            written last: every file with its size and SHA-256, the monitored value
    SHA256SUMS               the same hashes for ``sha256sum -c``

The file layer lives in its own modules, re-exported here: writing and verifying one checkpoint
(:mod:`framework.checkpoint_io`), the manifest format (:mod:`framework.manifest`), choosing,
pruning and branching a run's checkpoints (:mod:`framework.checkpoint_dir`), background writes
(:mod:`framework.async_checkpoint`), weights for inference (:mod:`framework.weights`), safe
file writes (:mod:`framework.files`) and the checks of what is read (:mod:`framework.schema`).
Nothing is ever unpickled: tensors come from safetensors and everything else from JSON, so a
planted pickle cannot run code.

What goes into a checkpoint, and how it is checked on the way back, is the train state's
(:mod:`framework.state`, a registry of named stateful objects); sharded tensors are written by
torch.distributed.checkpoint (:mod:`framework.dcp`), into the checkpoint's ``shards/``.
"""

from __future__ import annotations

from typing import Any

import torch

from .async_writer import AsyncCheckpointer
from .errors import CheckpointError, CorruptCheckpointError
from .io import CheckpointReader, CheckpointWriter, staging_dir, verify
from .manifest import MANIFEST, SUMS
from .store import (
    ABANDONED,
    CHECKPOINT_RE,
    LATEST,
    Found,
    abandon_newer,
    list_checkpoints,
    load_newest,
    newest_complete,
    prune,
    read_latest,
    validate,
    write_latest,
)
from .weights import load_weights, read_weights

__all__ = [
    "ABANDONED",
    "CHECKPOINT_RE",
    "LATEST",
    "MANIFEST",
    "SUMS",
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "CorruptCheckpointError",
    "Found",
    "abandon_newer",
    "dedup_shared",
    "list_checkpoints",
    "load_newest",
    "load_weights",
    "newest_complete",
    "prune",
    "read_latest",
    "read_weights",
    "staging_dir",
    "validate",
    "verify",
    "write_latest",
]


def dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one, record the aliases."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and sig in seen:
            aliases[name] = seen[sig]
            continue
        seen[sig] = name
        unique[name] = t.contiguous()
    return unique, aliases
