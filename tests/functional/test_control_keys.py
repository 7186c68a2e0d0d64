"""The dashboard's kill/restart keys and `pdtui ctl` go through one Control (pdtui.core.control):
the keys call it, a request on the control socket reaches the same runtime and shows on the
dashboard, `down` closes the app, and a port taken at start closes it with 1 (never an app left
open over another pdtui's ports)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pdtui.app.app import make_app
from pdtui.app.widgets import InstancePane
from pdtui.core.control import Control, ControlServer, request
from pdtui.core.supervisor import PortInUse
from tests.functional.fake_runtime import T0, FakeRuntime, started, state

pytestmark = pytest.mark.anyio


class SpyControl(Control):
    def __init__(self, runtime: Any) -> None:
        super().__init__(runtime)
        self.seen: list[tuple[str, str]] = []

    async def kill(self, which: str, **kw: Any) -> dict[str, Any]:
        self.seen.append(("kill", which))
        return await super().kill(which, **kw)

    async def restart(self, which: str, **kw: Any) -> dict[str, Any]:
        self.seen.append(("restart", which))
        return await super().restart(which, **kw)


def pair_up(fake: FakeRuntime) -> None:
    fake.emit(started(), state("P", "starting", T0 + 1, pid=11), state("D", "starting", T0 + 2, pid=12),
              state("P", "ready", T0 + 61, pid=11), state("D", "ready", T0 + 62, pid=12))


async def settle(pilot: Any) -> None:
    for _ in range(5):
        await pilot.pause(0.05)


async def test_the_keys_call_the_runtimes_control() -> None:
    fake = FakeRuntime()
    fake.control = SpyControl(fake)  # a Runtime has one (runtime.control); the app takes it
    app = make_app(fake, clock=lambda: T0 + 100)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.control is fake.control
        pair_up(fake)
        await settle(pilot)
        for key in ("k", "K", "r", "R"):
            await pilot.press(key)
            await settle(pilot)
    assert fake.control.seen == [("kill", "D"), ("kill", "P"), ("restart", "D"), ("restart", "P")]
    assert [c for c in fake.calls if c[0] in ("kill", "restart")] == [
        ("kill", "D"), ("kill", "P"), ("restart", "D"), ("restart", "P")]


async def test_a_kill_on_the_control_socket_shows_on_the_dashboard_and_down_closes_it() -> None:
    fake = FakeRuntime()
    fake.on_kill = lambda name: fake.emit(state(name, "exited", T0 + 81, exit_code=-9, detail="killed by pdtui ctl"))
    app = make_app(fake, clock=lambda: T0 + 100)
    folder = Path(tempfile.mkdtemp(prefix="pdtui-", dir="/tmp"))
    path = folder / "ctl" / "9000.sock"
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            server = await ControlServer(app.control, path).start()
            pair_up(fake)
            await settle(pilot)
            answer = await asyncio.to_thread(request, path, {"verb": "kill", "instance": "D"}, timeout_s=10)
            assert answer["ok"] and answer["instance"] == "D"
            await settle(pilot)
            assert app.query_one("#pane-D", InstancePane).has_class("-down")
            assert "pdtui ctl: kill D" in str(app.query_one("#notice").render())
            down = await asyncio.to_thread(request, path, {"verb": "down"}, timeout_s=10)
            assert down["ok"]
            for _ in range(40):
                if not app.is_running:
                    break
                await pilot.pause(0.05)
            assert not app.is_running  # `pdtui ctl down` closed the dashboard
            server.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert ("aclose", "pdtui ctl: down") in fake.calls and app.return_code == 0


class TakenPorts(FakeRuntime):
    async def start(self) -> float:
        raise PortInUse("proxy: port 9000 on 127.0.0.1 is already in use (Address already in use)")


async def test_a_port_taken_at_start_closes_the_dashboard_with_1() -> None:
    fake = TakenPorts()
    app = make_app(fake, clock=lambda: T0 + 100)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(40):
            if not app.is_running:
                break
            await pilot.pause(0.05)
        assert not app.is_running
    assert app.return_code == 1
