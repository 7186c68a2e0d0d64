"""Issue 22: stdout that is /dev/null, closed, a full pipe, or a terminal that went away.

`pdtui proxy` (over fake P and D servers, tests/child_scripts/fake_server.py: not vLLM) and `pdtui up
--headless` (over the same fake engines, tests/fake_service.py) each serve streamed requests with
their stdout in each of four states, stay alive, never hold a stream back (no wait for a chunk over
1 s), and count the events they could not write where docs/proxy.md says: the proxy's /metrics
(``pdtui_events_dropped_total``), headless's `pdtui ctl status` (``stdout``), and each one's last
line on stderr. Then SIGHUP from a terminal that hangs up: it stops both, unless it was ignored at
start (nohup, `trap '' HUP`), when both serve on. And pdtui.core.linesink's LineSink itself, in
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdtui.core import config as config_mod
from pdtui.core.control import request
from pdtui.core.linesink import LineSink
from tests.fake_service import ROOT, fake_env, fake_profile, wait_gone, wait_ready
from tests.fakes import free_port
from tests.stdout_cases import CASES, Stdout, controlling_terminal, fake_pd, stream_many

N = 100
"""Streamed requests served per case (the 1,000-request run: results/2026-12-07-stdout)."""
BUFFER = 4096
"""$PDTUI_EVENT_BUFFER_BYTES in the children: a reader 4 KiB behind loses events (default 16 MiB)."""


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _wait_for(path: Path, text: str, proc: subprocess.Popen[Any], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text(errors="replace") if path.exists() else ""
        if text in got:
            return got
        assert proc.poll() is None, f"exited {proc.returncode}: {got}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen: {path.read_text(errors='replace')}")


def _json_lines(lines: list[bytes]) -> list[dict[str, Any]]:
    """Every line whole JSON: a dropped event is dropped whole, never cut."""
    return [json.loads(x) for x in lines if x.strip()]


def _preexec(*steps: Callable[[], None] | None) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            if step is not None:
                step()
    return run


# ----- `pdtui proxy` over a fake P and D ---------------------------------------------------------


def _proxy(out: Stdout, err: Path, p_url: str, d_url: str, port: int,
           preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PDTUI_EVENT_BUFFER_BYTES": str(BUFFER), "PYTHONPATH": str(ROOT)}
    with err.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "proxy", "--prefill", p_url, "--decode", d_url,
                                 "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out.arg, stderr=f, env=env,
                                cwd=ROOT, preexec_fn=_preexec(out.preexec, preexec),  # noqa: PLW1509 - fd 1, the session: as a shell sets them
                                start_new_session=preexec is None)
    out.spawned()
    return proc


@pytest.mark.parametrize("case", CASES)
def test_pdtui_proxy_serves_streams_whatever_its_stdout_is(case: str, short_tmp: Path) -> None:
    """`pdtui proxy` over fake P and D, stdout /dev/null, closed, a full pipe, a terminal that hung
    up: 100 streamed requests all served, no wait over 1 s, alive after; its /metrics count the
    events it wrote and dropped; a full pipe, once read, gets whole lines and a notice of the gap."""
    out, err = Stdout(case), short_tmp / "proxy.err"
    port = free_port()
    with fake_pd() as (p_url, d_url):
        proc = _proxy(out, err, p_url, d_url, port)
        try:
            _wait_for(err, "listening on", proc)
            out.hang_up()
            ok, worst = stream_many(f"http://127.0.0.1:{port}", N)
            assert ok == N and worst < 1.0, (ok, worst)
            assert proc.poll() is None
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            written = _metric(metrics, "pdtui_events_written_total")
            full = _metric(metrics, 'pdtui_events_dropped_total{reason="full"}')
            gone = _metric(metrics, 'pdtui_events_dropped_total{reason="gone"}')
            assert written + full + gone >= N + 1  # proxy_started and a trace per request at least
            if case == "devnull":
                assert full == gone == 0
            elif case == "closed":
                assert written == 0 and full == 0 and gone >= N + 1
            elif case == "tty_gone":
                assert full == 0 and gone >= N and written >= 1  # proxy_started reached the terminal
            else:
                assert full > 0 and written > 0 and gone == 0
                events = _json_lines(out.read_all(3.0))
                assert events[0]["event"] == "proxy_started"
                gap = [e for e in events if e["event"] == "notice" and "events were dropped" in e["text"]]
                assert gap and "stdout was not read" in gap[0]["text"], events[-3:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            log = err.read_text()
            if case != "devnull":
                assert "events were not written to stdout" in log, log
            assert "Traceback" not in log, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()


@pytest.mark.parametrize("hup", ["default", "ignored"])
def test_pdtui_proxy_on_a_terminal_that_hangs_up(hup: str, short_tmp: Path) -> None:
    """SIGHUP (the controlling terminal hung up) stops `pdtui proxy` (exit 0, says why), as it
    stops `pdtui up --headless`; ignored at start (nohup, `trap '' HUP`) it stays ignored and the
    proxy serves on, the events dropped and counted."""
    out, err = Stdout("tty_gone"), short_tmp / "proxy.err"
    port = free_port()
    with fake_pd() as (p_url, d_url):
        proc = _proxy(out, err, p_url, d_url, port, preexec=controlling_terminal(hup == "ignored"))
        try:
            _wait_for(err, "listening on", proc)
            out.hang_up()
            if hup == "default":
                assert proc.wait(15) == 0
                assert "stopping: SIGHUP" in err.read_text()
                return
            os.killpg(proc.pid, signal.SIGHUP)  # the shell's own, to its jobs
            ok, worst = stream_many(f"http://127.0.0.1:{port}", 20)
            assert ok == 20 and worst < 1.0 and proc.poll() is None
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert _metric(metrics, 'pdtui_events_dropped_total{reason="gone"}') >= 20
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()


# ----- `pdtui up --headless` over fake engines -------------------------------------------------


def _headless(tmp: Path, out: Stdout, err: Path, preexec: Callable[[], None] | None = None
              ) -> tuple[subprocess.Popen[bytes], Path, Path, int]:
    home, logs = tmp / "h", tmp / "logs"
    profile = fake_profile(tmp)
    port = config_mod.load_profile(profile).proxy_port
    sock = home / "state" / "ctl" / f"{port}.sock"
    env = fake_env(home, "pd", PDTUI_FAKE_ITL_S="0.01", PDTUI_EVENT_BUFFER_BYTES=str(BUFFER))
    with err.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pdtui", "up", "--headless", "--profile", str(profile),
                                 "--log-dir", str(logs)], stdin=subprocess.DEVNULL, stdout=out.arg, stderr=f,
                                env=env, cwd=ROOT, preexec_fn=_preexec(out.preexec, preexec),  # noqa: PLW1509 - as above
                                start_new_session=preexec is None)
    out.spawned()
    return proc, home, sock, port


def _down(proc: subprocess.Popen[bytes], sock: Path) -> int:
    request(sock, {"verb": "down"}, timeout_s=60)
    return proc.wait(30)


@pytest.mark.parametrize("case", CASES)
def test_headless_up_serves_streams_whatever_its_stdout_is(case: str, short_tmp: Path) -> None:
    """`pdtui up --headless` over fake engines, stdout /dev/null, closed, a full pipe, a terminal
    that hung up: 100 streamed requests served through its proxy, no wait over 1 s; its control
    socket answers throughout (the loop never waits on stdout); `pdtui ctl status` counts the events
    written and dropped; `down` ends it with 0 and a last stderr line with the count."""
    out, err = Stdout(case), short_tmp / "up.err"
    proc, home, sock, port = _headless(short_tmp, out, err)
    try:
        st = wait_ready(home, sock, proc)
        pids = [i["pid"] for i in st["instances"]]
        out.hang_up()
        ok, worst = stream_many(f"http://127.0.0.1:{port}", N)
        assert ok == N and worst < 1.0, (ok, worst)
        t0 = time.monotonic()
        st = request(sock, {"verb": "status"}, timeout_s=10)
        assert time.monotonic() - t0 < 5 and proc.poll() is None
        assert [i["state"] for i in st["instances"]] == ["ready", "ready"]
        counts = st["stdout"]
        assert counts["written"] + counts["dropped_full"] + counts["dropped_gone"] >= N
        if case == "devnull":
            assert counts["output"] == "null" and counts["dropped_full"] == counts["dropped_gone"] == 0
        elif case == "closed":
            assert counts["gone"] == "closed" and counts["written"] == 0 and counts["dropped_gone"] >= N
        elif case == "tty_gone":
            assert counts["gone"] == "EIO" and counts["dropped_gone"] >= N and counts["written"] >= 1
        else:
            assert counts["output"] == "pipe" and counts["dropped_full"] > 0 and counts["gone"] is None
            events = _json_lines(out.read_all(4.0))
            assert events[0]["event"] == "runtime_started"
            gap = [e for e in events if e["event"] == "notice" and "events were dropped here" in e["text"]]
            assert gap, [e["event"] for e in events[-5:]]
        assert _down(proc, sock) == 0
        assert not wait_gone(pids)
        log = err.read_text()
        if case != "devnull":
            assert "events were not written to stdout" in log, log
        assert "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


@pytest.mark.parametrize("hup", ["default", "ignored"])
def test_headless_up_on_a_terminal_that_hangs_up(hup: str, short_tmp: Path) -> None:
    """The terminal `pdtui up --headless` runs in hangs up (its controlling terminal: SIGHUP to it;
    the engines and the proxy run in sessions of their own). As README promises, that stops
    everything (exit 0, no engine left); with SIGHUP ignored at start (nohup, `trap '' HUP`), the
    pair and its proxy serve on, stdout's events dropped and counted (EIO), also after the SIGHUP a
    shell sends its jobs' process groups."""
    out, err = Stdout("tty_gone"), short_tmp / "up.err"
    proc, home, sock, port = _headless(short_tmp, out, err, preexec=controlling_terminal(hup == "ignored"))
    try:
        st = wait_ready(home, sock, proc)
        pids = [i["pid"] for i in st["instances"]]
        out.hang_up()
        if hup == "default":
            assert proc.wait(30) == 0
            assert not wait_gone(pids) and not sock.exists()
            return
        os.killpg(proc.pid, signal.SIGHUP)  # what the shell sends its jobs when it hangs up
        ok, worst = stream_many(f"http://127.0.0.1:{port}", 20)
        assert ok == 20 and worst < 1.0 and proc.poll() is None
        st = request(sock, {"verb": "status"}, timeout_s=10)
        assert st["stdout"]["gone"] == "EIO" and st["stdout"]["dropped_gone"] >= 20
        assert _down(proc, sock) == 0
        assert not wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


