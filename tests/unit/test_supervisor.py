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


def _grandchild(inst: Instance) -> int:
    for line in inst.log_tail:
        if line.startswith("GRANDCHILD "):
            return int(line.split()[1])
    raise AssertionError(f"no grandchild in {list(inst.log_tail)}")


async def _wait_until(pred, timeout_s: float) -> float:
    import time

    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("victim", ["api-server", "engine-core"])
def test_a_kill_from_outside_is_seen_within_2s_everything_goes_and_a_restart_works(victim, tmp_path):
    """kill -9 from another process, as the OOM killer does. The engine-core stand-in holds the log
    pipe and left the process group: the old supervisor waited on the pipe and never saw it."""
    import time

    events: list = []

    async def go():
        inst = make("family", events, log_dir=tmp_path)
        await inst.start()
        await _wait_until(lambda: inst.members, 5)  # the watcher found the engine core by its title
        api, core = inst.pid, _grandchild(inst)
        assert inst.members == {core: "VLLM::EngineCore"}
        scratch = inst.scratch  # where the engine's sockets and temp files went (not /tmp itself)
        assert scratch is not None and sorted(f.name for f in scratch.iterdir()) == ["fake-ipc-socket",
                                                                                     "vllm_dist_fake"]
        t0 = time.monotonic()
        os.kill(api if victim == "api-server" else core, 9)
        await asyncio.wait_for(inst.wait_exit(), 5)
        seen = time.monotonic() - t0
        assert seen < 2.0, seen
        exited = [e for e in events if isinstance(e, InstanceStateChanged) and e.state == "exited"][-1]
        assert "unexpectedly" in exited.detail
        assert ("API server" if victim == "api-server" else "VLLM::EngineCore") in exited.detail
        assert "signal SIGKILL (killed" in exited.detail, exited.detail
        await _wait_until(lambda: not alive(api) and not alive(core), 2)
        assert not scratch.exists(), list(scratch.iterdir())  # no socket of a killed engine left
        # its port is free again, and a restart works, with a temp folder of its own
        check_port_free("127.0.0.1", inst.port, "test")
        await inst.start()
        assert inst.ready and inst.scratch is not None and inst.scratch != scratch and inst.scratch.exists()
        await inst.stop()
        assert not inst.scratch.exists()
        return seen

    seen = run(go())
    print(f"\n[supervisor] {victim} killed from outside: seen after {seen * 1000:.0f} ms")
    log = (tmp_path / "D.log").read_text()
    assert log.count("===== pdtui: D (decode) started") == 2 and "DIED: its" in log and "SIGKILL (killed" in log
    assert "stopped as pdtui asked (stopped)" in log.splitlines()[-1]


def test_the_reaper_kills_everything_when_pdtui_itself_is_killed(tmp_path):
    """kill -9 of pdtui: nothing it launched may outlive it (the pipe to the reaper closes), nor the
    engines' temp folder."""
    import subprocess
    import textwrap
    import time

    script = tmp_path / "fake_pdtui.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.unit.test_supervisor import make
        async def go():
            inst = make("family", [])
            await inst.start()
            while not inst.members:
                await asyncio.sleep(0.05)
            print(inst.pid, *inst.members, flush=True)
            print(inst.scratch, flush=True)
            await asyncio.sleep(600)
        asyncio.run(go())
    """))
    pdtui = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in pdtui.stdout.readline().split()]
        scratch = Path(pdtui.stdout.readline().strip())
        assert len(pids) == 2 and all(alive(p) for p in pids) and scratch.is_dir()
        pdtui.kill()
        pdtui.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), [p for p in pids if alive(p)]
        while scratch.exists() and time.monotonic() < deadline:  # the reaper removes it after the kills
            time.sleep(0.05)
        assert not scratch.exists(), "the engines' temp folder outlived pdtui"
    finally:
        if pdtui.poll() is None:
            pdtui.kill()


def test_a_restart_the_moment_the_process_is_gone_waits_for_the_clean_up_of_the_last_death():
    """Found by the chaos run: a start issued while the last death's clean-up still ran had that
    clean-up's 'exited' taken for the new process's."""
    events: list = []

    async def go():
        inst = make("family", events)
        await inst.start()
        await _wait_until(lambda: inst.members, 5)
        os.kill(inst.pid, 9)
        await _wait_until(lambda: not inst.alive, 5)  # the return code is in; the clean-up is not done
        await inst.start()
        await asyncio.sleep(1.0)
        assert inst.ready and inst.state == "ready", inst.state
        await inst.stop()

    run(go())
    states = [e.state for e in events if isinstance(e, InstanceStateChanged)]
    assert states == ["starting", "ready", "exited", "starting", "ready", "stopping", "exited"], states


def test_a_dead_side_channel_listener_ends_the_instance_with_its_cause():
    """vLLM's NIXL handshake listener is a thread: when it dies (its port taken after pdtui's
    check), the server lives on and answers /health but can never be half of a pair. It must not
    show 'ready': the start fails with the thread's exception, and nothing of it is left."""
    events: list = []

    async def go():
        inst = make("listener-dies", events)
        with pytest.raises(StartupFailed) as e:
            await inst.start()
        assert not inst.alive
        return inst, str(e.value)

    inst, msg = run(go())
    assert "Address already in use" in msg, msg
    exited = [e for e in events if isinstance(e, InstanceStateChanged) and e.state == "exited"]
    assert exited and "side-channel listener thread died" in exited[0].detail
    assert "Address already in use" in exited[0].detail
    assert not [e for e in events if isinstance(e, InstanceStateChanged) and e.state == "ready"]
    assert not alive(inst.pid)


