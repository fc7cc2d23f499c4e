"""What a run shows about itself: ``metrics.jsonl`` and trackers (:mod:`~framework.observability.metrics`),
the progress display (:mod:`~framework.observability.progress`), the run's records and its run dir
(:mod:`~framework.observability.run_info`: config.json, the summary, the lock), the plots
(:mod:`~framework.observability.plot`, ``python -m framework plot``), and where the time and memory go:
throughput and MFU (:mod:`~framework.observability.throughput`, FLOPs counted by
:mod:`~framework.observability.flops`) and the profiler (:mod:`~framework.observability.profiler`), both
subscribers of the loop's events.

Example:

    >>> import json, os
    >>> engine = framework.Engine(max_epochs=1, batch_size=32, run_dir="runs/digits", progress=False)
    >>> _ = engine.fit(Classifier(), train_data, val_data)
    >>> sorted(os.listdir("runs/digits"))
    ['.lock', 'checkpoints', 'config.json', 'metrics.jsonl']
    >>> records = [json.loads(line) for line in open("runs/digits/metrics.jsonl")]
    >>> [sorted(k for k in r if k.startswith("val/")) for r in records if "val/loss" in r]   # the epoch's record
    [['val/acc', 'val/loss']]
    >>> records[-1]["stop"], records[-1]["stop_reason"]                                      # the stop record
    ('max_epochs', 'max_epochs=1 reached')

Then, in a shell:

.. code-block:: bash

    python -m framework plot runs/digits -o curves.png
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import EngineConfig


def observers(config: EngineConfig) -> list[Any]:
    """The measuring subscribers ``config`` asks for, in the order the Engine subscribes them (first, before the
    trace, the doctor and the callbacks): the profiler (``profile_steps`` / ``profile_memory``), throughput.

    Example:

        >>> from framework.config import EngineConfig
        >>> config = EngineConfig.from_options(run_dir="runs/x", profile_steps=(3, 5))
        >>> [type(subscriber).__name__ for subscriber in observers(config)]
        ['Profiler', 'Throughput']
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
