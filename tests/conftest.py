"""Suite-wide test settings."""

import torch

# pytest-xdist runs one worker per core; letting each worker's torch also spawn a
# thread per core oversubscribes the CPU and makes tiny-model tests several times
# slower. Subprocess launches set OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)
