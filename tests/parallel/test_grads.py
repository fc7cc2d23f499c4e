"""framework.parallel.grads: the gradient helpers of the optimizer step must do exactly what torch's own
functions do (same values, same bits), and the non-finite check must catch every NaN and inf
without changing a bit of what it reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework import Engine, LoopModule, NonFiniteError
from framework.parallel import grads as gradient_ops

BAD = [float("nan"), float("inf"), float("-inf")]


def some_grads(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype), torch.tensor(0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nonfinite_check_is_zero_for_finite_tensors_and_changes_no_bit(dtype):
    tensors = some_grads(dtype)
    tensors[0][0, 0] = -0.0  # x * 1.0 keeps the sign of zero
    before = [t.clone() for t in tensors]
    flag = gradient_ops.NonFiniteCheck()(tensors)
    assert flag is not None and flag.tolist() == [0.0]
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b) and torch.equal(torch.signbit(t), torch.signbit(b))


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("where", [0, 1, 2], ids=["matrix", "vector", "0-dim loss"])
def test_nonfinite_check_catches_nan_and_inf_in_any_tensor(bad, where):
    check = gradient_ops.NonFiniteCheck()
    tensors = some_grads()
    assert check(tensors).tolist() == [0.0]  # type: ignore[union-attr]
    tensors[where].view(-1)[-1] = bad
    assert check(tensors).tolist() == [1.0]  # type: ignore[union-attr]
    # The flag is reused across calls: it stays raised until cleared, then reads finite again.
    tensors[where].view(-1)[-1] = 1.0
    assert check(tensors).tolist() == [1.0]  # type: ignore[union-attr]
    check.clear()
    assert check(tensors).tolist() == [0.0]  # type: ignore[union-attr]


def test_nonfinite_check_reads_non_contiguous_tensors():
    t = torch.randn(5, 3).t()
    t[2, 4] = float("nan")
    assert gradient_ops.NonFiniteCheck()([t]).tolist() == [1.0]  # type: ignore[union-attr]


def test_nonfinite_check_returns_none_where_the_fused_op_does_not_apply():
    # Sparse gradients (nn.Embedding(sparse=True)) have no fused kernel: the engine measures norms instead.
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, float("nan")], (4,), check_invariants=True)
    assert gradient_ops.NonFiniteCheck()([torch.ones(2), sparse]) is None


def test_a_skipped_step_lowers_the_flag_for_the_next_one():
    # With nan_policy="skip", the step after a bad one must be judged on its own values.
    from tests.scripts.issue4_common import Net, data

    x, y = data(4 * 16, nan_items=[16])  # window 1 of 4 is bad
    engine = Engine(max_epochs=1, batch_size=16, shuffle=False, nan_policy="skip", progress=False, doctor="off")
    engine.fit(Net(optimizer="sgd", lr=0.1), (x, y))
    assert engine.skipped_steps == 1 and engine.step == 4


def test_grad_norm_counts_sparse_gradients():
    # An embedding's backward leaves duplicate indices: index 0 holds 1 + 2 = 3 once coalesced.
    sparse = torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, 4.0], (4,), check_invariants=True)
    assert gradient_ops.grad_norm([torch.tensor([0.0]), sparse]).item() == 5.0
    poisoned = torch.sparse_coo_tensor([[1]], [float("nan")], (4,), check_invariants=True)
    assert gradient_ops.grad_norm([torch.ones(2), poisoned]).isnan()


def sparse_bag() -> LoopModule:
    class Bag(LoopModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4, sparse=True)
            self.head = nn.Linear(4, 1)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(idx)).squeeze(-1)

        def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(outputs, targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Bag()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_the_engine_trains_a_model_with_sparse_gradients(clip):
    # The fused check has no sparse kernel: the engine falls back to the total norm.
    idx, y = torch.arange(10).repeat(4), torch.randn(40)
    module = sparse_bag()
    before = module.emb.weight.detach().clone()
    Engine(max_steps=3, batch_size=8, clip_grad_norm=clip, progress=False).fit(module, (idx, y))
    assert not torch.equal(before, module.emb.weight) and torch.isfinite(module.emb.weight).all()


def test_a_non_finite_sparse_gradient_is_caught_and_named():
    idx, y = torch.arange(10).repeat(4), torch.randn(40)
    y[3] = float("nan")
    module = sparse_bag()
    before = module.emb.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"non-finite gradients in .*emb\.weight"):
        Engine(max_steps=3, batch_size=8, shuffle=False, progress=False).fit(module, (idx, y))
    assert torch.equal(before, module.emb.weight)


def test_grad_norm_is_bitwise_torchs_total_norm():
    grads = some_grads()
    assert torch.equal(gradient_ops.grad_norm(grads), torch.nn.utils.get_total_norm(grads, foreach=True))


def test_pack_stacks_scalars_in_order():
    assert gradient_ops.pack([torch.tensor(1.0), torch.tensor(2.0)]).tolist() == [1.0, 2.0]


def test_zero_grad_sets_every_gradient_to_none_and_respects_an_override():
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    gradient_ops.zero_grad(opt)
    assert all(p.grad is None for p in net.parameters())

    calls: list[bool] = []

    class Counting(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    gradient_ops.zero_grad(Counting(net.parameters(), lr=0.1))
    assert calls == [True]  # an optimizer's own zero_grad runs (set_to_none=True)
