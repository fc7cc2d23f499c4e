"""Issue 3's "must hold": the same training at any micro-batch size and world size.

Setup (tests/scripts/exact_common.py): a token-level model (embedding + linear),
cross-entropy with ignore_index padding over variable-length sequences, count_items =
non-padding tokens, AdamW, 1000 items, 2 epochs, global batch 64 (the last window of
each epoch has 40 items). Final parameters are compared:

  (a) 1 process, micro 64      (b) 1 process, micro 16 (4 accumulation steps)
  (c) 2 processes, micro 16    (d) a plain PyTorch loop, token mean over each global batch

One 2-process launch (tests/scripts/ddp_exactness.py) produces everything (c) needs,
plus the traces, validation metrics, stream and DataLoader runs, and the "rank with
nothing left" run. (filelock, used to share that launch between xdist workers, is a
dependency of torch.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework import Engine
from tests.helpers import TinyClassifier, classification_data, launch
from tests.procs import shared_dir
from tests.scripts.exact_common import (
    EPOCHS,
    GLOBAL_BATCH,
    TOL,
    VAL_TOL,
    TokenModel,
    direct_metrics,
    flat_params,
    hand_loop,
    max_diff,
    order_errors,
    token_data,
    train_data,
    val_data,
)
from tests.threads import one_thread  # noqa: F401  (autouse: tiny models, one thread)

SCRIPT = Path(__file__).parent / "scripts" / "ddp_exactness.py"


def fit(micro: int, shuffle: bool, data=None, val=None) -> tuple[TokenModel, Engine]:
    model = TokenModel()
    engine = Engine(
        max_epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        micro_batch_size=micro,
        shuffle=shuffle,
        seed=0,
        progress=False,
        trace=True,
    )
    engine.fit(model, train_data() if data is None else data, val)
    return model, engine


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    """Final parameters of the 1-process runs and the plain loop."""
    out = {}
    for shuffle in (False, True):
        for micro in (64, 16):
            out[f"{'ab'[micro == 16]}_shuffle{int(shuffle)}"] = flat_params(fit(micro, shuffle)[0])
    out["d"] = flat_params(hand_loop(train_data()))
    out["init"] = flat_params(TokenModel())
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """Run the 2-process script once; its files are shared by every test below, also across pytest-xdist
    workers (tests/procs.shared_dir: the launch, the slow part, runs once per session)."""
    return shared_dir(tmp_path_factory, "ddp_exactness", lambda out: launch(SCRIPT, str(out)))


def load(out: Path, name: str):
    return torch.load(out / name, weights_only=False)


# ---------------------------------------------------------------- 1 process


def test_training_moved_the_parameters(one_process):
    # Exactness between runs that never trained would be vacuous.
    assert max_diff(one_process["a_shuffle0"], one_process["init"]) > 0.1


def test_micro_batches_match_one_forward_and_the_plain_loop(one_process):
    a, b, d = one_process["a_shuffle0"], one_process["b_shuffle0"], one_process["d"]
    assert max_diff(a, d) <= TOL, "(a) 1 process micro 64 vs (d) plain PyTorch loop"
    assert max_diff(b, d) <= TOL, "(b) 1 process micro 16 vs (d) plain PyTorch loop"
    assert max_diff(a, b) <= TOL


def test_micro_batches_match_with_shuffle(one_process):
    a, b = one_process["a_shuffle1"], one_process["b_shuffle1"]
    assert max_diff(a, b) <= TOL
    # Shuffling changed the run (else this test would repeat the one above).
    assert max_diff(a, one_process["a_shuffle0"]) > 1e-2


def test_naive_scaling_breaks_the_tolerance(one_process):
    # The common bug: each micro-batch's token mean divided by the accumulation steps, i.e. a mean
    # of micro-batch means. Micro-batches hold different token counts (and the last window is
    # partial), so this is a different gradient, far outside the tolerance the engine meets.
    naive = flat_params(hand_loop(train_data(), micro=16, naive=True))
    assert max_diff(naive, one_process["d"]) > 100 * TOL


class ItemModel(TinyClassifier):
    """Item-level loss with an int count_items (the default): the engine's host-side weight path."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)  # no Adam normalisation to hide a scale error


def test_item_level_partial_window_exact():
    # 1000 items, batch 64: the last window (40 items) is micro-batches of 16, 16 and 8, so
    # equal weights (1/3) or "divide by accumulation" (1/4 each) both get it wrong.
    x, y = classification_data(1000)
    final = {}
    for micro in (64, 16, 8):
        torch.manual_seed(0)
        model = ItemModel()
        Engine(max_epochs=EPOCHS, batch_size=GLOBAL_BATCH, micro_batch_size=micro, seed=0, progress=False).fit(
            model, (x, y)
        )
        final[micro] = flat_params(model)
    assert max_diff(final[64], final[16]) <= TOL and max_diff(final[64], final[8]) <= TOL


