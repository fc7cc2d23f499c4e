"""framework/doctor/: one broken module per loop mistake, an assertion on the message that names it;
correct modules (dropout, micro-batches, schedulers, frozen-by-design parameters, BatchNorm, dict
batches, token counts) produce no finding in any mode; the doctor never steers training and reads
device values only on its checked steps.

Every test runs a real Engine on a real (tiny) module; nothing of the doctor is mocked.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from framework import Engine, LoopError, LoopModule, LoopWarning, NonFiniteError
from framework.doctor import CHECKS, Doctor
from tests.helpers import TinyClassifier, classification_data

X, Y = classification_data(256)
VAL = classification_data(64, seed=1)


def run(module: LoopModule, *, data=None, val=None, **kw) -> Engine:
    """Fit with warnings recorded on the engine (``engine.caught``): the doctor's findings as the user sees them."""
    kw.setdefault("max_steps", 3)
    kw.setdefault("batch_size", 32)
    kw.setdefault("progress", False)
    engine = Engine(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine.fit(module, (X, Y) if data is None else data, val)
        finally:
            engine.caught = [w for w in caught if issubclass(w.category, LoopWarning)]
    return engine


def warned(engine: Engine, check: str) -> str:
    """The one LoopWarning of ``check`` (failing if there is none or several), as text."""
    mine = [str(w.message) for w in engine.caught if w.message.check == check]
    assert len(mine) == 1, (check, [str(w.message) for w in engine.caught])
    return mine[0]


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in module.state_dict().values() if t.is_floating_point()])


# ------------------------------------------------------------------ compute_loss returns the wrong thing


class NonScalar(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")


class PythonNumber(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets).item()


class Detached(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets).detach()


class NoGradForward(TinyClassifier):
    def forward(self, inputs):
        with torch.no_grad():
            return self.net(inputs)


class NoGradForwardPlusRegularizer(NoGradForward):
    """The weight penalty keeps the loss differentiable, which hides the no_grad forward from autograd."""

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets) + 1e-4 * sum(p.square().sum() for p in self.parameters())


class StaleLoss(TinyClassifier):
    """Computes the loss once and keeps returning it."""

    def __init__(self):
        super().__init__()
        self.cached = None

    def compute_loss(self, outputs, targets):
        if self.cached is None:
            self.cached = F.cross_entropy(outputs, targets)
        return self.cached


@pytest.mark.parametrize(
    "cls, check, pattern",
    [
        (NonScalar, "loss_value", r"NonScalar.compute_loss returned a tensor of shape \[32\]; return a scalar"),
        (PythonNumber, "loss_value", r"PythonNumber.compute_loss returned a float .*return a scalar tensor"),
        (
            Detached,
            "loss_value",
            r"Detached.compute_loss returned a loss that does not require grad although forward's outputs do.*Fix",
        ),
        (
            NoGradForward,
            "loss_graph",
            r"NoGradForward.forward returned outputs that do not require grad.*no_grad.*Fix: remove",
        ),
        (
            NoGradForwardPlusRegularizer,
            "loss_graph",
            r"NoGradForwardPlusRegularizer.forward returned outputs that do not require grad.*Fix",
        ),
        (
            StaleLoss,
            "loss_graph",
            r"StaleLoss.compute_loss returned a loss that is not computed from this step's forward outputs: a stale loss.*Fix",
        ),
    ],
)
def test_bad_loss_is_an_error_before_the_step(cls, check, pattern):
    torch.manual_seed(0)
    module = cls()
    engine = Engine(max_steps=3, batch_size=32, progress=False)
    with pytest.raises(LoopError, match=pattern) as info:
        engine.fit(module, (X, Y))
    assert info.value.check == check
    # Raised before the failing step's optimizer step: the stale loss is caught on step 1 (its first reuse),
    # before its backward (which would fail with autograd's cryptic "backward through the graph a second time").
    assert engine.step == (1 if cls is StaleLoss else 0)


