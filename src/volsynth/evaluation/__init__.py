"""Evaluation of synthetic volumes.

- :mod:`~volsynth.evaluation.evaluate`: ``volsynth evaluate``: folders or a manifest → ``metrics.csv``,
  ``ceiling.csv`` and ``summary.json`` (metrics themselves are pure functions in :mod:`volsynth.metrics`).
- :mod:`~volsynth.evaluation.lpips`: LPIPS with a VGG-16 backbone over all slices of the three views; reported
  unavailable (never 0) when its weights are missing.
- :mod:`~volsynth.evaluation.downstream`: synthetic-to-real segmentation checks (``tissue``, ``segment``).
- :mod:`~volsynth.evaluation.report`: the static HTML comparison.

Importing this package loads nothing heavy (no torch): import the submodule you need.
"""
