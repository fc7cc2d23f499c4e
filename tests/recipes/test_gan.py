"""recipes/gan.py: docstring, data, the quality measure, smoke runs in-process and under accelerate launch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.helpers import ROOT, launch
from tests.recipes import launch_commands, load_recipe

gan = load_recipe("gan")


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_docstring_begins_with_its_launch_commands():
    first = launch_commands(gan.__doc__)
    assert first[0].startswith("python recipes/gan.py")
    text = "\n".join(first)
    for cmd in (
        "accelerate launch --config_file launch/cpu.yaml recipes/gan.py",
        "accelerate launch --config_file launch/cpu_ddp.yaml recipes/gan.py",
        "--micro-batch-size",
        "--smoke",
    ):
        assert cmd in text


def test_ring_data_has_every_mode_at_its_spread():
    cfg = gan.Config()
    points = gan.ring_data(cfg, 8000)
    centers = gan.mode_centers(cfg)
    assert centers.shape == (8, 2) and torch.allclose(centers.norm(dim=1), torch.full((8,), cfg.radius))
    dist, mode = torch.cdist(points, centers).min(1)
    counts = torch.bincount(mode, minlength=8)
    assert counts.min() > 900 and counts.max() < 1100  # about 1000 each
    # A 2-D Gaussian's distance from its mean averages std * sqrt(pi / 2).
    assert dist.mean().item() == pytest.approx(cfg.std * math.sqrt(math.pi / 2), rel=0.05)
    assert torch.equal(points, gan.ring_data(cfg, 8000)), "a fixed set"


def test_quality_counts_modes_and_high_quality_points():
    cfg = gan.Config()
    centers = gan.mode_centers(cfg)
    g = torch.Generator().manual_seed(0)
    on_modes = centers.repeat(500, 1) + cfg.std * torch.randn(4000, 2, generator=g)
    q = gan.quality(on_modes, cfg)
    assert q["modes_covered"] == 8 and q["high_quality"] > 0.98  # within 3 std: 98.9% of a 2-D Gaussian
    assert q["min_mode_share"] > 0.12 and q["max_mode_share"] < 0.13
    collapsed = centers[3] + cfg.std * torch.randn(4000, 2, generator=g)  # every point on one mode
    q = gan.quality(collapsed, cfg)
    assert q["modes_covered"] == 1 and q["high_quality"] > 0.98 and q["max_mode_share"] > 0.98
    between = (centers + centers.roll(1, 0)) / 2  # halfway between neighbours: near no mode
    assert gan.quality(between.repeat(10, 1), cfg) == {
        "modes_covered": 0,
        "high_quality": 0.0,
        "min_mode_share": 0.0,
        "max_mode_share": 0.0,
    }
    # A mode counts only with at least min_mode_share of the points: 7 modes and a trace of the 8th.
    mostly = torch.cat([centers[:7].repeat(100, 1), centers[7:].repeat(3, 1)])
    assert gan.quality(mostly, cfg)["modes_covered"] == 7


def test_smoke_in_process(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = gan.main(["--smoke", "--run-dir", str(run_dir), "--progress", "false"])
    out = capsys.readouterr().out
    assert "gan: modes_covered=" in out and "high_quality=" in out
    assert str(run_dir) in out and "metrics.jsonl" in out  # it says where its outputs went
    assert 0 <= result["modes_covered"] <= 8 and 0.0 <= result["high_quality"] <= 1.0
    train = [r for r in _records(run_dir) if "train/loss/discriminator" in r]
    assert train and all({"train/loss/generator", "lr/discriminator", "lr/generator"} <= set(r) for r in train), (
        "both phases are logged"
    )
    assert train[-1]["lr/generator"] < train[0]["lr/generator"], "each phase's cosine schedule decays"
    saved = yaml.safe_load((run_dir / "recipe_config.yaml").read_text())
    assert saved["smoke"] is True and saved["ema_decay"] == 0.99
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["module"] == "GAN"
    assert (run_dir / "checkpoints" / "latest").is_file()


@pytest.mark.multiprocess
def test_smoke_under_accelerate_launch_on_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(ROOT / "recipes/gan.py", "--smoke", "--run-dir", str(run_dir), "--micro-batch-size", "64")
    assert proc.stdout.count("gan: modes_covered=") == 1, proc.stdout  # only rank 0 prints the summary
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["global_batch"], resolved["accumulation"]) == (2, 256, 2)
    assert any("train/loss/generator" in r for r in _records(run_dir))
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
