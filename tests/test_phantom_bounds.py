"""benchmarks/phantom_bounds.py: the oracle ladder below the phantom's ceiling."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture
def bounds_module(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("phantom_bounds")


def test_lookup_table_is_the_binned_conditional_mean(bounds_module: ModuleType) -> None:
    # Hand-computed: bin 25 (0.1) holds targets 1 and 3 → 2; bin 230 (0.9) holds 5; bins between interpolate.
    source = np.array([0.1, 0.1, 0.9])
    target = np.array([1.0, 3.0, 5.0])
    table = bounds_module.lookup_table([(source, target)])
    assert table[25] == pytest.approx(2.0) and table[230] == pytest.approx(5.0)
    assert table[0] == pytest.approx(2.0) and table[255] == pytest.approx(5.0)  # np.interp holds the ends
    assert table[127] == pytest.approx(2.0 + 3.0 * (127 - 25) / (230 - 25))


def test_ideal_row_matches_the_written_cohort_and_the_ladder_is_ordered(bounds_module: ModuleType,
                                                                        tmp_path: Path) -> None:
    from volsynth.data.phantom import make_phantom_cohort

    settings = {"seed": 3, "subjects": 4, "spacing": 6.0}
    manifest = make_phantom_cohort(tmp_path / "phantom", settings["subjects"], seed=settings["seed"],
                                   spacing=settings["spacing"], montage=False)
    rows = bounds_module.bounds(**settings, source="t1", target="t2")
    entries = {e["subject"]: e for e in json.loads(Path(manifest).read_text())["subjects"]}
    test = [e for e in entries.values() if e["split"] == "test"]
    assert test and {r["subject"] for r in rows} == {e["subject"] for e in test} | {"mean"}
    for entry in test:
        def read(path: str) -> np.ndarray:
            return np.asarray(nib.load(Path(manifest).parent / path).dataobj, dtype=np.float64)
        target, ideal, brain = read(entry["images"]["t2"]), read(entry["ideal"]["t2"]), read(entry["mask"]) > 0
        unit = (target - target.min()) / np.ptp(target)
        ideal_unit = (ideal - target.min()) / np.ptp(target)
        expected = np.mean((ideal_unit[brain] - unit[brain]) ** 2) / np.var(unit[brain])  # NMSE by hand
        mine = {r["predictor"]: r for r in rows if r["subject"] == entry["subject"]}
        assert mine["ideal image (the ceiling)"]["nmse_mask"] == pytest.approx(expected, rel=1e-4)
        # Knowing less never helps: the ceiling beats the anatomy oracles, which beat any voxel-wise map of the input.
        ladder = [mine[name]["nmse_mask"] for name in (
            "ideal image (the ceiling)", "anatomy + subject's tissue parameters, no target bias field",
            "lookup table on the noisy source (the input)")]
        assert ladder == sorted(ladder) and ladder[0] < ladder[-1] / 2, ladder
