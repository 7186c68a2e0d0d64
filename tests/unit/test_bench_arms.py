"""run_bench's policy for an arm that fails: one more start after a port race inside vLLM, the
other arms still run, and the run still fails with the first error. The arms themselves are fakes
(``fake_arms``: each records that it ran and fails as told); the test is about the loop."""

from __future__ import annotations

import asyncio

import pytest

from pdtui.bench import runners
from pdtui.bench.runners import ArmResult, BenchOptions, BenchResult
from pdtui.core import config as config_mod
from pdtui.core.supervisor import StartupFailed

RACE = StartupFailed("P (prefill) exited with code -9 during start-up.\nCause: torch.distributed.DistNetworkError:"
                     " The server socket has failed to listen on any local network address. port: 34141,"
                     " useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
BROKEN = StartupFailed("D (decode) exited with code 1 during start-up.\nCause: ValueError: bad model")


def fake_arms(monkeypatch: pytest.MonkeyPatch, plan: dict[str, list[Exception | None]]) -> list[str]:
    """Each arm's starts fail or succeed in the order of ``plan[arm]``; returns the starts made."""
    starts: list[str] = []

    async def fake_run_named(arm, cfg, opts, result, reporter, clock):
        starts.append(arm)
        result.arms[arm] = ArmResult(arm)
        err = plan[arm].pop(0)
        if err is not None:
            result.arms[arm].error = str(err)
            raise err

    monkeypatch.setattr(runners, "_run_named", fake_run_named)
    monkeypatch.setattr(runners, "environment", lambda cfg, engines=None: {})
    return starts


def _bench(arms: tuple[str, ...]) -> tuple[BenchResult, BaseException | None]:
    result = BenchResult()
    try:
        asyncio.run(runners.run_bench(config_mod.load_profile("cpu"), BenchOptions(arms=arms), result))
    except Exception as e:  # noqa: BLE001
        return result, e
    return result, None


def test_a_port_race_at_start_is_retried_once_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = fake_arms(monkeypatch, {"pair": [RACE, None], "single-proxied": [None]})
    result, err = _bench(("pair", "single-proxied"))
    assert err is None and starts == ["pair", "pair", "single-proxied"]
    assert result.arms["pair"].error is None
    assert any("retried once" in n and "exited with code -9" in n for n in result.arms["pair"].notices)


def test_an_arm_that_fails_does_not_stop_the_others_and_the_run_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    starts = fake_arms(monkeypatch, {"pair": [BROKEN], "pair-both": [RACE, RACE], "single-proxied": [None]})
    result, err = _bench(("pair", "pair-both", "single-proxied"))
    assert starts == ["pair", "pair-both", "pair-both", "single-proxied"]  # no second start for BROKEN
    assert err is BROKEN
    assert result.arms["pair-both"].error and result.arms["single-proxied"].error is None
