"""The data pipeline's behaviour seen from the engine: drop_last, dict data, the 1-item BatchNorm
warning, train/data_wait and the end-of-fit line, the prefetch thread's bounds and errors.

Sources for rank r of world size W are built side by side, as in tests/data/test_batching.py: that is
exactly what rank r builds in a W-process run (tests/data/test_distributed.py runs the processes).
"""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from framework import Engine
from framework.data import Batching, WaitMeter, make_source, micro_batch_sizes, resolve_batching
from tests.helpers import Items, ItemStream
from tests.scripts.data_common import SLOW, Augmented, AugmentedStream, Net, fit, flat, make_xy


def windows(data, batch_size, micro, world_size, rank, **kw):
    batching = resolve_batching(data, batch_size, micro, world_size)
    kw.setdefault("shuffle", True)
    return list(make_source(data, batching, rank=rank, seed=0, to_device=lambda b: b, **kw).windows(0))


def ids(batch):
    return batch[0].reshape(-1).tolist()


# ---------------------------------------------------------------- drop_last


@pytest.mark.parametrize("kind", ["tensors", "dataset", "stream"])
@pytest.mark.parametrize("world_size,micro", [(1, 64), (1, 16), (2, 32), (2, 8)])
def test_drop_last_drops_the_same_partial_global_batch_at_any_world_size(kind, world_size, micro):
    n = 1000  # 15 full windows of 64, then 40 items
    data = {"tensors": (torch.arange(n), torch.zeros(n)), "dataset": Items(n), "stream": ItemStream(n)}[kind]
    shuffle = kind != "stream"
    per_rank = [windows(data, 64, micro, world_size, r, drop_last=True, shuffle=shuffle) for r in range(world_size)]
    assert {len(w) for w in per_rank} == {15}
    kept = sorted(i for wins in per_rank for w in wins for b in w.micro_batches for i in ids(b))
    full = [windows(data, 64, 64, 1, 0, shuffle=shuffle)]
    expected = sorted(i for w in full[0][:15] for b in w.micro_batches for i in ids(b))
    assert kept == expected and len(kept) == 15 * 64, "the first 15 global batches, whole; the 40 left out"
    off = [windows(data, 64, micro, world_size, r, shuffle=shuffle) for r in range(world_size)]
    assert {len(w) for w in off} == {16}  # default: the partial batch stays


def test_drop_last_in_the_engine_counts_steps_and_refuses_what_it_cannot_do():
    x, y = make_xy(100)
    engine, _ = fit((x, y), batch_size=32, drop_last=True)
    assert engine.step == 2 * 3  # 100 items: 3 full batches of 32 per epoch, the 4 left dropped
    engine, _ = fit((x, y), batch_size=32)
    assert engine.step == 2 * 4
    with pytest.raises(ValueError, match=r"drop_last=True leaves no batch: the data has 100 items.*batch_size=128"):
        fit((x, y), batch_size=128, drop_last=True)
    with pytest.raises(ValueError, match=r"pass DataLoader\(\.\.\., drop_last=True\)"):
        Engine(max_epochs=1, drop_last=True, progress=False).fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    # Validation sees every item whatever drop_last says (exact means).
    engine = Engine(max_epochs=1, batch_size=32, drop_last=True, progress=False)
    engine.fit(Net(), (x, y), (x[:50], y[:50]))
    assert engine.metrics["val/loss"] == pytest.approx(engine.validate(engine._fit.module, (x[:50], y[:50]))["loss"])


# ---------------------------------------------------------------- dict data


