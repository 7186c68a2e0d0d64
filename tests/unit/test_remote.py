"""The service and its viewers (issue 23, detach and attach): the control socket's ``subscribe``
(header, history, live events, its last line), a slow viewer dropped and never waited for, the
RemoteSource that reads it (reconnects without losing or repeating an event), read-only viewers,
and the TCP listener's token. In-process first (a stub run, no engines); then `pdtui up --detach`
over fake engines (tests/child_scripts/fake_engines) driven as a user would, `pdtui ctl down`
leaving nothing behind. No vLLM here.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core.control import Control, ControlError, ControlServer, ControlTcpServer, request
from pdtui.core.events import Event, EventHub, InstanceStateChanged, Notice, RuntimeStopped, from_json
from pdtui.core.kvmath import KvGeometry
from pdtui.core.remote import RemoteRefused, RemoteSource
from pdtui.core.source import RunInfo
from tests.fake_service import ROOT, alive, ctl, fake_env, fake_profile, wait_gone
from tests.fakes import free_port
from tests.functional.fake_runtime import request as traced
from tests.waiting import port_free

TOKEN = "a-token-of-forty-three-characters-xxxxxxxxx"


def run(coro: Any, timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ----- a stub run that emits as the Runtime does -------------------------------------------------


class StubInstance:
    def __init__(self, name: str, role: str) -> None:
        self.name, self.role, self.url = name, role, f"http://127.0.0.1:9{len(name)}00"
        self.state, self.pid = "ready", 1000 + len(name)
        self.ready_timeout_s, self.stop_grace_s = 5.0, 1.0
        self.log_path: Path | None = Path(f"/tmp/run/{name}.log")

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class HubRun:
    """A Source whose emit feeds its Control and its hub as Runtime.emit does (a bounded history)."""

    def __init__(self) -> None:
        self.instances = {"P": StubInstance("P", "prefill"), "D": StubInstance("D", "decode")}
        self.history: collections.deque[Event] = collections.deque(maxlen=20000)
        self.hub = EventHub()
        self.run = RunInfo("cpu", "tiny", "http://127.0.0.1:9000", 128, model="/m", ready_timeout_s=5.0)
        self.geometry: KvGeometry | None = KvGeometry(2, 2, 64, "float16", 2)
        self.replay, self.remote, self.broken = False, False, None
        self.t_start: float | None = time.monotonic() - 30.0
        self.log_dir: Path | None = Path("/tmp/run")
        self.closed = False
        self.calls: list[tuple[Any, ...]] = []
        self.control = Control(self)

    def emit(self, ev: Event) -> None:
        self.history.append(ev)
        self.control.observe(ev)
        self.hub.publish(ev)

    def subscribe(self) -> Any:
        return self.hub.subscribe()

    async def kill(self, name: str, reason: str = "killed") -> int:
        self.calls.append(("kill", name, reason))
        self.instances[name].state = "exited"
        self.emit(InstanceStateChanged(instance=name, role=self.instances[name].role, state="exited", exit_code=-9,
                                       detail=reason))
        return -9

    async def restart(self, name: str) -> float:
        self.calls.append(("restart", name))
        return 0.1

    async def stop_instance(self, name: str) -> int:
        return 0

    async def aclose(self, reason: str = "closed") -> None:
        self.closed = True
        self.emit(RuntimeStopped(reason=reason))
        self.hub.close()


def note(i: int) -> Notice:
    return Notice(level="info", text=f"event {i}")


def lines_of(sock: socket.socket) -> Iterator[dict[str, Any]]:
    with sock.makefile("rb") as f:
        for line in f:
            yield json.loads(line)


def subscribe_raw(path: Path, **req: Any) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall((json.dumps({"verb": "subscribe", **req}) + "\n").encode())
    return s


# ----- subscribe -----------------------------------------------------------------------------------


def test_subscribe_sends_a_header_the_history_then_live_events_and_a_last_line(short_tmp: Path) -> None:
    """The contract line by line (a raw client), and the RemoteSource over it: the run, the
    instances, the geometry, the history in order, the live events, `end: closed` when the run
    closes, and the viewer's on_down handlers then."""
    path = short_tmp / "c.sock"
    rt = HubRun()
    for i in range(3):
        rt.emit(note(i))
    rt.emit(traced("r1", 1.0))

    async def go() -> tuple[list[dict[str, Any]], RemoteSource, list[Event], list[str]]:
        server = await ControlServer(rt.control, path).start()
        raw = await asyncio.to_thread(subscribe_raw, path)
        remote = RemoteSource(path)
        header = await remote.connect()
        seen = remote.subscribe()
        await remote.start()
        told: list[str] = []
        remote.control.on_down(lambda: told.append("down"))
        rt.emit(note(4))
        rt.emit(traced("r2", 2.0))
        await asyncio.sleep(0.2)
        await rt.aclose("pdtui ctl: down")
        got = [ev async for ev in seen]
        lines = await asyncio.to_thread(lambda: list(lines_of(raw)))
        raw.close()
        server.close()
        assert header["history"] == 4
        return lines, remote, got, told

    lines, remote, got, told = run(go())
    header = lines[0]
    assert header["ok"] and header["verb"] == "subscribe" and header["pid"] == os.getpid()
    assert header["run"]["model_name"] == "tiny" and header["run"]["proxy_url"] == "http://127.0.0.1:9000"
    assert [(i["name"], i["role"], i["state"], i["pid"]) for i in header["instances"]] == [
        ("P", "prefill", "ready", 1001), ("D", "decode", "ready", 1001)]
    assert header["instances"][0]["log"] == "/tmp/run/P.log" and header["geometry"]["head_dim"] == 64
    assert header["history"] == 4 and header["seq"] == 1 and header["read_only"] is False
    assert header["log_dir"] == "/tmp/run" and 29 < header["t_start_age_s"] < 60 and header["broken"] is None
    events = [from_json(json.dumps(x)) for x in lines[1:-1]]
    assert [getattr(e, "text", getattr(e, "request_id", None)) for e in events] == [
        "event 0", "event 1", "event 2", "r1", "event 4", "r2", None]
    assert isinstance(events[-1], RuntimeStopped)
    assert lines[-1] == {"ok": True, "verb": "subscribe", "end": "closed", "reason": "pdtui ctl: down"}
    # the viewer: the same events, the same instances, its handlers told
    assert [e.to_json() for e in got] == [e.to_json() for e in events]
    assert remote.run == rt.run and remote.geometry == rt.geometry and remote.log_dir == Path("/tmp/run")
    assert remote.instances["D"].log_path == Path("/tmp/run/D.log") and remote.instances["D"].ready
    assert remote.ended == "closed" and remote.closed and told == ["down"]
    assert rt.hub._queues == []  # every subscription is gone


