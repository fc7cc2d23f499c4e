"""framework/data/batching.py: global batches are the same set of items at any world size and micro split.

No processes are started: a Source for rank r of world_size W is exactly what rank r
builds in a W-process run, so the ranks' sources side by side are the distributed run.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework.data import Batching, epoch_order, make_source, rank_share, resolve_batching
from tests.helpers import Items, ItemStream


def source(data, batch_size, micro, world_size, rank, shuffle=True, seed=0, **kw):
    batching = resolve_batching(data, batch_size, micro, world_size)
    return make_source(data, batching, rank=rank, seed=seed, shuffle=shuffle, to_device=lambda b: b, **kw)


def ids_of(batch) -> list[int]:
    return batch[0].reshape(-1).tolist()


def global_windows(data, batch_size, micro, world_size, epoch=0, shuffle=True, seed=0, **kw):
    """Per window: the items each rank uses, as a list over ranks of lists of micro-batch id lists."""
    per_rank = [
        list(source(data, batch_size, micro, world_size, r, shuffle, seed, **kw).windows(epoch))
        for r in range(world_size)
    ]
    assert len({len(w) for w in per_rank}) == 1, "every rank must see the same number of windows"
    return [[[ids_of(b) for b in win.micro_batches] for win in wins] for wins in zip(*per_rank, strict=True)]


SPLITS = [(1, 64), (1, 16), (2, 32), (2, 16), (2, 8), (4, 16), (4, 4)]  # (world_size, micro) for batch 64


# A stream is read in its own order (shuffle does not apply), so it appears unshuffled only.
@pytest.mark.parametrize("kind,shuffle", [("tensors", False), ("tensors", True), ("dataset", True), ("stream", False)])
def test_each_global_batch_is_the_same_set_at_any_split(kind, shuffle):
    n = 1000  # 15 full windows of 64 and a last one of 40
    if kind == "tensors":
        data = (torch.arange(n), torch.zeros(n))
    elif kind == "dataset":
        data = Items(n)
    else:
        data = ItemStream(n)
    for epoch in (0, 1):
        reference = None
        for world_size, micro in SPLITS:
            windows = global_windows(data, 64, micro, world_size, epoch=epoch, shuffle=shuffle)
            sets = []
            for w, ranks in enumerate(windows):
                items = [i for rank in ranks for mb in rank for i in mb]
                assert len(items) == len(set(items)), f"window {w} has a duplicated item at W={world_size}"
                assert all(len(mb) <= micro for rank in ranks for mb in rank)
                # Each rank holds at most `accumulation` micro-batches and the shares differ by <= 1 item.
                assert all(len(rank) <= 64 // (micro * world_size) for rank in ranks)
                sizes = [sum(len(mb) for mb in rank) for rank in ranks]
                assert max(sizes) - min(sizes) <= 1
                sets.append(sorted(items))
            if reference is None:
                reference = sets
                assert sorted(i for s in sets for i in s) == list(range(n)), "every item exactly once per epoch"
                assert [len(s) for s in sets] == [64] * 15 + [40]
            assert sets == reference, f"W={world_size} micro={micro} regrouped the items"


def test_rank_sources_cover_exactly_the_one_process_window():
    data = (torch.arange(1000), torch.zeros(1000))
    one = list(source(data, 64, 64, 1, 0).windows(epoch=0))
    r0 = list(source(data, 64, 16, 2, 0).windows(epoch=0))
    r1 = list(source(data, 64, 16, 2, 1).windows(epoch=0))
    for a, b, c in zip(one, r0, r1, strict=True):
        # In order, too: rank 0's micro-batches then rank 1's are the 1-process batch.
        assert ids_of(a.micro_batches[0]) == [i for m in b.micro_batches + c.micro_batches for i in ids_of(m)]


def test_epoch_order_seeded_per_epoch_and_rng_free():
    state = torch.get_rng_state()
    a = epoch_order(100, seed=0, epoch=0, shuffle=True)
    assert torch.equal(torch.get_rng_state(), state), "the epoch order must not consume the global RNG"
    assert torch.equal(a, epoch_order(100, seed=0, epoch=0, shuffle=True))
    assert not torch.equal(a, epoch_order(100, seed=0, epoch=1, shuffle=True))
    assert not torch.equal(a, epoch_order(100, seed=1, epoch=0, shuffle=True))
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(epoch_order(5, seed=0, epoch=3, shuffle=False), torch.arange(5))
    torch.manual_seed(123)  # nor depend on it
    assert torch.equal(a, epoch_order(100, seed=0, epoch=0, shuffle=True))


def test_rank_share_balanced_and_covering():
    for n in range(0, 20):
        for world in (1, 2, 3, 4):
            bounds = [rank_share(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("kind", ["tensors", "stream", "loader"])
def test_rank_without_micro_batch_gets_a_filler(kind):
    # 129 items, global batch 64, 2 ranks: the last window has 1 item. Sources split a window
    # into contiguous shares (rank 1 gets the item); a loader deals batches round-robin (rank 0).
    n = 129
    if kind == "tensors":
        data, bs, micro = (torch.arange(n), torch.zeros(n)), 64, 16
    elif kind == "stream":
        data, bs, micro = ItemStream(n), 64, 16
    else:
        data, bs, micro = DataLoader(TensorDataset(torch.arange(n), torch.zeros(n)), batch_size=16), 64, None
    r0 = list(source(data, bs, micro, 2, 0, shuffle=False).windows(epoch=0))
    r1 = list(source(data, bs, micro, 2, 1, shuffle=False).windows(epoch=0))
    assert len(r0) == len(r1) == 3
    empty, full = (r1, r0) if kind == "loader" else (r0, r1)
    assert empty[-1].micro_batches == [] and empty[-1].filler is not None
    assert [ids_of(b) for b in full[-1].micro_batches] == [[128]]
    assert all(w.filler is None for w in empty[:-1] + full)


def test_windows_resume_from_position():
    data = (torch.arange(300), torch.zeros(300))
    src = source(data, 32, 8, 1, 0)
    full = [[ids_of(b) for b in w.micro_batches] for w in src.windows(epoch=2)]
    resumed = list(src.windows(epoch=2, start=4))
    assert resumed[0].index == 4
    assert [[ids_of(b) for b in w.micro_batches] for w in resumed] == full[4:]
    stream = source(ItemStream(100), 32, 8, 1, 0)
    windows = list(stream.windows(epoch=0))
    assert [w.items_read for w in windows] == [32, 64, 96, 100]
    later = list(stream.windows(epoch=0, start=2, items_read=64))
    assert [w.index for w in later] == [2, 3]
    assert [ids_of(b) for b in later[0].micro_batches] == [ids_of(b) for b in windows[2].micro_batches]


def test_loader_windows_deal_batches_round_robin():
    loader = DataLoader(TensorDataset(torch.arange(100), torch.zeros(100)), batch_size=10)
    r0 = list(source(loader, 40, None, 2, 0).windows(epoch=0))
    r1 = list(source(loader, 40, None, 2, 1).windows(epoch=0))
    # 4 loader batches per window (2 per rank), 10 batches -> windows of 4, 4, 2.
    assert [len(w.micro_batches) for w in r0] == [2, 2, 1] and [len(w.micro_batches) for w in r1] == [2, 2, 1]
    for a, b in zip(r0, r1, strict=True):
        ids = sorted(i for w in (a, b) for mb in w.micro_batches for i in ids_of(mb))
        assert ids == list(range(a.index * 40, min(100, a.index * 40 + 40)))


def test_num_windows():
    assert source((torch.arange(1000),), 64, 16, 2, 0).num_windows() == 16
    assert source(ItemStream(10), 4, None, 1, 0).num_windows() is None
    loader = DataLoader(TensorDataset(torch.arange(100)), batch_size=10)
    assert source(loader, None, None, 1, 0).num_windows() == 10


def test_resolve_batching():
    assert resolve_batching(None, 64, 16, 2) == Batching(64, 16, 2, 2)
    assert resolve_batching(None, 64, None, 2) == Batching(64, 32, 1, 2)
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=5)
    assert resolve_batching(loader, None, None, 2) == Batching(10, 5, 1, 2)
    assert resolve_batching(loader, 20, None, 2).accumulation == 2
    with pytest.raises(ValueError, match=r"use a multiple of 2, e.g. batch_size=66"):
        resolve_batching(None, 65, None, 2)
    with pytest.raises(ValueError, match=r"batch_size=72 or a micro_batch_size in \[1, 2, 4, 8, 16, 32\]"):
        resolve_batching(None, 64, 12, 2)
    with pytest.raises(ValueError, match="positive int"):
        resolve_batching(None, 0, None, 1)
    with pytest.raises(ValueError, match="positive int"):
        resolve_batching(None, 64, 0, 1)


def test_unsupported_and_mismatched_inputs():
    with pytest.raises(TypeError, match=r"not supported.*Dataset"):
        source(42, 8, None, 1, 0)
    with pytest.raises(ValueError, match="different lengths"):
        source((torch.arange(5), torch.arange(4)), 2, None, 1, 0)


def test_worker_loading_keeps_order_and_global_rng():
    data = Items(50)
    plain = global_windows(data, 16, 8, 2)
    state = torch.get_rng_state()
    workers = global_windows(data, 16, 8, 2, num_workers=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert workers == plain


def test_source_skips_nothing_across_epochs():
    data = (torch.arange(100), torch.zeros(100))
    src = source(data, 32, None, 1, 0)
    for epoch in range(3):
        ids = [i for w in src.windows(epoch) for b in w.micro_batches for i in ids_of(b)]
        assert sorted(ids) == list(range(100))
    e0 = [ids_of(b) for w in src.windows(0) for b in w.micro_batches]
    e1 = [ids_of(b) for w in src.windows(1) for b in w.micro_batches]
    assert e0 != e1  # reshuffled per epoch
    assert list(itertools.chain(*e0)) != list(range(100))
