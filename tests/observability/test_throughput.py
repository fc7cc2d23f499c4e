"""Throughput, MFU and memory on log steps (framework/observability/throughput.py, flops.py): the keys on log
steps only, the model's FLOPs against the analytic count of an MLP (one process here, accumulation too; two
processes and the layouts in tests/observability/test_ddp.py), counting refused where it cannot be trusted,
and observation that never steers (bitwise)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import Callback, Engine, LoopModule
from framework.events import Event
from framework.observability.flops import StepFlops
from framework.observability.throughput import Throughput, known_peak_tflops
from tests.helpers import classification_data

COST_KEYS = {"train/step_time", "train/tflops", "train/mfu", "train/memory_mb"}


class MLP(LoopModule):
    """A dense MLP over ``sizes``; its input needs no gradient."""

    def __init__(self, sizes: tuple[int, ...] = (8, 64, 32, 3), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def analytic_flops(sizes: tuple[int, ...], items: int) -> int:
    """Per item: 2*in*out for each Linear's forward, 4*in*out for its backward (input and weight gradients),
    2*in*out for the first one's, whose input needs no gradient."""
    layers = list(itertools.pairwise(sizes))
    return items * sum((2 + (2 if i == 0 else 4)) * a * b for i, (a, b) in enumerate(layers))


def throughput_of(engine: Engine) -> Throughput:
    return next(s for s in engine.events.subscribers if isinstance(s, Throughput))


