"""The proxied arms' proxy (single-proxied, two-single): pdtui's proxy process with no prefill
instance, round-robin over the colocated instances it is told are up, fed from the instances'
state events, against fake vLLM servers (tests/fakes.py, named as fakes: the test is about the
proxy's choice and its wiring, not about vLLM)."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from pdtui.bench.runners import arm_proxy, follow_states, proxied_settings, proxy_sees_up
from pdtui.core.events import Event, InstanceStateChanged, RequestTraced
from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
from tests.fakes import FakeVllm, free_port, serving

BODY = {"model": "fake", "prompt": "hello", "max_tokens": 3, "stream": True}


def _state(name: str, state: str) -> InstanceStateChanged:
    return InstanceStateChanged(instance=name, role="single", state=state)


async def _wait_health(url: str, want: dict[str, bool]) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(200):
            if (await client.get(f"{url}/health")).json().get("decode") == want:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"the proxy never showed {want}")


def test_the_arm_proxy_is_a_process_round_robin_over_the_instances_its_state_events_say_are_up():
    async def go():
        s1, s2 = FakeVllm("decode", tokens=3, delay_s=0.02), FakeVllm("decode", tokens=3, delay_s=0.02)
        events: list[Event] = []
        passed_on: list[Event] = []
        async with serving(s1), serving(s2):
            proxy = arm_proxy("127.0.0.1", free_port(), [("S1", s1.url), ("S2", s2.url)], 16, events.append)
            on_instance = follow_states(proxy, passed_on.append)
            on_instance(_state("S1", "starting"))  # before start: kept, sent once it runs
            await proxy.start()
            try:
                assert proxy.pid and proxy.pid != os.getpid()
                async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
                    assert (await client.post("/v1/completions", json=BODY)).status_code == 503  # none up yet
                    on_instance(_state("S1", "ready"))
                    on_instance(_state("S2", "ready"))
                    await proxy_sees_up(proxy.url, ["S1", "S2"])
                    n = 0

                    async def wave(size: int) -> None:
                        nonlocal n
                        rs = await asyncio.gather(*(client.post("/v1/completions", json=BODY,
                                                                headers={"X-Request-Id": f"r{n + i}"})
                                                    for i in range(size)))
                        assert all(r.status_code == 200 for r in rs)
                        n += size

                    await wave(1)  # S1
                    on_instance(_state("S2", "stopping"))  # S2's turn, but it is going down: S1
                    await _wait_health(proxy.url, {"S1": True, "S2": False})
                    await wave(1)
                    on_instance(_state("S2", "ready"))
                    await _wait_health(proxy.url, {"S1": True, "S2": True})
                    for _ in range(3):
                        await wave(1)  # S2, S1, S2: in turn, whatever their load
                    await wave(3)  # three at once: S1, S2, S1
                    on_instance(_state("S1", "exited"))
                    await _wait_health(proxy.url, {"S1": False, "S2": True})
                    await wave(1)
                for _ in range(100):
                    traces = {e.request_id: e.decode for e in events if isinstance(e, RequestTraced)}
                    if all(f"r{i}" in traces for i in range(n)):
                        break
                    await asyncio.sleep(0.02)
            finally:
                await proxy.stop()
        return [traces[f"r{i}"] for i in range(n)], passed_on, events

    got, passed_on, events = asyncio.run(asyncio.wait_for(go(), 60))
    assert got[:5] == ["S1", "S1", "S2", "S1", "S2"]
    assert sorted(got[5:8]) == ["S1", "S1", "S2"] and got[8] == "S2"
    assert [e.state for e in passed_on] == ["starting", "ready", "ready", "stopping", "ready", "exited"]
    # no prefill instance: every request relayed as it is (the first found nothing up: 503)
    traced = [(e.status, e.prefill, e.outcome) for e in events if isinstance(e, RequestTraced)]
    assert traced[0][0] == 503 and set(traced[1:]) == {(200, None, "fallback")}, traced


def test_proxy_sees_up_times_out_on_an_instance_it_was_never_told_about():
    async def go():
        d = FakeVllm("decode")
        async with serving(d):
            proxy = arm_proxy("127.0.0.1", free_port(), [("S", d.url)], 16, lambda e: None)
            await proxy.start()
            try:
                with pytest.raises(TimeoutError, match="did not see S up"):
                    await proxy_sees_up(proxy.url, ["S"], timeout_s=0.3)
            finally:
                await proxy.stop()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_the_proxied_arms_settings_are_round_robin():
    s = proxied_settings(32)
    assert (s.block_size, s.decode_choice) == (32, "round-robin")


def test_least_loaded_would_send_every_lone_request_to_the_first_instance():
    # the pair's default, for contrast: at concurrency 1 (the follow workload) S2 never works
    async def go():
        s1, s2 = FakeVllm("decode", tokens=3, delay_s=0.02), FakeVllm("decode", tokens=3, delay_s=0.02)
        traces: list[RequestTraced] = []
        async with serving(s1), serving(s2):
            ups = [Upstream("S1", "decode", s1.url), Upstream("S2", "decode", s2.url)]
            server = ProxyServer(Proxy([], ups, ProxySettings(block_size=16), on_trace=traces.append),
                                 "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    for _ in range(4):
                        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
            finally:
                await server.stop()
        return [t.decode for t in traces]

    assert asyncio.run(asyncio.wait_for(go(), 30)) == ["S1"] * 4


def test_an_unknown_decode_choice_is_refused():
    with pytest.raises(ValueError, match="decode_choice"):
        Proxy([], [], ProxySettings(decode_choice="random"))
