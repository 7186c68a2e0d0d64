"""`pdtui attach`: dashboards on a running service (a real `pdtui up --headless` over fake engines,
tests/child_scripts/fake_engines; no vLLM). Viewers see the same requests, a late one the history
first; a read-only one has no kill or restart keys; a viewer that quits or loses its terminal
leaves the service, its other viewers and a stream going through the proxy alone."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdtui.app.app import make_app
from pdtui.core import config as config_mod
from pdtui.core.control import request
from pdtui.core.events import RequestTraced
from pdtui.core.remote import RemoteSource
from tests.fake_service import ROOT, alive, ctl, fake_env, fake_profile, wait_gone, wait_ready


@contextlib.contextmanager
def service(folder: Path, **env: str) -> Iterator[tuple[Path, config_mod.PairConfig, Path]]:
    """`pdtui up --headless` over fake P/D engines that stream: (its socket, its config, PDTUI_HOME);
    stopped with `pdtui ctl down` (then killed, if need be), nothing left."""
    home = folder / "h"
    profile = fake_profile(folder)
    cfg = config_mod.load_profile(profile)
    sock = home / "state" / "ctl" / f"{cfg.proxy_port}.sock"
    with open(folder / "service.err", "w") as err:
        up = subprocess.Popen([sys.executable, "-m", "pdtui", "up", "--headless", "--profile", str(profile)],
                              env=fake_env(home, "pd", **env), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                              start_new_session=True)
    try:
        st = wait_ready(home, sock, up)
        yield sock, cfg, home
        ctl(home, "down", "--proxy-port", str(cfg.proxy_port))
        assert up.wait(timeout=20) == 0, (folder / "service.err").read_text()
        assert wait_gone([i["pid"] for i in st["instances"]]) == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def stream(cfg: config_mod.PairConfig, rid: str, tokens: int = 5) -> list[float]:
    """One streamed completion through the proxy: the arrival time of each chunk."""
    times = []
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{cfg.proxy_url}/v1/completions", headers={"X-Request-Id": rid},
            json={"model": cfg.model_name, "prompt": "hello", "max_tokens": tokens, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())
            if line == "data: [DONE]":
                break
    return times


def traces(events: Any, prefix: str) -> list[str]:
    return [e.to_json() for e in events if isinstance(e, RequestTraced) and e.request_id.startswith(prefix)]


async def wait_for(pilot: Any, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not seen in time"
        await pilot.pause(0.05)


@pytest.fixture
def live(short_tmp: Path) -> Iterator[tuple[Path, config_mod.PairConfig, Path]]:
    with service(short_tmp) as found:
        yield found


@pytest.mark.anyio
async def test_viewers_see_the_same_requests_and_a_late_one_gets_the_history_first(
        live: tuple[Path, config_mod.PairConfig, Path]) -> None:
    import asyncio

    sock, cfg, _home = live
    viewer = RemoteSource(sock, read_only=True)
    await viewer.connect()
    other = RemoteSource(sock)
    await other.connect()
    await other.start()
    app = make_app(viewer)
    async with app.run_test(size=(120, 40)) as pilot:
        for i in range(3):
            await asyncio.to_thread(stream, cfg, f"attach-{i}")
        await wait_for(pilot, lambda: len([r for r in app.snapshot.requests if r.request_id.startswith("attach-")]) == 3
                       and len(traces(other.history, "attach-")) == 3)
        assert traces(viewer.history, "attach-") == traces(other.history, "attach-")  # the same events, both
        # a late viewer: the history first, before start() returns
        late = RemoteSource(sock)
        header = await late.connect()
        assert header["history"] > 3
        await late.start()
        assert traces(late.history, "attach-") == traces(other.history, "attach-")
        assert late.instances["D"].state == "ready" and late.run.proxy_url == cfg.proxy_url
        await late.aclose()

        # read-only: no kill or restart keys in the footer; a press is refused with a notice
        assert app.sub_title == "attached, read-only"
        active = app.screen.active_bindings
        assert {active[k].binding.action for k in "kKrR"} == {"refuse('kill')", "refuse('restart')"}
        assert not any(active[k].binding.show for k in "kKrR")
        await pilot.press("k")
        await wait_for(pilot, lambda: bool(app.notices) and "read-only" in app.notices[-1].text)
        assert "kill is refused" in app.notices[-1].text
        status = await other.control.status()
        assert [(i["name"], i["state"], i["restarts"]) for i in status["instances"]] == [("P", "ready", 0),
                                                                                          ("D", "ready", 0)]
        assert status["viewers"] == 2
        await pilot.press("q")  # leaves: the service runs on
    assert viewer.ended == "left" and viewer.closed
    await asyncio.to_thread(stream, cfg, "after-0")
    deadline = time.monotonic() + 10
    while not traces(other.history, "after-"):
        assert time.monotonic() < deadline, "the other viewer stopped seeing the service"
        await asyncio.sleep(0.05)
    status = await other.control.status()
    assert status["viewers"] == 1 and status["closing"] is False
    await other.aclose()


def attach_on_a_terminal(home: Path, cfg: config_mod.PairConfig) -> tuple[subprocess.Popen[bytes], int, list[bytes]]:
    """`pdtui attach` on a pseudo-terminal of its own, its screen drained by a thread."""
    master, slave = pty.openpty()
    env = fake_env(home, TERM="xterm-256color", COLUMNS="120", LINES="40")
    proc = subprocess.Popen([sys.executable, "-m", "pdtui", "attach", "--proxy-port", str(cfg.proxy_port)], env=env,
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    screen: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                screen.append(chunk)

    threading.Thread(target=drain, daemon=True).start()
    return proc, master, screen


def test_a_viewer_that_quits_and_one_that_loses_its_terminal_leave_the_stream_and_the_service_alone(
        short_tmp: Path) -> None:
    """Two `pdtui attach` processes; a 200-chunk stream through the proxy; one viewer quits (q), the
    other gets SIGHUP (its SSH session dropped) mid-stream: both end, the stream ends whole with no
    gap over 1 s at the client, and the service answers on with no viewer."""
    with service(short_tmp, PDTUI_FAKE_ITL_S="0.02") as (sock, cfg, home):
        viewers = [attach_on_a_terminal(home, cfg) for _ in range(2)]
        try:
            deadline = time.monotonic() + 40
            while request(sock, {"verb": "status"}, timeout_s=10)["viewers"] < 2:
                assert time.monotonic() < deadline, [b"".join(v[2])[-2000:] for v in viewers]
                assert all(v[0].poll() is None for v in viewers), [b"".join(v[2])[-2000:] for v in viewers]
                time.sleep(0.1)
            time.sleep(1.0)  # both drawn: their start-up is not what is measured
            got: list[list[float]] = []
            client = threading.Thread(target=lambda: got.append(stream(cfg, "witness-0", tokens=200)))
            t0 = time.monotonic()
            client.start()
            time.sleep(1.0)
            (quitter, q_master, _), (dropped, _, _) = viewers
            os.write(q_master, b"q")
            time.sleep(0.5)
            os.kill(dropped.pid, signal.SIGHUP)
            assert quitter.wait(timeout=20) == 0 and dropped.wait(timeout=20) == 0
            client.join(30)
            assert got, "the stream did not finish"
            times = got[0]
            assert len(times) == 201  # 200 chunks and [DONE]
            gaps = [b - a for a, b in zip([t0, *times], times, strict=False)]
            assert max(gaps) < 1.0, f"a gap of {max(gaps):.2f} s"
            assert times[-1] - t0 > 2.0  # the viewers ended while it ran (200 x 20 ms)
            status = request(sock, {"verb": "status"}, timeout_s=10)
            assert status["viewers"] == 0 and [i["state"] for i in status["instances"]] == ["ready", "ready"]
            screens = [b"".join(v[2]).decode(errors="replace") for v in viewers]
            assert "left the service" in screens[0] and "it runs on" in screens[0]
            assert all("\x1b[" in s for s in screens)  # each drew the dashboard
        finally:
            for proc, master, _ in viewers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                os.close(master)
        assert json.loads(ctl(home, "status", "--proxy-port", str(cfg.proxy_port), "--json").stdout)["ok"]
    assert not alive(viewers[0][0].pid) and not alive(viewers[1][0].pid)
