"""Run under 2 processes by tests/test_schedules.py (one launch covers every 2-process check of issue 4).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/issue4_ddp.py OUT_DIR

Global batch 16 = 2 processes x micro-batch 4 x 2 accumulation steps; 48 items = 3 windows per
epoch, in order (shuffle=False). Writes OUT_DIR/rank{r}.json with, per rank:
  lambda_calls, lambda_params    a per-step LambdaLR's calls over 2 epochs, and the final parameters
  lambda_epoch_calls             the same LambdaLR with interval="epoch"
  skip                           nan_policy="skip" with a NaN item that only rank 1 reads
  raise                          the NonFiniteError message under "raise" for the same data (None if none)
  fused_step, fused_deferred     nan_policy="skip" with fused AdamW, reading the verdict at once / a step late
  deferred_raise                 the NonFiniteError message under "raise" with nan_check="deferred"
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

from framework import Engine, NonFiniteError
from tests.scripts.issue4_common import Net, data, flat

KW = {"batch_size": 16, "micro_batch_size": 4, "shuffle": False, "progress": False}
# Window 1 holds items 16..31; rank 1's share of it is items 24..31, so only rank 1 sees the NaN.
NAN_ITEM = 27


def main(out: Path) -> None:
    result: dict = {}
    module = Net(optimizer="sgd", lr=0.3, scheduler="lambda")
    engine = Engine(max_epochs=2, trace=True, **KW)
    engine.fit(module, data(48))
    rt = engine._rt
    forwards = Counter(step for name, step, _ in engine.trace if name == "forward")
    result.update(
        world_size=rt.world_size,
        rank=rt.rank,
        forwards_per_step=sorted(set(forwards.values())),
        lambda_calls=module.lambda_calls,
        lambda_params=flat(module).tolist(),
    )

    module = Net(optimizer="sgd", lr=0.3, scheduler="lambda_epoch")
    Engine(max_epochs=2, **KW).fit(module, data(48))
    result["lambda_epoch_calls"] = module.lambda_calls

    module = Net(optimizer="adamw", lr=1e-2, scheduler="lambda")
    engine = Engine(max_epochs=1, nan_policy="skip", **KW)
    engine.fit(module, data(48, nan_items=[NAN_ITEM]))
    result["skip"] = {
        "skipped_steps": engine.skipped_steps,
        "lambda_calls": module.lambda_calls,
        "params": flat(module).tolist(),
    }

    result["raise"] = None
    try:
        Engine(max_epochs=1, nan_policy="raise", **KW).fit(Net(optimizer="sgd", lr=0.1), data(48, nan_items=[NAN_ITEM]))
    except NonFiniteError as e:
        result["raise"] = str(e)

    # nan_check="deferred" (fused AdamW skips on the device, the verdict and the stop flags come a step
    # late): the same NaN must end both ranks bitwise where reading at once ends them.
    for check in ("step", "deferred"):
        module = Net(optimizer="adamw", lr=1e-2, scheduler="lambda", fused=True)
        engine = Engine(max_epochs=2, nan_policy="skip", nan_check=check, **KW)
        engine.fit(module, data(48, nan_items=[NAN_ITEM]))
        result[f"fused_{check}"] = {
            "deferred": engine._fit.defer,
            "skipped_steps": engine.skipped_steps,
            "last_epoch": module.sched.last_epoch,
            "params": flat(module).tolist(),
        }
    try:
        engine = Engine(max_epochs=1, nan_policy="raise", nan_check="deferred", **KW)
        engine.fit(Net(optimizer="sgd", lr=0.1, fused=True), data(48, nan_items=[NAN_ITEM]))
        result["deferred_raise"] = None
    except NonFiniteError as e:
        result["deferred_raise"] = str(e)

    (out / f"rank{rt.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