def test_stale_loss_is_caught_on_its_first_reuse_even_late():
    """A loss cached from step 5 on is reused on step 6, an unchecked step under "basic": autograd would
    fail there; under "full" the doctor names the mistake on that very step."""

    class LateStale(TinyClassifier):
        calls = 0

        def compute_loss(self, outputs, targets):
            if not torch.is_grad_enabled():  # the "full" doctor's no-grad loss probe: not a training step
                return F.cross_entropy(outputs, targets)
            LateStale.calls += 1
            if LateStale.calls <= 6:
                self.keep = F.cross_entropy(outputs, targets)
            return self.keep

    with pytest.raises(LoopError, match="stale loss"):
        Engine(max_steps=8, batch_size=32, progress=False, doctor="full").fit(LateStale(), (X, Y))


# ------------------------------------------------------------------ the user runs the engine's steps


class BackwardInComputeLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        loss.backward()
        return loss


class BackwardInForward(TinyClassifier):
    def forward(self, inputs):
        out = self.net(inputs)
        out.square().mean().backward(retain_graph=True)  # an "auxiliary" backward
        return out


class ZeroGradInForward(TinyClassifier):
    def forward(self, inputs):
        self.zero_grad()
        return self.net(inputs)


class OptimizerOwner(TinyClassifier):
    def configure_optimizers(self):
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return self.opt


class OptimizerZeroGradInComputeLoss(OptimizerOwner):
    def compute_loss(self, outputs, targets):
        self.opt.zero_grad()
        return F.cross_entropy(outputs, targets)


class StepInComputeLoss(OptimizerOwner):
    def compute_loss(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        self.opt.step()
        return loss


class StepWithOwnOptimizerInForward(TinyClassifier):
    """An optimizer the engine does not know, over this module's parameters."""

    def __init__(self):
        super().__init__()
        self.private = torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, inputs):
        out = self.net(inputs)
        self.private.step()
        return out


@pytest.mark.parametrize(
    "cls, pattern",
    [
        (BackwardInComputeLoss, r"BackwardInComputeLoss.compute_loss called backward\(\).*Fix: remove the call"),
        (BackwardInForward, r"BackwardInForward.forward called backward\(\).*Fix: remove the call"),
        (ZeroGradInForward, r"ZeroGradInForward.forward called zero_grad\(\).*Fix: remove"),
        (OptimizerZeroGradInComputeLoss, r"OptimizerZeroGradInComputeLoss.compute_loss called zero_grad\(\)"),
        (StepInComputeLoss, r"StepInComputeLoss.compute_loss called optimizer.step\(\).*blocked.*Fix: remove"),
        (StepWithOwnOptimizerInForward, r"StepWithOwnOptimizerInForward.forward called optimizer.step\(\)"),
    ],
)
def test_backward_step_or_zero_grad_in_user_code_is_an_error(cls, pattern):
    torch.manual_seed(0)
    module = cls()
    before = flat(module)
    with pytest.raises(LoopError, match=pattern) as info:
        Engine(max_steps=3, batch_size=32, progress=False).fit(module, (X, Y))
    assert info.value.check == "loop_calls"
    assert torch.equal(flat(module), before)  # stopped before any parameter changed
    assert "zero_grad" not in module.__dict__  # the doctor's temporary patch is gone


def test_zero_grad_on_a_submodule_between_micro_batches_is_caught():
    """Not patched (a submodule's zero_grad), but it drops the first micro-batch's gradient: caught by its effect."""

    class SubmoduleZeroGrad(TinyClassifier):
        def compute_loss(self, outputs, targets):
            self.net.zero_grad()
            return F.cross_entropy(outputs, targets)

    with pytest.raises(
        LoopError, match=r"SubmoduleZeroGrad.compute_loss called zero_grad\(\) \(gradients were set to None\)"
    ):
        Engine(max_steps=2, batch_size=32, micro_batch_size=16, progress=False).fit(SubmoduleZeroGrad(), (X, Y))


