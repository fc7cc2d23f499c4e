"""The GPU side of prefetching (framework.data.device): windows copied ahead on a side CUDA stream,
pinned and non_blocking, are the same values as on the host, safe against the caching allocator
reusing their memory while the training stream still reads them, and leave training bitwise
unchanged. Skipped without a CUDA GPU (benchmarks/gpu_session.sh runs them with `pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from framework.data import Batching, make_source
from framework.parallel.runtime import send_to_device
from tests.scripts.data_common import SLOW, Augmented, AugmentedStream, fit, flat, make_xy

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def _source(data, prefetch, device, **kw):
    return make_source(
        data, Batching(32, 16, 2, 1), rank=0, seed=0, shuffle=True, prefetch=prefetch, device=device,
        to_device=(lambda b: send_to_device(b, device)) if device is not None else (lambda b: b), **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kind,workers,stage",
    [("tensors", 0, "lookahead"), ("dataset", 0, "thread"), ("dataset", 2, "lookahead"), ("stream", 0, "thread")],
)
def test_windows_reach_the_gpu_ahead_with_the_host_values(kind, workers, stage):
    x, y = make_xy(160)
    data = {"tensors": lambda: (x, y), "dataset": lambda: Augmented("generator", n=160, sleep=SLOW),
            "stream": lambda: AugmentedStream("generator", n=160, sleep=SLOW)}[kind]  # fmt: skip
    host = [w.micro_batches for w in _source(data(), 0, None, num_workers=workers).windows(0)]
    source = _source(data(), 2, CUDA, num_workers=workers)
    gpu = [w.micro_batches for w in source.windows(0)]
    assert source.stage == stage
    torch.cuda.synchronize()
    assert len(gpu) == len(host) == 5
    for hw, gw in zip(host, gpu, strict=True):
        for hb, gb in zip(hw, gw, strict=True):
            assert all(t.is_cuda for t in gb)
            assert all(torch.equal(h, g.cpu()) for h, g in zip(hb, gb, strict=True))


def test_a_copied_batch_is_not_overwritten_while_the_training_stream_still_reads_it():
    # Each window's reduction is queued behind a long GPU spin on the training stream, and the
    # window dropped at once: without record_stream the allocator would give its memory to the next
    # copy on the side stream, which does not wait for the spin, and the sums would read new data.
    n = 64 * 40
    x = torch.arange(n * 256, dtype=torch.float32).reshape(n, 256)
    y = torch.zeros(n, dtype=torch.long)
    source = make_source(
        (x, y), Batching(64, 64, 1, 1), rank=0, seed=0, shuffle=False, prefetch=2, device=CUDA,
        to_device=lambda b: send_to_device(b, CUDA),
    )  # fmt: skip
    sums = []
    for window in source.windows(0):
        torch.cuda._sleep(2_000_000)  # (about a millisecond of GPU time, queued on the training stream)
        sums.append(window.micro_batches[0][0].sum(dtype=torch.float64))
        del window
    expected = [x[i * 64 : (i + 1) * 64].double().sum() for i in range(40)]
    assert all(torch.equal(s.cpu(), e) for s, e in zip(sums, expected, strict=True))


@pytest.mark.parametrize("kind", ["generator", "global"])
def test_training_on_the_gpu_is_bitwise_the_same_with_and_without_prefetch(kind):
    runs = {}
    for workers, prefetch in ((0, 0), (0, 2), (2, 2)):
        engine, module = fit(Augmented(kind, sleep=SLOW), dropout=0.3, num_workers=workers, prefetch=prefetch)
        assert engine._rt.device.type == "cuda"
        runs[workers, prefetch] = flat(module).cpu()
    assert all(torch.equal(p, runs[0, 0]) for p in runs.values()), list(runs)
