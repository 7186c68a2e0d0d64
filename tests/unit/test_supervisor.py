"""The supervisor with real child processes (tests/child_scripts/fake_server.py) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from pdtui.core.config import LaunchSpec
from pdtui.core.events import InstanceStateChanged
from pdtui.core.supervisor import Instance, PortInUse, StartupFailed, check_port_free
from tests.fakes import free_port

CHILD = Path(__file__).resolve().parents[1] / "child_scripts" / "fake_server.py"


def make(mode: str, events: list, **kw) -> Instance:
    port = free_port()
    spec = LaunchSpec("D", "decode", [sys.executable, str(CHILD), str(port), mode], {}, f"http://127.0.0.1:{port}")
    return Instance(spec, events.append, port=port, ready_timeout_s=kw.pop("ready_timeout_s", 20), **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_ready_then_stop_reports_states_in_order():
    events: list = []

    async def go():
        inst = make("ready", events)
        elapsed = await inst.start()
        assert inst.ready and 0 < elapsed < 20
        assert os.getpgid(inst.pid) == inst.pid  # its own process group
        await inst.stop()
        assert not inst.alive

    run(go())
    states = [e.state for e in events if isinstance(e, InstanceStateChanged)]
    assert states == ["starting", "ready", "stopping", "exited"]


def test_a_child_that_dies_during_start_up_fails_at_once_with_the_cause():
    events: list = []

    async def go():
        inst = make("crash", events, ready_timeout_s=60)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(StartupFailed) as err:
            await inst.start()
        assert loop.time() - t0 < 10  # not the 60 s ready timeout
        return str(err.value)

    msg = run(go())
    assert "exited with code 3 during start-up" in msg
    assert "Cause: ValueError: fake engine refuses to start" in msg
    assert "starting fake server" in msg  # the log tail


def test_stop_escalates_to_sigkill_of_the_whole_group():
    events: list = []

    async def go():
        inst = make("stubborn", events, stop_grace_s=1.0)
        await inst.start()
        grandchild = None
        for _ in range(50):
            grandchild = next((int(line.split()[1]) for line in inst.log_tail if line.startswith("GRANDCHILD")), None)
            if grandchild:
                break
            await asyncio.sleep(0.1)
        assert grandchild and alive(grandchild)
        code = await inst.stop()
        assert code == -9
        for _ in range(50):
            if not alive(grandchild):
                break
            await asyncio.sleep(0.1)
        assert not alive(grandchild), "the grandchild outlived the group kill"

    run(go())


def test_kill_and_restart():
    events: list = []

    async def go():
        inst = make("ready", events)
        await inst.start()
        first = inst.pid
        assert await inst.kill(reason="drill") == -9
        exited = [e for e in events if isinstance(e, InstanceStateChanged) and e.state == "exited"][-1]
        assert exited.exit_code == -9 and "drill" in exited.detail and "SIGKILL" in exited.detail
        await inst.start()
        assert inst.ready and inst.pid != first
        await inst.stop()

    run(go())


def test_port_in_use_gets_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"port {port} on 127.0.0.1 is already in use.*ss -ltnp"):
            check_port_free("127.0.0.1", port, "D (decode) HTTP")
        events: list = []
        spec = LaunchSpec("D", "decode", [sys.executable, str(CHILD), str(port), "ready"], {}, f"http://127.0.0.1:{port}")
        inst = Instance(spec, events.append, port=port)
        with pytest.raises(PortInUse):
            run(inst.start())
        assert inst.proc is None  # nothing was launched
