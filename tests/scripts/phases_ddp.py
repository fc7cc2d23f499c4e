"""Run under 2 processes by tests/test_phases.py (one launch covers every 2-process check).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/phases_ddp.py OUT_DIR

Writes to OUT_DIR, per rank r:
  params_{gan,gan_nan,joint}_r{r}.pt  final flat parameters: the GAN in alternating phases, the same with
                                      NaN losses in one phase on one rank (nan_policy="skip"), Muon + AdamW
  trace_gan_r{r}.pt, findings_gan_r{r}.pt  engine.trace; the default doctor's warnings and errors
  skipped_gan_nan_r{r}.pt             engine.skipped_steps
  resume_{straight,resumed}_r{r}.pt   every optimizer's and scheduler's state and the EMA, of an
                                      uninterrupted run and of one stopped after step 10 and resumed
The test compares them with the hand-written rules run in the test process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

import torch

from framework import Engine
from tests.helpers import CrashAt
from tests.scripts.phases_common import (
    BATCH,
    D_FLAG,
    EPOCHS,
    G_FLAG,
    GAN,
    Joint,
    fit_state,
    flagged,
    flat_params,
    regression_data,
    ring_data,
)


def engine(**options) -> Engine:
    # 2 processes x micro-batches of 16: 2 per rank in a window of 64; the 40-item window is 20 per rank (16 + 4).
    return Engine(
        max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=16, shuffle=False, seed=0, progress=False, **options
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    runs = {
        "gan": (GAN(), ring_data(), {"trace": True}),
        # Item 259 is in the 5th window of each epoch, item 488 in the 8th; each sits on one rank only.
        "gan_nan": (
            GAN(),
            flagged(ring_data(), {4 * BATCH + 3: G_FLAG, 7 * BATCH + 40: D_FLAG}),
            {"nan_policy": "skip"},
        ),
        "joint": (Joint(torch.float64), regression_data(dtype=torch.float64), {}),
    }
    for name, (model, data, options) in runs.items():
        e = engine(**options)
        e.fit(model, data)
        rank = e.rank
        torch.save(flat_params(model), out / f"params_{name}_r{rank}.pt")
        if name == "gan":
            torch.save(e.trace, out / f"trace_{name}_r{rank}.pt")
            bad = [(f.check, f.severity, f.message) for f in e.doctor.findings if f.severity in ("warning", "error")]
            torch.save(bad, out / f"findings_{name}_r{rank}.pt")
        if name == "gan_nan":
            torch.save(e.skipped_steps, out / f"skipped_{name}_r{rank}.pt")

    # Resume: stopped after step 10 on both ranks, resumed from step 8's checkpoint (shuffled data,
    # schedulers on both phases, EMA).
    def resumable(run_dir: Path, **options) -> Engine:
        e = Engine(
            max_epochs=EPOCHS, batch_size=BATCH, micro_batch_size=16, seed=0, progress=False, run_dir=run_dir,
            checkpoint_every_n_steps=4, ema_decay=0.9, trace=True, **options,
        )  # fmt: skip
        return e

    straight, straight_model = resumable(out / "straight"), GAN(with_schedulers=True)
    straight.fit(straight_model, ring_data())
    try:
        resumable(out / "stopped", callbacks=[CrashAt(10)]).fit(GAN(with_schedulers=True), ring_data())
        raise AssertionError("CrashAt(10) did not stop the run")
    except KeyboardInterrupt:
        pass
    resumed, resumed_model = resumable(out / "stopped", resume="auto"), GAN(with_schedulers=True)
    resumed.fit(resumed_model, ring_data())
    assert straight.trace is not None and resumed.trace is not None
    for name, e, model in (("straight", straight, straight_model), ("resumed", resumed, resumed_model)):
        saved = {"state": fit_state(e), "params": flat_params(model), "first_step": e.trace[0][1]}
        torch.save(saved, out / f"resume_{name}_r{e.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
