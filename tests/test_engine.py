"""framework/engine.py: the canonical loop, modes, stopping, validation, errors, run dir, inputs.

Every test runs a real Engine on a real (tiny) model: nothing of ours is mocked,
so each assertion can fail if the loop does the wrong thing.
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from framework import Engine, LoopError
from tests.helpers import TinyClassifier, classification_data
from tests.scripts.exact_common import order_errors
from tests.threads import one_thread  # noqa: F401  (autouse: tiny models, one thread)


def engine(**kw) -> Engine:
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    return Engine(**kw)


def params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def forwards_per_step(trace) -> list[int]:
    steps = max(s for _, s, _ in trace) + 1
    return [sum(1 for n, s, _ in trace if n == "forward" and s == step) for step in range(steps)]


class Recorder(TinyClassifier):
    """Records, at every forward, the mode and autograd state the engine gave it, and its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled)
        self.inputs: list[torch.Tensor] = []

    def forward(self, inputs):
        self.seen.append((self.training, torch.is_grad_enabled()))
        self.inputs.append(inputs.detach().clone())
        return super().forward(inputs)


# ---------------------------------------------------------------- canonical order


class Hooked(TinyClassifier):
    """Records the real operations as they run, beside the engine's trace: forward (a pre-hook), compute_loss
    (the call itself), backward (a hook on the loss tensor's gradient: it fires inside backward), and the
    optimizer's zero_grad and step and the scheduler's step (wrapped)."""

    def __init__(self, scheduler: bool = False) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.scheduler = scheduler
        self.register_forward_pre_hook(lambda module, args: self.ops.append("forward"))

    def compute_loss(self, outputs, targets):
        self.ops.append("loss")
        loss = super().compute_loss(outputs, targets)
        loss.register_hook(lambda grad: self.ops.append("backward"))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        zero_grad = opt.zero_grad
        opt.zero_grad = lambda set_to_none=True: (self.ops.append("zero_grad"), zero_grad(set_to_none))  # type: ignore[method-assign]
        opt.register_step_post_hook(lambda *args: self.ops.append("optimizer_step"))
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        step = sched.step
        sched.step = lambda *a: (self.ops.append("scheduler_step"), step(*a))  # type: ignore[method-assign]
        return opt, sched


@pytest.mark.parametrize(("micro", "per_step"), [(None, [1] * 8), (8, [4, 4, 4, 1] * 2)], ids=["one", "accumulate"])
def test_the_trace_is_the_real_operations_in_their_canonical_order(micro, per_step):
    # The trace is built from the loop's events; it must say what really ran, in the order it ran (the real
    # operations' own hooks record them), and that order must be canonical.
    x, y = classification_data(100)
    module = Hooked(scheduler=micro is not None)
    e = engine(max_epochs=2, batch_size=32, micro_batch_size=micro, trace=True, doctor="off")  # (no probe calls)
    e.fit(module, (x, y))
    assert [name for name, *_ in e.trace] == module.ops
    assert order_errors(e.trace, has_scheduler=module.scheduler) == []
    # ceil(100 / 32) = 4 windows per epoch; 32 / 8 = 4 micro-batches each, and the last window's 4 items 1.
    assert forwards_per_step(e.trace) == per_step
    assert module.ops.count("zero_grad") == e.step == 8  # once per optimizer step, accumulation or not


def test_order_checker_rejects_wrong_orders():
    # The checker itself must be able to fail, or the order tests above prove nothing.
    good = [("zero_grad", 0, 0), ("forward", 0, 0), ("loss", 0, 0), ("backward", 0, 0), ("optimizer_step", 0, 1)]
    assert order_errors(good) == []
    assert order_errors(good[1:]) != []  # no zero_grad
    assert order_errors(good[:1] + good[:]) != []  # zero_grad twice
    assert order_errors([good[0], good[2], good[1], *good[3:]]) != []  # loss before forward
    assert order_errors(good[:-1]) != []  # no optimizer step
    assert order_errors(good, has_scheduler=True) != []  # missing scheduler step
    two_micro = [*good[:4], ("zero_grad", 0, 1), ("forward", 0, 1), ("loss", 0, 1), ("backward", 0, 1), good[4]]
    assert order_errors(two_micro) != []  # zero_grad between micro-batches (accumulation lost)


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("user_mode", ["train", "eval"])
def test_modes_inside_forward(user_mode):
    x, y = classification_data(50)
    module = Recorder()
    module.train(user_mode == "train")  # whatever the user left it in must not matter
    e = engine(max_epochs=2, batch_size=16, micro_batch_size=8)
    e.fit(module, (x, y), (x[:20], y[:20]))
    # Training: 50 items -> windows of 16,16,16,2 -> 2+2+2+1 = 7 forwards per epoch.
    # Validation: 20 items in micro-batches of 8 -> 3 forwards per epoch.
    expected = [(True, True)] * 7 + [(False, False)] * 3
    assert module.seen == expected * 2

    module.seen.clear()
    module.train(user_mode == "train")
    e.validate(module, (x, y))
    assert module.seen and all(s == (False, False) for s in module.seen)
    assert module.training == (user_mode == "train"), "validate must restore the user's mode"


