"""Shared tiny fixtures: a paired cohort written to disk, built from smooth random fields (no downloads), and the
benchmark scripts as modules."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from volsynth.data.io import write_volume
from volsynth.data.manifest import Manifest, Subject, save_manifest
from volsynth.data.volume import Volume


def smooth_pair(rng: np.random.Generator, shape: tuple[int, int, int] = (24, 24, 24)
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 'T1-like' source, a 'T2-like' target (a fixed nonlinear map of the source) and a 3-class label map."""
    field = gaussian_filter(rng.standard_normal(shape), 2.0)
    field = (field - field.min()) / (field.max() - field.min())
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (x**2 + y**2 + z**2) < 0.8
    source = np.where(inside, 200 + 800 * field, 0.0)
    target = np.where(inside, 1000 - 700 * field + 150 * np.sin(6 * field), 0.0)
    label = np.where(inside, 1 + np.digitize(field, [0.4, 0.6]), 0).astype(np.uint8)
    return source.astype(np.float32), target.astype(np.float32), label


def write_cohort(root: Path, n_subjects: int = 4, *, shape: tuple[int, int, int] = (24, 24, 24), seed: int = 0,
                 spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> Path:
    """A generic ``<subject>/<modality>.nii.gz`` tree plus manifest.json; returns the manifest path."""
    rng = np.random.default_rng(seed)
    subjects = []
    for index in range(n_subjects):
        source, target, label = smooth_pair(rng, shape)
        folder = root / f"sub{index:02d}"
        paths = {}
        for name, array in (("t1", source), ("t2", target), ("seg", label)):
            paths[name] = write_volume(Volume(array, spacing, (-20.0, 10.0, 5.0)), folder / f"{name}.nii.gz")
        # The 3-class map doubles as a tissue map (1 CSF-like, 2 GM-like, 3 WM-like) for methods that need one.
        subjects.append(Subject(f"sub{index:02d}", images={"t1": paths["t1"], "t2": paths["t2"]}, label=paths["seg"],
                                extra={"tissue": paths["seg"]}))
    return save_manifest(Manifest(subjects, dataset="generic", source="t1", target="t2"), root / "manifest.json")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Test tensors are tiny; on a 2-core machine a second thread only adds contention.
    torch.set_num_threads(1)


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return write_cohort(tmp_path / "cohort")


@functools.cache
def _benchmark_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """``benchmark_script("learning_curve")``: ``benchmarks/learning_curve.py`` imported as a module (once)."""
    return _benchmark_module