def test_an_inner_loop_optimizer_over_other_tensors_is_allowed():
    """Meta-learning style: an optimizer stepping fast weights that are not the module's parameters."""

    class InnerLoop(TinyClassifier):
        def forward(self, inputs):
            fast = torch.zeros(3, requires_grad=True)
            inner = torch.optim.SGD([fast], lr=0.1)
            fast.grad = torch.ones(3)
            inner.step()
            return self.net(inputs) + fast.detach()

    engine = run(InnerLoop(), doctor="full", val=VAL)
    assert engine.doctor.findings == [] and engine.caught == []


def test_patches_are_removed_when_user_code_raises():
    class Boom(OptimizerOwner):
        def forward(self, inputs):
            raise ValueError("user bug")

    module = Boom()
    with pytest.raises(ValueError, match="user bug"):
        Engine(max_steps=1, batch_size=32, progress=False).fit(module, (X, Y))
    assert "zero_grad" not in module.__dict__ and "zero_grad" not in module.opt.__dict__
    # and the global optimizer hook is gone: a plain optimizer steps normally
    p = nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    torch.optim.SGD([p], lr=1.0).step()
    assert p.item() == 0.0


# ------------------------------------------------------------------ modes


class EvalInForward(TinyClassifier):
    def forward(self, inputs):
        self.eval()
        return self.net(inputs)


class SubmoduleEvalInComputeLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        self.net[2].eval()  # the dropout
        return F.cross_entropy(outputs, targets)


class TrainInValidation(TinyClassifier):
    def forward(self, inputs):
        self.train()
        return self.net(inputs)


def test_module_switching_to_eval_during_training_is_an_error():
    with pytest.raises(
        LoopError,
        match=r"EvalInForward switched itself to eval mode during training \(in forward\); remove the .eval\(\)",
    ):
        Engine(max_steps=2, batch_size=32, progress=False).fit(EvalInForward(), (X, Y))
    with pytest.raises(
        LoopError, match=r"SubmoduleEvalInComputeLoss.compute_loss switched net.2 to eval mode.*remove the .eval\(\)"
    ) as info:
        Engine(max_steps=2, batch_size=32, progress=False).fit(SubmoduleEvalInComputeLoss(dropout=0.1), (X, Y))
    assert info.value.check == "train_mode"


def test_module_switching_to_train_during_validation_is_an_error():
    with pytest.raises(
        LoopError, match=r"TrainInValidation switched itself to train mode during validation; remove the\s+.train\(\)"
    ) as info:
        Engine(max_epochs=1, batch_size=128, progress=False).fit(TrainInValidation(), (X, Y), VAL)
    assert info.value.check == "eval_mode"


# ------------------------------------------------------------------ parameters and the optimizer


class Unused(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)  # defined, never used


class HeadOutsideOptimizer(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, inputs):
        return self.head(self.net(inputs))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-3)  # forgot the head


class ZeroLrGroup(TinyClassifier):
    def configure_optimizers(self):
        first, last = self.net[0], self.net[3]
        return torch.optim.SGD([{"params": first.parameters()}, {"params": last.parameters(), "lr": 0.0}], lr=0.1)


class ZeroGradient(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(3))

    def forward(self, inputs):
        return self.net(inputs) + 0.0 * self.gate  # connected, but its gradient is exactly zero

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AllFrozen(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_parameters_without_gradient_are_named_once():
    engine = run(Unused(), max_steps=10)
    msg = warned(engine, "gradients")  # once, though 5 of the 10 steps were checked
    assert "2 trainable parameter(s) of Unused received no gradient: spare.weight, spare.bias" in msg
    assert "Fix: use them in forward, remove them, or call requires_grad_(False)" in msg
    assert [f.check for f in engine.doctor.findings] == ["gradients"]  # not reported again as "unchanged"


def test_trainable_parameters_missing_from_the_optimizer_are_named():
    msg = warned(run(HeadOutsideOptimizer()), "optimizer_coverage")
    assert "2 trainable parameter(s) of HeadOutsideOptimizer are in no param group of the optimizer" in msg
    assert "head.weight, head.bias" in msg and "self.parameters()" in msg


def test_parameters_unchanged_by_the_first_steps_name_the_cause():
    msg = warned(run(ZeroLrGroup()), "updates")
    assert "2 trainable parameter(s) of ZeroLrGroup did not change in the first 2 optimizer steps" in msg
    assert "param group 1 has lr=0: net.3.weight, net.3.bias" in msg and "Fix: give every param group" in msg
    msg = warned(run(ZeroGradient()), "updates")
    assert "(zero gradient: gate)" in msg


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(LoopError, match=r"AllFrozen has no trainable parameters \(none with requires_grad=True\)"):
        Engine(max_steps=1, batch_size=32, progress=False).fit(AllFrozen(), (X, Y))


# ------------------------------------------------------------------ values


class NanLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")


class InfGradient(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(1))

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets) + self.z.sqrt().sum()  # d sqrt(z)/dz at 0 is inf


