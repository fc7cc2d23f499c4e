"""self.log and compute_loss's dict extras on 1 or 2 processes (run by tests/test_self_log.py).

    python tests/scripts/self_log_run.py RUN_DIR                                              # one process
    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/self_log_run.py RUN_DIR  # two

200 items in order (shuffle=False), global batch 32 in micro-batches of 8, 2 epochs (7 steps each, the last
of 8 items), a train record every 3 steps. The module logs the mean target of each micro-batch with self.log
and its own loss as a dict extra: train/target_mean is then the mean target of each step's global batch,
averaged over the steps since the last record, whatever the split.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.helpers

import torch
import torch.nn.functional as F

from framework import Engine
from tests.helpers import TinyClassifier, classification_data


class Logged(TinyClassifier):
    def compute_loss(self, outputs, targets):
        self.log("target_mean", targets.float().mean())
        loss = F.cross_entropy(outputs, targets)
        return {"loss": loss, "loss_copy": loss.detach()}


if __name__ == "__main__":
    x, y = classification_data(200)
    torch.manual_seed(0)
    engine = Engine(
        max_epochs=2, batch_size=32, micro_batch_size=8, shuffle=False, log_every_n_steps=3, progress=False,
        run_dir=sys.argv[1], checkpoint_every_epoch=False,
    )  # fmt: skip
    engine.fit(Logged(), (x, y))
