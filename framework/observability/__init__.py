"""What a run shows about itself: ``metrics.jsonl`` and trackers (:mod:`~framework.observability.metrics`),
the progress display (:mod:`~framework.observability.progress`), the run's records and its run dir
(:mod:`~framework.observability.run_info`: config.json, the summary, the lock), and the plots
(:mod:`~framework.observability.plot`, ``python -m framework plot``).

Example::

    python -m framework plot runs/digits -o curves.png
"""
