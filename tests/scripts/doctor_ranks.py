"""The doctor's cross-rank verdicts under 2 real processes (run by tests/doctor/test_ranks.py).

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/doctor_ranks.py OUT_DIR

Each rank writes ``OUT_DIR/rank{R}.json``: {case: [[check, message], ...]} for

- ``weights_differ`` / ``weights_same``: ``Doctor.check_initial_weights`` on a model built after a
  per-rank seed, then after the same seed;
- ``fsdp_clean`` / ``fsdp_zero_lr`` / ``fsdp_unused``: 3 optimizer steps of a model sharded by FSDP2's
  ``fully_shard`` over both ranks, whose 1-row head leaves rank 1 an empty shard (no evidence either
  way: a correct model must not be reported unchanged), driven through the doctor with
  ``strategy="fsdp"`` and an all-reduce.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from framework import LoopModule
from framework.doctor import Doctor
from tests.helpers import doctor_step


class Net(LoopModule):
    def __init__(self, lr_head: float = 0.1, unused: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(8, 4)
        self.head = nn.Linear(4, 1)  # weight [1, 4], bias [1]: one row, so rank 1's shards are empty
        self.lr_head = lr_head
        if unused:
            self.spare = nn.Linear(2, 2)

    def forward(self, inputs):
        return self.head(torch.tanh(self.body(inputs))).squeeze(-1)

    def compute_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(
            [
                {"params": [p for n, p in self.named_parameters() if not n.startswith("head.")]},
                {"params": self.head.parameters(), "lr": self.lr_head},
            ],
            lr=0.1,
        )


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def findings(doctor: Doctor) -> list[list[str]]:
    return [[f.check, f.message] for f in doctor.findings]


SHARDS: dict[str, int] = {}  # this rank's shard sizes of the head (rank 1: empty)


def fsdp_case(mesh, **kw) -> list[list[str]]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    module = Net(**kw)
    fully_shard(module, mesh=mesh)
    SHARDS.update({n: p.to_local().numel() for n, p in module.head.named_parameters()})
    opt = module.configure_optimizers()
    doctor = Doctor("basic")
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    doctor.start_fit(module, opt, is_main=dist.get_rank() == 0, strategy="fsdp", reduce=all_reduce)
    for _ in range(3):
        doctor_step(doctor, module, [opt], (x, y))
    doctor.end_fit()
    return findings(doctor)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    warnings.simplefilter("always")
    results = {}

    torch.manual_seed(rank)  # the mistake: every rank builds its own initialisation
    doctor = Doctor()
    doctor.check_initial_weights(Net())  # reduce, is_main and device from torch.distributed
    results["weights_differ"] = findings(doctor)
    torch.manual_seed(0)
    doctor = Doctor()
    doctor.check_initial_weights(Net(), reduce=all_reduce, is_main=rank == 0)
    results["weights_same"] = findings(doctor)

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results["fsdp_clean"] = fsdp_case(mesh)
    results["fsdp_zero_lr"] = fsdp_case(mesh, lr_head=0.0)
    results["fsdp_unused"] = fsdp_case(mesh, unused=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    (out / f"shards{rank}.json").write_text(json.dumps(SHARDS))
    dist.barrier()
    dist.destroy_process_group()
    # FSDP modules still alive here keep gloo work in flight into interpreter teardown, which can abort
    # ("terminate called without an active exception"): the results are written, leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