# ----- LineSink, in process ----------------------------------------------------------------------


def _sink_run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_sink_on_a_full_pipe_drops_whole_lines_and_tells_the_reader_the_gap() -> None:
    async def go() -> None:
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        said: list[str] = []
        stream = os.fdopen(w, "wb", buffering=0)
        sink = LineSink(stream, limit=1000, gap_line=lambda n: f"GAP {n}\n".encode(), on_change=said.append)
        assert sink.kind == "pipe" and os.get_blocking(w)  # O_NONBLOCK on a description of its own
        lines = [f"{k:04d} {'x' * 95}\n".encode() for k in range(200)]  # 100 B each
        t0 = time.monotonic()
        for line in lines:
            sink.write(line)
        assert time.monotonic() - t0 < 0.5  # never waited on the reader
        assert sink.dropped_full > 0 and sink.written + sink.dropped_full == 200
        assert sink.buffered <= 1000 + 100 and "not being read" in said[0]
        data = b""
        os.set_blocking(r, False)
        for _ in range(100):
            with contextlib.suppress(BlockingIOError):
                data += os.read(r, 1 << 16)
            if data.endswith(b"\n") and b"GAP" in data:
                break
            await asyncio.sleep(0.01)
        got = data.splitlines(keepends=True)
        assert got[:-1] == [x for x in lines if x in set(got)]  # whole lines, in order
        assert got[-1] == f"GAP {sink.dropped_full}\n".encode() and "read again" in said[-1]
        await sink.aclose()
        stream.close()
        os.close(r)

    _sink_run(go())


