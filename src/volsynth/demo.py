"""``volsynth demo``: the whole pipeline on a phantom cohort, on CPU, in minutes.

phantom (T1 → T2 pairs with lesions) → train each method from its ``<method>-cpu`` preset → predict the test
subjects on their native grids → evaluate (paper profile, brain mask) → tissue-segmentation downstream check →
HTML report comparing the methods.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from volsynth.config import load_config, resolve_config_path


def run_demo(out: str | Path, *, subjects: int = 8, iterations: int = 600, methods: Sequence[str] = ("mdagan",),
             spacing: float = 2.0, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the report's ``index.html``."""
    import os

    import torch

    from volsynth.data.phantom import make_phantom_cohort
    from volsynth.evaluation.downstream import run_downstream
    from volsynth.evaluation.evaluate import evaluate_predictions
    from volsynth.evaluation.report import build_report
    from volsynth.inference.predict import predict
    from volsynth.training.trainer import train

    # Demo tensors are small: on a 2-core machine one intra-op thread is faster than two that fight with any other
    # process for the cores (OpenMP barrier spinning made steps 5–10x slower under load in our measurements).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    out = Path(out)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    for name in methods:  # fail before any work when a preset is missing
        resolve_config_path(f"{name}-cpu")
    manifest = out / "phantom" / "manifest.json"
    if not manifest.is_file():
        _say(f"[demo] phantom cohort: {subjects} subjects at {spacing} mm", progress)
        manifest = make_phantom_cohort(out / "phantom", subjects, seed=seed, spacing=spacing, progress=progress)
    timings["phantom"] = time.perf_counter() - began
    runs = []
    for name in methods:
        run = out / "runs" / name
        # Demo-sized settings on top of the CPU preset: 16³ patches, 30 % background patches (so networks with
        # normalisation layers also learn the air outside the head), lr 1e-3 (the setting the learning test
        # validates: mdagan-cpu halves validation L1 in 300 iterations) and 50 % window overlap, so the whole
        # pipeline fits in minutes on 2 cores. Real runs use the presets as they are.
        config = load_config(f"{name}-cpu", [f"data.manifest={manifest.resolve()}", "data.source=t1",
                                             "data.target=t2", f"train.iterations={iterations}",
                                             "data.patch_size=[16,16,16]", "train.lr=1e-3",
                                             "data.foreground_probability=0.7",
                                             "train.val_every=100", "train.checkpoint_every=100",
                                             "inference.overlap=0.5", "inference.sw_batch_size=8",
                                             f"train.progress={str(progress).lower()}", f"seed={seed}"])
        start = time.perf_counter()
        if not (run / "checkpoints" / "last.pt").is_file():
            _say(f"[demo] training {name} for {iterations} iterations", progress)
            train(config, run)
        timings[f"train_{name}"] = time.perf_counter() - start
        start = time.perf_counter()
        test_subjects = json.loads((run / "splits.json").read_text())["test"]
        predict(run / "checkpoints" / "last.pt", manifest, run / "predictions", subjects=test_subjects,
                progress=progress)
        timings[f"predict_{name}"] = time.perf_counter() - start
        evaluate_predictions(run / "predictions", manifest, out_dir=run / "evaluation", profile="paper",
                             target_modality="t2", normalise="minmax")
        try:
            run_downstream(run, protocol="tissue")
        except ValueError as error:  # e.g. a barely trained model's flat output has no tissues to segment
            _say(f"[demo] downstream tissue check skipped for {name}: {error}", progress)
        runs.append(run)
    _say("[demo] writing the report", progress)
    index = build_report(runs, out / "report")
    timings["total"] = time.perf_counter() - began
    (out / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    return index


def _say(text: str, enabled: bool) -> None:
    if enabled:
        print(text, flush=True)  # noqa: T201  (the demo's progress narration)
