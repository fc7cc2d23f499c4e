"""``one_thread``: an autouse fixture for test modules of tiny models. Import it into the module
(``from tests.threads import one_thread  # noqa: F401``): their intra-op threads would only fight the
other xdist workers for the 2 cores (5x slower under load); restored after the module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
