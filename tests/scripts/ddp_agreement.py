"""What 2 DDP processes must agree on, one launch for every case (run by tests/procs.agreement_launch).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/ddp_agreement.py OUT_DIR

Each case is a fresh Engine and model in the same two processes; each rank writes
OUT_DIR/{case}-rank{R}.pt with what it saw. tests/parallel/test_ddp_agreement.py compares them with
one-process runs. (One launch for all: a 2-process launch costs about 12 CPU-seconds of start-up.)

  reference   tests/scripts/preempt_run.py, uninterrupted, in OUT_DIR/reference (its final and
              per-step parameters: what tests/parallel/test_preemption.py compares stopped runs with); the
              first Engine, so collective_timeout=20 makes the process group's timeout
  bn          a BatchNorm model, 2 epochs, checkpoints in OUT_DIR/bn: the logged val/loss,
              engine.validate's loss, each rank's own buffers after the last step (before
              validation agreed them), and the loss a validation without the agreement gives
              (a new Engine's validate on the module with each rank's own buffers)
  nan_skip    an infinite loss on rank 1's batch only at step NAN_STEP (finite gradients),
              nan_policy="skip": which steps each rank skipped, its final parameters
  unused_find an unused layer, Engine(find_unused_parameters=True): final parameters
  nan_raise   the same infinite loss, nan_policy="raise": the error, parameters before and after
  unused      an unused layer with the default: the error, parameters before and after
              (last: a DDP wrapper stalled by an unused parameter is left behind)
  timeout     the process group's collective timeout (seconds): the reference's collective_timeout=20
  dead peer   last, preempt_run.py again in OUT_DIR/dead (slow steps, --note-sigterm): the test kills
              rank 1 with SIGKILL mid-run; rank 0 must fail on its own (error-rank0.txt there), and this
              launch then exits non-zero
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.scripts`

from framework import Callback, Engine, LoopModule
from tests.scripts import preempt_run

RANK = int(os.environ.get("RANK", "0"))
NAN_STEP = 5
ENGINE: Engine | None = None  # the engine of the case running (the infinite loss reads its step)


class BNNet(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, out, y):
        return F.cross_entropy(out, y)


class UnusedNet(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 3)
        self.idle = nn.Linear(8, 3)  # in the optimizer, never in forward

    def forward(self, x):
        return self.used(x)

    def compute_loss(self, out, y):
        return F.cross_entropy(out, y)


class InfOnRank1(LoopModule):
    """An infinite loss on rank 1 at step NAN_STEP: a term that does not depend on the parameters, so the
    gradients stay finite; only the loss says something went wrong, on that rank alone."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, out, y):
        loss = F.cross_entropy(out, y)
        if RANK == 1 and ENGINE is not None and ENGINE.step == NAN_STEP:
            loss = loss + torch.tensor(math.inf)
        return loss


class Record(Callback):
    """Each rank's parameters after every step, which steps it skipped, its own buffers after ``buffers_at``."""

    def __init__(self, buffers_at: int | None = None) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.skipped: list[int] = []
        self.buffers_at, self.own_buffers = buffers_at, None

    def on_fit_start(self, engine, module):
        self.params[0] = clone_params(module)

    def on_step_end(self, engine, module, metrics):
        self.params[engine.step] = clone_params(module)
        if engine.last_step is not None and engine.last_step.skipped:
            self.skipped.append(engine.step - 1)  # (the index of the step, as errors name it)
        if engine.step == self.buffers_at:
            self.own_buffers = {k: b.detach().clone() for k, b in module.named_buffers()}


def clone_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 2 + 1  # (off-centre: BatchNorm's statistics matter)
    y = (x[:, 0] > 1).long() + (x[:, 1] > 1).long()
    return x, y


def case_bn(out: Path) -> dict:
    x, y = data(320, 1)
    vx, vy = data(72, 2)
    torch.manual_seed(0)
    model = BNNet()
    rec = Record(buffers_at=40)
    engine = Engine(
        max_epochs=2, batch_size=16, seed=0, run_dir=str(out / "bn"), progress=False, callbacks=[rec], shuffle=True
    )
    engine.fit(model, (x, y), (vx, vy))
    logged = engine.metrics["val/loss"]
    validated = engine.validate(model, (vx, vy))["loss"]
    # Validation without the agreement: every rank's own buffers, a new engine (no fit: nothing agrees them).
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(rec.own_buffers[k])
    unagreed = Engine(batch_size=16, progress=False).validate(model, (vx, vy))["loss"]
    return {
        "logged": logged,
        "validated": validated,
        "unagreed": unagreed,
        "own_buffers": rec.own_buffers,
        "step": engine.step,
    }


def case_nan(policy: str) -> dict:
    global ENGINE
    x, y = data(320, 3)
    torch.manual_seed(0)
    model = InfOnRank1()
    rec = Record()
    ENGINE = engine = Engine(max_steps=12, batch_size=16, seed=0, nan_policy=policy, progress=False, callbacks=[rec])
    error = None
    try:
        engine.fit(model, (x, y))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    ENGINE = None
    return {
        "error": error,
        "skipped": rec.skipped,
        "skipped_steps": engine.counters.skipped_steps,
        "params": rec.params,  # by steps done: params[NAN_STEP] is the state before step NAN_STEP
        "after": clone_params(model),
        "step": engine.step,
    }


def case_unused(find: bool | None) -> dict:
    x, y = data(320, 4)
    torch.manual_seed(0)
    model = UnusedNet()
    before = clone_params(model)
    engine = Engine(max_epochs=1, batch_size=16, seed=0, find_unused_parameters=find, progress=False)
    error = None
    try:
        engine.fit(model, (x, y))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "before": before, "after": clone_params(model), "step": engine.step}


def collective_timeout() -> float:
    group = torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    ref = out / "reference"
    preempt_run.main(
        [str(ref / "run"), str(ref / "final.pt"), "--record", str(ref / "steps.pt"), "--collective-timeout", "20"]
    )
    cases = {
        "bn": lambda: case_bn(out),
        "nan_skip": lambda: case_nan("skip"),
        "unused_find": lambda: case_unused(True),
        "nan_raise": lambda: case_nan("raise"),
        "unused": lambda: case_unused(None),
    }
    for name, run in cases.items():
        torch.save(run(), out / f"{name}-rank{RANK}.pt")
        if name == "bn":
            torch.save({"seconds": collective_timeout()}, out / f"timeout-rank{RANK}.pt")
    (out / f"cases-done-rank{RANK}").write_text("1")
    dead = out / "dead"
    preempt_run.main([str(dead / "run"), str(dead / "final.pt"), "--sleep", "0.05", "--note-sigterm"])


if __name__ == "__main__":
    main()