class Records(Callback):
    """Every step's metrics, as on_step_end sees them (the train record on log steps, else empty)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_step_end(self, engine, module, metrics):
        self.by_step[engine.step] = dict(metrics)


def fit(module: LoopModule, n: int = 96, **kw: Any) -> Engine:
    x, y = classification_data(n)
    options: dict[str, Any] = dict(max_epochs=1, batch_size=32, progress=False, seed=0)
    options.update(kw)
    engine = Engine(**options)
    engine.fit(module, (x, y), (x[:32], y[:32]) if "val_every_n_steps" in kw else None)
    return engine


# ---------------------------------------------------------------- the keys


def test_the_cost_keys_are_on_log_steps_only_with_their_meaning(tmp_path):
    records = Records()
    engine = fit(
        MLP(), n=224, log_every_n_steps=3, peak_tflops=2.0, run_dir=str(tmp_path), callbacks=[records],
        val_every_n_steps=2,
    )  # fmt: skip
    assert sorted(records.by_step) == list(range(1, 8))
    for step, metrics in records.by_step.items():
        assert (set(metrics) >= COST_KEYS) == (step % 3 == 0), (step, metrics)
        assert not (COST_KEYS & set(metrics)) or step % 3 == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    assert all(set(r) >= COST_KEYS for r in train)
    assert not any(COST_KEYS & set(r) for r in lines if "train/loss" not in r)  # (validation, epoch records)
    for r in train:
        assert 0 < r["train/step_time"] < 60
        flops = throughput_of(engine).flops_per_step
        assert r["train/tflops"] == pytest.approx(flops / r["train/step_time"] / 1e12)
        assert r["train/mfu"] == pytest.approx(r["train/tflops"] / 2.0)
        assert r["train/memory_mb"] > 10  # (CPU: this process's peak resident set)


def test_without_a_known_peak_there_is_no_mfu_and_throughput_off_adds_no_key():
    engine = fit(MLP(), log_every_n_steps=1)  # (a CPU: no table entry)
    assert {"train/step_time", "train/tflops", "train/memory_mb"} <= set(engine.metrics)
    assert "train/mfu" not in engine.metrics
    off = fit(MLP(), log_every_n_steps=1, throughput=False)
    assert not COST_KEYS & set(off.metrics) and "train/loss" in off.metrics
    assert not any(isinstance(s, Throughput) for s in off.events.subscribers)


def test_the_progress_line_shows_items_per_second_and_mfu_where_known(capsys):
    fit(MLP(), log_every_n_steps=1, progress=True, peak_tflops=1.0)
    err = capsys.readouterr().err
    step_lines = [line for line in err.splitlines() if line.startswith("epoch 0 step") and "loss=" in line]
    assert len(step_lines) == 3 and all("items/s=" in line and " mfu=" in line for line in step_lines)
    assert all(line.endswith("%") for line in step_lines)  # (mfu=0.00265%: a share of the peak)


def test_the_gpu_table_reads_device_names_and_precision():
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=True) == 989.5
    assert known_peak_tflops("NVIDIA H100 PCIe", "bf16", tf32=True) == 756.5
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB", "no", tf32=True) == 156.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB", "no", tf32=False) == 19.5
    assert known_peak_tflops("NVIDIA A10G", "bf16", tf32=False) is None  # (not the A10)
    assert known_peak_tflops("NVIDIA GeForce RTX 3090", "bf16", tf32=False) is None


# ---------------------------------------------------------------- the count


@pytest.mark.parametrize("micro", [None, 8], ids=["one-micro-batch", "accumulation-4x8"])
def test_flops_of_an_mlp_per_optimizer_step_match_the_analytic_count(micro):
    sizes = (8, 64, 32, 3)
    engine = fit(MLP(sizes), micro_batch_size=micro, log_every_n_steps=1)
    counted = throughput_of(engine).flops_per_step
    expected = analytic_flops(sizes, 32)  # per optimizer step: the window's 32 items, however they are split
    assert counted == pytest.approx(expected, rel=0.10)
    # The record says the same: TFLOP/s x seconds per step = FLOPs per step.
    assert engine.metrics["train/tflops"] * engine.metrics["train/step_time"] * 1e12 == pytest.approx(counted)


def test_the_doctors_probe_forwards_and_the_optimizer_are_not_counted():
    sizes = (8, 64, 32, 3)
    off = throughput_of(fit(MLP(sizes), doctor="off")).flops_per_step
    full = throughput_of(fit(MLP(sizes), doctor="full")).flops_per_step  # (three probe forwards at step 1)
    assert off == full == analytic_flops(sizes, 32)


def test_once_the_first_step_is_counted_nothing_listens_to_the_micro_batch_events():
    # The count needs the forward/loss/backward events on the first step only; later steps, and a barebones
    # engine (doctor off, no trace, no callbacks), emit them to nobody.
    engine = fit(MLP((8, 64, 32, 3)), doctor="off", log_every_n_steps=1)
    assert throughput_of(engine).flops_per_step == analytic_flops((8, 64, 32, 3), 32)
    per_micro = (Event.FORWARD, Event.AFTER_FORWARD, Event.LOSS, Event.AFTER_LOSS, Event.BACKWARD)
    assert [event for event in per_micro if engine.events.wants(event)] == []

    class Raises(MLP):
        def compute_loss(self, outputs, targets):
            raise RuntimeError("a bug in the user's loss")

    broken = Engine(max_steps=2, batch_size=32, progress=False, doctor="off")
    with pytest.raises(RuntimeError, match="a bug in the user's loss"):
        broken.fit(Raises((8, 64, 32, 3)), classification_data(64))
    assert [event for event in per_micro if broken.events.wants(event)] == []  # the count ended with the fit


class GradientPenalty(MLP):
    """A loss that runs the network on a leaf and takes the gradient with respect to it, as the GAN recipe's
    R1 penalty does with its discriminator."""

    def forward(self, inputs):
        return inputs, self.net(inputs)

    def compute_loss(self, outputs, targets):
        inputs, logits = outputs
        leaf = inputs.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(self.net(leaf).sum(), leaf, create_graph=True)
        return F.cross_entropy(logits, targets) + slope.square().mean()


def test_a_loss_that_takes_the_gradient_of_a_leaf_trains_and_is_counted():
    sizes = (8, 64, 32, 3)
    engine = fit(GradientPenalty(sizes), log_every_n_steps=1)
    # More than the plain MLP's count (the penalty's gradient and its backward are the model's work too).
    assert throughput_of(engine).flops_per_step > analytic_flops(sizes, 32)


def test_attention_on_cpu_is_counted_with_pytorchs_sdpa_formula():
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    flops = StepFlops()
    flops.start()
    F.scaled_dot_product_attention(q, q, q).sum().backward()
    flops.stop()
    assert not flops.unknown
    # torch.utils.flop_counter's SDPA formulas: forward QK^T and PV, two products of 2*b*h*s*s*d FLOPs; backward
    # five (the scores recomputed, then the gradients of V, the scores' input, Q and K).
    b, h, s, d = q.shape
    assert flops.total == (2 + 5) * 2 * b * h * s * s * d


def test_a_compiled_model_is_not_counted_and_says_so_once(capsys):
    module = MLP()
    module.net = torch.compile(module.net, backend="eager")  # type: ignore[assignment]  # (no C++ compiler needed)
    engine = fit(module, log_every_n_steps=1)
    assert "train/step_time" in engine.metrics and "train/memory_mb" in engine.metrics
    assert "train/tflops" not in engine.metrics and "train/mfu" not in engine.metrics
    err = capsys.readouterr().err
    assert err.count("the model is compiled") == 1 and "train/tflops and train/mfu are left out" in err


class Blocks(MLP):
    def fsdp_blocks(self):
        return [self.net[0], self.net[3]]


def test_under_activation_checkpointing_the_recomputed_forwards_are_not_taken_for_model_flops(capsys):
    engine = fit(Blocks(), log_every_n_steps=1, activation_checkpointing=True)
    assert "train/tflops" not in engine.metrics and "train/step_time" in engine.metrics
    assert capsys.readouterr().err.count("activation checkpointing recomputes") == 1


@torch.library.custom_op("framework_tests::fused_matmul", mutates_args=())
def fused_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


@fused_matmul.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    return grad @ b.t(), a.t() @ grad


fused_matmul.register_autograd(_backward, setup_context=_setup)


class LibraryKernel(MLP):
    """An MLP whose last layer runs a library's own kernel (a custom op without a FLOP formula)."""

    def forward(self, inputs):
        hidden = self.net[:-1](inputs)
        return fused_matmul(hidden, self.net[-1].weight.t()) + self.net[-1].bias