def test_validation_ignores_dropout_and_leaves_training_rng_alone():
    # Eval mode turns dropout off, so validating twice gives the same numbers; and validation
    # inside fit must not shift training's random stream (the dropout masks of later steps).
    x, y = classification_data(200)
    torch.manual_seed(1)
    a = TinyClassifier(dropout=0.5)
    torch.manual_seed(1)
    b = TinyClassifier(dropout=0.5)
    e = engine(max_epochs=1, batch_size=50)
    assert e.validate(a, (x, y)) == e.validate(a, (x, y))
    torch.manual_seed(7)
    engine(max_epochs=2, batch_size=50).fit(a, (x, y), (x[:30], y[:30]))
    torch.manual_seed(7)
    engine(max_epochs=2, batch_size=50).fit(b, (x, y))
    assert torch.equal(params(a), params(b))


# ---------------------------------------------------------------- stopping and the scheduler


@pytest.mark.parametrize("max_steps", [1, 5, 7])
def test_max_steps_exact(max_steps):
    x, y = classification_data(100)
    module = Recorder()
    e = engine(max_steps=max_steps, batch_size=32, micro_batch_size=16, trace=True)
    e.fit(module, (x, y))
    assert e.step == max_steps
    assert [n for n, _, _ in e.trace].count("optimizer_step") == max_steps
    # Nothing is computed past the last step: each full window is 2 forwards, each epoch's 4th window 1.
    per_epoch = [2, 2, 2, 1]
    assert len(module.seen) == sum(itertools.islice(itertools.cycle(per_epoch), max_steps))


def test_max_epochs_stops_before_max_steps():
    x, y = classification_data(100)
    e = engine(max_epochs=1, max_steps=1000, batch_size=32)
    e.fit(TinyClassifier(), (x, y))
    assert (e.step, e.epoch) == (4, 1)


