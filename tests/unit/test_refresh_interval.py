"""The live dashboard's refresh interval: 20 Hz where pdtui has 4 CPUs or more, 2 Hz with fewer (on
2 cores the 20 Hz refresh moved the proxy's gap p99 1.22x-1.52x over headless; 500 ms 1.00-1.04x:
results/2026-12-07-dashboard-2core), PDTUI_REFRESH_MS over both; a bad value said in words."""

from __future__ import annotations

import pytest

from pdtui import cli
from pdtui.app.app import FEW_CPUS_REFRESH_S, REFRESH_INTERVAL_S, make_app, refresh_interval_s
from tests.functional.fake_runtime import FakeRuntime


def test_few_cpus_refresh_less_often_and_the_variable_wins() -> None:
    assert refresh_interval_s({}, cpus=16) == REFRESH_INTERVAL_S == 0.05
    assert refresh_interval_s({}, cpus=4) == 0.05
    assert refresh_interval_s({}, cpus=2) == FEW_CPUS_REFRESH_S == 0.5
    assert refresh_interval_s({"PDTUI_REFRESH_MS": "100"}, cpus=2) == 0.1
    assert refresh_interval_s({"PDTUI_REFRESH_MS": "250"}, cpus=16) == 0.25


@pytest.mark.parametrize("bad", ["0", "fast", "-5", "100000"])
def test_a_bad_refresh_variable_is_said_in_words(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="PDTUI_REFRESH_MS=.*milliseconds between two refreshes, 10 to 5000"):
        refresh_interval_s({"PDTUI_REFRESH_MS": bad})
    monkeypatch.setenv("PDTUI_REFRESH_MS", bad)
    with pytest.raises(cli.ConfigError, match="10 to 5000"):
        cli._refresh_s()


def test_the_app_keeps_the_interval_it_is_given() -> None:
    assert make_app(FakeRuntime(), refresh_s=0.5).refresh_s == 0.5
    assert make_app(FakeRuntime()).refresh_s == REFRESH_INTERVAL_S