def test_a_dict_of_tensors_and_a_list_of_dicts_train_and_validate_with_dict_batches():
    x, y = make_xy(96)
    seen = []

    class DictNet(Net):
        def forward(self, inputs):
            seen.append(sorted(inputs))
            return self.net(inputs["inputs"])

    as_dict = {"inputs": x, "labels": y}
    as_list = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    results = []
    for data in (as_dict, as_list, (x, y)):
        torch.manual_seed(0)
        module = Net() if isinstance(data, tuple) else DictNet()
        engine = Engine(max_epochs=2, batch_size=32, progress=False, seed=0, doctor="off")
        engine.fit(module, data, data)
        results.append((flat(module), engine.metrics["val/loss"]))
    assert seen and all(keys == ["inputs", "labels"] for keys in seen)
    # The same items in the same order: a dict of tensors, a list of dicts and a tuple train alike.
    assert torch.equal(results[0][0], results[2][0]) and torch.equal(results[1][0], results[2][0])
    assert results[0][1] == results[1][1] == results[2][1]


def test_dict_data_errors_name_the_problem():
    x, y = make_xy(10)
    with pytest.raises(ValueError, match=r"lengths \{'inputs': 10, 'labels': 9\}; give every tensor one row"):
        fit({"inputs": x, "labels": y[:9]})
    with pytest.raises(TypeError, match=r"dict data must map names to tensors.*\['list'\]"):
        fit({"inputs": x.tolist(), "labels": y.tolist()})


# ---------------------------------------------------------------- BatchNorm and 1-item micro-batches


