"""Silent recompute (issue 14 part 2): the proxy's record of how many prompt tokens D computed on a
paired request, the error class when that is more than one block, and what the client sees, against
fake upstreams (tests/fakes.py). The same is checked on a real CPU pair whose transfer fails in
tests/e2e/test_pair.py (test_a_failed_kv_pull_that_d_recomputes_is_a_red_row)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
from tests.fakes import FakeRawUpstream, FakeVllm, free_port, proxy_stack, raw_chunk, raw_head, serving

PROMPT = 40  # FakeVllm's prompt_tokens; block_size 16 in proxy_stack


def stack(p: FakeVllm, d: FakeVllm, p_up: bool = True, reports: bool = True):
    return proxy_stack(p, d, p_up, decode_reports_cached=reports)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def sse_events(text: str) -> list[str]:
    return [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]


def metric(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_a_paired_request_that_d_pulled_whole_computed_0_and_the_client_sees_p_s_cached_tokens():
    async def go():
        p, d = FakeVllm("prefill", p_cached=7), FakeVllm("decode", tokens=3, cached_tokens=PROMPT)
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200
            # D got P's params less P's cached tokens, so it reported its own (all 40)
            params = d.requests[0]["kv_transfer_params"]
            assert "remote_prefill_cached_tokens" not in params and params["remote_block_ids"] == [[0, 1, 2]]
            # the client sees P's prefix hits, as vLLM's own D would have reported them
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 7}
            (t,) = traces
            assert (t.outcome, t.prompt_tokens, t.d_computed_tokens, t.recomputed) == ("pair", PROMPT, 0, False)
            m = (await client.get("/metrics")).text
            assert metric(m, "pdtui_recompute_total") == 0.0 and metric(m, "pdtui_d_computed_tokens_total") == 0.0

    run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_d_that_computed_the_prompt_itself_is_the_recompute_class_counted_in_metrics(stream):
    async def go():
        p, d = FakeVllm("prefill", p_cached=0), FakeVllm("decode", tokens=3, cached_tokens=0)
        async with stack(p, d) as (client, traces):
            body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": stream}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200  # the client cannot tell: that is why the proxy must
            (t,) = traces
            assert (t.outcome, t.d_computed_tokens, t.recomputed) == ("pair", PROMPT, True)
            m = (await client.get("/metrics")).text
            assert metric(m, "pdtui_recompute_total") == 1.0
            assert metric(m, "pdtui_d_computed_tokens_total") == PROMPT
            assert 'pdtui_requests_total{outcome="pair"} 1.0' in m  # still a pair: a class of its own

    run(go())


@pytest.mark.parametrize(("cached", "computed", "recomputed"), [(PROMPT - 16, 16, False), (PROMPT - 17, 17, True),
                                                                (-1, PROMPT, True)])
def test_one_block_is_the_limit_and_no_details_means_nothing_cached(cached, computed, recomputed):
    """N <= block_size is tolerated; no prompt_tokens_details (vLLM 0.22.1 leaves them out at 0) is 0 cached."""
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=2, cached_tokens=cached)
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200
            (t,) = traces
            assert (t.d_computed_tokens, t.recomputed) == (computed, recomputed)

    run(go())


def test_a_stream_without_usage_asks_d_for_it_and_the_client_never_sees_it():
    async def go():
        p, d = FakeVllm("prefill", p_cached=5), FakeVllm("decode", tokens=4, cached_tokens=0)
        async with stack(p, d) as (client, traces):
            body = {"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}
            r = await client.post("/v1/completions", json=body)
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and len(events) == 5 and not any("usage" in e for e in events)
            # D was asked for usage, not for usage in every chunk; the rest of the body is the client's
            (db,) = d.requests
            assert db["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
            assert {k: v for k, v in db.items() if k not in ("stream_options", "kv_transfer_params")} == body
            (t,) = traces
            assert (t.chunks, t.completion_tokens, t.d_computed_tokens, t.recomputed) == (4, 4, PROMPT, True)

    run(go())


def test_a_stream_that_asked_for_usage_gets_it_with_p_s_cached_tokens():
    async def go():
        p, d = FakeVllm("prefill", p_cached=5), FakeVllm("decode", tokens=4, cached_tokens=PROMPT)
        async with stack(p, d) as (client, traces):
            body = {"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True,
                    "stream_options": {"include_usage": True}}
            r = await client.post("/v1/completions", json=body)
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and len(events) == 6
            usage = json.loads(events[-2])
            assert usage["choices"] == [] and usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}
            assert d.requests[0]["stream_options"] == {"include_usage": True}  # as the client sent it
            (t,) = traces
            assert (t.d_computed_tokens, t.recomputed) == (0, False)

    run(go())


def test_off_d_gets_p_s_params_verbatim_and_nothing_is_recorded():
    async def go():
        p, d = FakeVllm("prefill", p_cached=5), FakeVllm("decode", tokens=2, cached_tokens=0)
        async with stack(p, d, reports=False) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                           "stream": True})
            assert sse_events(r.text)[-1] == "[DONE]"
            assert d.requests[0]["kv_transfer_params"]["remote_prefill_cached_tokens"] == 5
            assert "stream_options" not in d.requests[0]
            assert (traces[0].d_computed_tokens, traces[0].recomputed) == (None, False)

    run(go())


def test_a_fallback_is_not_checked():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=2, cached_tokens=0)
        async with stack(p, d, p_up=False) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                           "stream": True})
            assert sse_events(r.text)[-1] == "[DONE]" and "stream_options" not in d.requests[0]
            assert (traces[0].outcome, traces[0].d_computed_tokens, traces[0].recomputed) == ("fallback", None, False)

    run(go())


def _d_stream(cached: int) -> bytes:
    """What vLLM 0.32's D streams for a 3-token completion asked for usage (compact JSON)."""
    events = [{"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]} for i in range(3)]
    events.append({"id": "c", "object": "text_completion", "choices": [],
                   "usage": {"prompt_tokens": PROMPT, "total_tokens": PROMPT + 3, "completion_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": cached}}})
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events) \
        + b"data: [DONE]\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_d_s_usage_event_split_anywhere_is_still_read_and_edited_whole(include_usage):
    """TCP may cut D's stream anywhere: at every cut, the client gets the same events (the usage
    dropped or with P's figure) and the trace the same N."""
    stream = _d_stream(cached=0)
    want = [e for e in sse_events(stream.decode()) if include_usage or '"usage"' not in e]
    if include_usage:
        want[-2] = want[-2].replace('"cached_tokens":0', '"cached_tokens":3')
    cuts = sorted({1, *range(0, len(stream), 37), stream.index(b'"usage"') + 3, len(stream) - 3})

    async def go():
        p = FakeVllm("prefill", p_cached=3)
        got = []
        for cut in cuts:
            parts = [stream[:cut], stream[cut:]] if cut else [stream]
            steps = [raw_head(), *(x for part in parts for x in (raw_chunk(part), 0.01)), raw_chunk(b"")]
            d = FakeRawUpstream(lambda body, steps=steps: steps)
            traces: list = []
            async with serving(p), d:
                proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)],
                              ProxySettings(decode_reports_cached=True), on_trace=traces.append)
                server = ProxyServer(proxy, "127.0.0.1", free_port())
                await server.start()
                try:
                    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                        body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
                        if include_usage:
                            body["stream_options"] = {"include_usage": True}
                        r = await client.post("/v1/completions", json=body)
                finally:
                    await server.stop()
            (t,) = traces
            got.append((cut, sse_events(r.text), t.chunks, t.d_computed_tokens, t.recomputed))
        for cut, events, chunks, n, recomputed in got:
            assert events == want, f"cut at {cut}"
            assert (chunks, n, recomputed) == (3, PROMPT, True), f"cut at {cut}"

    run(go())
