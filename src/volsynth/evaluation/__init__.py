"""Evaluation of synthetic volumes: SSIM/PSNR/NMSE/MAE (whole volume and in a mask), LPIPS-VGG, scoring.

- :mod:`~volsynth.evaluation.metrics`: pure numpy metrics and the ``paper`` / ``synthrad2023`` profiles.
- :mod:`~volsynth.evaluation.lpips`: LPIPS with a VGG-16 backbone over all slices of the three views; reported
  unavailable (never 0) when its weights are missing.
- :mod:`~volsynth.evaluation.evaluate`: ``volsynth evaluate``: folders or a manifest → ``metrics.csv`` and
  ``summary.json``.
"""

from volsynth.evaluation.evaluate import EvaluationResult, evaluate_predictions
from volsynth.evaluation.lpips import (
    LPIPS,
    LPIPSConfig,
    LPIPSUnavailable,
    build_lpips,
    lpips_views,
    lpips_volume,
)
from volsynth.evaluation.metrics import (
    PROFILES,
    compute_metrics,
    ct_window_to_unit,
    mae,
    metric_names,
    nmse,
    psnr,
    ssim,
    ssim_map,
)

__all__ = [
    "LPIPS",
    "PROFILES",
    "EvaluationResult",
    "LPIPSConfig",
    "LPIPSUnavailable",
    "build_lpips",
    "compute_metrics",
    "ct_window_to_unit",
    "evaluate_predictions",
    "lpips_views",
    "lpips_volume",
    "mae",
    "metric_names",
    "nmse",
    "psnr",
    "ssim",
    "ssim_map",
]