def test_per_step_scheduler_stepped_once_per_optimizer_step():
    calls = []

    class Counted(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)

            def factor(step):
                calls.append(step)
                return 0.5**step

            return {"optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    x, y = classification_data(100)
    module = Counted()
    engine(max_epochs=3, batch_size=32, micro_batch_size=8).fit(module, (x, y))
    # LambdaLR calls its lambda once when built, then once per scheduler.step(): 12 optimizer steps.
    # Accumulation (4 micro-batches per step) must not multiply the scheduler steps.
    assert calls == list(range(13))


def test_epoch_scheduler_stepped_once_per_epoch():
    calls = []

    class PerEpoch(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: calls.append(s) or 1.0)
            return {"optimizer": opt, "scheduler": sched, "interval": "epoch"}

    x, y = classification_data(100)
    e = engine(max_epochs=3, batch_size=32, trace=True)
    e.fit(PerEpoch(), (x, y))
    assert calls == [0, 1, 2, 3]
    assert "scheduler_step" not in [n for n, _, _ in e.trace]  # per-epoch steps are not per-step events


# ---------------------------------------------------------------- validation and learning


@pytest.mark.parametrize("micro", [10, 7])
def test_validation_means_exact_on_partial_last_batch(micro):
    x, y = classification_data(103, seed=3)
    module = TinyClassifier()
    metrics = engine(max_epochs=1, batch_size=micro).validate(module, (x, y))
    with torch.no_grad():
        out = module(x)
        loss = F.cross_entropy(out, y).item()
        acc = (out.argmax(-1) == y).float().mean().item()
    # A mean of batch means would be off here: 103 items leave a last batch of 3 (or 5).
    assert metrics["loss"] == pytest.approx(loss, abs=1e-6)
    assert metrics["acc"] == pytest.approx(acc, abs=1e-6)
    assert set(metrics) == {"loss", "acc"}


def test_validation_per_token_metric_weighs_every_element():
    # A metric returning several values per item (per token) is a mean over all values.
    class PerElement(TinyClassifier):
        def compute_metrics(self, outputs, targets):
            return {"prob": outputs.softmax(-1).reshape(-1), "first": outputs[:, 0]}

    x, y = classification_data(103, seed=3)
    module = PerElement()
    metrics = engine(max_epochs=1, batch_size=16).validate(module, (x, y))
    with torch.no_grad():
        out = module(x)
    assert metrics["prob"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["first"] == pytest.approx(out[:, 0].double().mean().item(), abs=1e-6)


class FastClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_loss_decreases_on_learnable_task(tmp_path):
    x, y = classification_data(512)
    module = FastClassifier()
    e = engine(max_epochs=5, batch_size=32, run_dir=str(tmp_path), log_every_n_steps=4)
    before = e.validate(module, (x, y))
    e.fit(module, (x, y))
    after = e.validate(module, (x, y))
    assert after["loss"] < 0.5 * before["loss"]
    assert after["acc"] > 0.9
    train = [r["train/loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "train/loss" in r]
    assert len(train) == 80 // 4 and train[-1] < 0.5 * train[0]


# ---------------------------------------------------------------- clear errors


class ScalarPerItem(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")  # a vector, not a scalar


class FloatLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets).item()  # a Python number: no gradient


class JunkOptimizer(TinyClassifier):
    def configure_optimizers(self):
        return [p for p in self.parameters()]  # parameters, not an optimizer


def test_error_loss_not_scalar():
    x, y = classification_data(64)
    with pytest.raises(LoopError, match=r"shape \[32\].*scalar"):
        engine(max_steps=1, batch_size=32).fit(ScalarPerItem(), (x, y))


def test_error_loss_not_tensor():
    x, y = classification_data(64)
    with pytest.raises(LoopError, match=r"compute_loss returned a float.*scalar tensor"):
        engine(max_steps=1, batch_size=32).fit(FloatLoss(), (x, y))


@pytest.mark.parametrize(
    "data",
    [
        (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
        TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
        [],
    ],
    ids=["tensors", "tensordataset", "list"],
)
def test_error_empty_dataset(data):
    with pytest.raises(ValueError, match="empty"):
        engine(max_epochs=1, batch_size=32).fit(TinyClassifier(), data)


def test_error_empty_stream():
    class Empty(IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match=r"no batches.*non-empty"):
        engine(max_epochs=1, batch_size=32).fit(TinyClassifier(), Empty())


def test_error_batch_size_not_divisible_names_valid_values():
    x, y = classification_data(64)
    with pytest.raises(ValueError) as info:
        engine(max_epochs=1, batch_size=30, micro_batch_size=8).fit(TinyClassifier(), (x, y))
    msg = str(info.value)
    # Names the mistake and two ways out: a batch_size that works, or micro sizes that divide 30.
    assert "batch_size=30" in msg and "micro_batch_size=8" in msg
    assert "batch_size=32" in msg
    assert "[3, 5, 6, 10, 15, 30]" in msg


def test_error_max_epochs_and_max_steps_unset_at_fit_only():
    x, y = classification_data(64)
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        Engine(batch_size=32, progress=False).fit(TinyClassifier(), (x, y))
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        Engine(batch_size=32, max_time=10, progress=False).fit(TinyClassifier(), (x, y))
    # validate and predict need neither (batch_size alone is enough)
    engine = Engine(batch_size=32, progress=False)
    assert set(engine.validate(TinyClassifier(), (x, y))) == {"loss", "acc"}
    assert engine.predict(TinyClassifier(), x).shape == (64, 3)


def test_error_configure_optimizers_junk():
    x, y = classification_data(64)
    with pytest.raises(
        TypeError, match=r"JunkOptimizer.configure_optimizers returned a list.*must return an optimizer"
    ):
        engine(max_steps=1, batch_size=32).fit(JunkOptimizer(), (x, y))


def test_error_batch_size_missing_for_dataset():
    x, y = classification_data(64)
    with pytest.raises(ValueError, match=r"batch_size=\.\.\.\) is required"):
        engine(max_steps=1).fit(TinyClassifier(), (x, y))


def test_error_not_a_loop_module():
    x, y = classification_data(64)
    with pytest.raises(TypeError, match="LoopModule"):
        engine(max_steps=1, batch_size=32).fit(nn.Linear(8, 3), (x, y))


# ---------------------------------------------------------------- run dir


def test_run_dir_metrics_and_config(tmp_path):
    x, y = classification_data(100)
    run = tmp_path / "run"
    e = engine(max_epochs=2, batch_size=20, micro_batch_size=10, run_dir=str(run), log_every_n_steps=2, seed=3)
    e.fit(TinyClassifier(), (x, y), (x[:30], y[:30]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    # 5 steps per epoch, 10 in all, logged every 2 steps; one validation per epoch.
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert [r["epoch"] for r in train] == [0, 0, 1, 1, 1]
    assert all(r["lr"] == pytest.approx(1e-3) and math.isfinite(r["train/loss"]) for r in train)
    assert [(r["step"], r["epoch"]) for r in val] == [(5, 0), (10, 1)]
    assert all({"val/loss", "val/acc"} <= set(r) for r in val)
    assert val[-1]["val/loss"] == pytest.approx(e.metrics["val/loss"])
    config = json.loads((run / "config.json").read_text())
    assert config["max_epochs"] == 2 and config["seed"] == 3 and config["batch_size"] == 20
    resolved = config["resolved"]  # (the arguments as given above; what the run made of them here)
    assert config["micro_batch_size"] == 10 and resolved["micro_batch_size"] == 10
    assert resolved["accumulation"] == 2 and resolved["world_size"] == 1
    assert resolved["optimizers"] == {"optimizer": "AdamW"} and resolved["module"] == "TinyClassifier"


def test_train_loss_logged_is_item_mean_of_the_window(tmp_path):
    # With log_every_n_steps=1 the first record's train/loss is the loss of the first global
    # batch, computed before the step: check it against a direct computation.
    x, y = classification_data(64)
    module = TinyClassifier()
    with torch.no_grad():
        first = F.cross_entropy(module(x[:32]), y[:32]).item()
    engine(
        max_steps=1, batch_size=32, micro_batch_size=8, shuffle=False, run_dir=str(tmp_path), log_every_n_steps=1
    ).fit(module, (x, y))
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train/loss"] == pytest.approx(first, abs=1e-6)


# ---------------------------------------------------------------- input kinds


def test_dataloader_used_as_given():
    x, y = classification_data(50)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(5))
    module = Recorder()
    e = engine(max_epochs=1, trace=True)
    e.fit(module, loader)
    expected = list(
        DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(5))
    )
    # The loader's own batches, in the loader's own (seeded) order, one per optimizer step.
    assert len(module.inputs) == 5
    assert all(torch.equal(a, b[0]) for a, b in zip(module.inputs, expected, strict=True))
    assert forwards_per_step(e.trace) == [1] * 5


def test_dataloader_batch_is_the_micro_batch():
    x, y = classification_data(50)
    e = engine(max_epochs=1, batch_size=20, trace=True)
    e.fit(TinyClassifier(), DataLoader(TensorDataset(x, y), batch_size=10))
    assert forwards_per_step(e.trace) == [2, 2, 1]  # 5 loader batches, 2 per optimizer step
    assert order_errors(e.trace) == []
    with pytest.raises(ValueError, match="DataLoader's batch_size is 10"):
        engine(max_epochs=1, batch_size=20, micro_batch_size=5).fit(
            TinyClassifier(), DataLoader(TensorDataset(x, y), batch_size=10)
        )


class PairDataset(Dataset):
    """A generic map-style Dataset (no tensors to gather): items are (x, y) pairs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _fit_params(data, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    module = TinyClassifier()
    engine(max_epochs=2, batch_size=16, micro_batch_size=8, **kw).fit(module, data)
    return params(module)


def test_map_dataset_and_workers_match_tensors():
    # The same items in the same order, however they are loaded: identical parameters.
    x, y = classification_data(70)
    reference = _fit_params((x, y))
    assert torch.equal(_fit_params(TensorDataset(x, y)), reference)
    assert torch.equal(_fit_params(PairDataset(x, y)), reference)
    assert torch.equal(_fit_params(PairDataset(x, y), num_workers=2), reference)
    assert not torch.equal(_fit_params((x, y), shuffle=False), reference)  # the comparison can fail


def test_collate_fn_passthrough():
    x, y = classification_data(40)
    seen = []

    def collate(samples):
        seen.append(len(samples))
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    engine(max_epochs=1, batch_size=16, collate_fn=collate).fit(TinyClassifier(), PairDataset(x, y))
    assert seen == [16, 16, 8]


class Stream(IterableDataset):
    """Yields (x, y) items in order; optionally with a length."""

    def __init__(self, x, y, with_len: bool):
        self.x, self.y, self.with_len = x, y, with_len

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))

    def __len__(self):
        if not self.with_len:
            raise TypeError("no length")
        return len(self.x)


@pytest.mark.parametrize("with_len", [True, False])
def test_iterable_dataset(with_len):
    x, y = classification_data(50)
    module = Recorder()
    e = engine(max_epochs=2, batch_size=16, trace=True)
    e.fit(module, Stream(x, y, with_len))
    # Epoch ends with the stream: windows of 16,16,16,2, each epoch reading the stream in order.
    assert e.step == 8 and e.epoch == 2
    assert forwards_per_step(e.trace) == [1] * 8
    assert torch.equal(torch.cat(module.inputs), torch.cat([x, x]))


def test_endless_stream_bounded_by_max_steps():
    class Endless(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in itertools.count():
                xi = torch.randn(8, generator=g)
                yield xi, (xi[0] > 0).long()

    e = engine(max_steps=6, batch_size=8, micro_batch_size=4, trace=True)
    e.fit(TinyClassifier(), Endless())
    assert e.step == 6 and forwards_per_step(e.trace) == [2] * 6


def test_tuple_of_tensors_input_matches_tensor_dataset():
    x, y = classification_data(70)
    assert torch.equal(_fit_params((x, y)), _fit_params(TensorDataset(x, y)))
    assert torch.equal(_fit_params([x, y]), _fit_params(TensorDataset(x, y)))
    with pytest.raises(ValueError, match="different lengths"):
        _fit_params((x, y[:-1]))


def test_seed_everything_before_building_gives_the_same_initial_weights_and_names_a_bad_seed():
    import framework

    framework.seed_everything(7)
    a = TinyClassifier()
    framework.seed_everything(7)
    b = TinyClassifier()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match=r"seed_everything\(seed=-1\); use a non-negative int"):
        framework.seed_everything(-1)


def test_a_resumed_run_says_where_it_resumed_from_and_a_short_run_shows_its_loss(tmp_path, capsys):
    x, y = classification_data(96)
    Engine(max_steps=2, batch_size=32, run_dir=str(tmp_path), checkpoint_every_n_steps=1).fit(TinyClassifier(), (x, y))
    first = capsys.readouterr().err
    assert "resumed from" not in first
    assert re.search(r"^fit done at step 2: max_steps=2 reached; train/loss=\d", first, flags=re.M), (
        first
    )  # (no log step)
    Engine(max_steps=3, batch_size=32, run_dir=str(tmp_path), resume="auto").fit(TinyClassifier(), (x, y))
    again = capsys.readouterr().err
    assert again.splitlines()[:2] == [
        f"run_dir: {tmp_path}",
        "resumed from checkpoints/step-00000002 (epoch 0, step 2)",
    ]
    # With progress=False too: the run dir, the resume and why it stopped, and nothing else.
    Engine(max_steps=4, batch_size=32, run_dir=str(tmp_path), resume="auto", progress=False).fit(
        TinyClassifier(), (x, y)
    )
    quiet = capsys.readouterr().err.splitlines()
    assert quiet[:2] == [f"run_dir: {tmp_path}", "resumed from checkpoints/step-00000003 (epoch 1, step 3)"], quiet
    assert len(quiet) == 3 and quiet[2].startswith("fit done at step 4: max_steps=4 reached; train/loss="), quiet
