"""The drills' shared steps (pdtui.app.drill.Steps): the bounded wait on the dashboard's state with
its poll interval and broken-pair check, a step's record and SVG name, the verdict's rows, a
failure's record. On a fake pilot and app (FakePilot, FakeDrillApp): no Textual, no engine."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pdtui.app.drill import Check, DrillFailed, Steps, all_ready, raise_unheld
from pdtui.app.state import DashState, InstanceView, Snapshot


class FakeDrillApp:
    """What the drills read of a PdtuiApp: its snapshot, whether it runs, a start's error, screenshots."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = DashState().snapshot()
        self.is_running = True
        self.start_error: str | None = None
        self.shots: list[tuple[str, str]] = []

    def save_screenshot(self, filename: str, path: str) -> str:
        self.shots.append((filename, path))
        return f"{path}/{filename}"

    def header(self, **changes: Any) -> None:
        self.snapshot = dataclasses.replace(self.snapshot, header=dataclasses.replace(self.snapshot.header, **changes))


class FakePilot:
    """A pilot whose pause sleeps as asked and keeps each delay."""

    def __init__(self) -> None:
        self.app = FakeDrillApp()
        self.pauses: list[float] = []

    async def pause(self, delay: float) -> None:
        self.pauses.append(delay)
        await asyncio.sleep(delay)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_until_returns_once_the_state_shows_it_asking_every_poll_s():
    pilot, seen = FakePilot(), []
    st = Steps(pilot, poll_s=0.05)

    def pred(s: Snapshot) -> bool:
        seen.append(s)
        return len(seen) == 3

    run(st.until("three looks", pred, 5))
    assert len(seen) == 3 and pilot.pauses == [0.05, 0.05]


def test_until_past_its_bound_fails_naming_what_was_awaited():
    pilot = FakePilot()
    with pytest.raises(DrillFailed, match=r"^D ready: not seen within 0 s$"):
        run(Steps(pilot, poll_s=0.1).until("D ready", lambda s: False, 0.3))
    assert 2 <= len(pilot.pauses) <= 4 and set(pilot.pauses) == {0.1}


def test_a_starting_wait_ends_at_once_on_a_failed_start_or_a_closed_dashboard():
    pilot = FakePilot()
    pilot.app.start_error = "D (decode) died during start-up: SIGILL\nthe log's tail"
    with pytest.raises(DrillFailed, match=r"^start-up failed: D \(decode\) died during start-up: SIGILL$"):
        run(Steps(pilot).until("ready", lambda s: False, 5, starting=True))
    assert pilot.pauses == []
    pilot.app.is_running = False
    with pytest.raises(DrillFailed, match="^ready: the dashboard was closed$"):
        run(Steps(pilot).until("ready", lambda s: True, 5))


def test_a_broken_pair_ends_a_starting_wait_only_where_the_drill_watches_for_it():
    pilot = FakePilot()
    pilot.app.header(broken="the warm-up's D leg failed: 500")
    with pytest.raises(DrillFailed, match="^the pair came up broken: the warm-up's D leg failed: 500$"):
        run(Steps(pilot).until("ready", lambda s: True, 5, starting=True))
    run(Steps(pilot).until("not starting", lambda s: True, 5))  # only a starting wait looks
    run(Steps(pilot, watch_broken=False).until("ready", lambda s: True, 5, starting=True))  # the kill-p-load drill


def test_all_ready_needs_every_instance_ready_and_the_warm_up_done():
    app = FakeDrillApp()
    assert not all_ready(app.snapshot)  # no instance yet
    views = (InstanceView(name="P", role="prefill", state="ready"), InstanceView(name="D", role="decode", state="starting"))
    app.snapshot = dataclasses.replace(app.snapshot, instances=views)
    app.header(ready_s=40.0)
    assert not all_ready(app.snapshot)
    app.snapshot = dataclasses.replace(app.snapshot, instances=(views[0], dataclasses.replace(views[1], state="ready")))
    assert all_ready(app.snapshot)
    app.header(ready_s=None)
    assert not all_ready(app.snapshot)


def test_steps_are_recorded_with_their_svgs_and_a_failure_with_failed_svg(tmp_path: Path):
    pilot, lines = FakePilot(), []
    st = Steps(pilot, shots=tmp_path / "shots", prefix="cpu-", log=lines.append)

    async def go() -> None:
        await st.done("ready", "pair ready")
        await st.done("kill-d", "D exited")
        st.check("D's pane turns red", "red", True)
        st.check("no silent recompute", "1 recomputed", False)
        try:
            raise_unheld(st.res.checks)
        except DrillFailed as e:
            st.fail(e)

    run(go())
    assert [(s.name, s.detail, s.screenshot) for s in st.res.steps] == [
        ("ready", "pair ready", f"{tmp_path}/shots/cpu-01-ready.svg"),
        ("kill-d", "D exited", f"{tmp_path}/shots/cpu-02-kill-d.svg")]
    assert all(s.seconds >= 0.3 for s in st.res.steps)  # each step lets the widgets take the last snapshot
    assert pilot.app.shots[-1] == ("cpu-failed.svg", str(tmp_path / "shots")) and (tmp_path / "shots").is_dir()
    assert st.res.failed == "expected no silent recompute, observed 1 recomputed" and not st.res.ok
    assert lines[0].startswith("[drill] ready ") and lines[0].endswith(" s  pair ready")
    assert lines[2:4] == ["[drill] ok  D's pane turns red: red", "[drill] NOT no silent recompute: 1 recomputed"]
    assert lines[4].startswith("[drill] FAILED after ") and lines[4].endswith(": expected no silent recompute, observed 1 recomputed")
    table = st.res.table().splitlines()
    assert table[0] == f"{'step':<10} {'s':>7}  what was seen" and table[1].startswith("ready ")
    assert table[-1] == "FAILED: expected no silent recompute, observed 1 recomputed"


def test_no_shots_no_svg_and_every_check_held_raises_nothing():
    pilot = FakePilot()
    st = Steps(pilot)
    run(st.done("ready", "ok"))
    assert st.res.steps[0].screenshot is None and pilot.app.shots == []
    raise_unheld([Check("a", "a", True)])
    st.fail(DrillFailed("stopped"))
    assert st.res.failed == "stopped" and pilot.app.shots == []
