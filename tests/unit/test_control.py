"""Control (pdtui.core.control): the one path for the dashboard's keys and `pdtui ctl`.

Three layers: Control over a scripted stub runtime; the control socket (owner-only, stale and live
sockets, malformed requests); and a real Runtime whose instances are fake child processes
(tests/child_scripts/fake_server.py), driven by `pdtui ctl` as a subprocess, headless included.
No vLLM here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pdtui.core import config as config_mod
from pdtui.core.control import Control, ControlError, ControlInUse, ControlServer, NotListening, request
from pdtui.core.events import InstanceStateChanged, Notice
from pdtui.core.source import RunInfo
from tests.fake_service import ctl, env_for, fake_profile, wait_ready

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "child_scripts" / "fake_server.py"


def run(coro: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ----- a scripted runtime ------------------------------------------------------------------------


class StubInstance:
    def __init__(self, name: str, role: str) -> None:
        self.name, self.role, self.url = name, role, f"http://127.0.0.1:9{len(name)}00"
        self.state, self.pid = "ready", 1000 + len(name)
        self.ready_timeout_s, self.stop_grace_s = 5.0, 1.0
        self.log_path: Path | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class StubRuntime:
    """A stub Source (pdtui.core.source) for Control; restart takes ``restart_s`` and fails if
    ``fail_restart``."""

    def __init__(self) -> None:
        self.instances = {"P": StubInstance("P", "prefill"), "D": StubInstance("D", "decode"),
                          "D2": StubInstance("D2", "decode")}
        self.history: list[Any] = []
        self.calls: list[tuple[str, Any]] = []
        self.run = RunInfo("cpu", "tiny", "http://127.0.0.1:9000", 128, ready_timeout_s=5.0)
        self.replay, self.broken, self.geometry = False, None, None
        self.t_start = time.monotonic() - 12.0
        self.log_dir = Path("/tmp/run")
        self.closed = False
        self.restart_s = 0.3
        self.fail_restart = False

    def emit(self, ev: Any) -> None:
        self.history.append(ev)

    def _state(self, name: str, state: str, **kw: Any) -> None:
        inst = self.instances[name]
        inst.state = state
        self.emit(InstanceStateChanged(instance=name, role=inst.role, state=state, pid=inst.pid, **kw))

    async def kill(self, name: str, reason: str = "killed by pdtui (drill)") -> int:
        self.calls.append(("kill", name, reason))
        self._state(name, "exited", exit_code=-9, detail=f"{reason} (signal SIGKILL)")
        return -9

    async def restart(self, name: str) -> float:
        self.calls.append(("restart", name))
        self._state(name, "stopping", detail="restarting")
        self._state(name, "exited", exit_code=0, detail="restarting")
        self.instances[name].pid += 1
        self._state(name, "starting")
        await asyncio.sleep(self.restart_s)
        if self.fail_restart:
            self._state(name, "exited", exit_code=3, detail="exited unexpectedly: its API server exited with code 3")
            raise RuntimeError("D (decode) exited with code 3 during start-up.\nCause: ValueError: no")
        self._state(name, "ready")
        return self.restart_s

    async def aclose(self, reason: str = "closed") -> None:
        self.calls.append(("aclose", reason))
        self.closed = True
        for name in self.instances:
            self.instances[name].state = "exited"


def test_names_case_and_roles_resolve_and_an_unknown_one_is_named() -> None:
    c = Control(StubRuntime())
    assert c.resolve("D") == "D" and c.resolve("d2") == "D2" and c.resolve("p") == "P"
    assert c.resolve("decode") == "D" and c.resolve("prefill") == "P"  # the first of the role (the keys)
    with pytest.raises(ControlError) as err:
        c.resolve("X")
    assert err.value.code == "unknown_instance"
    assert "no instance 'X'" in str(err.value) and "P (prefill), D (decode), D2 (decode)" in str(err.value)


def test_unknown_verbs_and_malformed_requests_are_answered_as_errors() -> None:
    c = Control(StubRuntime())

    async def go() -> list[dict[str, Any]]:
        return [await c.handle(r) for r in (
            {"verb": "frob"}, ["status"], {"verb": "kill"}, {"verb": "restart", "instance": "D", "timeout_s": -1},
            {"verb": "kill", "instance": "Q"})]

    frob, notdict, noname, badtimeout, unknown = run(go())
    assert frob["ok"] is False and frob["code"] == "unknown_verb" and "status, kill, restart, down" in frob["error"]
    assert notdict["code"] == "bad_request" and noname["code"] == "bad_request" and "needs an instance" in noname["error"]
    assert badtimeout["code"] == "bad_request"
    assert unknown["code"] == "unknown_instance"


def test_kill_is_the_runtimes_kill_and_names_its_source() -> None:
    rt = StubRuntime()
    c = Control(rt)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        return await c.kill("decode"), await c.handle({"verb": "kill", "instance": "P"})

    key, ctl = run(go())
    assert key == {"ok": True, "verb": "kill", "instance": "D", "role": "decode", "was": "ready", "exit_code": -9,
                   "state": "exited"}
    assert rt.calls[0] == ("kill", "D", "killed by pdtui (drill)")  # a key: the Runtime's own words
    assert rt.calls[1] == ("kill", "P", "killed by pdtui ctl")
    assert ctl["ok"] and ctl["instance"] == "P"
    notes = [e.text for e in rt.history if isinstance(e, Notice)]
    assert notes == ["pdtui ctl: kill P"]


def test_restart_reports_progress_and_the_ready_time() -> None:
    rt = StubRuntime()
    c = Control(rt)
    seen: list[dict[str, Any]] = []

    answer = run(c.restart("D", progress=seen.append))
    assert answer["ok"] and answer["instance"] == "D" and answer["ready_s"] == pytest.approx(0.3)
    assert answer["state"] == "ready" and answer["pid"] == 1002
    assert any(p["state"] == "starting" and "pid 1002" in p["progress"] for p in seen)
    assert rt.calls == [("restart", "D")]


def test_a_second_restart_of_the_same_instance_is_busy_and_a_failed_one_says_why() -> None:
    rt = StubRuntime()
    c = Control(rt)

    async def go() -> tuple[Any, ...]:
        first = asyncio.ensure_future(c.restart("D"))
        await asyncio.sleep(0.05)
        second = await c.handle({"verb": "restart", "instance": "D"})
        other = await c.restart("P")  # another instance is free to restart meanwhile
        await first
        rt.fail_restart = True
        failed = await c.handle({"verb": "restart", "instance": "D"})
        return second, other, failed

    second, other, failed = run(go())
    assert second["ok"] is False and second["code"] == "busy" and "already restarting" in second["error"]
    assert other["ok"]
    assert failed["ok"] is False and failed["code"] == "failed" and "did not come back" in failed["error"]
    assert "ValueError: no" in failed["error"]


def test_restart_is_bounded_and_the_start_goes_on() -> None:
    rt = StubRuntime()
    rt.restart_s = 1.0
    c = Control(rt)

    async def go() -> tuple[dict[str, Any], float, str]:
        t0 = time.monotonic()
        answer = await c.handle({"verb": "restart", "instance": "D", "timeout_s": 0.3})
        waited = time.monotonic() - t0
        await asyncio.sleep(1.0)
        return answer, waited, rt.instances["D"].state

    answer, waited, later = run(go())
    assert answer["code"] == "timeout" and "not ready within 0.3 s (state starting)" in answer["error"]
    assert waited < 0.9
    assert later == "ready"  # not cancelled: the instance's own ready timeout is the real bound


def test_status_has_every_instance_its_last_death_and_restarts() -> None:
    rt = StubRuntime()
    c = Control(rt, socket_path=Path("/tmp/x.sock"))

    async def go() -> dict[str, Any]:
        await c.kill("D")
        await c.restart("D")
        rt._state("P", "exited", exit_code=-9, detail="exited unexpectedly: its VLLM::EngineCore (pid 7) died")
        return await c.status()

    st = run(go())
    assert st["ok"] and st["verb"] == "status" and st["pid"] == os.getpid()
    assert st["proxy_url"] == "http://127.0.0.1:9000" and st["run_dir"] == "/tmp/run" and st["profile"] == "cpu"
    assert 11 < st["uptime_s"] < 60 and st["socket"] == "/tmp/x.sock" and st["closing"] is False
    by = {i["name"]: i for i in st["instances"]}
    assert set(by) == {"P", "D", "D2"}
    assert by["D"]["state"] == "ready" and by["D"]["ready"] is True and by["D"]["restarts"] == 0
    assert by["D"]["last_death"]["detail"] == "restarting"  # the last exit: the restart's stop
    assert by["P"]["ready"] is False and by["P"]["last_death"]["unexpected"] is True
    assert by["P"]["last_death"]["exit_code"] == -9 and "EngineCore" in by["P"]["last_death"]["detail"]
    assert by["D2"]["last_death"] is None
    assert json.loads(json.dumps(st)) == st  # JSON as it is


def test_down_stops_everything_then_tells_the_host_and_refuses_more() -> None:
    rt = StubRuntime()
    c = Control(rt)
    told: list[str] = []
    c.on_down(lambda: told.append("exit"))

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        answer = await c.down(source="pdtui ctl")
        return answer, await c.handle({"verb": "kill", "instance": "D"})

    answer, after = run(go())
    assert answer["ok"] and answer["stopped"] == ["P", "D", "D2"]
    assert rt.calls == [("aclose", "pdtui ctl: down")] and told == ["exit"]
    assert after["code"] == "closed"


# ----- the socket --------------------------------------------------------------------------------


def _ask(path: Path, req: dict[str, Any]) -> Any:
    return asyncio.to_thread(request, path, req, timeout_s=10)


def test_the_socket_is_owner_only_and_removed_on_close(short_tmp: Path) -> None:
    folder = short_tmp / "ctl"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # a folder left open by someone: tightened
    path = folder / "9000.sock"

    async def go() -> dict[str, Any]:
        server = await ControlServer(Control(StubRuntime()), path).start()
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        answer = await _ask(path, {"verb": "status"})
        server.close()
        return answer

    answer = run(go())
    assert answer["ok"] and answer["socket"] == str(path)
    assert not path.exists()
    with pytest.raises(NotListening, match=str(path)):
        request(path, {"verb": "status"})


def test_a_stale_socket_is_replaced_and_a_live_one_refused(short_tmp: Path) -> None:
    path = short_tmp / "ctl" / "9000.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a pdtui that died: the file stays, nobody listens
    stale.close()
    with pytest.raises(NotListening, match="stale"):
        request(path, {"verb": "status"})

    async def go() -> tuple[str, dict[str, Any]]:
        first = await ControlServer(Control(StubRuntime()), path).start()
        with pytest.raises(ControlInUse) as err:
            await ControlServer(Control(StubRuntime()), path).start()
        still = await _ask(path, {"verb": "status"})  # the first one untouched
        first.close()
        return str(err.value), still

    refused, still = run(go())
    assert "another pdtui answers on the control socket" in refused and f"pid {os.getpid()}" in refused
    assert still["ok"]


def test_malformed_lines_and_unknown_verbs_over_the_socket(short_tmp: Path) -> None:
    path = short_tmp / "c.sock"

    def raw(data: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(data)
            return json.loads(s.makefile("rb").readline())

    async def go() -> list[dict[str, Any]]:
        server = await ControlServer(Control(StubRuntime()), path).start()
        try:
            return [await asyncio.to_thread(raw, b"not json\n"), await _ask(path, {"verb": "reboot"}),
                    await _ask(path, {"verb": "restart", "instance": "Z"})]
        finally:
            server.close()

    bad, verb, name = run(go())
    assert bad["ok"] is False and bad["code"] == "bad_request"
    assert verb["code"] == "unknown_verb" and "reboot" in verb["error"]
    assert name["code"] == "unknown_instance" and "'Z'" in name["error"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_reach_the_socket_nor_be_served(short_tmp: Path) -> None:
    path = short_tmp / "ctl" / "9000.sock"
    os.chmod(short_tmp, 0o755)
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
             "except OSError as e:\n    print('refused', e.errno); sys.exit(0)\n"
             "try:\n    s.sendall(b'{\"verb\": \"down\"}\\n')\nexcept BrokenPipeError:\n    pass\n"
             "print(s.makefile().readline().strip())")  # the server may refuse before reading
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system python another user can run")

    def as_nobody() -> str:
        out = subprocess.run([python, "-I", "-c", probe, str(path)], user=65534, capture_output=True, text=True,
                             timeout=20, check=False)
        return out.stdout.strip() + out.stderr.strip()

    async def go() -> tuple[str, str]:
        rt = StubRuntime()
        server = await ControlServer(Control(rt), path).start()
        try:
            blocked = await asyncio.to_thread(as_nobody)
            os.chmod(path.parent, 0o777)  # even if the folder and the socket were opened up ...
            os.chmod(path, 0o666)
            served = await asyncio.to_thread(as_nobody)
            assert rt.calls == []  # ... the peer's uid is checked: nothing was stopped
            return blocked, served
        finally:
            server.close()

    blocked, served = run(go())
    assert blocked.startswith("refused 13"), blocked  # EACCES: the 0700 folder
    assert '"forbidden"' in served and "uid 65534" in served


# ----- a real Runtime over fake engines, driven by `pdtui ctl` ---------------------------------------


FAKE_ENGINES = f"""
import os, sys
from pdtui.core import runtime
from pdtui.core.config import LaunchSpec

