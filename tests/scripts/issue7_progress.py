"""A short run with the progress display on, for the terminal / no-terminal tests.

    python tests/scripts/issue7_progress.py [--log-every N]

2 epochs of 7 steps (200 items, batch 32) with validation; the progress goes to
stderr, whatever that is (a pseudo-terminal in the test). Prints ``DONE <steps>``
to stdout at the end.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.helpers

import torch

from framework import Engine
from tests.helpers import TinyClassifier, classification_data

parser = argparse.ArgumentParser()
parser.add_argument("--log-every", type=int, default=2)
args = parser.parse_args()

x, y = classification_data(200)
torch.manual_seed(0)
engine = Engine(max_epochs=2, batch_size=32, seed=0, log_every_n_steps=args.log_every, progress=True)
engine.fit(TinyClassifier(), (x, y), (x[:64], y[:64]))
print(f"DONE {engine.step}", flush=True)