def test_a_crash_by_signal_is_named_in_words_with_where_it_happened(tmp_path):
    """The engine core stand-in dies of SIGILL with faulthandler on (as on an AMX Xeon without the
    tile permission): the exited event names the signal in words and the function it died in."""
    events: list = []

    async def go():
        inst = make("family-sigill", events, log_dir=tmp_path)
        await inst.start()
        await asyncio.wait_for(inst.wait_exit(), 10)

    run(go())
    exited = [e for e in events if isinstance(e, InstanceStateChanged) and e.state == "exited"][-1]
    assert "VLLM::EngineCore" in exited.detail, exited.detail
    assert "SIGILL (illegal instruction" in exited.detail and "cpu_attention_with_kv_cache" in exited.detail, exited.detail
    log = (tmp_path / "D.log").read_text()
    assert "Fatal Python error: Illegal instruction" in log and "===== pdtui: D DIED: its VLLM::EngineCore" in log


def test_death_words_read_crash_reports_and_the_kernel_oom_line(tmp_path):
    from pdtui.core import death

    lines = ["INFO ok", "Fatal Python error: Illegal instruction", "",
             "Thread 0x00007e (most recent call first):",
             '  File "/usr/lib/python3.11/threading.py", line 81 in _worker', "",
             "Current thread 0x00007f (most recent call first):",
             '  File "/x/site-packages/vllm/_custom_ops.py", line 3021 in cpu_attention_with_kv_cache',
             '  File "/x/site-packages/vllm/v1/attention/backends/cpu_attn.py", line 400 in forward']
    crash = death.crash_report(lines)
    assert crash is not None and crash.signal == "SIGILL"
    assert crash.where == ("cpu_attention_with_kv_cache (vllm/_custom_ops.py:3021)"
                           " < forward (vllm/v1/attention/backends/cpu_attn.py:400)")
    vllm_line = [("(EngineCore pid=9) ERROR [multiproc_executor.py:316] Worker proc VllmWorker-0 died"
                 " unexpectedly (exit code: -4), shutting down executor.")]
    assert death.crash_report(vllm_line).signal == "SIGILL"
    assert death.crash_report(["nothing here"]) is None
    kmsg = tmp_path / "kmsg"  # a stand-in for /dev/kmsg: one record per line
    kmsg.write_text("6,100,5,-;Out of memory: Killed process 4242 (VLLM::Worker) total-vm:9000kB\n")
    assert "OOM killer" in death.killed_words(4242, str(kmsg)) and "4242" in death.killed_words(4242, str(kmsg))
    assert "not by the OOM killer" in death.killed_words(4243, str(kmsg))
    assert "not readable" in death.killed_words(4242, str(tmp_path / "missing"))
    assert death.describe_status(9) == "signal SIGKILL (killed)" and death.describe_status(3 << 8) == "code 3"


def test_two_instances_of_one_name_in_one_pdtui_do_not_take_each_other_down():
    """Two Runtimes in one process (the e2e tests start two pairs together) each have a "D": the
    stop of one, which kills its whole family by its processes' tag, leaves the other running (CI at
    d840946: the linked pair's stop took test_pair's P and D, both "P"/"D" of generation 1)."""
    events: list = []

    async def go():
        a, b = make("ready", events), make("ready", events)
        await asyncio.gather(a.start(), b.start())
        assert a.tag != b.tag and not b.tag.startswith(a.tag) and not a.tag.startswith(b.tag)
        await a.stop()
        assert not a.alive and b.alive and alive(b.pid)
        await b.stop()
        assert not b.alive

    run(go())


def test_of_two_engine_processes_found_dead_the_crash_is_named_not_the_termination_after_it():
    """CI at a6d6c50: D's worker died of SIGILL, vLLM then terminated its engine core, and both were
    dead by pdtui's next look; the engine core, listed first, was named (SIGTERM)."""
    from pdtui.core.supervisor import first_cause

    core = (10, "VLLM::EngineCore", " with signal SIGTERM (terminated)")
    worker = (11, "VLLM::Worker", " with signal SIGILL (illegal instruction: the CPU refused an instruction)")
    assert first_cause([core, worker]) == worker
    assert first_cause([worker, core]) == worker
    killed = (12, "VLLM::Worker", " with signal SIGKILL (killed: not by the OOM killer)")
    assert first_cause([core, killed]) == killed
    assert first_cause([core]) == core  # a termination alone is what it is
    unknown = (13, "VLLM::Worker", " (its status was reaped by vLLM before pdtui read it; no crash report in the log)")
    assert first_cause([core, unknown]) == unknown
