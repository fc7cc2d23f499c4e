"""framework/observability/plot.py: ``python -m framework plot RUN_DIR [RUN_DIR ...] [-o out.png]``."""

from __future__ import annotations

import json

import pytest
import torch

from framework import Engine
from framework.observability.plot import main, plot_runs, read_metrics
from tests.helpers import TinyClassifier, classification_data

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs that differ in their learning rate."""
    x, y = classification_data(200)
    dirs = []
    for name, lr in (("adam-3", 1e-3), ("adam-2", 1e-2)):

        class Module(TinyClassifier):
            def configure_optimizers(self, lr=lr):  # bind this run's lr now
                return torch.optim.Adam(self.parameters(), lr=lr)

        run_dir = tmp_path_factory.mktemp("runs") / name
        torch.manual_seed(0)
        Engine(max_epochs=2, batch_size=32, log_every_n_steps=2, progress=False, run_dir=str(run_dir)).fit(
            Module(), (x, y), (x[:64], y[:64])
        )
        dirs.append(str(run_dir))
    return dirs


def test_plot_one_run_writes_a_png_into_the_run_dir(runs, capsys):
    assert main([runs[0]]) == 0
    out = f"{runs[0]}/curves.png"
    with open(out, "rb") as f:
        assert f.read(8) == PNG
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_two_runs_overlays_them(runs, tmp_path):
    out = tmp_path / "sub" / "compare.png"
    assert main([*runs, "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    fig = plot_runs(runs)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"loss", "acc", "lr", "train/grad_norm", "train/step_time", "train/tflops", "train/memory_mb"}
    labels = [line.get_label() for line in axes["loss"].lines]
    assert labels == ["adam-3 train", "adam-3 val", "adam-2 train", "adam-2 val"]
    # The curves are the runs' own numbers, against steps.
    train_x, train_y = axes["loss"].lines[2].get_data()
    logged = [r for r in read_metrics(runs[1]) if "train/loss" in r]
    assert list(train_x) == [r["step"] for r in logged] and list(train_y) == [r["train/loss"] for r in logged]
    assert list(axes["acc"].lines[0].get_xdata()) == [7, 14]


def test_python_m_framework_plot_dispatches_here(runs, tmp_path):
    from framework.cli import main as cli  # what `python -m framework` runs, in-process

    out = tmp_path / "cli.png"
    assert cli(["plot", runs[0], "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_a_resumed_runs_repeated_steps_keep_the_last_record_and_a_cut_line_is_skipped(tmp_path, capsys):
    lines = [
        {"step": 2, "epoch": 0, "train/loss": 1.0},
        {"step": 4, "epoch": 0, "train/loss": 0.9},
        {"step": 4, "epoch": 0, "epoch_time": 1.0, "val/loss": 0.95},
        {"step": 4, "epoch": 0, "train/loss": 0.8},  # the resumed run logs step 4 again
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "ep'  # cut by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    recs = read_metrics(str(tmp_path))
    assert recs == [lines[0], lines[2], lines[3]]
    assert "metrics.jsonl:5: skipped" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 0


def test_a_loss_over_decades_gets_a_log_axis_train_and_val_two_colours_and_marks_at_the_best_and_the_stop(tmp_path):
    records = [{"step": s, "epoch": 0, "train/loss": 2.0 * 0.5 ** (s / 10)} for s in range(10, 101, 10)]
    records += [{"step": s, "epoch": 0, "val/loss": v} for s, v in ((30, 0.5), (60, 0.2), (90, 0.3))]
    records.append({"step": 100, "epoch": 1, "stop": "max_steps", "stop_reason": "max_steps=100 reached"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = plot_runs([str(tmp_path)])
    ax = next(a for a in fig.axes if a.get_title() == "loss")
    assert ax.get_yscale() == "log"  # 2.0 down to 0.002: three decades
    train, val = ax.lines
    assert train.get_color() != val.get_color()
    best, stop = ax.collections  # not lines: ax.lines holds the curves only
    assert best.get_offsets().tolist() == [[60.0, 0.2]] and "best val/loss=0.2 (step 60)" in best.get_label()
    assert stop.get_segments()[0][0][0] == 100 and stop.get_label() == f"{tmp_path.name} stop: max_steps (step 100)"
    # mode="max" in config.json: the best is the highest value.
    (tmp_path / "config.json").write_text(json.dumps({"monitor": "val/loss", "mode": "max"}))
    best = next(c for c in plot_runs([str(tmp_path)]).axes[0].collections if "best" in c.get_label())
    assert best.get_offsets().tolist() == [[30.0, 0.5]]
    # A loss within one decade keeps a linear axis.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    assert plot_runs([str(tmp_path)]).axes[0].get_yscale() == "linear"


def test_a_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def _write(run_dir, records):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run_dir)


def test_the_cost_panels_show_step_time_tflops_with_mfu_where_the_peak_is_known_and_memory(runs, tmp_path):
    # The real runs (CPU: no peak) have the panels, with their logged numbers and units, and no MFU axis.
    fig = plot_runs(runs[:1])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    logged = [r for r in read_metrics(runs[0]) if "train/loss" in r]
    for key, unit in (("train/step_time", "s / step"), ("train/tflops", "TFLOP/s per process")):
        assert list(axes[key].lines[0].get_ydata()) == [r[key] for r in logged]
        assert axes[key].get_ylabel() == unit
    assert axes["train/memory_mb"].get_ylim()[0] == 0 and not axes["train/tflops"].child_axes
    # Runs that log train/mfu against one peak get MFU on the right of the TFLOP/s panel.
    records = [
        {"step": s, "epoch": 0, "train/loss": 1.0, "train/tflops": t, "train/mfu": t / 400.0}
        for s, t in ((10, 120.0), (20, 160.0))
    ]
    same = [_write(tmp_path / "a", records), _write(tmp_path / "b", records)]
    panel = next(ax for ax in plot_runs(same).axes if ax.get_title().startswith("train/tflops"))
    assert panel.get_title() == "train/tflops (MFU of a 400 TFLOP/s peak)"
    (mfu,) = panel.child_axes
    assert mfu.get_ylabel() == "MFU"
    other = [dict(r, **{"train/mfu": r["train/tflops"] / 300.0}) for r in records]  # another GPU
    mixed = [same[0], _write(tmp_path / "c", other)]
    panel = next(ax for ax in plot_runs(mixed).axes if ax.get_title().startswith("train/tflops"))
    assert panel.get_title() == "train/tflops" and not panel.child_axes  # (one MFU axis cannot serve two peaks)
