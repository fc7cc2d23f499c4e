"""Run under 2 processes by tests/test_exactness.py (one launch covers every 2-process check).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/ddp_exactness.py OUT_DIR

Writes to OUT_DIR, per rank r:
  params_{name}_r{r}.pt   final flat parameters of each configuration (c_shuffle0, c_shuffle1,
                          stream, loader, lastone)
  trace_{name}_r{r}.pt    engine.trace of each configuration
  val_r{r}.pt             engine.validate on the 103-item set, plus fit's val/ metrics
  world_r{r}.pt           the world size and rank the engine saw
  micro_steps_lastone_r{r}.pt  micro-batches this rank really ran in the "last window of 1 item" run
The test compares them with 1-process runs done in the test process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from framework import Engine
from tests.scripts.exact_common import (
    EPOCHS,
    GLOBAL_BATCH,
    TokenModel,
    TokenStream,
    flat_params,
    save,
    token_data,
    train_data,
    val_data,
)


class RankShard(IterableDataset):
    """A stream that shards itself: rank r yields items r, r + W, r + 2W, ... (rank 0 maybe fewer)."""

    def __init__(self, data, rank0_limit=None):
        self.data, self.rank0_limit = data, rank0_limit

    def __iter__(self):
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        items = list(zip(*self.data, strict=True))[rank::world]
        if rank == 0 and self.rank0_limit is not None:
            items = items[: self.rank0_limit]
        return iter(items)


def main(out: Path) -> None:
    data, val = train_data(), val_data()
    rank = None
    # (c): 2 processes x micro 16 -> 2 accumulation steps per window; the last window of each
    # epoch has 1000 - 15*64 = 40 items (20 per rank: micro-batches of 16 and 4).
    for shuffle in (False, True):
        name = f"c_shuffle{int(shuffle)}"
        model = TokenModel()
        engine = Engine(
            max_epochs=EPOCHS,
            batch_size=GLOBAL_BATCH,
            micro_batch_size=16,
            shuffle=shuffle,
            seed=0,
            progress=False,
            trace=True,
        )
        engine.fit(model, data, val if shuffle else None)
        rank = engine._rt.rank
        save(flat_params(model), out / f"params_{name}_r{rank}.pt")
        save(engine.trace, out / f"trace_{name}_r{rank}.pt")
        if shuffle:
            # Validation of the trained model, standalone and as run inside fit.
            fit_val = {k: v for k, v in engine.metrics.items() if k.startswith("val/")}
            metrics = Engine(max_epochs=1, batch_size=32, micro_batch_size=16, progress=False).validate(model, val)
            save({"validate": metrics, "fit": fit_val}, out / f"val_r{rank}.pt")
        save({"world_size": engine._rt.world_size, "rank": rank}, out / f"world_r{rank}.pt")

    # The same unshuffled run from a length-less stream and from a DataLoader of micro-batches
    # (the loader's batches are dealt to the ranks): both must land on (a) as well.
    for name, source, micro in (
        ("stream", TokenStream(data), 16),
        ("loader", DataLoader(TensorDataset(*data), batch_size=16), None),
    ):
        model = TokenModel()
        Engine(
            max_epochs=EPOCHS, batch_size=GLOBAL_BATCH, micro_batch_size=micro, shuffle=False, seed=0, progress=False
        ).fit(model, source)
        save(flat_params(model), out / f"params_{name}_r{rank}.pt")

    # The stream_sharded opt-in: each rank's stream holds only its own items. Interleaved by rank,
    # rank r's k-th window is the evens/odds of the 1-process window, so (a) is reproduced; a
    # shard that ends early ("uneven": rank 0 keeps 100 of its 500 items) must not hang.
    for name, limit in (("sharded", None), ("sharded_uneven", 100)):
        model = TokenModel()
        engine = Engine(
            max_epochs=EPOCHS,
            batch_size=GLOBAL_BATCH,
            micro_batch_size=16,
            shuffle=False,
            seed=0,
            progress=False,
            stream_sharded=True,
        )
        engine.fit(model, RankShard(data, rank0_limit=limit))
        save(flat_params(model), out / f"params_{name}_r{rank}.pt")
        save(engine.step, out / f"steps_{name}_r{rank}.pt")

    # A last window of 1 item: rank 0 has no micro-batch in it and must still join the
    # gradient all-reduce (empty contribution), or rank 1 hangs in DDP's backward.
    small = token_data(2 * GLOBAL_BATCH + 1, seed=3)
    model = TokenModel()
    engine = Engine(
        max_epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        micro_batch_size=16,
        shuffle=True,
        seed=0,
        progress=False,
        trace=True,
    )
    engine.fit(model, small)
    save(flat_params(model), out / f"params_lastone_r{rank}.pt")
    save(engine.trace, out / f"trace_lastone_r{rank}.pt")
    save(engine.micro_steps, out / f"micro_steps_lastone_r{rank}.pt")  # real micro-batches (fillers not counted)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