def test_a_late_viewer_gets_how_things_stand_even_when_the_history_no_longer_holds_it(short_tmp: Path) -> None:
    """After a long run the start, the instances' states and their milestones have left the
    bounded history: the preamble brings them first, so the header and the panes are not blank."""
    from pdtui.app.state import DashState
    from pdtui.core.events import ConnectorEvent, PairReady, RuntimeStarted
    from tests.functional.fake_runtime import started, state

    path = short_tmp / "c.sock"
    rt = HubRun()
    rt.history = collections.deque(maxlen=10)
    rt.emit(started())
    for name in ("P", "D"):
        rt.emit(state(name, "starting", 1.0, pid=7))
        rt.emit(ConnectorEvent(instance=name, what="registered", text=f"{name} registered"))
        rt.emit(state(name, "ready", 2.0, pid=7))
    rt.emit(PairReady(elapsed_s=31.5))
    rt.emit(state("D", "starting", 3.0, pid=8))  # D again: its old milestone is no longer how it stands
    rt.emit(state("D", "ready", 4.0, pid=8))
    for i in range(20):
        rt.emit(note(i))

    async def go() -> tuple[dict[str, Any], list[Event]]:
        server = await ControlServer(rt.control, path).start()
        remote = RemoteSource(path)
        header = await remote.connect()
        await remote.start()
        await remote.aclose()
        server.close()
        return header, list(remote.history)

    header, got = run(go())
    assert header["history"] == 10 and header["seq"] == rt.control.seq - 9
    kinds = [type(e).__name__ for e in got[:header["preamble"]]]
    assert kinds == ["RuntimeStarted", "InstanceStateChanged", "ConnectorEvent", "InstanceStateChanged",
                     "PairReady", "InstanceStateChanged", "InstanceStateChanged"]
    assert isinstance(got[0], RuntimeStarted) and [getattr(e, "text", "") for e in got[-10:]] == [
        f"event {i}" for i in range(10, 20)]
    dash = DashState()
    for ev in got:
        dash.apply(ev)
    snap = dash.snapshot()
    assert snap.header.profile == "cpu" and snap.header.ready_s == 31.5
    assert [(v.name, v.state, v.pid) for v in snap.instances] == [("P", "ready", 7), ("D", "ready", 8)]
    assert dict(snap.instance("P").milestones) == {"registered": "P registered"} and not snap.instance("D").milestones


