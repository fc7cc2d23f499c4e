"""In-process recipe runs use one intra-op thread: pytest runs with -n auto (one worker per core),
and two workers each spinning several OpenMP threads on a shared core slow each other down badly."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
