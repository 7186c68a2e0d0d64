"""One definition of a percentile for all of pdtui: the dashboard, the bench, the transparency bench.

It is the one ``vllm bench serve`` reports (``numpy.percentile`` with its default method,
"linear": the rank ``(n - 1) * p / 100`` interpolated between its two neighbours), so a p99 in
pdtui and a p99 from vLLM's own bench over the same samples are the same number. The dashboard
used the nearest rank before (issue 14): on 100 samples that is the 99th value, where this is
0.99 of the way from the 99th to the 100th.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (p in 0..100) as numpy.percentile computes it by default; None for no values."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