def test_a_viewer_that_reads_nothing_is_dropped_and_never_slows_the_run(short_tmp: Path) -> None:
    """A subscriber that stops reading: the run's emit goes on at full speed (the viewer's backlog
    is its own, bounded), the server drops it with a last line saying so, and its subscription
    ends."""
    path = short_tmp / "c.sock"
    rt = HubRun()
    big = "x" * 2000

    async def go() -> tuple[float, list[dict[str, Any]]]:
        server = await ControlServer(rt.control, path, backlog=200).start()
        raw = await asyncio.to_thread(subscribe_raw, path)
        await asyncio.sleep(0.2)  # subscribed
        assert len(rt.hub._queues) == 1
        spent = 0.0
        for i in range(3000):  # some 6 MB: far past what the socket buffers hold
            t0 = time.perf_counter()
            rt.emit(Notice(level="info", text=f"{i} {big}"))
            spent += time.perf_counter() - t0
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the server run, as the Runtime's loop does
        for _ in range(50):
            if not rt.hub._queues:
                break
            await asyncio.sleep(0.05)
        assert rt.hub._queues == []  # dropped: nothing is kept for it any more
        lines = await asyncio.to_thread(lambda: list(lines_of(raw)))
        raw.close()
        server.close()
        return spent, lines

    spent, lines = run(go())
    assert spent < 1.0  # 3,000 emits (microseconds each): none waited for the viewer
    assert lines[-1]["end"] == "overflow" and lines[-1]["code"] == "overflow" and lines[-1]["ok"] is False
    assert "fell 200 events behind" in lines[-1]["error"] and "runs on" in lines[-1]["error"]
    assert all("event" in x for x in lines[1:-1])  # whole event lines up to the last one


