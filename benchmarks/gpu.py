"""GPU throughput: the Engine against a hand-written Accelerate loop, in bf16 (issue 9's GPU target:
>= 0.98x the hand-written loop's tokens/s). Not a CI test: run it where a CUDA GPU is present.

    .venv/bin/python benchmarks/gpu.py                   # writes benchmarks/gpu_results.md
    .venv/bin/python benchmarks/gpu.py --quick           # a smoke run
    .venv/bin/python benchmarks/gpu.py --quick --allow-cpu --out ''   # check the script itself on a CPU

Workloads, both with AdamW(fused=True) for every loop and bf16 autocast:

- the medium MLP 784-1024-1024-10, batch 256 (items/s);
- a small GPT: the adder recipe's decoder-only transformer scaled up (8 layers, d_model 512,
  8 heads), batch 256 problems of 14 tokens (tokens/s).

Each table also gives TFLOP/s and MFU: the model FLOPs of one step as the Engine counts them (``FlopCounterMode``
over its first step) over each loop's time per step, against the GPU's dense bf16 peak
(``framework.observability.throughput.PEAK_TFLOPS``).

Loops: the hand-written Accelerate loop (``Accelerator(mixed_precision="bf16")``, ``prepare``,
``accelerator.backward``, as in Accelerate's examples); the Engine with defaults (the NaN guard
reads its verdict a step late with the fused optimizer: ``nan_check="auto"``); the Engine
barebones; and the Engine barebones with ``nan_check="step"``, which prices the per-step sync
that a non-fused optimizer would cost. Marginal time per step, (T(N2) - T(N1)) / (N2 - N1), with
``torch.cuda.synchronize()`` before each clock read, loops interleaved, median of the repetitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overhead import accelerate_steps, interleaved, new_accelerator  # noqa: E402  (benchmarks/overhead.py)

from framework import Engine, LoopModule  # noqa: E402
from framework.observability.throughput import Throughput, device_peak_tflops  # noqa: E402
from framework.optim import fused_on_gpu  # noqa: E402


def load_adder() -> Any:
    spec = importlib.util.spec_from_file_location("recipe_adder", ROOT / "recipes" / "adder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_adder"] = module  # (its dataclasses resolve annotations through sys.modules)
    spec.loader.exec_module(module)
    return module


def fused_adamw(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=1e-4, fused=fused_on_gpu(module.parameters()))


class MLP(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return fused_adamw(self)


def workloads(quick: bool) -> dict[str, tuple[Callable[[], LoopModule], tuple[torch.Tensor, ...], int, int]]:
    """name -> (model factory, data tensors, batch size, tokens per item)."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, tuple[Callable[[], LoopModule], tuple[torch.Tensor, ...], int, int]] = {}
    # A CPU check of the script (--quick --allow-cpu) runs batches of 32: bf16 matmuls on a CPU without
    # bf16 units take about a second per step of 256.
    batch = 32 if quick and not torch.cuda.is_available() else 256
    n = batch * (8 if quick else 64)
    out[f"medium MLP 784-1024-1024-10, batch {batch}"] = (
        MLP,
        (torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch,
        1,
    )
    adder = load_adder()
    layers, width = (2, 128) if quick else (8, 512)
    cfg = adder.Config(n_layer=layers, d_model=width, n_head=8, train_size=n, val_size=256, digit_positions=True)

    class GPT(adder.Adder):  # type: ignore[misc,name-defined]
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return fused_adamw(self)

    train, _ = adder.make_data(cfg)
    out[f"GPT {layers} layers x {width} (the adder's, scaled up), batch {batch}"] = (
        lambda: GPT(cfg),
        train,
        batch,
        train[0].shape[1],
    )
    return out


def run_accelerate(factory: Callable[[], LoopModule], data: tuple[torch.Tensor, ...], batch: int, n: int) -> None:
    """The loop from Accelerate's examples, with the module's own loss and optimizer."""
    accelerator = new_accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    module = factory().to(accelerator.device)
    loader = DataLoader(TensorDataset(*data), batch_size=batch, shuffle=True, drop_last=True)
    accelerate_steps(accelerator, module, module.configure_optimizers(), loader, module.compute_loss, n)


def run_engine(
    factory: Callable[[], LoopModule], data: tuple[torch.Tensor, ...], batch: int, n: int, **kw: Any
) -> None:
    torch.manual_seed(0)
    Engine(max_steps=n, batch_size=batch, seed=0, mixed_precision="bf16", **kw).fit(factory(), data)


def flops_per_step(factory: Callable[[], LoopModule], data: tuple[torch.Tensor, ...], batch: int) -> int | None:
    """The model FLOPs of one optimizer step, as the Engine counts them (FlopCounterMode over its first step)."""
    engine = Engine(max_steps=1, batch_size=batch, seed=0, mixed_precision="bf16", progress=False, doctor="off")
    engine.fit(factory(), data)
    return next(s for s in engine.events.subscribers if isinstance(s, Throughput)).flops_per_step


def loops_for(
    factory: Callable[[], LoopModule], data: tuple[torch.Tensor, ...], batch: int
) -> dict[str, Callable[[int], None]]:
    barebones = dict(progress=False, doctor="off", log_every_n_steps=10**9)
    return {
        "hand-written Accelerate loop": partial(run_accelerate, factory, data, batch),
        "Engine, defaults (nan_check=auto: deferred on a GPU)": partial(run_engine, factory, data, batch),
        "Engine, barebones": partial(run_engine, factory, data, batch, **barebones),
        'Engine, barebones, nan_check="step" (a sync per step)': partial(
            run_engine, factory, data, batch, nan_check="step", **barebones
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small models, short runs: a smoke test")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to check the script only)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results.md"), help="'' = don't write")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (--allow-cpu runs it on CPU to check the script only)")
    n1, n2 = (3, 8) if args.quick else (20, 120)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (script check only)"
    lines = [
        "# GPU throughput",
        "",
        f"Produced by `python benchmarks/gpu.py {' '.join(sys.argv[1:])}` on {device}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. bf16, AdamW(fused=True) in every loop; marginal time per step, "
        f"N1={n1}, N2={n2}, median of {args.reps} interleaved repetitions.",
        "",
    ]
    # MFU: the model FLOPs per step (counted by the engine) over each loop's time per step, against the device's
    # dense bf16 peak (framework.observability.throughput.PEAK_TFLOPS; none on a CPU or an unlisted GPU).
    peak = device_peak_tflops(torch.device("cuda"), "bf16") if torch.cuda.is_available() else None
    if peak:
        lines += [f"MFU against a dense bf16 peak of {peak:g} TFLOP/s.", ""]
    for name, (factory, data, batch, tokens) in workloads(args.quick).items():
        flops = flops_per_step(factory, data, batch)
        per_step = interleaved(loops_for(factory, data, batch), n1, n2, args.reps, warmup=2)
        base = statistics.median(per_step["hand-written Accelerate loop"])
        first = len(lines)
        lines += [
            f"### {name}",
            "",
            f"Model FLOPs per step: {flops / 1e9:.2f} GFLOP (forward + backward)." if flops else "FLOPs: not counted.",
            "",
            "| loop | ms/step | tokens/s | vs Accelerate loop | TFLOP/s | MFU |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in per_step.items():
            med = statistics.median(v)
            tflops = flops / med / 1e12 if flops else None
            shown = (f"{tflops:.3g}", f"{tflops / peak:.1%}" if peak else "–") if tflops is not None else ("–", "–")
            lines.append(
                f"| {k} | {med * 1e3:.2f} | {batch * tokens / med:,.0f} | {base / med:.3f}x | {' | '.join(shown)} |"
            )
        lines.append("")
        print("\n".join(lines[first:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
