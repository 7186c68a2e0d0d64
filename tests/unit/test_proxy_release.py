"""P's blocks for a D leg that is never sent are released through D (Proxy._release: a request D
refuses, carrying P's kv_transfer_params), against fake upstreams (tests/fakes.py; the fakes
answer the release as vLLM 0.32 does, 404). What vLLM does with it, on real engines:
results/2026-12-07-field (P frees the blocks 0.37 s after D's 404 instead of 30.7 s later), and
tests/e2e/attached/test_b_field.py. Also the drill's faults (pdtui.core.proxy.drillhooks)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pdtui.core.proxy import ProxySettings, Upstream, drillhooks
from pdtui.core.proxy.contract import RELEASE_MODEL
from tests.fakes import FakeVllm, free_port, proxy_served, proxy_stack, serving


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _trace(traces, n=1, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if len(traces) >= n:
            return traces[n - 1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no trace {n} within {timeout} s")


def test_a_paired_request_releases_nothing():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with proxy_stack(p, d, drill=True) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200
            t = await _trace(traces)
            assert t.outcome == "pair" and t.kv_release is None and d.releases == [] and t.drill is None
            assert 'pdtui_kv_release_total{result="released"} 0.0' in (await client.get("/metrics")).text

    run(go())


def test_a_client_that_leaves_before_d_is_sent_gets_p_s_blocks_released():
    """The window between P's answer and D's dispatch, held open by the drill's fault: the client
    hangs up in it, D never gets the request, and D is sent the release with P's params verbatim."""
    async def go():
        p, d = FakeVllm("prefill", blocks=4), FakeVllm("decode")
        async with proxy_stack(p, d, drill=True) as (client, traces):
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3},
                                  headers={"X-Request-Id": "gone", drillhooks.HEADER: "hold_decode_s=2"}, timeout=0.5)
            t = await _trace(traces)
            assert t.status == 499 and t.outcome == "error" and t.drill == "hold_decode_s=2"
            assert d.requests == []  # the D leg was never sent
            (rel,) = d.releases
            assert rel["model"] == RELEASE_MODEL and rel["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2, 3]]
            assert t.kv_release["result"] == "released" and t.kv_release["via"] == "D", t.kv_release
            assert t.kv_release["status"] == 404 and "4 blocks freed" in t.kv_release["why"]
            assert 'pdtui_kv_release_total{result="released"} 1.0' in (await client.get("/metrics")).text

    run(go())


def test_no_decode_up_after_p_answered_is_said_no_release_possible():
    async def go():
        up = {"D": True}
        p, d = FakeVllm("prefill", blocks=2, delay_s=0.0), FakeVllm("decode")
        prefill, decode = [Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url, is_up=lambda: up["D"])]
        settings = ProxySettings(block_size=16, drill=True)
        async with serving(p), serving(d), proxy_served(prefill, decode, settings) as (client, traces, _):
            async def down_soon():
                await asyncio.sleep(0.3)  # P has answered; D's dispatch is held
                up["D"] = False
            task = asyncio.create_task(down_soon())
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3},
                                  headers={drillhooks.HEADER: "hold_decode_s=0.6"})
            await task
        assert r.status_code == 503
        t = await _trace(traces)
        assert t.kv_release["result"] == "no_decode" and "P holds 2 blocks until its KV lease ends" in t.kv_release["why"]
        assert d.releases == [] and d.requests == []

    run(go())


def test_a_decode_that_cannot_be_reached_releases_through_another():
    async def go():
        p, d2 = FakeVllm("prefill", blocks=3), FakeVllm("decode")
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: ConnectFailed, never sent
        async with serving(p), serving(d2):
            d_up = {"n": 0}

            def first_only() -> bool:  # D is up for the choice (least loaded, first), then not
                d_up["n"] += 1
                return d_up["n"] <= 2
            async with proxy_served([Upstream("P", "prefill", p.url)],
                                    [Upstream("D", "decode", dead, is_up=first_only), Upstream("D2", "decode", d2.url)],
                                    ProxySettings(block_size=16)) as (client, traces, _):
                r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
        t = await _trace(traces)
        assert r.status_code == 502 and t.decode == "D", (r.text, t)
        assert d2.requests == [] and len(d2.releases) == 1
        assert t.kv_release["result"] == "released" and t.kv_release["via"] == "D2"

    run(go())


def test_the_drill_header_is_ignored_without_the_setting_and_refused_when_malformed():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with proxy_stack(p, d) as (client, traces):  # drill off: a header does nothing
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                  headers={drillhooks.HEADER: "tamper=reuse"})
            assert r.status_code == 200 and traces[0].drill is None
            assert d.requests[0]["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2]]
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with proxy_stack(p, d, drill=True) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                  headers={drillhooks.HEADER: "tamper=nonsense"})
            assert r.status_code == 400 and "tamper='nonsense'" in r.json()["error"]["message"]
            assert p.requests == []

    run(go())


@pytest.mark.parametrize("kind, blocks, engine", [
    ("shift", [[1, 2, 3]], "fake-p"),
    ("out_of_range", [[drillhooks.OUT_OF_RANGE + i for i in range(3)]], "fake-p"),
    ("foreign_engine", [[0, 1, 2]], drillhooks.FOREIGN_ENGINE),
])
def test_a_tampered_request_gives_d_other_params_and_releases_p_s_own(kind, blocks, engine):
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with proxy_stack(p, d, drill=True) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                                  headers={drillhooks.HEADER: f"tamper={kind}"})
            assert r.status_code == 200  # the fake D answers anything: the real one is the drill's question
            got = d.requests[0]["kv_transfer_params"]
            assert got["remote_block_ids"] == blocks and got["remote_engine_id"] == engine
            t = await _trace(traces)
            assert t.drill == f"tamper={kind}" and t.kv_release["result"] == "released"
            assert d.releases[0]["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2]]  # P's own

    run(go())


def test_reuse_gives_d_the_previous_paired_request_s_params():
    async def go():
        p, d = FakeVllm("prefill", blocks=2), FakeVllm("decode")
        async with proxy_stack(p, d, drill=True) as (client, traces):
            await client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2})
            first = d.requests[0]["kv_transfer_params"]
            p.blocks = 5
            await client.post("/v1/completions", json={"model": "m", "prompt": "b", "max_tokens": 2},
                              headers={drillhooks.HEADER: "tamper=reuse"})
            assert d.requests[1]["kv_transfer_params"] == first
            await _trace(traces, 2)
            assert d.releases[0]["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2, 3, 4]]

    run(go())


def test_parse():
    assert drillhooks.parse("hold_decode_s=2.5, tamper=shift") == drillhooks.DrillFaults(2.5, "shift")
    for bad in ("hold_decode_s=99", "hold_decode_s=x", "tamper", "color=red"):
        with pytest.raises(drillhooks.DrillHeaderError):
            drillhooks.parse(bad)
    assert drillhooks.tampered("shift", {"remote_block_ids": [1, 2]}, None, "remote_block_ids") == {
        "remote_block_ids": [2, 3]}  # a flat list (older vLLM) too
