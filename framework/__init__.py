"""A PyTorch training loop that is correct by construction.

Example:

    >>> from framework import Engine, seed_everything
    >>> seed_everything(0)  # before building the model
    >>> engine = Engine(max_epochs=2, batch_size=32, seed=0, run_dir="runs/digits", progress=False)
    >>> engine.fit(Classifier(), train_data, val_data).stop_reason.cause
    'max_epochs'
    >>> sorted(k for k in engine.metrics if k.startswith("val/"))
    ['val/acc', 'val/loss']
    >>> import os
    >>> sorted(os.listdir("runs/digits"))  # what the run wrote
    ['.lock', 'checkpoints', 'config.json', 'metrics.jsonl']
"""

from . import schedules  # so a plain `import framework` exposes framework.schedules
from .callbacks import Callback, EarlyStopping
from .checkpoint import CheckpointError, load_weights
from .data.rng import seed_everything
from .doctor import LoopError, LoopWarning
from .engine import Engine
from .guard import NonFiniteError
from .module import LoopModule

__all__ = [
    "Callback",
    "CheckpointError",
    "EarlyStopping",
    "Engine",
    "LoopError",
    "LoopModule",
    "LoopWarning",
    "NonFiniteError",
    "load_weights",
    "schedules",
    "seed_everything",
]
__version__ = "0.1.0"