def test_an_op_without_a_formula_leaves_the_keys_out_and_names_it(capsys):
    engine = fit(LibraryKernel(), log_every_n_steps=1)
    assert throughput_of(engine).flops_per_step is None
    assert "train/tflops" not in engine.metrics and "train/step_time" in engine.metrics
    err = capsys.readouterr().err
    assert err.count("framework_tests.fused_matmul") == 1 and "register_flop_formula" in err


# ---------------------------------------------------------------- observation never steers


class Noisy(MLP):
    """Dropout (the RNG) and attention, so a changed stream or kernel would show."""

    def __init__(self) -> None:
        super().__init__((8, 32, 32, 3), dropout=0.3)

    def forward(self, inputs):
        h = self.net[:-1](inputs)
        q = h.view(h.shape[0], 4, 1, 8)
        h = h + F.scaled_dot_product_attention(q, q, q).reshape(h.shape)
        return self.net[-1](h)


def test_with_throughput_and_the_profiler_on_the_final_parameters_are_bitwise_those_of_a_run_without(tmp_path):
    def run(**kw: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        module = Noisy()
        fit(module, n=160, micro_batch_size=16, log_every_n_steps=2, val_every_n_steps=2, **kw)
        return module.state_dict(), torch.rand(4)  # (and the global RNG stream goes on alike)

    off, rng_off = run(throughput=False)
    on, rng_on = run(
        throughput=True, peak_tflops=1.0, profile_steps=(1, 4), profile_memory=True, run_dir=str(tmp_path),
        checkpoint_every_n_steps=2,
    )  # fmt: skip
    assert (tmp_path / "profile" / "rank0.trace.json").is_file()
    assert off.keys() == on.keys()
    assert all(torch.equal(off[k], on[k]) for k in off), [k for k in off if not torch.equal(off[k], on[k])]
    assert torch.equal(rng_off, rng_on)
