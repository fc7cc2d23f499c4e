"""framework/module.py: LoopModule's defaults, and what the engine does with the hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import Engine, LoopError, LoopModule
from tests.helpers import TinyClassifier, classification_data


class Bare(LoopModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, inputs):
        return self.lin(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def test_is_an_nn_module():
    m = Bare()
    assert isinstance(m, nn.Module)
    assert m(torch.zeros(3, 4)).shape == (3, 2)


def test_defaults():
    m = Bare()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    inputs, targets = m.split_batch((x, y))
    assert inputs is x and targets is y
    assert m.count_items((x, y)) == 5
    assert m.compute_metrics(m(x), y) == {}
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.parameters()}
    assert not opt.defaults["fused"]  # on CPU: torch's default AdamW (the NaN guard's read is free here)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_optimizer_is_fused_on_a_gpu_so_the_nan_guard_needs_no_sync():
    from framework.guard import why_not_deferred

    opt = Bare().cuda().configure_optimizers()
    assert opt.defaults["fused"] is True
    assert why_not_deferred(opt, None, "step") is None


def test_count_items_follows_split_batch():
    # A custom split_batch changes what the default count_items counts (the targets).
    class Seq(Bare):
        def split_batch(self, batch):
            return batch["x"], batch["y"]

    batch = {"x": torch.randn(7, 4), "y": torch.zeros(7, dtype=torch.long)}
    assert Seq().count_items(batch) == 7


def test_missing_methods_name_the_fix():
    class NoForward(LoopModule):
        def compute_loss(self, outputs, targets):
            return outputs.sum()

    with pytest.raises(NotImplementedError, match=r"NoForward.forward is missing; define forward"):
        NoForward()(torch.zeros(1))
    with pytest.raises(NotImplementedError, match=r"compute_loss is missing"):
        LoopModule().compute_loss(None, None)


def test_engine_rejects_module_without_compute_loss():
    class NoLoss(LoopModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, inputs):
            return self.lin(inputs)

    x, y = classification_data(32)
    with pytest.raises(LoopError, match=r"NoLoss does not define compute_loss"):
        Engine(max_steps=1, batch_size=16, progress=False).fit(NoLoss(), (x, y))


def test_custom_split_batch_and_dict_batches():
    # Dict items through a generic Dataset: the user's split_batch decides inputs and targets.
    x, y = classification_data(40)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return {"features": x[i], "label": y[i]}

    class DictModule(TinyClassifier):
        def split_batch(self, batch):
            return batch["features"], batch["label"]

        def count_items(self, batch):
            return len(batch["label"])

    torch.manual_seed(0)
    a = DictModule()
    Engine(max_epochs=1, batch_size=8, progress=False).fit(a, Dicts())
    torch.manual_seed(0)
    b = TinyClassifier()
    Engine(max_epochs=1, batch_size=8, progress=False).fit(b, (x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [2.5, "3", None, torch.tensor(2.0), torch.tensor([1, 2])])
def test_bad_count_items_is_a_clear_error(bad):
    class BadCount(TinyClassifier):
        def count_items(self, batch):
            return bad

    x, y = classification_data(32)
    with pytest.raises(LoopError, match=r"BadCount.count_items returned .*(int|integer scalar)"):
        Engine(max_steps=1, batch_size=16, progress=False).fit(BadCount(), (x, y))


@pytest.mark.filterwarnings("ignore:.*count_items returned 0")  # the zero count is the point here
def test_count_items_tensor_weighs_micro_batches():
    # Items weighted by count_items: a micro-batch counted as 0 items contributes nothing, so
    # training on (real, counted-zero) equals training on the real micro-batch alone.
    x, y = classification_data(32)

    class CountFirstHalf(TinyClassifier):
        def count_items(self, batch):
            # Batch items carry their index in column 0 of a third tensor.
            return (batch[2] < 16).sum()

        def split_batch(self, batch):
            return batch[0], batch[1]

    idx = torch.arange(32)
    torch.manual_seed(0)
    a = CountFirstHalf()
    Engine(max_steps=1, batch_size=32, micro_batch_size=16, shuffle=False, progress=False).fit(a, (x, y, idx))
    torch.manual_seed(0)
    b = TinyClassifier()
    Engine(max_steps=1, batch_size=16, shuffle=False, progress=False).fit(b, (x[:16], y[:16]))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)


def test_a_dict_batch_into_a_tensor_forward_names_split_batch():
    """The default split_batch hands a dict with 'labels' to forward whole (the HF convention); a forward that
    takes a tensor fails inside torch (an embedding's TypeError). The error names split_batch and the fix."""

    class Tokens(LoopModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids).mean(1)

        def compute_loss(self, outputs, targets):
            return F.mse_loss(outputs.sum(-1), targets.float())

    ids = torch.randint(0, 10, (16, 5))
    batches = [{"input_ids": ids[i : i + 4], "labels": torch.zeros(4)} for i in range(0, 16, 4)]
    module = Tokens()
    before = [p.detach().clone() for p in module.parameters()]
    engine = Engine(max_steps=2, progress=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.raises(TypeError, match=r"Tokens\.forward failed on a dict batch") as err:
        engine.fit(module, loader)
    message = str(err.value)
    assert "define split_batch(self, batch)" in message and "['input_ids', 'labels']" in message, message
    assert "Tensor" in message  # (torch's own message is kept)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), before, strict=True))
    with pytest.raises(TypeError, match="split_batch"):
        engine.validate(module, loader)
