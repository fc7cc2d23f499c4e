"""Memory per rank and step time, FSDP against DDP, on 2 CPU processes (one launch, interleaved).

    .venv/bin/python benchmarks/fsdp.py              # launches 2 processes; writes benchmarks/fsdp_results.md
    .venv/bin/python benchmarks/fsdp.py --quick      # tiny settings (CI smoke)

Model: an MLP of 8 layers of 1024 x 1024 (8.4M parameters, 34 MB in fp32), AdamW, global batch 64,
each Linear an FSDP unit. Both strategies train in the same processes, alternately (ddp, fsdp, ddp,
fsdp, ...), so machine noise hits both alike. Per rank and strategy it reports:

- parameter + gradient + optimizer-state bytes held by this rank (counted from the tensors, exactly: a
  DTensor counts its local shard), the issue's target being FSDP <= 0.55x DDP for parameters + optimizer;
- peak resident memory of the process after each strategy's runs (informational: both share the process);
- the marginal time per step, ``(T(n2) - T(n1)) / (n2 - n1)``, median over the repetitions, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from framework import Callback, Engine, LoopModule, seed_everything

    width, depth = (128, 4) if args.quick else (1024, 8)

    class MLP(LoopModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

        def forward(self, inputs):
            for layer in self.net:
                inputs = torch.relu(layer(inputs))
            return inputs

        def compute_loss(self, outputs, targets):
            return F.mse_loss(outputs, targets)

    class Memory(Callback):
        def __init__(self) -> None:
            self.bytes: dict[str, int] = {}

        def on_step_end(self, engine, module, metrics):  # after the step: parameters, gradients, state all held
            opt = engine._fit.optimizers.first.optimizer
            state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.ndim]
            self.bytes = {
                "params": local_bytes(module.parameters()),
                "grads": local_bytes(p.grad for p in module.parameters() if p.grad is not None),
                "optimizer": local_bytes(state),
            }

    g = torch.Generator().manual_seed(0)
    n = 64 * max(args.steps)
    x, y = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    timings: dict[str, dict[int, list[float]]] = {"ddp": {}, "fsdp": {}}
    memory: dict[str, dict[str, int]] = {}
    rss: dict[str, int] = {}
    rank = int(os.environ.get("RANK", "0"))
    for rep in range(args.reps + 1):  # (repetition 0 warms up: process group, allocator, kernels; not timed)
        for strategy in ("ddp", "fsdp"):
            for steps in args.steps:
                seed_everything(0)
                module = MLP()
                mem = Memory()
                engine = Engine(
                    max_steps=steps, batch_size=64, strategy=strategy, progress=False, doctor="off",
                    log_every_n_steps=10_000, callbacks=[mem],
                )  # fmt: skip
                torch.distributed.barrier() if torch.distributed.is_initialized() else None
                t0 = time.perf_counter()
                engine.fit(module, (x[: 64 * steps], y[: 64 * steps]))
                if rep:
                    timings[strategy].setdefault(steps, []).append(time.perf_counter() - t0)
                memory[strategy] = mem.bytes
                rss[strategy] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n1, n2 = args.steps
    per_step = {
        s: statistics.median((b - a) / (n2 - n1) for a, b in zip(t[n1], t[n2], strict=True)) for s, t in timings.items()
    }
    (Path(args.out) / f"rank{rank}.json").write_text(
        json.dumps({"memory": memory, "rss": rss, "per_step": per_step, "width": width, "depth": depth})
    )


def report(out: Path, quick: bool) -> str:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    lines = [
        f"MLP {ranks[0]['depth']} x {ranks[0]['width']}^2, AdamW, global batch 64, 2 CPU processes (gloo), "
        "DDP and FSDP interleaved in one launch.",
        "",
        "| rank | DDP params + grads + AdamW state | FSDP | FSDP / DDP (params + optimizer) | step time FSDP / DDP |",
        "|---|---|---|---|---|",
    ]
    for r, got in enumerate(ranks):
        d, f = got["memory"]["ddp"], got["memory"]["fsdp"]
        ratio = (f["params"] + f["optimizer"]) / (d["params"] + d["optimizer"])
        mib = 1 << 20
        lines.append(
            f"| {r} | {(d['params'] + d['grads'] + d['optimizer']) / mib:.1f} MiB "
            f"| {(f['params'] + f['grads'] + f['optimizer']) / mib:.1f} MiB | **{ratio:.3f}x** "
            f"| {got['per_step']['fsdp'] / got['per_step']['ddp']:.2f}x |"
        )
    worst = max((g["memory"]["fsdp"]["params"] + g["memory"]["fsdp"]["optimizer"]) / (g["memory"]["ddp"]["params"] + g["memory"]["ddp"]["optimizer"]) for g in ranks)  # fmt: skip
    lines += [
        "",
        f"target: FSDP <= 0.55x DDP per rank (params + optimizer): {'met' if worst <= 0.55 else 'MISSED'} ({worst:.3f}x)",
    ]
    step = ranks[0]["per_step"]
    lines.append(f"marginal step time (rank 0): DDP {step['ddp'] * 1e3:.1f} ms, FSDP {step['fsdp'] * 1e3:.1f} ms")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="results markdown (default benchmarks/fsdp_results.md; '' for none)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--steps", type=int, nargs=2, default=None)
    args = p.parse_args()
    args.reps = args.reps or (1 if args.quick else 5)
    args.steps = args.steps or ([1, 2] if args.quick else [3, 8])
    if args.worker:
        worker(args)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(ROOT / "launch" / "cpu_ddp.yaml"), __file__, "--worker", "--out", tmp, "--reps", str(args.reps),
            "--steps", *map(str, args.steps), *(["--quick"] if args.quick else []),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, timeout=1800)
        text = report(Path(tmp), args.quick)
    print(text)
    out = args.out if args.out is not None else ("" if args.quick else str(ROOT / "benchmarks" / "fsdp_results.md"))
    if out:
        Path(out).write_text("# FSDP against DDP\n\n`.venv/bin/python benchmarks/fsdp.py`\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
