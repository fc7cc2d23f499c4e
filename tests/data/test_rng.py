"""framework.data.rng and the determinism rule: the result does not depend on who fetches the data.

A random-augmentation Dataset (dropout in the model too) ends with bitwise-equal parameters for
num_workers 0, 1, 2 and prefetch on and off, whether the augmentation draws from
framework.data.item_generator() or from the global torch/numpy/random RNGs; and the comparison is
not vacuous: augmentation seeded per worker does change the result with num_workers.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from framework.data import Batching, item_generator, item_seed, make_source, mix_seed
from framework.data.rng import NUMPY, PYTHON, TORCH, ItemFetcher
from tests.scripts.data_common import SLOW, Augmented, AugmentedStream, fit, flat

SETUPS = [(w, p) for w in (0, 1, 2) for p in (0, 2)]  # (num_workers, prefetch)


@pytest.mark.parametrize("kind", ["generator", "global"])
def test_random_augmentation_is_bitwise_the_same_for_any_workers_and_prefetch(kind):
    results = {}
    for workers, prefetch in SETUPS:
        engine, module = fit(Augmented(kind, sleep=SLOW), dropout=0.3, num_workers=workers, prefetch=prefetch)
        results[workers, prefetch] = flat(module)
        source = engine._fit.source
        # The rule: data drawing from a global RNG is never fetched by a thread (it would race with dropout).
        expected_stage = "thread" if (kind == "generator" and workers == 0 and prefetch) else "plain"
        assert source.stage == expected_stage, (workers, prefetch)
        assert source.global_rngs == (TORCH | NUMPY | PYTHON if kind == "global" else 0)
    reference = results[0, 0]
    for setup, params in results.items():
        assert torch.equal(params, reference), f"num_workers, prefetch = {setup} changed the result"
    _, plain = fit(Augmented("none"), dropout=0.3)
    assert not torch.equal(flat(plain), reference), "the augmentation must matter, or the test proves nothing"


def test_augmentation_seeded_per_worker_would_change_the_result():
    # What the test above guards against: the same comparison tells 1 worker from 2 when the
    # augmentation follows per-worker seeds (as every DataLoader-based framework does).
    _, one = fit(Augmented("per_worker"), dropout=0.3, num_workers=1)
    _, two = fit(Augmented("per_worker"), dropout=0.3, num_workers=2)
    assert not torch.equal(flat(one), flat(two))


def test_a_stream_drawing_from_the_global_rng_is_the_same_with_and_without_the_thread():
    runs = {}
    for kind in ("generator", "torch"):
        for prefetch in (0, 2):
            engine, module = fit(AugmentedStream(kind, sleep=SLOW), dropout=0.3, prefetch=prefetch)
            runs[kind, prefetch] = flat(module)
            assert engine._fit.source.stage == ("thread" if kind == "generator" and prefetch else "plain")
        assert torch.equal(runs[kind, 0], runs[kind, 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_the_data_leaves_the_training_rng_streams_alone(workers):
    # Dropout draws from the global RNGs; data that draws from them too must not move them.
    torch.manual_seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    source = make_source(
        Augmented("global"), Batching(32, 16, 2, 1), rank=0, seed=0, shuffle=True, to_device=lambda b: b,
        num_workers=workers,
    )  # fmt: skip
    assert len([w for epoch in (0, 1) for w in source.windows(epoch)]) == 16
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_item_generator_is_keyed_by_seed_epoch_and_index():
    seen = []

    class Probe(Dataset):
        def __len__(self):
            return 8  # two windows: the first is made in the training thread, the second by the thread

        def __getitem__(self, i):
            time.sleep(SLOW)
            g = item_generator()
            assert item_generator() is g  # the same item: the same generator, draws continue
            seen.append((i, item_seed(), threading.current_thread().name))
            return torch.rand(3, generator=g), torch.tensor(i)

    def batches(seed, epoch, prefetch):
        src = make_source(
            Probe(), Batching(4, 2, 1, 1), rank=0, seed=seed, shuffle=False, to_device=lambda b: b, prefetch=prefetch
        )
        return [b[0] for w in src.windows(epoch) for b in w.micro_batches]

    a = batches(0, 0, prefetch=0)
    assert [s[:2] for s in seen] == [(i, mix_seed(0, 0, i)) for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, batches(0, 0, prefetch=2), strict=True))
    assert any(name != threading.current_thread().name for *_, name in seen), "prefetch=2 should use a thread"
    assert not torch.equal(a[0], batches(0, 1, prefetch=0)[0])  # another epoch: other draws
    assert not torch.equal(a[0], batches(1, 0, prefetch=0)[0])  # another seed: other draws
    expected = torch.rand(3, generator=torch.Generator().manual_seed(mix_seed(0, 0, 1)))
    assert torch.equal(a[0][1], expected)


def test_outside_an_engine_fetch_the_helpers_fall_back_to_the_global_rng():
    assert item_generator() is torch.default_generator
    torch.manual_seed(3)
    a = item_seed()
    torch.manual_seed(3)
    assert item_seed() == a


def test_getitems_datasets_pass_the_index():
    class Batched(Dataset):
        def __len__(self):
            return 6

        def __getitems__(self, ids):
            return [(torch.rand(2, generator=item_generator(i)), torch.tensor(i)) for i in ids]

        def __getitem__(self, i):
            raise AssertionError("__getitems__ is used")

    src = make_source(Batched(), Batching(6, 3, 1, 1), rank=0, seed=0, shuffle=False, to_device=lambda b: b)
    (window,) = src.windows(0)
    for x, ids in window.micro_batches:
        for row, i in zip(x, ids.tolist(), strict=True):
            assert torch.equal(row, torch.rand(2, generator=torch.Generator().manual_seed(mix_seed(0, 0, i))))

    class Forgot(Batched):
        def __getitems__(self, ids):
            return [(torch.rand(2, generator=item_generator()), torch.tensor(i)) for i in ids]

    src = make_source(Forgot(), Batching(6, 3, 1, 1), rank=0, seed=0, shuffle=False, to_device=lambda b: b)
    with pytest.raises(RuntimeError, match=r"item_generator\(\) inside a batched __getitems__ needs the item's index"):
        list(src.windows(0))


def test_the_probe_names_each_global_rng_and_seeds_only_those():
    draws = {"torch": lambda: torch.rand(()), "numpy": np.random.rand, "random": random.random, "none": lambda: 0}
    for name, bit in (("torch", TORCH), ("numpy", NUMPY), ("random", PYTHON), ("none", 0)):
        fetcher = ItemFetcher(seed=0)
        first = fetcher.items(0, [5, 6], lambda i, name=name: draws[name]())
        assert fetcher.decide() == bit
        again = ItemFetcher(seed=0)
        again.uses = bit  # (decided: seeds only what it uses)
        assert again.items(0, [5, 6], lambda i, name=name: draws[name]()) == first, name
