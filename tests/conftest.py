"""Suite-wide test settings."""

import torch

# pytest-xdist runs one worker per core; letting each worker's torch also spawn a
# thread per core oversubscribes the CPU and makes tiny-model tests several times
# slower. Subprocess launches set OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)

# The scripts that tests launch as processes are not test modules: several run on import, so the doctest
# collection (--doctest-modules, meant for framework/) must not import them.
collect_ignore_glob = ["scripts/*.py", "launch/*_run.py"]
