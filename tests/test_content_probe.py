"""benchmarks/content_probe.py: the cross-domain tissue probe tells a shared content space from two private ones."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest


@pytest.fixture
def script(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("content_probe")


def _codes(rng: np.random.Generator, centres: np.ndarray, n: int, offset: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray]:
    classes = rng.choice([1, 2, 3], size=n, p=[0.2, 0.5, 0.3])
    return centres[classes - 1] + offset + 0.3 * rng.standard_normal((n, centres.shape[1])), classes


def test_a_shared_space_reads_across_domains_and_a_private_one_does_not(script: ModuleType) -> None:
    rng = np.random.default_rng(0)
    centres = 3 * np.eye(3, 8)  # one direction per tissue class
    shared = {(d, s): _codes(rng, centres, 600) for d in script.DOMAINS for s in ("train", "test")}
    result = script.probe_accuracies(shared)
    assert min(result[f"{a}->{b}"] for a in script.DOMAINS for b in script.DOMAINS) > 0.95
    assert result["domain_gap"] < 0.5

    # The target encoder puts each tissue where the source puts another one, and somewhere else on average.
    permuted = centres[[2, 0, 1]]
    private = {("source", s): _codes(rng, centres, 600) for s in ("train", "test")}
    private.update({("target", s): _codes(rng, permuted, 600, offset=2.0) for s in ("train", "test")})
    result = script.probe_accuracies(private)
    assert result["source->source"] > 0.95 and result["target->target"] > 0.95
    assert result["source->target"] < result["majority_target"]
    assert result["target->source"] < result["majority_source"]
    assert result["domain_gap"] > 3

    classes = private[("target", "test")][1]  # majority rate by hand
    assert result["majority_target"] == pytest.approx(max(np.sum(classes == k) for k in (1, 2, 3)) / classes.size)