class FakeEngines(runtime.Runtime):
    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        for name, inst in self.instances.items():
            argv = ([sys.executable, {str(CHILD)!r}, str(inst.port), "ready"] if os.environ.get("FAKE_MODE") != "never"
                    else [sys.executable, "-c", "import time; time.sleep(120)"])
            inst.spec = LaunchSpec(name, inst.role, argv, {{}}, inst.url)

runtime.Runtime = FakeEngines
from pdtui import cli
sys.exit(cli.main(sys.argv[1:]))
"""
"""`python -c FAKE_ENGINES up ...`: the real CLI, whose Runtime launches fake_server.py for each instance
(FAKE_MODE=never: a process that never gets ready)."""


def test_headless_up_is_driven_by_pdtui_ctl(short_tmp: Path) -> None:
    """`pdtui up --headless` (fake engines): status, kill D, restart D (waits, ready time), unknown
    names refused, down ends the headless process with 0 and nothing left behind."""
    home = short_tmp / "h"
    profile = fake_profile(short_tmp)
    port = config_mod.load_profile(profile).proxy_port
    sock = home / "state" / "ctl" / f"{port}.sock"
    logs = short_tmp / "logs"
    up = subprocess.Popen([sys.executable, "-c", FAKE_ENGINES, "up", "--headless", "--profile", str(profile),
                           "--log-dir", str(logs)], env=env_for(home), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(home, sock, up)
        args = ("--proxy-port", str(port))
        st = ctl(home, "status", *args, "--json")
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert [(i["name"], i["state"]) for i in status["instances"]] == [("P", "ready"), ("D", "ready")]
        assert status["run_dir"] == str(logs) and status["proxy_url"].endswith(f":{port}")
        pids = [i["pid"] for i in status["instances"]]
        text = ctl(home, "status", *args)
        assert text.returncode == 0 and "D    decode   ready" in text.stdout

        kill = ctl(home, "kill", "D", *args)
        assert kill.returncode == 0 and "killed D (decode)" in kill.stdout, kill.stderr
        st = json.loads(ctl(home, "status", *args, "--json").stdout)
        d = st["instances"][1]
        assert d["state"] == "exited" and d["last_death"]["detail"].startswith("killed by pdtui ctl")

        restart = ctl(home, "restart", "d", *args, "--json")
        assert restart.returncode == 0, restart.stderr
        answer = json.loads(restart.stdout)
        assert answer["ok"] and answer["instance"] == "D" and 0 < answer["ready_s"] < 20
        assert "D starting (pid" in restart.stderr  # progress lines on stderr
        st = json.loads(ctl(home, "status", *args, "--json").stdout)
        assert st["instances"][1]["state"] == "ready" and st["instances"][1]["restarts"] == 1

        unknown = ctl(home, "kill", "X", *args)
        assert unknown.returncode == 2 and "no instance 'X'" in unknown.stderr

        down = ctl(home, "down", *args)
        assert down.returncode == 0 and "stopped P, D" in down.stdout, down.stderr
        out, err = up.communicate(timeout=20)
        assert up.returncode == 0, err
        assert f"pdtui: logs in {logs}" in err and f"control socket {sock}" in err
        assert '"runtime_stopped"' in out and "pdtui ctl: down" in out
        assert not sock.exists()
        pids.append(answer["pid"])
        assert not [p for p in pids if Path(f"/proc/{p}").exists()
                    and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert (logs / "D.log").exists() and (logs / "P.log").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def test_ctl_with_nobody_listening_names_the_socket_and_exits_1(short_tmp: Path) -> None:
    home = short_tmp / "h"
    out = ctl(home, "status")
    assert out.returncode == 1
    assert f"no pdtui is listening on {home}/state/ctl/8000.sock" in out.stderr and "pdtui up" in out.stderr
    out = ctl(home, "restart", "D", "--port-offset", "34000", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == "not_listening"
    assert f"{home}/state/ctl/42000.sock" in out.stderr
    out = ctl(home, "kill", "--socket", str(short_tmp / "none.sock"))  # no instance named
    assert out.returncode == 2 and "name the instance" in out.stderr
    out = ctl(home, "status", "--socket", str(short_tmp / "none.sock"))
    assert out.returncode == 1 and str(short_tmp / "none.sock") in out.stderr


def test_down_during_start_up_ends_headless_up_cleanly(short_tmp: Path) -> None:
    home = short_tmp / "h"
    profile = fake_profile(short_tmp)
    port = config_mod.load_profile(profile).proxy_port
    sock = home / "state" / "ctl" / f"{port}.sock"
    up = subprocess.Popen([sys.executable, "-c", FAKE_ENGINES, "up", "--headless", "--profile", str(profile)],
                          env=env_for(home, FAKE_MODE="never"), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        st = wait_ready(home, sock, up, ready=False)
        assert [i["state"] for i in st["instances"]] == ["starting", "starting"] and st["pair_ready_s"] is None
        down = ctl(home, "down", "--proxy-port", str(port), "--json")
        assert down.returncode == 0 and json.loads(down.stdout)["ok"], down.stderr
        _, err = up.communicate(timeout=30)
        assert up.returncode == 0, err
        assert "exited" not in err and "Traceback" not in err  # a stop asked for, not a failed start
        assert not sock.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def test_the_dashboard_is_driven_by_pdtui_ctl_and_closes_on_down(short_tmp: Path) -> None:
    """`pdtui up` with its dashboard on a pseudo-terminal (fake engines): kill and restart from
    `pdtui ctl`, then `down` closes the dashboard with 0 and removes the socket."""
    import pty
    import threading

    home = short_tmp / "h"
    profile = fake_profile(short_tmp)
    port = config_mod.load_profile(profile).proxy_port
    sock = home / "state" / "ctl" / f"{port}.sock"
    master, slave = pty.openpty()
    env = env_for(home, TERM="xterm-256color", COLUMNS="120", LINES="40")
    up = subprocess.Popen([sys.executable, "-c", FAKE_ENGINES, "up", "--profile", str(profile)], env=env, cwd=ROOT,
                          stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    screen: list[bytes] = []

    def drain() -> None:  # the terminal must be read, or the dashboard blocks writing to it
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                screen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_ready(home, sock, up)
        args = ("--proxy-port", str(port))
        assert ctl(home, "kill", "D", *args).returncode == 0
        restart = ctl(home, "restart", "D", *args, "--json")
        assert restart.returncode == 0 and json.loads(restart.stdout)["ok"], restart.stderr
        down = ctl(home, "down", *args)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=20) == 0
        assert not sock.exists()
        out = b"".join(screen).decode(errors="replace")
        assert "pdtui: logs in" in out and "\x1b[" in out  # the run folder, then the dashboard was drawn
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        os.close(master)
        reader.join(5)
