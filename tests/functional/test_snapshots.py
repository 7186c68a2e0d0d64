"""SVG snapshots at 80x24 (SSH) and 160x48 (projector), with an injected clock (frozen uptime).

Update after an intended change: pytest tests/functional/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdtui.app.app import make_app
from pdtui.app.replay import ReplayRuntime
from pdtui.core.events import Notice
from tests.functional.fake_runtime import T0, FakeRuntime, request, state
from tests.functional.test_dashboard import pair_up

FIXTURE = Path(__file__).parent.parent / "fixtures" / "recordings" / "cpu-pair-short.jsonl"
SIZES = [(80, 24), (160, 48)]


def frozen() -> float:
    return T0 + 123.0


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_replay_end(snap_compare, size: tuple[int, int]) -> None:
    rt = ReplayRuntime(FIXTURE, speed=0)
    app = make_app(rt, clock=frozen, speed=0)

    async def run_before(pilot) -> None:
        await rt.finished.wait()
        for _ in range(5):
            await pilot.pause(0.05)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_live_pair_after_kill_d(snap_compare, size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=frozen)

    async def run_before(pilot) -> None:
        pair_up(fake)
        fake.emit(request("pdtui-aaaa0001", T0 + 70), request("pdtui-aaaa0002", T0 + 71, prompt=3000, blocks=24),
                  Notice(level="warning", instance="D", text="killing D (decode): SIGKILL to its process group",
                         t=T0 + 80),
                  state("D", "exited", T0 + 81, exit_code=-9, detail="killed by pdtui (drill)"),
                  request("pdtui-aaaa0003", T0 + 81, outcome="error", error="D died mid-stream", itl=[1.0]),
                  request("pdtui-aaaa0004", T0 + 82, outcome="fallback", prefill=None, fallback_reason="prefill_down",
                          ttft_ms=900.0))
        for _ in range(5):
            await pilot.pause(0.05)
        await pilot.press("up")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
def test_latency_histograms(snap_compare, size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=frozen)

    async def run_before(pilot) -> None:
        pair_up(fake)
        for i in range(40):
            fake.emit(request(f"pdtui-p{i:04d}", T0 + 70 + i, ttft_ms=200.0 + 15 * (i % 13),
                              itl=[5.0 + (i % 7), 6.0, 30.0 if i % 10 == 0 else 7.0]))
        for i in range(8):
            fake.emit(request(f"pdtui-f{i:04d}", T0 + 120 + i, outcome="fallback", ttft_ms=600.0 + 20 * i,
                              itl=[12.0, 14.0]))
        for _ in range(5):
            await pilot.pause(0.05)
        await pilot.press("h")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
