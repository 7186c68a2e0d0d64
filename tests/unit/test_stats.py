"""pdtui's one percentile is numpy.percentile's default, the one `vllm bench serve` reports."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pdtui.core.stats import percentile


def test_percentile_equals_numpy_percentile_as_vllm_bench_serve_calls_it():
    rng = random.Random(14)
    for n in (1, 2, 3, 7, 100, 1001):
        xs = [rng.expovariate(1 / 20) for _ in range(n)]
        for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12, abs=1e-12), (n, p)


def test_percentile_edges():
    assert percentile([], 99) is None
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="outside 0..100"):
        percentile([1.0], 101)