def test_non_finite_values_name_the_loss_or_the_parameter():
    module = NanLoss()
    before = flat(module)
    engine = Engine(max_steps=2, batch_size=32, progress=False)
    with pytest.raises(
        NonFiniteError,
        match=r"at optimizer step 0 .*: NanLoss.compute_loss returned nan .*parameters and optimizer state are unchanged",
    ):
        engine.fit(module, (X, Y))
    assert torch.equal(flat(module), before)
    assert [f.check for f in engine.doctor.findings] == ["finite"]
    with pytest.raises(NonFiniteError, match=r"non-finite gradients in z; parameters"):
        Engine(max_steps=2, batch_size=32, progress=False).fit(InfGradient(), (X, Y))


@pytest.mark.parametrize(
    "count, kind, pattern",
    [
        (-3, "error", r"Bad.count_items returned -3; return the \(non-negative\) number"),
        (torch.tensor(-3), "error", r"Bad.count_items returned -3; return the \(non-negative\) number"),
        (2.5, "error", r"Bad.count_items returned float 2.5; return an int"),
        (
            torch.tensor(4.0),
            "error",
            r"Bad.count_items returned a torch.float32 tensor of shape \[\]; return an integer scalar",
        ),
        (0, "warning", r"Bad.count_items returned 0 for a batch, so it adds nothing to the gradient"),
        (torch.tensor(0), "warning", r"Bad.count_items returned 0 for a batch"),
    ],
    ids=["negative", "negative-tensor", "float", "float-tensor", "zero", "zero-tensor"],
)
def test_count_items_must_be_a_non_negative_integer(count, kind, pattern):
    class Bad(TinyClassifier):
        def count_items(self, batch):
            return count

    if kind == "error":
        with pytest.raises(LoopError, match=pattern):
            run(Bad())
    else:
        import re

        assert re.search(pattern, warned(run(Bad(), max_steps=6), "count_items"))


# ------------------------------------------------------------------ full-only and setup warnings


class SumLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")


def test_a_sum_loss_is_found_by_the_full_doctor_only():
    engine = run(SumLoss(dropout=0.2), doctor="full")
    msg = warned(engine, "loss_scaling")
    assert "SumLoss.compute_loss scales with the batch size, like a sum: on a batch of 32 items" in msg
    assert "Fix: use reduction='mean'" in msg
    assert run(SumLoss(), doctor="basic").caught == []  # the probe costs forwards: "full" only
    assert "loss_scaling" in run(TinyClassifier(), doctor="full").doctor.ran  # it did run on a good module


