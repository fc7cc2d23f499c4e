"""What a run shows about itself: ``metrics.jsonl`` and trackers (:mod:`~framework.observability.metrics`),
the progress display (:mod:`~framework.observability.progress`), the run's records and its run dir
(:mod:`~framework.observability.run_info`: config.json, the summary, the lock), the plots
(:mod:`~framework.observability.plot`, ``python -m framework plot``), and where the time and memory go:
throughput and MFU (:mod:`~framework.observability.throughput`, FLOPs counted by
:mod:`~framework.observability.flops`) and the profiler (:mod:`~framework.observability.profiler`), both
subscribers of the loop's events.

Example::

    python -m framework plot runs/digits -o curves.png
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import EngineConfig


def observers(config: EngineConfig) -> list[Any]:
    """The measuring subscribers ``config`` asks for, in the order the Engine subscribes them (first, before the
    trace, the doctor and the callbacks): the profiler (``profile_steps`` / ``profile_memory``), throughput.

    Example::

        for subscriber in observers(EngineConfig.from_options(run_dir="runs/x", profile_steps=(3, 5))):
            events.subscribe(subscriber)
    """
    log, out = config.logging, list[Any]()
    if log.profile_steps is not None or log.profile_memory:
        from .profiler import Profiler

        assert config.checkpoint.run_dir is not None  # (checked with the config)
        out.append(Profiler(log.profile_steps, log.profile_memory, str(config.checkpoint.run_dir)))
    if log.throughput:
        from .throughput import Throughput

        out.append(Throughput(log.peak_tflops))
    return out
