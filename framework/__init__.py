"""A PyTorch training loop that is correct by construction.

Example::

    from framework import LoopModule, Engine
    engine = Engine(max_epochs=10, batch_size=64, seed=0, run_dir="runs/digits")
    engine.fit(Classifier(), train_data, val_data)
"""

from . import schedules  # so a plain `import framework` exposes framework.schedules
from .callbacks import Callback, EarlyStopping
from .checkpoint import CheckpointError, load_weights
from .doctor import LoopError, LoopWarning
from .engine import Engine, NonFiniteError
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
]
__version__ = "0.1.0"