def test_a_dropped_viewer_reconnects_and_misses_nothing_nor_sees_anything_twice(short_tmp: Path) -> None:
    """A burst past the backlog drops the RemoteSource; it says so, reconnects, and takes the
    history from where it was (seq): every event once, in order."""
    path = short_tmp / "c.sock"
    rt = HubRun()
    for i in range(5):
        rt.emit(note(i))

    async def go() -> tuple[RemoteSource, list[Event]]:
        server = await ControlServer(rt.control, path, backlog=20).start()
        remote = RemoteSource(path, reconnect_s=5)
        await remote.connect()
        seen = remote.subscribe()
        await remote.start()
        for i in range(5, 205):  # one step of the loop: the server's pump takes them all before it writes
            rt.emit(note(i))
        deadline = time.monotonic() + 10
        while remote.reconnects == 0 or len([e for e in remote.history if e.text.startswith("event")]) < 205:
            assert time.monotonic() < deadline, "no reconnection"
            await asyncio.sleep(0.05)
        rt.emit(note(205))
        await rt.aclose()
        got = [ev async for ev in seen]
        server.close()
        return remote, got

    remote, got = run(go())
    texts = [e.text for e in got if isinstance(e, Notice)]
    assert [t for t in texts if t.startswith("event")] == [f"event {i}" for i in range(206)]
    said = [t for t in texts if t.startswith("pdtui attach")]
    assert "fell 20 events behind" in said[0] and "reconnecting" in said[0]
    assert said[1].startswith("pdtui attach: reconnected") and remote.missed == 0
    assert remote.ended == "closed"


# ----- read-only viewers and the TCP listener -------------------------------------------------------