def test_sink_counts_what_a_closed_reader_or_a_hung_up_terminal_never_got() -> None:
    async def go() -> None:
        r, w = os.pipe()
        os.close(r)
        stream = os.fdopen(w, "wb", buffering=0)
        said: list[str] = []
        sink = LineSink(stream, on_change=said.append)
        assert not sink.write(b"a\n") and sink.gone == "EPIPE" and sink.dropped_gone == 1
        sink.write(b"b\n")
        assert sink.dropped_gone == 2 and "gone (EPIPE)" in said[0]
        assert sink.summary() == "2 lines were not written to stdout (2 once it was gone (EPIPE))"
        await sink.aclose()
        stream.close()

        master, slave = pty.openpty()
        tty = os.fdopen(slave, "wb", buffering=0)
        sink = LineSink(tty)
        assert sink.kind == "tty" and sink.write(b"hello\n")
        os.close(master)
        assert not sink.write(b"x\n") and sink.gone == "EIO"
        assert sink.counts() == {"output": "tty", "gone": "EIO", "written": 1, "dropped_full": 0,
                                 "dropped_gone": 1, "buffered_bytes": 0}
        await sink.aclose()
        tty.close()

        sink = LineSink(None)  # stdout closed at start: Python's sys.stdout is None
        assert sink.gone == "closed" and not sink.write(b"x\n") and sink.dropped_gone == 1

    _sink_run(go())
    with open(os.devnull, "wb") as null:  # written directly, no loop needed: it never waits
        sink = LineSink(null)
        assert sink.kind == "null" and all(sink.write(b"x" * 100_000 + b"\n") for _ in range(100))
        assert sink.written == 100 and sink.dropped == 0