class WithBatchNorm(LoopModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def test_batchnorm_with_micro_batches_warns():
    msg = warned(run(WithBatchNorm(), micro_batch_size=8), "batchnorm")
    assert (
        "WithBatchNorm has BatchNorm layers (net.1) and each forward sees a micro-batch of 8 items, not the global batch of 32"
        in msg
    )
    assert "Fix: set micro_batch_size" in msg
    assert run(WithBatchNorm()).caught == []  # whole batches: fine


@pytest.mark.parametrize(
    "make_val",
    [
        lambda tr: tr,
        lambda tr: (tr[0], tr[1]),  # a new tuple, the same tensors
        lambda tr: (tr[0].clone(), tr[1].clone()),  # equal copies
    ],
    ids=["same-object", "same-tensors", "equal-copies"],
)
def test_validation_data_identical_to_training_data_warns(make_val):
    msg = warned(run(TinyClassifier(), data=(X, Y), val=make_val((X, Y))), "val_data")
    assert "val_data is the same data as train_data" in msg and "Fix: pass a held-out split" in msg


def test_validation_data_identical_behind_loaders_and_subsets_warns():
    ds = TensorDataset(X, Y)
    train = DataLoader(ds, batch_size=32)
    assert "val_data" in [
        f.check
        for f in run(TinyClassifier(), data=train, val=DataLoader(ds, batch_size=64), batch_size=None).doctor.findings
    ]
    sub = Subset(ds, range(128))
    assert "val_data" in [f.check for f in run(TinyClassifier(), data=sub, val=Subset(ds, range(128))).doctor.findings]
    assert run(TinyClassifier(), data=sub, val=Subset(ds, range(128, 256))).doctor.findings == []


# ------------------------------------------------------------------ no false positives


class Scheduled(TinyClassifier):
    """Linear warmup from lr=0: the first step legitimately changes nothing."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 4))


class FrozenStem(TinyClassifier):
    """Frozen by design: requires_grad=False and left out of the optimizer."""

    def __init__(self):
        super().__init__(dropout=0.1)
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class LoraLike(TinyClassifier):
    """B starts at zero, so A's gradient is zero on step 1 (plain SGD: no weight decay to move it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 2) * 0.1)
        self.b = nn.Parameter(torch.zeros(2, 3))

    def forward(self, inputs):
        out = self.net(inputs)
        return out + out @ self.a @ self.b

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tokens(LoopModule):
    """Dict batches, dict outputs, a token-level mean with padding, tensor item counts."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16, padding_idx=0)
        self.out = nn.Linear(16, 11)

    def split_batch(self, batch):
        return batch["tokens"][:, :-1], batch["tokens"][:, 1:]

    def forward(self, inputs):
        h = self.emb(inputs)
        return {"logits": self.out(h), "hidden": h}

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs["logits"].flatten(0, 1), targets.flatten(), ignore_index=0)

    def count_items(self, batch):
        return (batch["tokens"][:, 1:] != 0).sum()


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(1, 11, (n, 9), generator=g)
        self.tokens[:, 6:] *= (torch.rand(n, 1, generator=g) < 0.5).long()  # padded tails

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i]}


GOOD = {
    "dropout+micro": (lambda: TinyClassifier(dropout=0.2), dict(micro_batch_size=8)),
    "scheduler": (Scheduled, {}),
    "frozen-by-design": (FrozenStem, dict(micro_batch_size=16)),
    "lora-zero-init": (LoraLike, {}),
    "batchnorm-whole-batches": (WithBatchNorm, {}),
    "tokens": (Tokens, dict(micro_batch_size=8)),
}


@pytest.mark.parametrize("doctor", ["basic", "full"])
@pytest.mark.parametrize("name", list(GOOD))
def test_correct_modules_produce_no_findings(name, doctor):
    make, kw = GOOD[name]
    torch.manual_seed(0)
    data, val = (TokenData(128, 0), TokenData(32, 1)) if name == "tokens" else ((X[:128], Y[:128]), VAL)
    engine = run(make(), data=data, val=val, max_steps=None, max_epochs=2, doctor=doctor, **kw)
    assert engine.doctor.findings == [] and engine.caught == [], engine.doctor.format_report()
    statuses = {check: status for check, _, status, _ in engine.doctor.report()}
    # "basic" judges a sum loss where it changes the result: with accumulation (or several processes).
    skipped = {"loss_scaling"} if doctor == "basic" and "micro_batch_size" not in kw else set()
    assert {c for c, s in statuses.items() if s == "ok"} == set(CHECKS) - skipped, statuses


# ------------------------------------------------------------------ observation never steers


class Everything(LoopModule):
    """Dropout and input noise (the global RNG, noise in every mode), BatchNorm (buffers), micro-batches,
    a per-step scheduler, tensor counts."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))

    def forward(self, inputs):
        return self.net(inputs + 0.01 * torch.randn_like(inputs))

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)

    def count_items(self, batch):
        return torch.as_tensor(len(batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


def test_off_basic_and_full_train_bitwise_the_same():
    results = []
    for doctor in ("off", "basic", "full"):
        torch.manual_seed(0)
        module = Everything()
        run(module, max_steps=9, micro_batch_size=16, doctor=doctor, val=VAL)
        results.append((module.state_dict(), torch.get_rng_state()))
    (ref, ref_rng), *others = results
    for state, rng in others:
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)  # parameters and BatchNorm buffers
        assert torch.equal(rng, ref_rng)  # and the global RNG stream is where training left it


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def test_basic_reads_device_values_only_on_its_checked_steps(monkeypatch):
    """A read of a tensor's value is a host-device sync on GPU; the doctor's reads happen on checked steps
    only (steps 0, 1, 2, 4, 8 of 12), and on the others it does no tensor work at all."""
    doctor_files = {m.__file__ for name, m in sys.modules.items() if name.startswith("framework.doctor")}
    engine = Engine(max_steps=12, batch_size=16, micro_batch_size=8, progress=False)
    log: list[tuple[int, bool]] = []
    checked_steps: list[int] = []
    original_start = Doctor.start_step

    def start_step(self):
        original_start(self)
        if self.checking:
            checked_steps.append(engine.step)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename in doctor_files:
                log.append((engine.step, engine.doctor.checking))
            return original(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(Doctor, "start_step", start_step)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    with pytest.warns(LoopWarning, match="BatchNorm"):  # micro-batches of 8: expected
        engine.fit(Everything(), (X[:192], Y[:192]))
    monkeypatch.undo()
    assert checked_steps == [0, 1, 2, 4, 8]
    assert log, "the counting saw no read at all (tensor count_items are read on checked steps)"
    assert all(checking for _, checking in log) and {s for s, _ in log} <= set(checked_steps), log


def test_checked_step_schedule():
    module = TinyClassifier()
    d = Doctor("basic")
    d.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
    checked = []
    for k in range(5001):
        d.start_step()
        if d.checking:
            checked.append(k)
    assert checked == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000, 5000]
    full = Doctor("full")
    full.start_fit(module, torch.optim.SGD(module.parameters(), lr=0.1))
    for _ in range(3):
        full.start_step()
        assert full.checking


def test_off_does_nothing_and_levels_are_validated(monkeypatch):
    assert run(Unused(), doctor="off").caught == []
    with pytest.raises(ValueError, match='doctor=\'loud\'; use "basic", "full" or "off"'):
        Engine(max_steps=1, doctor="loud")
    monkeypatch.setenv("FRAMEWORK_DOCTOR", "full")
    monkeypatch.setenv("FRAMEWORK_MAX_STEPS", "2")
    engine = Engine(max_steps=50, doctor="off")
    assert engine.doctor.level == "full" and engine.max_steps == 2  # how `python -m framework doctor` drives a recipe


def test_report_table_lists_every_check():
    engine = run(Unused(), doctor="full", val=VAL, max_steps=None, max_epochs=1)
    table = engine.doctor.format_report()
    for title, _ in CHECKS.values():
        assert title in table
    assert "WARNING   every trainable parameter receives a gradient" in table
    assert "-> 2 trainable parameter(s) of Unused received no gradient" in table


def test_doctor_warnings_are_emitted_by_rank_zero_only_but_recorded_everywhere():
    module = HeadOutsideOptimizer()
    d = Doctor("basic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.start_fit(module, module.configure_optimizers(), is_main=False)
    assert caught == [] and [f.check for f in d.findings] == ["optimizer_coverage"]


def test_parameters_too_large_to_copy_are_compared_by_fingerprint(monkeypatch):
    import framework.doctor.updates as doctor_mod

    monkeypatch.setattr(doctor_mod, "_SNAPSHOT_ELEMENTS", 10)  # "too large": fingerprints instead of copies
    assert "param group 1 has lr=0: net.3.weight, net.3.bias" in warned(run(ZeroLrGroup()), "updates")
    assert run(TinyClassifier()).caught == []
