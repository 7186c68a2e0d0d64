"""The two-single arm's dispatch: round-robin over the colocated instances that are up, whatever
their load (vLLM's examples/disagg toy proxies do the same), against two fake vLLM servers
(tests/fakes.py, named as fakes: the test is about the proxy's choice, not about vLLM)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pdtui.bench.runners import two_single_proxy
from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
from tests.fakes import FakeVllm, free_port, serving

BODY = {"model": "fake", "prompt": "hello", "max_tokens": 3, "stream": True}


async def _send(proxy: Proxy, waves: list[int], s2_up: list[bool]) -> list[str]:
    """Send ``waves`` of concurrent requests through ``proxy``; return the instance each went to."""
    traces = []
    proxy.on_trace = traces.append
    server = ProxyServer(proxy, "127.0.0.1", free_port())
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            n = 0
            for k, size in enumerate(waves):
                s2_up[0] = k != 1  # the second wave finds S2 down
                reqs = [client.post("/v1/completions", json=BODY, headers={"X-Request-Id": f"r{n + i}"})
                        for i in range(size)]
                rs = await asyncio.gather(*reqs)
                assert all(r.status_code == 200 for r in rs)
                n += size
    finally:
        await server.stop()
    by_id = {t.request_id: t.decode for t in traces}
    return [by_id[f"r{i}"] for i in range(sum(waves))]


def _run(make_proxy) -> list[str]:
    async def go():
        s1, s2 = FakeVllm("decode", tokens=3, delay_s=0.02), FakeVllm("decode", tokens=3, delay_s=0.02)
        s2_up = [True]
        async with serving(s1), serving(s2):
            ups = [Upstream("S1", "decode", s1.url), Upstream("S2", "decode", s2.url, is_up=lambda: s2_up[0])]
            return await _send(make_proxy(ups), [1, 1, 1, 1, 1, 3], s2_up)

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_two_single_is_round_robin_one_at_a_time_concurrent_and_skips_an_instance_that_is_down():
    got = _run(lambda ups: two_single_proxy(ups, block_size=16, on_trace=lambda t: None))
    # one at a time: S1; S2's turn, but S2 is down, so S1; then S2, S1, S2 in turn (S2 idle or
    # not); then three at once: S1, S2, S1 (in whatever order the proxy received them)
    assert got[:5] == ["S1", "S1", "S2", "S1", "S2"]
    assert sorted(got[5:]) == ["S1", "S1", "S2"]


def test_least_loaded_would_send_every_lone_request_to_the_first_instance():
    # the proxy's pair default, for contrast: at concurrency 1 (the follow workload) S2 never works
    got = _run(lambda ups: Proxy([], ups, ProxySettings(block_size=16), on_trace=lambda t: None))
    assert got[:5] == ["S1"] * 5


def test_an_unknown_decode_choice_is_refused():
    with pytest.raises(ValueError, match="decode_choice"):
        Proxy([], [], ProxySettings(decode_choice="random"))