def test_a_closed_stdout_is_held_by_dev_null_not_by_the_next_file_opened(tmp_path: Path) -> None:
    """`>&-`: hold_closed_std_fds puts /dev/null on fd 1, so a file opened next does not become
    "stdout"; sys.stdout stays None."""
    code = ("import os, sys; from pdtui.core.linesink import hold_closed_std_fds; hold_closed_std_fds();"
            f" f = open({str(tmp_path / 'f')!r}, 'w'); print(sys.stdout is None, f.fileno() != 1,"
            " os.readlink('/proc/self/fd/1'), file=sys.stderr)")
    got = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=False,
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1), env={
                             **os.environ, "PYTHONPATH": str(ROOT)}, check=False, timeout=30)
    assert got.stderr.split() == ["True", "True", "/dev/null"], got.stderr


def test_ctl_status_says_what_stdout_lost() -> None:
    from pdtui.cli import _ctl_text

    status = {"verb": "status", "pid": 7, "profile": "cpu", "proxy_url": "http://127.0.0.1:8000", "uptime_s": 9.0,
              "run_dir": "/tmp/run", "instances": [],
              "stdout": {"output": "pipe", "gone": None, "written": 1200, "dropped_full": 34, "dropped_gone": 0,
                         "buffered_bytes": 16000000}}
    assert ("events on stdout (pipe): 1,200 written, 34 dropped while it was not read, 0 dropped once it was"
            " closed or gone") in _ctl_text(status)
    status["stdout"] = {**status["stdout"], "dropped_full": 0}
    assert "events on stdout" not in _ctl_text(status)  # nothing lost, nothing said
