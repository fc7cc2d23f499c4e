"""compile=True (issue 4): torch.compile trains on CPU, the user's module object holds the trained
weights afterwards, and its state_dict has clean names (no ``_orig_mod.`` prefix)."""

from __future__ import annotations

import copy

import torch

from framework import Engine
from tests.scripts.issue4_common import Net, data, flat


def test_compile_trains_on_cpu_and_the_original_module_holds_the_weights():
    # One tiny test: compiling costs seconds on CPU (gcc builds the kernels), the rest is instant.
    x, y = data(64)
    module = Net(optimizer="sgd", lr=0.5)
    eager = copy.deepcopy(module)
    keys = list(module.state_dict())
    engine = Engine(max_steps=4, batch_size=16, shuffle=False, compile=True, progress=False)
    engine.fit(module, (x, y))
    Engine(max_steps=4, batch_size=16, shuffle=False, progress=False).fit(eager, (x, y))

    assert type(module) is Net and "_orig_mod" not in vars(module)
    assert list(module.state_dict()) == keys  # no "_orig_mod." prefix
    assert not any("_orig_mod" in k for k in module.state_dict())
    # The compiled run trained the very tensors of the module the user passed in, and computed
    # what eager mode computes (up to kernel-fusion rounding).
    assert not torch.equal(flat(module), flat(Net(optimizer="sgd", lr=0.5)))
    torch.testing.assert_close(flat(module), flat(eager), rtol=1e-4, atol=1e-5)
