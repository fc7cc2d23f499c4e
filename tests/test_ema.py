"""framework/optim.py (EMA) and Engine(ema_decay=...): the moving average of the parameters, kept exactly."""

from __future__ import annotations

import pytest
import torch

import framework
from framework import Engine

from .helpers import TinyClassifier, classification_data

DECAY = 0.9


def hand_ema(steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor], TinyClassifier]:
    """The same run written by hand: ema = decay * ema + (1 - decay) * param after each step."""
    x, y = classification_data(160)
    torch.manual_seed(0)
    module = TinyClassifier()
    ema = [p.detach().clone() for p in module.parameters()]
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    torch.manual_seed(0)  # (the engine seeds at fit start; the module has no dropout)
    for s in range(steps):
        i = torch.arange(s * 32, (s + 1) * 32) % 160
        opt.zero_grad()
        module.compute_loss(module(x[i]), y[i]).backward()
        opt.step()
        for e, p in zip(ema, module.parameters(), strict=True):
            e.mul_(DECAY).add_(p.detach(), alpha=1 - DECAY)
    return ema, [p.detach().clone() for p in module.parameters()], module


def test_the_engine_ema_equals_one_kept_by_hand(tmp_path):
    x, y = classification_data(160)
    torch.manual_seed(0)
    module = TinyClassifier()
    engine = Engine(max_steps=10, batch_size=32, shuffle=False, ema_decay=DECAY, progress=False, run_dir=str(tmp_path))
    engine.fit(module, (x, y))
    ema, params, _ = hand_ema(10)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), params, strict=True))
    assert engine._fit is not None and engine._fit.ema is not None
    got = engine._fit.ema.shadow
    assert max(float((a - b).abs().max()) for a, b in zip(got, ema, strict=True)) <= 1e-6
    # The EMA is not the parameters (the check can fail), and load_weights(ema=True) reads it back.
    assert max(float((a - b).abs().max()) for a, b in zip(got, params, strict=True)) > 1e-4
    loaded = framework.load_weights(TinyClassifier(), tmp_path, ema=True)
    assert all(torch.equal(p, e) for p, e in zip(loaded.parameters(), got, strict=True))


def test_validation_reports_the_ema_weights_and_leaves_the_trained_ones_in_place():
    x, y = classification_data(160)
    torch.manual_seed(0)
    module = TinyClassifier()
    engine = Engine(max_steps=10, batch_size=32, shuffle=False, ema_decay=DECAY, progress=False)
    engine.fit(module, (x, y), (x[:64], y[:64]))
    trained = [p.detach().clone() for p in module.parameters()]
    with_ema = engine.validate(module, (x[:64], y[:64]))
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), trained, strict=True))
    averaged = TinyClassifier()
    with torch.no_grad():
        for p, e in zip(averaged.parameters(), engine._fit.ema.shadow, strict=True):
            p.copy_(e)
    plain = Engine(batch_size=32, progress=False)
    assert with_ema["loss"] == pytest.approx(plain.validate(averaged, (x[:64], y[:64]))["loss"], abs=1e-7)
    assert abs(with_ema["loss"] - plain.validate(module, (x[:64], y[:64]))["loss"]) > 1e-6


def test_a_resumed_run_ends_with_the_same_ema_bitwise(tmp_path):
    x, y = classification_data(160)

    def run(run_dir, steps, resume=None):
        torch.manual_seed(0)
        module = TinyClassifier()
        engine = Engine(
            max_steps=steps, batch_size=32, ema_decay=DECAY, progress=False, run_dir=str(run_dir),
            checkpoint_every_n_steps=3, resume=resume,
        )  # fmt: skip
        engine.fit(module, (x, y))
        return [t.clone() for t in engine._fit.ema.shadow], [p.detach().clone() for p in module.parameters()]

    straight = run(tmp_path / "a", 9)
    run(tmp_path / "b", 5)  # stops after step 5 (a checkpoint at 3 and a final one at 5)
    resumed = run(tmp_path / "b", 9, resume="auto")
    assert all(torch.equal(a, b) for a, b in zip(straight[0] + straight[1], resumed[0] + resumed[1], strict=True))


def test_load_weights_ema_of_a_run_without_ema_names_the_fix(tmp_path):
    x, y = classification_data(64)
    Engine(max_steps=2, batch_size=32, progress=False, run_dir=str(tmp_path)).fit(TinyClassifier(), (x, y))
    with pytest.raises(framework.CheckpointError, match=r"no EMA.*ema_decay"):
        framework.load_weights(TinyClassifier(), tmp_path, ema=True)
