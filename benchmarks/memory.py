"""Memory at every layout: what each rank holds, what building the model costs, what activation checkpointing saves.

    python benchmarks/memory.py                      # all three parts (about 3 minutes on 2 CPU cores)
    python benchmarks/memory.py --quick              # small sizes: a smoke test of the script, not a measurement

1. Model state per rank (parameters + gradients + AdamW state, the local bytes each rank holds after a step)
   and peak RSS, at 1 process, DDP 2, FSDP 2, TP 2, FSDP 4, HSDP 2 x 2 and 2 x 2 (dp_shard x tp), for a
   model of blocks (Linear d->4d, Linear 4d->d). Target: a rank holds <= 1.1 x total / (dp_shard x tp).
2. Building a ~400 MB model on 4 processes (dp_shard 4): each rank's peak RSS growth from before the model
   exists (the process group and torch's distributed modules already loaded) until the first step,
   with ``configure_model`` (parameters on the meta device, only each rank's shards materialised) and with
   the model built in ``__init__`` on every rank, then sharded. Target: <= 0.5 x the model with meta init.
3. Activation checkpointing on one process, 12 blocks: peak RSS growth over one training step (activations
   and gradients) and the step time, with and without. Target: <= 0.5 x the memory without.

Every multi-process part runs under ``accelerate launch --config_file launch/cpu_ddp.yaml --num_processes N``
(CPU processes over gloo); each measurement in a fresh set of processes, so peak RSS is the run's own.
Results: ``benchmarks/memory_results.md`` (``--out``), and the README's "When the model does not fit".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the model (imported lazily: workers only)


def make_module(dim: int, blocks: int, meta: bool, tp: bool) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from framework import LoopModule

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(F.gelu(self.up(x)))

    class Net(LoopModule):
        def __init__(self) -> None:
            super().__init__()
            if not meta:
                self.configure_layers()

        def configure_layers(self) -> None:
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = b(x)
            return x

        def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(outputs, targets)

        def fsdp_blocks(self) -> list[nn.Module]:
            return list(self.blocks)

        def tp_plan(self) -> dict[str, str] | None:
            return {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"} if tp else None

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    if meta:
        Net.configure_model = Net.configure_layers  # type: ignore[method-assign,assignment]
    return Net()


def local_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


# ---------------------------------------------------------------- workers (one launch each)


def worker(kind: str, spec: dict[str, Any], out: Path) -> None:
    import torch

    from framework import Callback, Engine

    torch.manual_seed(0)
    dim, blocks, tokens = spec["dim"], spec["blocks"], spec["tokens"]
    if "WORLD_SIZE" in os.environ:  # (the process group and torch's distributed modules are not the model's cost)
        import torch.distributed.fsdp
        import torch.distributed.tensor.parallel

        torch.distributed.init_process_group("gloo")  # (the engine adopts it)
    baseline = rss_mib()
    module = make_module(dim, blocks, meta=spec.get("meta", True), tp=spec.get("tp_size", 1) > 1)
    result: dict[str, Any] = {}

    class Measure(Callback):
        def on_fit_start(self, engine, module):  # (the model is built, laid out and materialised)
            result["init_growth_mib"] = rss_mib() - baseline
            result["t_start"] = time.perf_counter()
            result["rss_at_start"] = rss_mib()

        def on_step_end(self, engine, module, metrics):
            if engine.step == 1:
                result["t_first"] = time.perf_counter()
            if engine.step == engine.max_steps:
                params = list(module.parameters())
                opt = engine._fit.optimizers.first.optimizer
                state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
                result["params_mib"] = local_bytes(params) / MIB
                result["grads_mib"] = local_bytes(p.grad for p in params) / MIB
                result["optimizer_mib"] = local_bytes(state) / MIB
                result["step_s"] = (time.perf_counter() - result["t_first"]) / max(engine.step - 1, 1)
                result["peak_rss_mib"] = rss_mib()
                result["step_growth_mib"] = rss_mib() - result["rss_at_start"]
                result["strategy"] = engine._fit.strategy.name

    x = torch.randn(tokens, dim)
    sizes = {k: spec[k] for k in ("dp_replicate_size", "dp_shard_size", "tp_size") if k in spec}
    engine = Engine(
        max_steps=spec.get("steps", 3), batch_size=tokens, progress=False, doctor="off", callbacks=[Measure()],
        activation_checkpointing=spec.get("ac", False), **sizes,
    )  # fmt: skip
    engine.fit(module, (x, x))
    if engine.is_main:
        out.write_text(json.dumps(result))


def launch(kind: str, spec: dict[str, Any], procs: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec), "--result", str(out)]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        config = str(ROOT / "launch" / "cpu_ddp.yaml")
        cmd = [accelerate, "launch", "--config_file", config, "--num_processes", str(procs), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- the report


LAYOUTS = [
    ("1 process", 1, {}),
    ("DDP 2", 2, {"dp_replicate_size": 2}),
    ("FSDP 2", 2, {"dp_shard_size": 2}),
    ("TP 2", 2, {"tp_size": 2}),
    ("FSDP 4", 4, {"dp_shard_size": 4}),
    ("HSDP 2 x 2", 4, {"dp_replicate_size": 2, "dp_shard_size": 2}),
    ("2 x 2 (dp_shard x tp)", 4, {"dp_shard_size": 2, "tp_size": 2}),
]


def state_table(tmp: Path, quick: bool) -> tuple[list[str], list[tuple[str, float, float]]]:
    model = {"dim": 128 if quick else 512, "blocks": 2 if quick else 8, "tokens": 64, "steps": 3}
    rows, checks, total = [], [], None
    for name, procs, sizes in LAYOUTS:
        r = launch("state", {**model, **sizes}, procs, tmp / "state.json")
        held = r["params_mib"] + r["grads_mib"] + r["optimizer_mib"]
        total = total or held
        split = sizes.get("dp_shard_size", 1) * sizes.get("tp_size", 1)
        ratio = held / (total / split)
        rows.append(
            f"| {name} | {r['strategy']} | {r['params_mib']:.1f} | {r['grads_mib']:.1f} | {r['optimizer_mib']:.1f} | "
            f"{held:.1f} | {held / total:.3f}x | {r['peak_rss_mib']:.0f} | {r['step_s'] * 1e3:.0f} |"
        )
        if split > 1:
            checks.append((f"{name}: per-rank model state <= 1.10x total / {split}", ratio, 1.1))
    head = [
        f"### 1. Model state per rank ({model['blocks']} blocks, d={model['dim']}, AdamW)",
        "",
        "| layout | strategy | params MiB | grads MiB | AdamW MiB | state MiB | vs 1 process | peak RSS MiB | ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return [*head, *rows, ""], checks


def init_table(tmp: Path, quick: bool) -> tuple[list[str], list[tuple[str, float, float]]]:
    dim, blocks = (256, 2) if quick else (1024, 12)  # full: 12 x 2 x (1024 x 4096) = 100.7M params, 403 MB
    model_mib = blocks * 2 * (dim * 4 * dim + dim) * 4 / MIB  # (+ biases; fp32)
    spec = {"dim": dim, "blocks": blocks, "tokens": 16, "steps": 2, "dp_shard_size": 4}
    meta = launch("init", {**spec, "meta": True}, 4, tmp / "init-meta.json")
    full = launch("init", {**spec, "meta": False}, 4, tmp / "init-full.json")
    lines = [
        f"### 2. Building a {model_mib:.0f} MiB model on 4 processes (dp_shard 4): peak RSS growth per rank until the first step",
        "",
        "| how the model is built | growth (MiB, rank 0) | vs the model |",
        "|---|---|---|",
        f"| configure_model (meta device, shards materialised) | {meta['init_growth_mib']:.0f} | {meta['init_growth_mib'] / model_mib:.2f}x |",
        f"| __init__ on every rank, then sharded | {full['init_growth_mib']:.0f} | {full['init_growth_mib'] / model_mib:.2f}x |",
        "",
    ]
    return lines, [("init growth with meta-device init <= 0.50x the model", meta["init_growth_mib"] / model_mib, 0.5)]


def ac_table(tmp: Path, quick: bool) -> tuple[list[str], list[tuple[str, float, float]]]:
    spec = {"dim": 64 if quick else 256, "blocks": 12, "tokens": 1024 if quick else 8192, "steps": 3}
    off = launch("ac", {**spec, "ac": False}, 1, tmp / "ac-off.json")
    on = launch("ac", {**spec, "ac": True}, 1, tmp / "ac-on.json")
    ratio = on["step_growth_mib"] / off["step_growth_mib"]
    lines = [
        f"### 3. Activation checkpointing, one process, 12 blocks (d={spec['dim']}, {spec['tokens']} tokens a step)",
        "",
        "| | peak RSS growth over training (MiB) | ms/step |",
        "|---|---|---|",
        f"| without | {off['step_growth_mib']:.0f} | {off['step_s'] * 1e3:.0f} |",
        f"| activation_checkpointing=True | {on['step_growth_mib']:.0f} | {on['step_s'] * 1e3:.0f} |",
        f"| ratio | {ratio:.2f}x | {on['step_s'] / off['step_s']:.2f}x |",
        "",
    ]
    return lines, [("activation memory with checkpointing <= 0.50x without", ratio, 0.5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "memory_results.md"), help="'' = don't write")
    p.add_argument("--only", default="state,init,ac", help="comma-separated parts")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.spec), Path(args.result))
        return
    import tempfile

    lines = [
        "# Memory benchmark",
        "",
        f"Produced by `python benchmarks/memory.py{' --quick' if args.quick else ''}` on {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d')}; CPU processes over gloo, fp32.",
        "",
    ]
    checks: list[tuple[str, float, float]] = []
    parts = {"state": state_table, "init": init_table, "ac": ac_table}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.only.split(","):
            table, more = parts[part](Path(tmp), args.quick)
            lines += table
            checks += more
            print("\n".join(table), flush=True)
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {v:.2f}x | {'yes' if v <= limit else 'no'} |" for t, v, limit in checks]
    print("\n".join(lines[-len(checks) - 4 :]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