def test_accumulation_trace_follows_canonical_order():
    # Also shows the setup exercises a partial last window: 1000 = 15 * 64 + 40.
    _, engine = fit(16, True)
    assert order_errors(engine.trace) == []
    forwards = [sum(1 for n, s, _ in engine.trace if n == "forward" and s == step) for step in range(engine.step)]
    assert forwards == ([4] * 15 + [3]) * EPOCHS  # the 40-item window: 16 + 16 + 8


# ---------------------------------------------------------------- 2 processes


@pytest.mark.multiprocess
def test_two_processes_ran_with_two_ranks(ddp):
    assert [load(ddp, f"world_r{r}.pt") for r in (0, 1)] == [
        {"world_size": 2, "rank": 0},
        {"world_size": 2, "rank": 1},
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize("shuffle", [0, 1])
def test_two_processes_match_one(ddp, one_process, shuffle):
    c0, c1 = (load(ddp, f"params_c_shuffle{shuffle}_r{r}.pt") for r in (0, 1))
    assert torch.equal(c0, c1), "DDP ranks must hold identical parameters"
    assert max_diff(c0, one_process[f"a_shuffle{shuffle}"]) <= TOL, "(c) 2 processes micro 16 vs (a)"
    assert max_diff(c0, one_process[f"b_shuffle{shuffle}"]) <= TOL, "(c) vs (b)"
    if not shuffle:
        assert max_diff(c0, one_process["d"]) <= TOL, "(c) vs (d) plain loop"


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["stream", "loader"])
def test_two_processes_stream_and_loader_match_one(ddp, one_process, name):
    # A stream is cut into the same global batches on every rank; a DataLoader's micro-batches are
    # dealt to the ranks. Unshuffled, both are the (a) run.
    for rank in (0, 1):
        assert max_diff(load(ddp, f"params_{name}_r{rank}.pt"), one_process["a_shuffle0"]) <= TOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["c_shuffle0", "c_shuffle1", "lastone"])
def test_two_process_trace_canonical_on_every_rank(ddp, name):
    for rank in (0, 1):
        trace = load(ddp, f"trace_{name}_r{rank}.pt")
        assert order_errors(trace) == [], f"rank {rank}"
    if name.startswith("c_"):
        # 2 accumulation steps per window on each rank; the 40-item window is 20 per rank: 16 + 4.
        steps = max(s for _, s, _ in trace) + 1
        assert steps == 16 * EPOCHS
        assert all(sum(1 for n, s, _ in trace if n == "forward" and s == k) == 2 for k in range(steps))


@pytest.mark.multiprocess
def test_two_process_validation_equals_one_process(ddp):
    model, engine = fit(16, True, val=val_data())  # the same run as the script's shuffled one
    one = engine.validate(model, val_data())
    direct = direct_metrics(model, val_data())
    assert set(one) == {"loss", "tok_acc", "seq_len"}
    for key in one:
        assert one[key] == pytest.approx(direct[key], abs=VAL_TOL), f"1 process {key} vs one forward over the set"
        assert engine.metrics[f"val/{key}"] == pytest.approx(one[key], abs=VAL_TOL)
    for rank in (0, 1):
        two = load(ddp, f"val_r{rank}.pt")
        for key in one:
            # 103 items over 2 ranks in micro-batches of 16: shares of unequal size, a partial last
            # batch; a per-rank mean, a padded duplicate or a dropped item would each move these.
            assert two["validate"][key] == pytest.approx(one[key], abs=VAL_TOL), f"rank {rank} validate {key}"
            assert two["fit"][f"val/{key}"] == pytest.approx(one[key], abs=VAL_TOL), f"rank {rank} fit val/{key}"


@pytest.mark.multiprocess
def test_rank_with_nothing_left_in_last_window(ddp):
    # 129 items, global batch 64: the last window has 1 item, so under 2 processes rank 0 has no
    # micro-batch there. The run finished (no hang: the launch has a timeout) and stays exact.
    # Windows of 64, 64, 1 items; ranks get 32 (2 micro-batches of 16) of each full window.
    steps = [load(ddp, f"micro_steps_lastone_r{r}.pt") for r in (0, 1)]
    assert steps == [4 * EPOCHS, 5 * EPOCHS], "rank 0 must have had an empty last window"
    model, _ = fit(64, True, data=token_data(2 * GLOBAL_BATCH + 1, seed=3))
    for rank in (0, 1):
        assert max_diff(load(ddp, f"params_lastone_r{rank}.pt"), flat_params(model)) <= TOL


@pytest.mark.multiprocess
def test_self_sharded_stream_opt_in(ddp, one_process):
    # Interleaved shards reproduce the 1-process run exactly.
    for rank in (0, 1):
        assert max_diff(load(ddp, f"params_sharded_r{rank}.pt"), one_process["a_shuffle0"]) <= TOL
    # A shard that ends early: the other rank finishes its stream (16 windows of 32 items per
    # epoch), the short one joins with zero-weight fillers, nobody hangs, DDP keeps them equal.
    assert load(ddp, "steps_sharded_uneven_r0.pt") == load(ddp, "steps_sharded_uneven_r1.pt") == 16 * EPOCHS
    assert torch.equal(load(ddp, "params_sharded_uneven_r0.pt"), load(ddp, "params_sharded_uneven_r1.pt"))
