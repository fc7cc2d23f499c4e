"""``python -m framework plot RUN_DIR [RUN_DIR ...] [-o curves.png]``: curves from ``metrics.jsonl``.

One panel for the loss (train solid, validation dashed with markers, in two
colours), one per other validation metric, and one each for ``lr``,
``train/grad_norm`` and the cost of a step: ``train/step_time``,
``train/tflops`` (with MFU on its right axis where the peak is known) and
``train/memory_mb``, all against optimizer steps. A panel whose values span
more than a decade (a loss falling from 2.3 to 0.01, a warmup) has a log
scale. A star marks the best validation value of the run's ``monitor`` (by its
``mode``, from ``config.json``; ``val/loss``, lowest, by default) and a dotted
vertical line the step where the run stopped, with why (the stop record).
Several run directories overlay, a pair of shades per run (train darker, val
lighter), for comparison. The default output is ``RUN_DIR/curves.png`` for one
run and ``curves.png`` in the current directory for several.

matplotlib is an optional dependency (``pip install matplotlib``, or the
``all`` extra); it is imported only here, with the non-interactive Agg backend,
(a bare Figure, never pyplot), so plotting works on a headless machine.

.. code-block:: bash

    python -m framework plot runs/adamw runs/sgd -o compare.png

:func:`main` is the same command in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

# Panels after "loss": these keys if present, then every other val/ metric.
_EXTRA_PANELS = ("lr", "train/grad_norm", "train/step_time", "train/tflops", "train/memory_mb")
# What the cost panels' numbers are (framework.observability.throughput).
_UNITS = {"train/step_time": "s / step", "train/tflops": "TFLOP/s per process", "train/memory_mb": "peak MiB"}


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, by step; for a step logged twice (a resumed run
    appends to the same file) the later record wins.

    Raises FileNotFoundError when the file is missing. A line that is not JSON
    (the last one, cut by a crash) is skipped with a note on stderr.

    Example:

        >>> import json, os
        >>> os.makedirs("runs/digits")
        >>> with open("runs/digits/metrics.jsonl", "w") as f:     # step 2 logged again by a resumed run
        ...     for step, loss in [(1, 2.3), (2, 0.9), (2, 0.8)]:
        ...         print(json.dumps({"step": step, "epoch": 0, "train/loss": loss}), file=f)
        >>> [(r["step"], r["train/loss"]) for r in read_metrics("runs/digits")]
        [(1, 2.3), (2, 0.8)]
        >>> read_metrics("runs/none")
        Traceback (most recent call last):
        ...
        FileNotFoundError: runs/none/metrics.jsonl does not exist; pass a run directory of Engine(run_dir=...)
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass a run directory of Engine(run_dir=...)")
    by_key: dict[tuple[int, int], dict[str, Any]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"{path}:{lineno}: skipped a line that is not JSON (cut by a crash?)", file=sys.stderr)
                continue
            # A step can hold a train record, an epoch record and a stop record: keep them apart.
            kind = 1 if "train/loss" in record else 2 if "stop" in record else 0
            by_key[(int(record.get("step", 0)), kind)] = record
    return [by_key[k] for k in sorted(by_key)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _labels(run_dirs: list[str]) -> list[str]:
    """Run names for the legend: the directory names, or the paths where those collide."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def _monitor(run_dir: str) -> tuple[str, str]:
    """The run's ``monitor`` and ``mode`` from its ``config.json`` (``("val/loss", "min")`` without one)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        return str(config.get("monitor") or "val/loss"), "max" if config.get("mode") == "max" else "min"
    except (OSError, ValueError, AttributeError):
        return "val/loss", "min"


def _colors(n_runs: int) -> list[tuple[Any, Any]]:
    """(train, val) colours per run: blue and orange for one run; for several, a dark and a light shade of
    one hue per run (matplotlib's tab20 pairs), so train and val differ and a run's two curves belong together."""
    import matplotlib

    if n_runs == 1:
        c = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        return [(c[0], c[1])]
    tab20: Any = matplotlib.colormaps["tab20"]  # (a ListedColormap: its 20 colours, in dark/light pairs)
    pairs = tab20.colors
    return [(pairs[(2 * i) % 20], pairs[(2 * i + 1) % 20]) for i in range(n_runs)]


def _mark_best_and_stop(
    ax: Any, panel: str, records: list[dict[str, Any]], ranked_by: tuple[str, str], label: str, colors: tuple[Any, Any]
) -> None:
    """A star at the best value of the run's monitor (``ranked_by``: monitor and mode, on its panel) and a dotted
    line at the stop, with why."""
    monitor, mode = ranked_by
    if monitor == f"val/{panel}":
        steps, values = _series(records, monitor)
        finite = [(v, x) for x, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if finite:
            sign = 1.0 if mode == "min" else -1.0  # (as keep_best ranks: of equal values the earlier step)
            value, step = min(finite, key=lambda p: (sign * p[0], p[1]))
            ax.scatter([step], [value], marker="*", s=160, color=colors[1], edgecolors="black", linewidths=0.6,
                       zorder=5, label=f"{label} best {monitor}={value:.4g} (step {step})")  # fmt: skip
    stop = next((r for r in reversed(records) if "stop" in r), None)
    if stop is not None:
        # (a vlines collection, not a Line2D: ax.lines keeps the curves only)
        ax.vlines([stop["step"]], 0, 1, transform=ax.get_xaxis_transform(), colors=[colors[0]], linestyles="dotted",
                  linewidths=1.2, label=f"{label} stop: {stop['stop']} (step {stop['step']})" if panel == "loss" else None)  # fmt: skip


def plot_runs(run_dirs: list[str]) -> Any:
    """Build the figure for ``run_dirs`` (a matplotlib Figure; one Axes per panel, titled by metric).

    Example:

        >>> import json, os, pytest
        >>> _ = pytest.importorskip("matplotlib")                  # an optional dependency
        >>> os.makedirs("runs/a")
        >>> with open("runs/a/metrics.jsonl", "w") as f:
        ...     for step in (1, 2):
        ...         print(json.dumps({"step": step, "epoch": 0, "train/loss": 1.0 / step, "val/acc": 0.5}), file=f)
        >>> fig = plot_runs(["runs/a"])
        >>> [ax.get_title() for ax in fig.axes if ax.get_visible()]
        ['loss', 'acc']
        >>> fig.savefig("compare.png")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [read_metrics(d) for d in run_dirs]
    ranked_by = [_monitor(d) for d in run_dirs]  # (each run's config.json, read once for all its panels)
    keys = {k for records in runs for r in records for k in r}
    metrics = sorted(k[len("val/") :] for k in keys if k.startswith("val/") and k != "val/loss")
    panels = ["loss"] + metrics + [k for k in _EXTRA_PANELS if k in keys]
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    # A bare Figure on an Agg canvas, not pyplot: no display needed, and no global backend
    # switched under a notebook that imported us.
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = _colors(len(run_dirs))
    for ax, panel in zip(axes.flat, panels, strict=False):  # spare axes are hidden below
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for (label, records, monitor), (train_color, val_color) in zip(
            zip(_labels(run_dirs), runs, ranked_by, strict=True), colors, strict=True
        ):
            if panel in _EXTRA_PANELS:
                ax.plot(*_series(records, panel), color=train_color, label=label)
                continue
            train_x, train_y = _series(records, f"train/{panel}")
            val_x, val_y = _series(records, f"val/{panel}")
            if train_x:
                ax.plot(train_x, train_y, color=train_color, label=f"{label} train")
            if val_x:
                ax.plot(val_x, val_y, color=val_color, linestyle="--", marker="o", markersize=3, label=f"{label} val")
            _mark_best_and_stop(ax, panel, records, monitor, label, (train_color, val_color))
        if _spans_decades(ax):
            ax.set_yscale("log")  # a loss from 2.3 to 0.01, a warmup, grad norms: orders of magnitude
        if ax.lines:
            ax.legend(fontsize="small")
    _label_cost_panels(dict(zip(panels, axes.flat, strict=False)), runs)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _label_cost_panels(axes: dict[str, Any], runs: list[list[dict[str, Any]]]) -> None:
    """Units on the step time, TFLOP/s and memory panels; MFU as the TFLOP/s panel's right axis where every run
    that logs ``train/mfu`` has the same peak (MFU = TFLOP/s / peak)."""
    from matplotlib.ticker import PercentFormatter

    for key, unit in _UNITS.items():
        if key in axes:
            axes[key].set_ylabel(unit)
    memory = axes.get("train/memory_mb")
    if memory is not None and memory.lines and memory.get_yscale() == "linear":
        top = max(y for line in memory.lines for y in line.get_ydata())
        memory.set_ylim(0, top * 1.15)  # (from 0: a change of 1 MiB in 300 is not a jump)
    peaks = {
        round(r["train/tflops"] / r["train/mfu"], 6)
        for records in runs
        for r in records
        if r.get("train/mfu") and isinstance(r.get("train/tflops"), (int, float))
    }
    if "train/tflops" in axes and len(peaks) == 1:
        peak = peaks.pop()
        ax = axes["train/tflops"]
        mfu = ax.secondary_yaxis("right", functions=(lambda t: t / peak, lambda m: m * peak))
        mfu.yaxis.set_major_formatter(PercentFormatter(1.0))
        mfu.set_ylabel("MFU")
        ax.set_title(f"{ax.get_title()} (MFU of a {peak:g} TFLOP/s peak)")


def _spans_decades(ax: Any) -> bool:
    """Whether the values are all > 0 (a log scale would drop the rest) and span over 10x."""
    values = [y for line in ax.lines for y in line.get_ydata()]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m framework plot``; returns the exit status.

    Example:

        >>> import os, pytest
        >>> _ = pytest.importorskip("matplotlib")                  # an optional dependency
        >>> engine = framework.Engine(max_steps=2, batch_size=32, log_every_n_steps=1, run_dir="runs/digits",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> main(["runs/digits", "-o", "curves.png"])
        wrote curves.png
        0
        >>> os.path.getsize("curves.png") > 0
        True
        >>> main(["runs/none"])
        2
    """
    parser = argparse.ArgumentParser(
        prog="python -m framework plot",
        description="Plot train/val curves from runs' metrics.jsonl (several runs overlay).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "-o", "--output", help="PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)"
    )
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot needs matplotlib: pip install matplotlib (or pip install 'framework[all]')", file=sys.stderr)
        return 1
    try:
        fig = plot_runs(args.run_dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = args.output or (os.path.join(args.run_dirs[0], "curves.png") if len(args.run_dirs) == 1 else "curves.png")
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")
    return 0
