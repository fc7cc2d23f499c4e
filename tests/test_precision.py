"""Mixed precision (issue 4): bf16 autocast really engaged with fp32 master weights, fp16's
GradScaler path (skips counted, scheduler not advanced), and clear errors where a precision
cannot run. CUDA-only tests are marked ``cuda`` and skip cleanly without a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from framework import Callback, Engine
from framework.parallel.runtime import make_runtime
from tests.scripts.issue4_common import Net, data, flat, read_metrics


class DtypeProbe:
    """Records the output dtype of every nn.Linear call, split by train/eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.train: set[torch.dtype] = set()
        self.eval: set[torch.dtype] = set()
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        (self.train if mod.training else self.eval).add(out.dtype)


def _fit(precision: str, **kw):
    x, y = data(64)
    module = Net(optimizer="adamw", lr=1e-2)
    probe = DtypeProbe(module)
    engine = Engine(max_epochs=2, batch_size=16, micro_batch_size=8, mixed_precision=precision, progress=False, **kw)
    engine.fit(module, (x, y), data(32, seed=1))
    return module, probe, engine


def test_bf16_on_cpu_autocasts_linears_and_keeps_fp32_master_weights():
    before = flat(Net())
    module, probe, engine = _fit("bf16")
    assert engine._rt.mixed_precision == "bf16"
    # Autocast is engaged for the training forward and for validation alike.
    assert probe.train == {torch.bfloat16}
    assert probe.eval == {torch.bfloat16}
    # The optimizer updates fp32 master weights: parameters never become bf16.
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    after = flat(module)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_no_mixed_precision_keeps_linears_in_fp32():
    # The control for the test above: without bf16 the same probe sees float32.
    _, probe, _ = _fit("no")
    assert probe.train == probe.eval == {torch.float32}


def test_fp16_on_cpu_is_a_clear_error():
    x, y = data(32)
    with pytest.raises(ValueError, match=r'fp16.*CUDA.*mixed_precision="bf16"'):
        Engine(max_steps=1, batch_size=16, mixed_precision="fp16", progress=False).fit(Net(), (x, y))


def test_unknown_precision_is_a_clear_error():
    x, y = data(32)
    with pytest.raises(ValueError, match=r"fp8.*\"no\", \"bf16\" or \"fp16\""):
        Engine(max_steps=1, batch_size=16, mixed_precision="fp8", progress=False).fit(Net(), (x, y))


# ---------------------------------------------------------------- the GradScaler path, on CPU


class Overflow(Net):
    """Scales the loss by 1e35 on the chosen training forwards: finite in fp32, but times the
    GradScaler's 2**16 it overflows to inf in backward, exactly like an fp16 overflow."""

    def __init__(self, overflow_calls: set[int], **kw) -> None:
        super().__init__(**kw)
        self.overflow_calls = overflow_calls
        self.calls = 0

    def compute_loss(self, outputs, targets):
        loss = super().compute_loss(outputs, targets)
        if self.calls in self.overflow_calls:
            loss = loss * 1e35
        self.calls += 1
        return loss


class Snapshots(Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_step_end(self, engine, module, metrics):
        self.params.append(flat(module))


def test_grad_scaler_overflow_skips_the_step_and_the_scheduler_on_cpu(tmp_path):
    """The fp16 path needs CUDA, but its step logic is device-independent: drive it with a CPU
    GradScaler in an fp32 runtime. The scaler's overflow skip must be counted, logged, leave the
    parameters and the scheduler alone, and halve the scale."""
    x, y = data(6 * 16)
    module = Overflow({2, 3}, optimizer="sgd", lr=0.1, scheduler="lambda")
    snaps = Snapshots()
    engine = Engine(
        max_steps=6,
        batch_size=16,
        shuffle=False,
        log_every_n_steps=1,
        run_dir=str(tmp_path),
        progress=False,
        callbacks=[snaps],
    )
    engine._rt = make_runtime("no")
    engine._rt.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = flat(module)
    engine.fit(module, (x, y))
    assert engine.skipped_steps == 2
    # Steps 2 and 3 (0-based) overflowed: the parameters did not move in them.
    assert torch.equal(snaps.params[1], snaps.params[2]) and torch.equal(snaps.params[2], snaps.params[3])
    assert not torch.equal(before, snaps.params[0]) and not torch.equal(snaps.params[3], snaps.params[4])
    # LambdaLR: called once at construction, then once per applied step (4), never for the 2 skipped.
    assert module.lambda_calls == [0, 1, 2, 3, 4]
    assert module.sched.last_epoch == 4
    assert scaler.get_scale() == 2.0**14  # halved once per overflow (growth needs 2000 good steps)
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r.get("train/skipped_steps", 0) for r in records] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(torch.tensor(r["train/grad_norm"])) for r in records[:2] + records[4:])


def test_grad_scaler_step_reads_the_host_once(monkeypatch):
    """Telling an overflow-skipped step from an applied one must not cost extra GPU syncs
    (GradScaler.get_scale() is one each): the overflow flag joins the step's one host read."""
    counter = [0]
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            counter[0] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Reads(Callback):
        def __init__(self) -> None:
            self.at_step_end: list[int] = []

        def on_step_end(self, engine, module, metrics):
            self.at_step_end.append(counter[0])

    reads = Reads()
    x, y = data(4 * 16)
    engine = Engine(max_steps=4, batch_size=16, log_every_n_steps=100, progress=False, doctor="off", callbacks=[reads])
    engine._rt = make_runtime("no")
    engine._rt.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    engine.fit(Overflow({2}, optimizer="sgd", lr=0.1), (x, y))
    monkeypatch.undo()
    assert engine.skipped_steps == 1
    per_step = [b - a for a, b in itertools.pairwise(reads.at_step_end)]
    # GradScaler.step reads the overflow flag once itself (torch's own check, on a value already
    # on the host by then); the engine adds exactly one read for its own decisions.
    assert per_step == [2, 2, 2], per_step


# ---------------------------------------------------------------- CUDA only


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_on_cuda_autocasts_and_keeps_fp32_master_weights(precision):
    module, probe, engine = _fit(precision)
    want = torch.bfloat16 if precision == "bf16" else torch.float16
    assert probe.train == {want} and probe.eval == {want}
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert {p.device.type for p in module.parameters()} == {"cuda"}
    assert (engine._rt.scaler is not None) == (precision == "fp16")
    assert torch.isfinite(flat(module)).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_scaler_skip_is_counted_and_does_not_advance_the_scheduler_on_cuda(tmp_path):
    x, y = data(6 * 16)
    module = Overflow({3}, optimizer="sgd", lr=0.1, scheduler="lambda")
    snaps = Snapshots()
    engine = Engine(
        max_steps=6,
        batch_size=16,
        shuffle=False,
        mixed_precision="fp16",
        log_every_n_steps=1,
        run_dir=str(tmp_path),
        progress=False,
        callbacks=[snaps],
    )
    engine.fit(module, (x, y))
    assert engine.skipped_steps == 1
    assert torch.equal(snaps.params[2], snaps.params[3])  # step 3 (0-based) overflowed: nothing moved
    assert not torch.equal(snaps.params[3], snaps.params[4])
    assert module.lambda_calls == [0, 1, 2, 3, 4, 5]
    records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r.get("train/skipped_steps", 0) for r in records] == [0, 0, 0, 1, 1, 1]
    assert engine._rt.scaler.get_scale() == 2.0**15