def test_a_one_item_micro_batch_into_batchnorm_is_warned_about_before_training():
    x, y = make_xy(129)  # batch 64: the last global batch has 1 item
    with pytest.warns(UserWarning, match=r"BatchNorm layer\(s\) in train mode \(net\.1\).*1 item\(s\).*drop_last=True"):
        Engine(max_steps=2, batch_size=64, progress=False).fit(Net(batchnorm=True), (x, y))
    assert 1 in micro_batch_sizes(129, Batching(64, 64, 1, 1), drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(max_epochs=1, batch_size=64, drop_last=True, progress=False).fit(Net(batchnorm=True), (x, y))
        Engine(max_epochs=1, batch_size=64, progress=False).fit(Net(), (x, y))  # no BatchNorm: nothing to say
        Engine(max_epochs=1, batch_size=64, limit_train_batches=2, progress=False).fit(Net(batchnorm=True), (x, y))
    # Two processes of micro-batch 32: a last window of 65 items gives rank 1 a 1-item second micro-batch.
    assert 1 in micro_batch_sizes(129, Batching(128, 32, 2, 2), drop_last=False)
    # And the warning was right: the crash it warns about.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Engine(max_epochs=1, batch_size=64, progress=False).fit(Net(batchnorm=True), (x, y))


# ---------------------------------------------------------------- data_wait and the end-of-fit line


def test_data_wait_is_logged_and_a_slow_dataset_gets_the_fix_in_the_end_of_fit_line(tmp_path, capsys):
    slow = Augmented("none", n=96, sleep=0.004)  # 32 items x 4 ms = 128 ms of fetching per step, a tiny step
    Engine(max_epochs=1, batch_size=32, prefetch=0, run_dir=str(tmp_path), log_every_n_steps=1).fit(Net(), slow)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [r["train/data_wait"] for r in records if "train/loss" in r]
    assert len(waits) == 3 and all(0.5 < w <= 1.0 for w in waits), waits
    err = capsys.readouterr().err
    assert "data: the step waited for input" in err and "set num_workers (now 0" in err

    # In-memory tensors: nothing to report (the line appears only when there is something to say). The step does
    # some work (20 ms): against a step of microseconds, an index op's share is the machine's load, not the data's.
    class Working(Net):
        def forward(self, inputs):
            time.sleep(0.02)
            return super().forward(inputs)

    x, y = make_xy(96)
    Engine(max_epochs=1, batch_size=32, log_every_n_steps=1).fit(Working(), (x, y))
    assert "data:" not in capsys.readouterr().err


def test_data_drawing_from_the_global_rng_is_named_in_the_end_of_fit_line(capsys):
    Engine(max_epochs=1, batch_size=32, seed=0).fit(Net(), Augmented("torch", n=64))
    err = capsys.readouterr().err
    assert "data: the dataset draws from the global torch RNG" in err
    assert "in the training thread (a prefetch thread would race with dropout" in err
    assert "framework.data.item_generator()" in err


def test_the_prefetch_thread_overlaps_a_slow_dataset():
    # 3 windows of 8 items x 10 ms: with the step itself taking 80 ms, a thread hides the fetching
    # of every window but the first; without it the step waits for each window.
    class SlowStep(Net):
        def forward(self, inputs):
            time.sleep(0.08)
            return super().forward(inputs)

    waited = {}
    for prefetch in (0, 2):
        engine = Engine(max_epochs=1, batch_size=8, prefetch=prefetch, progress=False, seed=0)
        engine.fit(SlowStep(), Augmented("none", n=32, sleep=0.01))
        waited[prefetch] = engine._fit.source.wait.fraction
    assert waited[2] < 0.6 * waited[0], waited


def test_wait_meter_counts_waiting_against_the_rest():
    meter = WaitMeter()
    meter.record(0.0, 1.0)  # asked at 0, got at 1: 1 s of waiting
    meter.record(4.0, 4.5)  # 3 s of step, then 0.5 s of waiting
    meter.pause(5.5)  # the epoch ends: the last step took 1 s
    assert meter.take() == pytest.approx(1.5 / 5.5)
    assert meter.take() == 0.0  # nothing since
    assert meter.fraction == pytest.approx(1.5 / 5.5)


# ---------------------------------------------------------------- the thread: bounded, errors re-raised


def test_the_thread_keeps_at_most_prefetch_windows_ahead():
    fetched = []

    class Counting(Dataset):
        def __len__(self):
            return 80

        def __getitem__(self, i):
            time.sleep(SLOW)
            fetched.append(i)
            return torch.tensor(float(i)), torch.tensor(0)

    source = make_source(Counting(), Batching(8, 8, 1, 1), rank=0, seed=0, shuffle=False, to_device=lambda b: b)
    it = source.windows(0)
    next(it)
    time.sleep(0.3)  # the thread runs ahead as far as it may
    # The window handed out, 2 in the queue, 1 the thread holds while the queue is full.
    assert len(fetched) == 8 * (1 + 2 + 1)
    source.close()
    assert not any(t.name == "framework-data-prefetch" for t in threading.enumerate())
    assert next(it, None) is None  # a closed iteration is over


def test_an_error_in_the_thread_is_raised_in_the_training_thread_with_its_traceback():
    source = make_source(
        Augmented("none", sleep=SLOW, fail_at=50),
        Batching(16, 16, 1, 1),
        rank=0,
        seed=0,
        shuffle=False,
        to_device=lambda b: b,
    )
    with pytest.raises(ValueError, match="corrupt item 50") as info:
        list(source.windows(0))
    assert any(entry.name == "__getitem__" for entry in info.traceback), "the dataset's frame is in the traceback"
    assert not any(t.name == "framework-data-prefetch" for t in threading.enumerate())


def test_a_stream_with_num_workers_is_warned_about():
    with pytest.warns(UserWarning, match="num_workers=2 applies to map-style Datasets"):
        fit(AugmentedStream("none", n=64), num_workers=2, max_epochs=1)


def test_the_thread_is_for_items_that_take_time_not_for_in_memory_indexing():
    fast, _ = fit(Augmented("none"), max_epochs=1)  # microseconds an item: a thread would only add hand-offs
    slow, _ = fit(Augmented("generator", sleep=SLOW), max_epochs=1)
    assert fast._fit.source.stage == "plain" and "items this fast need no thread" in fast._fit.source.where
    assert slow._fit.source.stage == "thread"
    off, _ = fit(Augmented("generator", sleep=SLOW), max_epochs=1, prefetch=0)
    assert off._fit.source.stage == "plain"
