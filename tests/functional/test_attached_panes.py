"""The dashboard over engines pdtui did not start (pdtui attach, issue 23): each pane says it is
attached, whether its log is followed or its metrics alone are shown, and which keys work and why
not (the keys without the user's command are off); observe only, the per-request panes say they
need pdtui's proxy in the path, and witness requests show as such. Driven by the functional tests'
FakeRuntime (no engines)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pdtui.app.app import make_app
from pdtui.app.state import PROXY_NEEDED
from pdtui.app.widgets import InstancePane, LatencyHistogram, RequestDetail, TransfersTable
from pdtui.core import topology
from pdtui.core.attached import AttachedInstance
from pdtui.core.events import MetricsSampled, RuntimeStarted, WitnessSampled
from pdtui.core.runtime import Runtime
from tests.fakes import FakeVllmEngine
from tests.functional.fake_runtime import T0, FakeRuntime, state

pytestmark = pytest.mark.anyio


def attached_started(*, observe: bool = False, router: str | None = None, kill: str | None = None,
                     restart: str | None = None, log: str | None = None) -> RuntimeStarted:
    return RuntimeStarted(
        profile="observe" if observe else "attached", model="tiny", model_shape=None, connector="NixlConnector",
        device="cpu", proxy_url=router or ("" if observe else "http://127.0.0.1:9000"),
        vllm_version="vLLM 0.32.0 (the engines')", kv_bytes_per_token=None, block_size=128,
        kv_load_failure_policy="fail", observe=observe, router=router, t=T0,
        instances=[{"name": "P", "role": "prefill", "url": "http://10.0.0.1:8100", "attached": True, "log": log,
                    "kill": None, "restart": None},
                   {"name": "D", "role": "decode", "url": "http://10.0.0.2:8200", "attached": True, "log": None,
                    "kill": kill, "restart": restart}])


def up(fake: FakeRuntime, started: RuntimeStarted) -> None:
    fake.emit(started, state("P", "starting", T0 + 1), state("D", "starting", T0 + 1),
              state("P", "ready", T0 + 1.2), state("D", "ready", T0 + 1.2),
              MetricsSampled(instance="D", t=T0 + 2, values={
                  "vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 2.0,
                  'vllm:num_requests_kv_fetch_by_stage{stage="waiting_to_start"}': 1.0,
                  'vllm:num_requests_kv_fetch_by_stage{stage="in_progress"}': 1.0,
                  'vllm:num_requests_kv_fetch_by_stage{stage="completed_waiting"}': 0.0}))


async def settle(pilot: Any) -> None:
    for _ in range(6):
        await pilot.pause(0.05)


def pane_text(app: Any, name: str) -> str:
    return app.query_one(f"#pane-{name}", InstancePane).render().plain


async def test_observe_only_the_per_request_panes_say_they_need_the_proxy_and_the_keys_are_off() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=lambda: T0 + 10)
    async with app.run_test(size=(120, 40)) as pilot:
        up(fake, attached_started(observe=True))
        await settle(pilot)
        needed = app.query_one("#proxy-needed")
        assert needed.display and PROXY_NEEDED in str(needed.render())
        assert "--witness URL" in str(needed.render())
        assert not app.query_one(TransfersTable).display
        assert PROXY_NEEDED in app.query_one(RequestDetail).render().plain
        assert PROXY_NEEDED in app.query_one("#ttft", LatencyHistogram).title_text()
        d = pane_text(app, "D")
        assert "pair 0" not in d and "run 3 wait 2  kv wait 1 pull 1 done 0" in d
        assert "metrics only" in d and "k/r off: no --kill/--restart D=CMD" in d
        assert app.query_one("#pane-D", InstancePane).border_title == "D (decode, attached)"
        assert app.check_action("kill", ("decode",)) is None and app.check_action("restart", ("prefill",)) is None
        assert app.check_action("load", ("single",)) is None  # no router to send to
        for key in ("k", "K", "r", "R", "1"):
            await pilot.press(key)
        await settle(pilot)
    assert [c for c in fake.calls if c[0] in ("kill", "restart")] == []


async def test_a_key_works_for_the_command_given_and_is_off_for_the_one_not_given() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=lambda: T0 + 10)
    async with app.run_test(size=(120, 40)) as pilot:
        up(fake, attached_started(kill="kill -9 4242", log="/var/log/p.log"))
        await settle(pilot)
        assert not app.query_one("#proxy-needed").display and app.query_one(TransfersTable).display
        d, p = pane_text(app, "D"), pane_text(app, "P")
        assert "r off: no --restart D=CMD  k: kill -9 4242" in d
        assert "pair 0" in d  # the proxy is in the path: per-request counts
        assert "metrics only" not in p and "reg·" in p  # its log is followed: the connector's flags
        assert app.check_action("kill", ("decode",)) is True and app.check_action("restart", ("decode",)) is None
        await pilot.press("k")
        await pilot.press("r")
        await settle(pilot)
    assert [c for c in fake.calls if c[0] in ("kill", "restart")] == [("kill", "D")]


async def test_observe_with_a_router_shows_witness_requests_labelled_as_such() -> None:
    fake = FakeRuntime()
    app = make_app(fake, clock=lambda: T0 + 10)
    async with app.run_test(size=(120, 40)) as pilot:
        up(fake, attached_started(observe=True, router="http://router:8000"))
        fake.emit(WitnessSampled(url="http://router:8000", request_id="pdtui-witness-1", status=200, ttft_ms=84.0,
                                 itl_ms=[20.0, 21.0], chunks=3, t=T0 + 5),
                  WitnessSampled(url="http://router:8000", request_id="pdtui-witness-2", status=503,
                                 error="HTTP 503: busy", t=T0 + 10))
        await settle(pilot)
        said = str(app.query_one("#proxy-needed").render())
        assert "witness requests through http://router:8000: 2 sent, 1 failed; last: HTTP 503: busy" in said
        ttft = app.query_one("#ttft", LatencyHistogram)
        assert ttft.title == "TTFT (witness)" and ttft.samples == ((84.0, "witness"),)
        assert app.query_one("#itl", LatencyHistogram).samples == ((20.0, "witness"), (21.0, "witness"))
        assert app.check_action("load", ("single",)) is True  # the load keys go to the router


async def test_observe_only_over_a_real_runtime_of_fake_engines_then_quit_leaves_them_running() -> None:
    """The real Runtime (no proxy: observe only) over two FAKE engines in child processes: the panes
    go ready and scraped, the per-request panes say they need the proxy, the keys are off, and
    quitting stops watching, not the engines."""
    engines = [FakeVllmEngine("prefill").start(), FakeVllmEngine("decode").start()]
    folder = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    try:
        p, d = (e.wait() for e in engines)
        rt = Runtime(topology.attached([p.url], [d.url], model_name="tiny", block_size=128, observe=True),
                     log_dir=folder / "run", control_socket=folder / "c.sock")
        for inst in rt.instances.values():
            assert isinstance(inst, AttachedInstance)
            inst.interval_s = 0.1
        app = make_app(rt)
        async with app.run_test(size=(120, 40)) as pilot:
            for _ in range(200):
                await pilot.pause(0.05)
                views = app.snapshot.instances
                if len(views) == 2 and all(v.state == "ready" and v.metrics for v in views):
                    break
            assert [(v.name, v.state) for v in app.snapshot.instances] == [("P", "ready"), ("D", "ready")]
            assert PROXY_NEEDED in str(app.query_one("#proxy-needed").render())
            assert "kv wait 0 pull 0 done 0" in pane_text(app, "D")
            assert app.check_action("kill", ("decode",)) is None
            await pilot.press("q")
            await pilot.pause(0.2)
        assert rt.closed and all(i.state == "stopped" for i in rt.instances.values())
        assert all(e.proc is not None and e.proc.poll() is None for e in engines)
    finally:
        for e in engines:
            e.kill()
        shutil.rmtree(folder, ignore_errors=True)