def test_tcp_needs_the_right_token_and_a_read_only_viewer_cannot_kill(short_tmp: Path) -> None:
    rt = HubRun()
    path = short_tmp / "c.sock"

    def raw_tcp(port: int, line: bytes) -> tuple[dict[str, Any], bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(line)
            f = s.makefile("rb")
            answer = json.loads(f.readline())
            return answer, f.read()  # b"": the server closed the connection

    async def go() -> dict[str, Any]:
        unix = await ControlServer(rt.control, path).start()
        tcp = await ControlTcpServer(rt.control, "127.0.0.1", 0, TOKEN).start()
        addr = ("127.0.0.1", tcp.port)
        out: dict[str, Any] = {}
        out["none"] = await asyncio.to_thread(raw_tcp, tcp.port, b'{"verb": "status"}\n')
        out["wrong"] = await asyncio.to_thread(raw_tcp, tcp.port, b'{"verb": "down", "token": "guess"}\n')
        out["garbage"] = await asyncio.to_thread(raw_tcp, tcp.port, b"GET / HTTP/1.1\r\n\r\n")
        out["right"] = await asyncio.to_thread(request, addr, {"verb": "status"}, token=TOKEN)
        with pytest.raises(RemoteRefused) as refused:
            await RemoteSource(addr, token="wrong-token-wrong-token").connect()
        out["remote_refused"] = refused.value
        remote = RemoteSource(addr, token=TOKEN)
        out["header"] = await remote.connect()
        await remote.start()
        # read-only: refused by the service (code forbidden), over TCP and over the Unix socket
        for where, ro in (("tcp", RemoteSource(addr, token=TOKEN, read_only=True)), ("unix", RemoteSource(path, read_only=True))):
            await ro.connect()
            for verb in ("kill", "restart", "down"):
                with pytest.raises(ControlError) as err:
                    await (ro.control.kill("D") if verb == "kill" else ro.control.restart("D") if verb == "restart"
                           else ro.control.down())
                out[f"{where}-{verb}"] = err.value
            await ro.aclose()
        out["status_ro"] = await RemoteSource(path, read_only=True).control.status()
        out["calls_before"] = list(rt.calls)
        out["kill"] = await remote.control.kill("d")  # a viewer that may: the service does it
        await asyncio.sleep(0.1)
        out["notices"] = [e.text for e in rt.history if isinstance(e, Notice)]
        out["d_state"] = remote.instances["D"].state
        await remote.aclose()
        tcp.close()
        unix.close()
        return out

    out = run(go())
    for case in ("none", "wrong", "garbage"):
        answer, rest = out[case]
        assert answer["ok"] is False and answer["code"] == "forbidden" and rest == b"", (case, answer)
    assert "needs a token" in out["none"][0]["error"] and out["wrong"][0]["error"] == "wrong token"
    assert rt.closed is False  # the wrong token's down did nothing
    assert out["right"]["ok"] and out["right"]["tcp"].startswith("127.0.0.1:") and TOKEN not in json.dumps(out["right"])
    assert out["remote_refused"].code == "forbidden" and "wrong token" in str(out["remote_refused"])
    assert out["header"]["ok"] and out["header"]["history"] == 0
    for key in ("tcp-kill", "tcp-restart", "tcp-down", "unix-kill", "unix-restart", "unix-down"):
        assert out[key].code == "forbidden" and "read-only" in str(out[key]), key
    assert out["status_ro"]["ok"]  # reading is what a read-only viewer does
    assert out["calls_before"] == []
    assert out["kill"]["ok"] and out["kill"]["instance"] == "D" and rt.calls == [("kill", "D", "killed by pdtui attach")]
    assert "pdtui attach: kill D" in out["notices"]
    assert out["d_state"] == "exited"  # the viewer's instance followed the service's event


# ----- `pdtui up --detach` over fake engines -----------------------------------------------------------


def test_up_detach_returns_once_ready_serves_on_and_ctl_down_leaves_nothing(short_tmp: Path) -> None:
    """`pdtui up --detach --listen`: returns 0 once the pair is ready, saying where everything is;
    the service runs in a session of its own, ignores SIGHUP, answers on its socket and on TCP
    (token 0600, wrong or no token refused), proxies a stream; `pdtui ctl down` then stops it,
    its engines and ports, and removes the socket."""
    home = short_tmp / "h"
    profile = fake_profile(short_tmp)
    cfg = config_mod.load_profile(profile)
    sock = home / "state" / "ctl" / f"{cfg.proxy_port}.sock"
    tcp = free_port()
    t0 = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "pdtui", "up", "--detach", "--profile", str(profile),
                         "--listen", f"127.0.0.1:{tcp}"], env=fake_env(home), cwd=ROOT, capture_output=True,
                        text=True, timeout=90, check=False)
    took = time.monotonic() - t0
    service: int | None = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = request(sock, {"verb": "status"}, timeout_s=10)
        service = status["pid"]
        run_dir = Path(status["run_dir"])
        out = up.stdout
        assert f"service running (pid {service}): pair ready in" in out and cfg.proxy_url in out
        assert f"control socket  {sock}" in out and f"run folder      {run_dir}" in out
        assert f"recording       {run_dir / 'events.jsonl'}" in out
        assert f"TCP             127.0.0.1:{tcp}, token in {run_dir / 'token'}" in out
        assert f"pdtui attach --proxy-port {cfg.proxy_port}" in out and f"pdtui ctl down --proxy-port {cfg.proxy_port}" in out
        assert f"starting the service (pid {service}); its output goes to {run_dir / 'service.out'}" in up.stderr
        assert "P ready, D ready" in up.stderr  # the progress, a line per change off a terminal
        assert took < 60
        # a service of its own: another session, SIGHUP ignored, its output in the run folder
        assert os.getsid(service) == service != os.getsid(0)
        os.kill(service, signal.SIGHUP)
        time.sleep(0.5)
        assert alive(service) and request(sock, {"verb": "status"}, timeout_s=10)["ok"]
        assert "pair ready in" in (run_dir / "service.out").read_text()
        token_file = run_dir / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        # TCP: the token or nothing
        assert request(("127.0.0.1", tcp), {"verb": "status"})["code"] == "forbidden"
        assert request(("127.0.0.1", tcp), {"verb": "down"}, token="x" * 43)["code"] == "forbidden"
        st = ctl(home, "status", "--connect", f"127.0.0.1:{tcp}", "--token-file", str(token_file), "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["pid"] == service, st.stderr
        assert json.loads(st.stdout)["tcp"] == f"127.0.0.1:{tcp}"
        assert token not in up.stdout + up.stderr  # where it is, never the token itself
        # the proxy serves
        with httpx.Client(timeout=20) as client:
            r = client.post(f"{cfg.proxy_url}/v1/completions", json={"model": cfg.model_name, "prompt": "hi",
                                                                        "max_tokens": 5, "stream": True})
            assert r.status_code == 200 and r.text.count("data: ") == 6 and "[DONE]" in r.text
        engines = [i["pid"] for i in status["instances"]]
        assert all(alive(p) for p in engines)

        down = ctl(home, "down", "--proxy-port", str(cfg.proxy_port))
        assert down.returncode == 0 and "stopped P, D" in down.stdout, down.stderr
        assert wait_gone([service, *engines]) == []
        service = None
        assert not sock.exists()
        ports = [cfg.proxy_port, tcp, *(i.port for i in cfg.instances), *(i.side_channel_port for i in cfg.instances)]
        assert [p for p in ports if not port_free(p)] == []
        recorded = (run_dir / "events.jsonl").read_text().splitlines()
        assert '"runtime_started"' in recorded[0] and '"runtime_stopped"' in recorded[-1]
        assert any('"event":"request"' in line for line in recorded)
    finally:
        if service is not None and alive(service):
            os.killpg(service, signal.SIGKILL)


def test_up_detach_exits_1_with_the_cause_when_the_service_dies_starting(short_tmp: Path) -> None:
    home = short_tmp / "h"
    profile = fake_profile(short_tmp)
    cfg = config_mod.load_profile(profile)
    up = subprocess.run([sys.executable, "-m", "pdtui", "up", "--detach", "--profile", str(profile)],
                        env=fake_env(home, "crash"), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "the service exited with code 1 during start-up" in up.stderr
    assert "ValueError: fake engine refuses to start" in up.stderr  # the tail of its output says why
    assert up.stdout == ""
    assert not (home / "state" / "ctl" / f"{cfg.proxy_port}.sock").exists()
    assert port_free(cfg.proxy_port)


def test_up_detach_refuses_what_it_can_before_starting_anything(short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pdtui import cli

    home = short_tmp / "h"
    monkeypatch.setenv("PDTUI_HOME", str(home))
    profile = fake_profile(short_tmp)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["up", "--detach", "--profile", str(profile), "--listen", f"127.0.0.1:{port}"]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err
    assert cli.main(["up", "--detach", "--profile", str(profile), "--listen", "nowhere"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert cli.main(["up", "--detach", "--profile", str(profile), "--token-file", "/nonexistent"]) == 2
    assert "without --listen nothing uses it" in capsys.readouterr().err
    assert not (home / "state" / "runs").exists()  # nothing started, no run folder


def test_the_detached_service_gets_every_flag_given() -> None:
    """`up --detach`'s service command line: `up --headless --service`, its run folder and
    recording, and every other flag as parsed (an abbreviation expanded, --detach never copied)."""
    from pdtui import cli

    args = cli.build_parser().parse_args(["up", "--det", "--port-offset", "100", "--model", "tiny", "--logs",
                                          "--listen", "127.0.0.1:8799", "--token-file", "tok",
                                          "--kv-load-failure-policy", "recompute", "--record", "x.jsonl"])
    got = cli._service_args(args, Path("/r"), Path("/r/x.jsonl"))
    assert got[:7] == ["up", "--headless", "--service", "--log-dir", "/r", "--record", "/r/x.jsonl"]
    rest = got[7:]
    assert "--detach" not in rest and "--det" not in rest and rest.count("--record") == 0
    assert rest[rest.index("--port-offset") + 1] == "100" and rest[rest.index("--model") + 1] == "tiny"
    assert rest[rest.index("--listen") + 1] == "127.0.0.1:8799"
    assert rest[rest.index("--token-file") + 1] == str(Path("tok").resolve())  # the service's cwd may differ
    assert rest[rest.index("--kv-load-failure-policy") + 1] == "recompute" and "--logs" in rest
    again = cli.build_parser().parse_args(got)  # and it parses back to the same settings
    assert (again.port_offset, again.model, again.listen, again.service, again.detach) == (100, "tiny",
                                                                                         "127.0.0.1:8799", True, False)
