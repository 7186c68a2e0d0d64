"""tests/fakes.free_port across pytest-xdist workers."""

from __future__ import annotations

import pytest


def test_free_ports_of_two_xdist_workers_never_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/fakes.free_port: each pytest-xdist worker draws from a slice of its own (CI at c502b19:
    two workers drew the same port and one proxy could not bind)."""
    from tests import fakes

    seen: dict[str, set[int]] = {}
    for worker in ("gw0", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
        seen[worker] = {fakes.free_port() for _ in range(20)}
    assert all(12000 <= p < 14000 for p in seen["gw0"]) and all(18000 <= p < 20000 for p in seen["gw3"])
