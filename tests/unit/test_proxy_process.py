"""The proxy as its own process (``pdtui proxy``), against fake upstreams (tests/fakes.py) on
127.0.0.1: the handle the Runtime holds (managed: states in on stdin, events out on stdout) and
the standalone command (its own /health polling, JSON lines on stdout)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from pdtui.core import kvmath
from pdtui.core.events import ProxyStarted, RequestTraced
from pdtui.core.proxy import ProxyOptionError, ProxyProcess, ProxySettings
from pdtui.core.proxy.process import parse_upstreams
from tests.fakes import FakeVllm, free_port, serving

GEO = kvmath.KvGeometry(layers=2, kv_heads=2, head_dim=64, dtype="bfloat16", dtype_bytes=2)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1].startswith("Z")


def test_parse_upstreams_names_and_errors():
    assert parse_upstreams(["http://127.0.0.1:1", "http://127.0.0.1:2"], "decode") == [
        ("D", "http://127.0.0.1:1"), ("D2", "http://127.0.0.1:2")]
    assert parse_upstreams(["P1=http://h:5/"], "prefill") == [("P1", "http://h:5")]
    with pytest.raises(ProxyOptionError, match="expected http://HOST:PORT"):
        parse_upstreams(["localhost:8100"], "prefill")
    with pytest.raises(ProxyOptionError, match="used twice"):
        parse_upstreams(["D=http://h:1", "D=http://h:2"], "decode")


def test_managed_process_relays_traces_and_follows_the_states_it_is_told():
    async def go():
        p, d = FakeVllm("prefill", blocks=4), FakeVllm("decode", tokens=6)
        events = []
        async with serving(p), serving(d):
            proc = ProxyProcess([("P", p.url)], [("D", d.url)], host="127.0.0.1", port=free_port(),
                                settings=ProxySettings(block_size=16, geometry=GEO), on_event=events.append)
            await proc.start()
            pid = proc.pid
            try:
                assert any(isinstance(e, ProxyStarted) for e in events)
                async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
                    # not told yet: nothing is up
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3})
                    assert r.status_code == 503
                    proc.set_up("P", True)
                    proc.set_up("D", True)
                    proc.set_info({"states": {"P": "ready", "D": "ready"}})
                    for _ in range(100):
                        h = await client.get("/health")
                        if h.status_code == 200 and h.json().get("states"):
                            break
                        await asyncio.sleep(0.02)
                    assert h.json()["states"] == {"P": "ready", "D": "ready"}
                    r = await client.post("/v1/completions", headers={"X-Request-Id": "pp-1"},
                                          json={"model": "m", "prompt": "x", "max_tokens": 6, "stream": True})
                    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
                    for _ in range(100):
                        traces = [e for e in events if isinstance(e, RequestTraced) and e.request_id == "pp-1"]
                        if traces:
                            break
                        await asyncio.sleep(0.02)
                    (t,) = traces
                    assert t.outcome == "pair" and t.chunks == 6 and len(t.itl_ms) == 5
                    assert t.kv_bytes == 4 * 16 * GEO.bytes_per_token
                    proc.set_up("P", False)
                    await asyncio.sleep(0.2)
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 200  # fell back to D
                    proc.set_up("D", False)
                    await asyncio.sleep(0.2)
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 503
            finally:
                await proc.stop()
            assert _gone(pid)

    run(go())


def test_managed_process_exits_when_its_parent_pipe_closes():
    async def go():
        d = FakeVllm("decode")
        async with serving(d):
            proc = ProxyProcess([], [("D", d.url)], host="127.0.0.1", port=free_port(), settings=ProxySettings(),
                                on_event=lambda e: None)
            await proc.start()
            proc.proc.stdin.close()  # what happens to the pipe when pdtui dies, however it dies
            code = await asyncio.wait_for(proc.proc.wait(), 10)
            assert code == 0
            await proc.stop()

    run(go())


def test_standalone_command_polls_health_and_prints_json_lines(tmp_path):
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=3)
        port = free_port()
        async with serving(p), serving(d):
            record = tmp_path / "events.jsonl"
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdtui", "proxy", "--prefill", p.url, "--decode", d.url, "--port", str(port),
                "--health-interval", "0.2", "--record", str(record),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
            try:
                line = await asyncio.wait_for(child.stderr.readline(), 20)
                assert b"listening on" in line and b"P up" in line and b"D up" in line, line
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3,
                                                                   "stream": True})
                    assert r.status_code == 200
                lines = []
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    raw = await asyncio.wait_for(child.stdout.readline(), 10)
                    lines.append(json.loads(raw))
                    if lines[-1]["event"] == "request":
                        break
                assert lines[0]["event"] == "proxy_started" and lines[-1]["outcome"] == "pair"
            finally:
                child.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(child.wait(), 10)
            assert code == 0
            kinds = [json.loads(x)["event"] for x in record.read_text().splitlines()]
            assert kinds[0] == "proxy_started" and "request" in kinds

    run(go())


def test_standalone_command_refuses_a_port_in_use():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pdtui", "proxy", "--decode", "http://127.0.0.1:1", "--port",
                              str(port)], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and "already in use" in out.stderr


def test_told_that_d_went_down_the_proxy_ends_its_streams_at_once_with_an_error_event():
    async def go():
        d = FakeVllm("decode", tokens=2000, delay_s=0.01)
        async with serving(d):
            proc = ProxyProcess([], [("D", d.url)], host="127.0.0.1", port=free_port(), settings=ProxySettings(),
                                on_event=lambda e: None)
            await proc.start()
            try:
                proc.set_up("D", True)
                await asyncio.sleep(0.2)
                body = {"model": "m", "prompt": "x", "max_tokens": 2000, "stream": True}
                async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client, \
                        client.stream("POST", "/v1/completions", json=body) as r:
                    seen, told = b"", None
                    async for chunk in r.aiter_bytes():
                        seen += chunk
                        if told is None and seen.count(b"data: {") >= 5:
                            proc.set_up("D", False)  # what the Runtime says when D's process dies
                            told = time.monotonic()
                    ended = time.monotonic()
                assert told is not None and ended - told < 1.0
                last = [x for x in seen.decode().split("\n\n") if x.strip()][-1]
                assert '"error"' in last and "went down" in last and "[DONE]" not in seen.decode()
            finally:
                await proc.stop()

    run(go())


def test_standalone_command_with_stdout_to_a_file(tmp_path):
    """`pdtui proxy ... > events.jsonl`: the events go to the file (uvloop aborted on it once)."""
    out = tmp_path / "events.jsonl"
    port = free_port()
    with out.open("w") as f:
        child = subprocess.Popen([sys.executable, "-m", "pdtui", "proxy", "--decode", "http://127.0.0.1:1", "--port",
                                  str(port)], stdout=f, stderr=subprocess.PIPE, start_new_session=True)
        try:
            line = child.stderr.readline()
            assert b"listening on" in line, line
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        finally:
            child.send_signal(signal.SIGTERM)
            assert child.wait(10) == 0
    events = [json.loads(x)["event"] for x in out.read_text().splitlines()]
    assert events[0] == "notice" and "proxy_started" in events


def test_standalone_command_with_stdout_to_dev_null_serves_streams():
    """`pdtui proxy ... > /dev/null` (nohup, a service manager) died at once with SIGABRT in
    uvloop (issue 22): it serves, here 50 streamed requests through a fake D, and stops cleanly."""

    async def go() -> int:
        d = FakeVllm("decode", tokens=4)
        port = free_port()
        async with serving(d):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdtui", "proxy", "--decode", d.url, "--port", str(port),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            try:
                line = await asyncio.wait_for(child.stderr.readline(), 30)
                assert b"listening on" in line, line
                ok = 0
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    for k in range(50):
                        r = await client.post("/v1/completions", json={"model": "m", "prompt": f"x{k}",
                                                                        "max_tokens": 4, "stream": True})
                        ok += r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
                assert ok == 50
            finally:
                child.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(child.wait(), 10)
        return code

    assert run(go()) == 0


def test_proxy_cpus_from_the_environment(monkeypatch):
    from pdtui.core.proxy.process import cpus_from_env

    cpu = max(os.sched_getaffinity(0))
    monkeypatch.setenv("PDTUI_PROXY_CPUS", str(cpu))
    assert cpus_from_env() == [cpu]
    monkeypatch.setenv("PDTUI_PROXY_CPUS", "two")
    with pytest.raises(ProxyOptionError, match="expected CPU numbers"):
        cpus_from_env()
    monkeypatch.setenv("PDTUI_PROXY_CPUS", "4096")
    with pytest.raises(ProxyOptionError, match="not available here"):
        cpus_from_env()

    async def go():
        d = FakeVllm("decode")
        async with serving(d):
            monkeypatch.setenv("PDTUI_PROXY_CPUS", str(cpu))
            proc = ProxyProcess([], [("D", d.url)], host="127.0.0.1", port=free_port(), settings=ProxySettings(),
                                on_event=lambda e: None)
            await proc.start()
            try:
                assert os.sched_getaffinity(proc.pid) == {cpu}
            finally:
                await proc.stop()

    run(go())


def _parser():
    import argparse

    from pdtui.core.proxy.process import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_the_standalone_flags_are_the_settings_fields_and_keep_their_names(tmp_path):
    from pdtui.core.proxy.process import settings_from

    parser = _parser()
    flags = {o for a in parser._actions for o in a.option_strings}
    assert {"--block-size", "--model", "--decode-choice", "--prefill-failure", "--tokenize-once",
            "--first-token-from-p", "--decode-reports-cached", "--prefill-timeout", "--decode-timeout",
            "--connector", "--prefill", "--decode", "--host", "--port", "--record", "--health-interval"} <= flags
    assert settings_from(parser.parse_args([])) == ProxySettings()
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, "hidden_size": 256,
                                                      "torch_dtype": "bfloat16"}))
    got = settings_from(parser.parse_args([
        "--block-size", "128", "--model", str(tmp_path), "--decode-choice", "round-robin",
        "--prefill-failure", "decode-locally", "--tokenize-once", "--first-token-from-p", "--decode-reports-cached",
        "--prefill-timeout", "7.5", "--decode-timeout", "9", "--connector", "NixlConnector"]))
    assert got == ProxySettings(block_size=128, geometry=kvmath.geometry_from_dir(tmp_path), decode_choice="round-robin",
                                prefill_failure="decode-locally", tokenize_once=True, first_token_from_p=True,
                                decode_reports_cached=True, prefill_timeout_s=7.5, decode_read_timeout_s=9.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-failure", "fallback"])
    for argv, words in ((["--block-size", "0"], "--block-size must be at least 1"),
                        (["--decode-timeout", "0"], "--decode-timeout must be positive"),
                        (["--health-interval", "-1"], "--health-interval must be positive"),
                        (["--model", str(tmp_path / "nowhere")], "no config.json there")):
        with pytest.raises(ProxyOptionError, match=words):
            settings_from(parser.parse_args(argv))


def test_the_settings_travel_to_the_managed_process_as_one_json_argument():
    from pdtui.core.proxy.process import settings_from

    settings = ProxySettings(block_size=128, geometry=GEO, decode_choice="round-robin", prefill_failure="decode-locally",
                             tokenize_once=True, first_token_from_p=True, decode_reports_cached=True,
                             prefill_timeout_s=7.5, decode_read_timeout_s=9.0, connect_timeout_s=2.0)
    assert ProxySettings.from_json(settings.to_json()) == settings
    assert ProxySettings.from_json("{}") == ProxySettings()
    proc = ProxyProcess([("P", "http://127.0.0.1:2")], [("D", "http://127.0.0.1:1")], host="127.0.0.1", port=1,
                        settings=settings, on_event=lambda e: None)
    argv = proc.argv()
    assert argv[argv.index("--settings") + 1] == settings.to_json() and "--prefill-failure" not in argv
    assert settings_from(_parser().parse_args(argv[4:])) == settings  # what `pdtui proxy` rebuilds
    for text, words in (('{"block_size": 16, "warp": 9}', "no such field: warp"), ("[]", "a JSON object"),
                        ("{", "not JSON"), ('{"block_size": 0}', "block_size must be at least 1"),
                        ('{"decode_choice": "random"}', "decode_choice 'random': one of least-loaded, round-robin")):
        with pytest.raises(ProxyOptionError, match=words):
            ProxySettings.from_json(text)


def test_the_proxy_log_says_what_happened(tmp_path):
    """proxy.log in the run folder was 0 bytes (issue 20): now it has the start (upstreams and
    settings), each request that did not pair and why, an upstream going down, and the stop."""
    log = tmp_path / "proxy.log"

    async def go():
        p, d = FakeVllm("prefill", blocks=4), FakeVllm("decode", tokens=3)
        async with serving(p), serving(d):
            proc = ProxyProcess([("P", p.url)], [("D", d.url)], host="127.0.0.1", port=free_port(),
                                settings=ProxySettings(block_size=16, geometry=GEO), on_event=lambda e: None,
                                log_path=log)
            await proc.start()
            try:
                proc.set_up("D", True)  # P never up: the request falls back to D
                await asyncio.sleep(0.2)
                async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
                    r = await client.post("/v1/completions", headers={"X-Request-Id": "log-1"},
                                          json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 200
                    proc.set_up("D", False)
                    await asyncio.sleep(0.2)
                    r = await client.post("/v1/completions", headers={"X-Request-Id": "log-2"},
                                          json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 503
                    await asyncio.sleep(0.2)
            finally:
                await proc.stop()

    run(go())
    text = log.read_text()
    assert "pdtui proxy: starting" in text and f"prefill P {FakeVllm.__name__}" not in text
    assert "decode D http://127.0.0.1:" in text and '"block_size":16' in text
    assert "listening on http://127.0.0.1:" in text
    assert "request log-1: fallback, HTTP 200" in text
    assert "D is down" in text and "request log-2: error, HTTP 503" in text
    assert "stopping:" in text.splitlines()[-1]
