"""How exact is recipes/hf_causal_lm.py under accumulation and 2 processes, and what AdamW's eps does to it.

    python benchmarks/hf_exactness.py                        # final weights after 100 steps (README's first table)
    python benchmarks/hf_exactness.py --growth --steps 60    # the difference step by step, with controls (second table)

For each AdamW eps (1e-8, the default, and 1e-6) it trains the recipe's model three ways on the same
global batches of 32 sequences: one forward per batch (the reference), 4 accumulated micro-batches
of 8 in one process, and 2 processes x 2 micro-batches of 8 (``accelerate launch`` with
launch/cpu_ddp.yaml). It prints the max absolute parameter difference to the reference, the
tensor where it sits and, for an embedding row, how often that token occurs in the training data.
(tests/recipes/test_hf_causal_lm.py shows that the naive scaling, every micro-batch weighted the
same, lands far outside these differences.)

``--growth`` follows the difference between 4 micro-batches of 8 and one forward of 32 step by step
(one process, in-process engine runs), next to two controls: the same split with only the padding
changed (``pad_to_multiple_of=128``: the same arithmetic on other tensor shapes), and both runs in
float64. Rounding differences that the training dynamics amplify show up in the first control
too; a scaling error would not shrink in float64.

Why eps matters: AdamW's update is ``lr * m / (sqrt(v) + eps)``. For a parameter whose gradients
are tiny (the embedding row of a rare token, which gets gradient only through the tied output
layer's softmax), ``sqrt(v)`` is comparable to eps, and the update is close to ``lr * g / eps``:
a rounding difference of relative size 1e-7 in ``g`` (summing the same tokens in another order)
becomes an absolute difference of about ``lr * 1e-7 * g / eps`` per step, large when ``g`` is not
negligible against eps, instead of the ``lr * 1e-7`` of a normalised update. A larger eps damps it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework.checkpoint.weights import full_weights  # noqa: E402

RECIPE = ROOT / "recipes" / "hf_causal_lm.py"


def _recipe():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("recipe_hf_causal_lm", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_hf_causal_lm"] = module
    spec.loader.exec_module(module)
    return module


def where(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The max |a - b| over every tensor, and where it is (tensor name, and row for a matrix)."""
    best, at = -1.0, ""
    for name in a:
        d = (a[name].double() - b[name].double()).abs()
        value = d.max().item()
        if value > best:
            idx = int(d.argmax())
            row = idx // d.shape[-1] if d.dim() == 2 else None
            best, at = value, name + (f"[row {row}]" if row is not None else "")
    return best, at


GROWTH_AT = (1, 2, 5, 10, 20, 40, 60, 100, 200)


def growth(hf, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Max |parameter difference| to one forward per batch, after each step in GROWTH_AT."""
    from transformers import DataCollatorForLanguageModeling

    from framework import Callback, Engine

    class Snapshots(Callback):
        def __init__(self) -> None:
            self.at: dict[int, dict[str, torch.Tensor]] = {}

        def on_step_end(self, engine, module, metrics):  # type: ignore[no-untyped-def]
            if engine.step in GROWTH_AT:
                self.at[engine.step] = {k: v.detach().double().clone() for k, v in module.state_dict().items()}

    cfg = hf.Config(max_steps=steps)
    tokenizer, train, _ = hf.make_data(cfg)

    def run(micro: int, dtype: torch.dtype = torch.float32, pad: int | None = None, eps: float = 1e-8):  # type: ignore[no-untyped-def]
        cfg.adam_eps = eps
        torch.manual_seed(cfg.seed)
        module = hf.CausalLM(cfg, tokenizer).to(dtype)
        snaps = Snapshots()
        collate = DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=pad)
        Engine(
            max_steps=steps, batch_size=32, micro_batch_size=micro, seed=cfg.seed, progress=False,
            callbacks=[snaps], collate_fn=collate,
        ).fit(module, train)  # fmt: skip
        return snaps.at

    def row(label: str, a, b) -> None:  # type: ignore[no-untyped-def]
        cells = []
        for step in sorted(a):
            value, name = max(((a[step][k] - b[step][k]).abs().max().item(), k) for k in a[step])
            cells.append(f"{value:.2g}" + (f" ({name.replace('lm.model.', '')})" if step == 1 else ""))
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    print("| run (vs one forward of 32, same settings) | after step " + " | ".join(
        str(s) for s in GROWTH_AT if s <= steps) + " |")  # fmt: skip
    reference = run(32)
    row("4 micro-batches of 8, fp32, eps 1e-8", run(8), reference)
    row("control: one forward of 32, padded to 128 (same arithmetic, other shapes)", run(32, pad=128), reference)
    reference = run(32, eps=1e-6)
    row("4 micro-batches of 8, fp32, eps 1e-6", run(8, eps=1e-6), reference)
    reference = run(32, torch.float64)
    row("4 micro-batches of 8, float64, eps 1e-8", run(8, torch.float64), reference)
    print(f"({steps} steps; warmup_cosine over {steps} steps; torch threads 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process runs")
    parser.add_argument("--growth", action="store_true", help="the difference after each step, with controls")
    args = parser.parse_args()
    hf = _recipe()
    if args.growth:
        torch.set_num_threads(1)
        growth(hf, args.steps)
        return
    common = ["--progress", "false", "--sample-tokens", "0", "--max-time", "none", "--max-steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    torch.set_num_threads(1)  # as each launched process has
    tmp = Path(tempfile.mkdtemp(prefix="hf_exactness_"))
    cfg = hf.parse_config(hf.Config, [])
    _, train, _ = hf.make_data(cfg)
    counts = torch.bincount(torch.tensor([i for s in train for i in s["input_ids"]]), minlength=cfg.vocab_size)
    rows = []
    for eps in ("1e-8", "1e-6"):
        runs = {}
        for name, extra in (("reference", []), ("accumulation", ["--micro-batch-size", "8"])):
            run_dir = tmp / f"{name}-{eps}"
            hf.main([*common, "--adam-eps", eps, "--run-dir", str(run_dir), *extra])
            runs[name] = full_weights(run_dir)
        if not args.no_ddp:
            run_dir = tmp / f"ddp-{eps}"
            cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
            cmd += [str(ROOT / "launch/cpu_ddp.yaml"), str(RECIPE), *common, "--adam-eps", eps]
            cmd += ["--run-dir", str(run_dir), "--micro-batch-size", "8"]
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            runs["2 processes"] = full_weights(run_dir)
        for name in runs:
            if name == "reference":
                continue
            diff, at = where(runs[name], runs["reference"])
            note = ""
            if "embed_tokens" in at or "lm_head" in at:
                token = int(at.split("[row ")[1].rstrip("]"))
                note = f" (token {token}: {int(counts[token])} of {int(counts.sum())} training tokens)"
            rows.append(f"| {name} vs reference | eps={eps} | {diff:.2g} | {at}{note} |")
            print(rows[-1], flush=True)
    print("\n| comparison | AdamW eps | max abs parameter difference | where |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n({args.steps} steps, batch 32, default model; runs in {tmp})")


if __name__ == "__main__":
    main()
