"""Checkpoints: atomic, verified, safe to load, and complete enough for bitwise-exact resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000120/``::

    model.safetensors        the module's weights (clean names, no DDP/compile prefixes)
    ema.safetensors          the EMA of the parameters (with Engine(ema_decay=...))
    state.safetensors        optimizer, scheduler, GradScaler, callback tensors
    state.json               their non-tensor parts, counters, data position, the run's fingerprint
    .metadata, __R_0.distcp  sharded tensors (torch.distributed.checkpoint), where a layout shards
    rng-rank{R}.json/.safetensors   each rank's torch/CUDA/numpy/python RNG states
    manifest.json            written last: every file with its size and SHA-256, the monitored value
    SHA256SUMS               the same hashes for ``sha256sum -c``

The package, bottom up:

- :mod:`~framework.checkpoint.files`: the errors, and file writes that never follow a link;
- :mod:`~framework.checkpoint.fileformat`: the manifest, safetensors streamed and hashed, checks of what
  is read (:func:`~framework.checkpoint.fileformat.expect`);
- :mod:`~framework.checkpoint.io`: one checkpoint, written complete or invisible
  (:class:`CheckpointWriter`) and verified before anything reads it (:class:`CheckpointReader`);
- :mod:`~framework.checkpoint.store`: a run's checkpoints (which to resume, ``latest``, pruning,
  timelines, background writes);
- :mod:`~framework.checkpoint.shards`: sharded tensors through torch.distributed.checkpoint, its pickled
  index read by an allow-list;
- :mod:`~framework.checkpoint.state`: what goes in (a registry of named stateful objects) and how it is
  checked on the way back, before anything is applied;
- :mod:`~framework.checkpoint.weights`: weights for inference (``framework.load_weights``) and export.

Nothing is ever unpickled except DCP's index, through an allow-list: tensors come from safetensors and
everything else from JSON, so a planted pickle cannot run code.

Example:

    >>> from pathlib import Path
    >>> from framework.checkpoint import CheckpointReader, newest_complete
    >>> engine = framework.Engine(max_steps=2, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/digits",
    ...                           progress=False)
    >>> module = Classifier()
    >>> _ = engine.fit(module, train_data)
    >>> path = newest_complete(Path("runs/digits/checkpoints"))
    >>> path.as_posix()
    'runs/digits/checkpoints/step-00000002'
    >>> weights = CheckpointReader(path).tensors("model.safetensors")  # verified first
    >>> sorted(weights), torch.equal(weights["net.weight"], module.net.weight)
    (['net.bias', 'net.weight'], True)
"""

from __future__ import annotations

from .fileformat import MANIFEST, SUMS
from .files import CheckpointError, CorruptCheckpointError, DiskFullError
from .io import CHECKPOINT_RE, CheckpointReader, CheckpointWriter, staging_dir, verify
from .store import (
    ABANDONED,
    LATEST,
    AsyncCheckpointer,
    Found,
    abandon_newer,
    list_checkpoints,
    load_newest,
    make_room,
    newest_complete,
    prune,
    publish,
    read_latest,
    validate,
    write_latest,
)
from .weights import dedup_shared, load_weights, read_weights

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
    "DiskFullError",
    "Found",
    "abandon_newer",
    "dedup_shared",
    "list_checkpoints",
    "load_newest",
    "load_weights",
    "make_room",
    "newest_complete",
    "prune",
    "publish",
    "read_latest",
    "read_weights",
    "staging_dir",
    "validate",
    "verify",
    "write_latest",
]
