"""The proxy's P/D contract and failure handling, against fake upstreams (tests/fakes.py) on
127.0.0.1. The same behaviours are checked against real vLLM in tests/e2e."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pdtui.core import kvmath
from pdtui.core.proxy import PREFILL_KV_PARAMS, Proxy, ProxyServer, Upstream
from tests.fakes import FakeRawUpstream, FakeVllm, free_port, proxy_stack, serving

GEO = kvmath.KvGeometry(layers=2, kv_heads=2, head_dim=64, dtype="bfloat16", dtype_bytes=2)


def stack(p: FakeVllm, d: FakeVllm, p_up: bool = True, prefill_failure: str = "retry"):
    return proxy_stack(p, d, p_up, geometry=GEO, prefill_failure=prefill_failure)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def sse_events(text: str) -> list[str]:
    return [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]


def test_the_pd_contract_streamed():
    async def go():
        p, d = FakeVllm("prefill", blocks=3), FakeVllm("decode", tokens=5)
        async with stack(p, d) as (client, traces):
            body = {"model": "m", "prompt": "hi", "max_tokens": 50, "max_completion_tokens": 50, "stream": True,
                    "stream_options": {"include_usage": True}, "min_tokens": 3}
            r = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "req-1"})
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and len(events) == 6
            # P leg: max_tokens 1, not streamed, no stream_options/min_tokens, do_remote_decode
            (pb,) = p.requests
            assert pb["max_tokens"] == 1 and pb["max_completion_tokens"] == 1 and pb["stream"] is False
            assert "stream_options" not in pb and "min_tokens" not in pb
            assert pb["kv_transfer_params"] == PREFILL_KV_PARAMS
            # D leg: the client's body, plus P's kv_transfer_params verbatim
            (db,) = d.requests
            assert {k: v for k, v in db.items() if k != "kv_transfer_params"} == body
            assert db["kv_transfer_params"]["remote_block_ids"] == [[0, 1, 2]]
            assert p.headers[0]["x-request-id"] == d.headers[0]["x-request-id"] == "req-1"
            (t,) = traces
            assert t.outcome == "pair" and t.request_id == "req-1" and t.blocks == 3
            assert t.kv_bytes == 3 * 16 * GEO.bytes_per_token
            assert t.chunks == 5 and len(t.itl_ms) == 4 and t.prompt_tokens == 40
            assert t.ttft_ms is not None and t.prefill_ms is not None and t.decode_ttft_ms is not None

    run(go())


def test_non_streamed_chat_passes_d_answer_through():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=4)
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert traces[0].outcome == "pair" and traces[0].completion_tokens == 4
            assert traces[0].endpoint == "/v1/chat/completions"

    run(go())


def test_no_prefill_up_falls_back_to_decode_colocated():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with stack(p, d, p_up=False) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5})
            assert r.status_code == 200
            assert p.requests == [] and "kv_transfer_params" not in d.requests[0]
            (t,) = traces
            assert t.outcome == "fallback" and t.fallback_reason.startswith("prefill_down")
            assert t.prefill_branch == "fallback_down" and t.prefill_attempts == 0
            metrics = (await client.get("/metrics")).text
            assert 'pdtui_fallbacks_total{reason="prefill_down"} 1.0' in metrics
            assert 'pdtui_prefill_branch_total{branch="fallback_down"} 1.0' in metrics
            assert 'pdtui_prefill_branch_total{branch="error_5xx"} 0.0' in metrics  # every branch shown

    run(go())


@pytest.mark.parametrize("p_status", [502, 503, 504])
def test_prefill_502_503_504_is_retried_once_then_the_client_gets_it(p_status):
    async def go():
        p, d = FakeVllm("prefill", status=p_status), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5})
            assert r.status_code == p_status and f"answered {p_status}" in r.json()["error"]["message"]
            assert len(p.requests) == 2 and d.requests == []  # no silent prefill on D
            (t,) = traces
            assert t.outcome == "error" and t.status == p_status and t.fallback_reason is None
            assert t.prefill_branch == "error_retry_failed" and t.prefill_attempts == 2
            assert t.failed == "P"  # P failed it, not D (never asked)
            metrics = (await client.get("/metrics")).text
            assert 'pdtui_prefill_branch_total{branch="error_retry_failed"} 1.0' in metrics
            assert "pdtui_prefill_retries_total 1.0" in metrics
            assert 'pdtui_requests_total{outcome="error"} 1.0' in metrics

    run(go())


def test_a_retry_goes_to_another_prefill_and_pairs():
    async def go():
        bad, good, d = FakeVllm("prefill", status=503), FakeVllm("prefill", blocks=2), FakeVllm("decode")
        traces = []
        async with serving(bad), serving(good), serving(d):
            proxy = Proxy([Upstream("P", "prefill", bad.url), Upstream("P2", "prefill", good.url)],
                          [Upstream("D", "decode", d.url)], on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 200
                    metrics = (await client.get("/metrics")).text
            finally:
                await server.stop()
        assert len(bad.requests) == 1 and len(good.requests) == 1
        assert d.requests[0]["kv_transfer_params"]["remote_block_ids"] == [[0, 1]]
        (t,) = traces
        assert t.outcome == "pair" and t.prefill == "P2" and t.prefill_branch == "retry_ok" and t.prefill_attempts == 2
        assert 'pdtui_prefill_branch_total{branch="retry_ok"} 1.0' in metrics

    run(go())


@pytest.mark.parametrize("p_status", [500, 501])
def test_other_prefill_5xx_is_an_error_to_the_client_not_a_fallback(p_status):
    async def go():
        p, d = FakeVllm("prefill", status=p_status), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5})
            assert r.status_code == p_status and "fake prefill says" in r.json()["error"]["message"]
            assert len(p.requests) == 1 and d.requests == []
            (t,) = traces
            assert t.outcome == "error" and t.prefill_branch == "error_5xx" and t.prefill_attempts == 1
            assert t.failed == "P"
            assert 'pdtui_prefill_branch_total{branch="error_5xx"} 1.0' in (await client.get("/metrics")).text

    run(go())


def test_prefill_200_without_kv_transfer_params_is_an_error():
    async def go():
        p, d = FakeVllm("prefill", kv_params=False), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5})
            assert r.status_code == 502 and "no kv_transfer_params" in r.json()["error"]["message"]
            assert d.requests == [] and traces[0].prefill_branch == "error_no_kv" and traces[0].failed == "P"

    run(go())


@pytest.mark.parametrize("p_status,kv_params,reason", [(500, True, "prefill_5xx"), (503, True, "prefill_5xx"),
                                                       (200, False, "no_kv_transfer_params")])
def test_decode_locally_keeps_the_old_fallback(p_status, kv_params, reason):
    async def go():
        p, d = FakeVllm("prefill", status=p_status, kv_params=kv_params), FakeVllm("decode")
        async with stack(p, d, prefill_failure="decode-locally") as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 5})
            assert r.status_code == 200
            assert len(p.requests) == 1 and "kv_transfer_params" not in d.requests[0]
            (t,) = traces
            assert t.outcome == "fallback" and t.fallback_reason.startswith(reason)
            assert t.prefill_branch == "decode_locally"
            metrics = (await client.get("/metrics")).text
            assert f'pdtui_fallbacks_total{{reason="{reason}"}} 1.0' in metrics
            assert 'pdtui_prefill_branch_total{branch="decode_locally"} 1.0' in metrics

    run(go())


def test_prefill_breaking_off_after_the_request_is_retried_not_a_fallback():
    async def go():
        d, traces = FakeVllm("decode"), []
        async with FakeRawUpstream(lambda body: [b"HTTP/1.1 200 OK\r\ncontent-le"]) as p, serving(d):
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)], on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 502 and "broke off" in r.json()["error"]["message"]
            finally:
                await server.stop()
        assert len(p.requests) == 2 and d.requests == []
        assert traces[0].prefill_branch == "error_retry_failed" and traces[0].outcome == "error"

    run(go())


def test_prefill_unreachable_falls_back():
    async def go():
        d = FakeVllm("decode")
        traces = []
        async with serving(d):
            proxy = Proxy([Upstream("P", "prefill", f"http://127.0.0.1:{free_port()}")], [Upstream("D", "decode", d.url)],
                          on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 200
            finally:
                await server.stop()
        assert traces[0].outcome == "fallback" and traces[0].fallback_reason.startswith("prefill_unreachable")
        assert traces[0].prefill_branch == "fallback_unreachable"

    run(go())


def test_prefill_4xx_is_the_clients_error_not_a_fallback():
    async def go():
        p, d = FakeVllm("prefill", status=400), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 400 and "fake prefill says 400" in r.json()["error"]["message"]
            assert d.requests == [] and traces[0].outcome == "error"
            assert traces[0].failed is None  # the client's input: no instance failed

    run(go())


def test_decode_fails_before_first_byte_gives_a_json_error():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", status=500)
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2, "stream": True})
            assert r.status_code == 500 and "error" in r.json()
            assert traces[0].outcome == "error" and traces[0].status == 500 and traces[0].failed == "D"

    run(go())


def test_decode_dies_mid_stream_ends_with_an_error_event_never_done():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=10, die_after=3)
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 10, "stream": True})
            events = sse_events(r.text)
            assert "[DONE]" not in events
            assert len(events) == 4  # 3 tokens, then the error
            err = json.loads(events[-1])["error"]
            assert "broke the stream after 3 tokens" in err["message"] and err["code"] == 502
            assert traces[0].outcome == "error" and traces[0].chunks == 3
            assert traces[0].failed == "D" and traces[0].prefill == "P"  # P did its part

    run(go())


def test_an_error_event_from_decode_ends_the_stream_without_done():
    """vLLM's D whose engine died answers an open stream with its error event and then
    `data: [DONE]`: the client gets the tokens and the error event, never the [DONE] after it (the
    stream must not end as if clean), and the trace names D's report (issue 22, item 4)."""
    from tests.fakes import raw_chunk, raw_head

    token = b'data: {"choices":[{"index":0,"text":" a"}]}\n\n'
    error = b'data: {"error": {"message": "EngineCore encountered an issue", "code": 500}}\n\n'

    def respond(body):
        if body.get("prompt") == "split":  # the error event cut in two, [DONE] in the same chunk as its end
            return [raw_head(), raw_chunk(token), raw_chunk(error[:20]), raw_chunk(error[20:] + b"data: [DONE]\n\n"),
                    raw_chunk(b"")]
        return [raw_head(), raw_chunk(token), raw_chunk(token), raw_chunk(error), raw_chunk(b"data: [DONE]\n\n"),
                raw_chunk(b"")]

    async def go():
        p = FakeVllm("prefill")
        traces: list = []
        async with serving(p), FakeRawUpstream(respond) as d:
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)], on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    answers = [await client.post("/v1/completions", headers={"X-Request-Id": prompt},
                                                 json={"model": "m", "prompt": prompt, "max_tokens": 5, "stream": True})
                               for prompt in ("whole", "split")]
            finally:
                await server.stop()
        for r, tokens in zip(answers, (2, 1), strict=True):
            events = sse_events(r.text)
            assert "[DONE]" not in events and len(events) == tokens + 1, events
            assert json.loads(events[-1])["error"]["message"] == "EngineCore encountered an issue"
        for t in traces:
            assert t.outcome == "error" and t.error == "decode D reported: EngineCore encountered an issue"
            assert t.failed == "D"

    run(go())


def test_client_disconnect_closes_the_decode_request():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=500, delay_s=0.02)
        async with stack(p, d) as (client, traces):
            async with client.stream("POST", "/v1/completions",
                                     json={"model": "m", "prompt": "x", "max_tokens": 500, "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    break  # one chunk, then hang up
            await asyncio.wait_for(d.disconnected.wait(), 5)
            for _ in range(100):
                if traces:
                    break
                await asyncio.sleep(0.05)
            assert traces[0].status == 499 and "client disconnected" in traces[0].error
            assert traces[0].failed is None  # the client left: no instance failed

    run(go())


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "m", "prompt": "x", "max_tokens": -1}', "max_tokens must be at least 1, got -1."),
    (b'{"model": "m", "prompt": "x", "max_tokens": "0"}', "max_tokens must be at least 1, got 0."),
    (b'{"model": "m", "prompt": "x", "max_tokens": "ten"}', "max_tokens: Input should be a valid integer"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 4.5}', "max_tokens: Input should be a valid integer"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 4, "min_tokens": 5}', "min_tokens must be less than or equal"),
    (b'{"model": "m", "prompt": "x", "stream": false, "stream_options": {"include_usage": true}}',
     "Stream options can only be defined when `stream=True`"),
    (b'{"model": "m", "prompt": "x", "stream": "maybe"}', "stream: Input should be a valid boolean"),
])
def test_bad_input_is_a_400_json_error_and_reaches_no_engine(raw, needle):
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and needle in r.json()["error"]["message"]
            assert p.requests == [] and d.requests == []
            assert traces[0].outcome == "error" and traces[0].failed is None
            assert (await client.get("/health")).status_code == 200  # still up

    run(go())


def test_routes_health_models_and_unknown_paths():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with stack(p, d) as (client, _):
            assert (await client.get("/v1/models")).json()["data"][0]["id"] == "fake"
            r = await client.get("/nope")
            assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
            assert (await client.get("/v1/completions")).status_code == 405
            health = (await client.get("/health")).json()
            assert health["prefill"] == {"P": True} and health["decode"] == {"D": True}

    run(go())


def test_no_decode_up_is_a_503():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with serving(p), serving(d):
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url, is_up=lambda: False)])
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 503 and "no decode instance is up" in r.json()["error"]["message"]
                    assert (await client.get("/health")).status_code == 503
            finally:
                await server.stop()

    run(go())


def test_a_client_hanging_up_after_done_is_a_normal_end():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode", tokens=3, linger_after_done_s=2.0)
        async with stack(p, d) as (client, traces):
            async with client.stream("POST", "/v1/completions",
                                     json={"model": "m", "prompt": "x", "max_tokens": 3, "stream": True}) as r:
                seen = b""
                async for chunk in r.aiter_bytes():
                    seen += chunk
                    if b"[DONE]" in seen:
                        break  # like the openai client: stop reading at [DONE]
            for _ in range(100):
                if traces:
                    break
                await asyncio.sleep(0.05)
            assert traces[0].outcome == "pair" and traces[0].error is None and traces[0].chunks == 3

    run(go())


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_a_415_like_vllm(ctype):
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        async with stack(p, d) as (client, traces):
            headers = {"content-type": ctype} if ctype else {}
            r = await client.post("/v1/completions", content=b'{"model": "m", "prompt": "x"}', headers=headers)
            if ctype is None:  # httpx sends no content-type for raw bytes
                assert "content-type" not in r.request.headers
            assert r.status_code == 415 and "Only 'application/json'" in r.json()["error"]["message"]
            assert p.requests == [] and d.requests == []
            (t,) = traces  # refused at the door, traced all the same
            assert t.outcome == "error" and t.status == 415 and t.prefill is None and t.decode is None
            r = await client.post("/v1/completions", content=b'{"model": "m", "prompt": "x", "max_tokens": 2}',
                                  headers={"content-type": "application/json; charset=utf-8"})
            assert r.status_code == 200

    run(go())


def test_with_no_decode_up_the_prefill_leg_is_never_run():
    async def go():
        p, d = FakeVllm("prefill"), FakeVllm("decode")
        traces = []
        async with serving(p), serving(d):
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url, is_up=lambda: False)],
                          on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
                    assert r.status_code == 503
            finally:
                await server.stop()
        assert p.requests == [] and traces[0].status == 503 and traces[0].prefill is None

    run(go())


def _scan(chunks: list[bytes]):
    import time as _time

    from pdtui.core.proxy.sse import SseScan
    from pdtui.core.proxy.trace import Trace

    trace = Trace(request_id="r", endpoint="/v1/completions", stream=True)
    scan = SseScan(trace, _time.perf_counter())
    for k, c in enumerate(chunks):
        scan.feed(c, 1000.0 + k)
    return trace, scan


def test_the_byte_scan_counts_what_a_json_parse_would():
    ev = [b'data: {"choices":[{"index":0,"text":" a%d","logprobs":null}],"usage":null}\n\n' % i for i in range(4)]
    empty = b'data: {"choices":[{"index":0,"text":"","logprobs":null}],"usage":null}\n\n'
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    chat = b'data: {"choices":[{"index":0,"delta":{"content":"hi \\"error\\" [DONE]"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}\n\n'
    done = b"data: [DONE]\n\n"
    stream = ev[0] + role + empty + ev[1] + chat + ev[2] + ev[3] + usage + done
    whole, _ = _scan([stream])
    assert whole.chunks == 5 and whole.completion_tokens == 5 and whole.prompt_tokens == 7 and whole.done_seen
    # one event per chunk: a gap per token event after the first, the chunks' own times
    per, _ = _scan([ev[0], role, empty, ev[1], chat, ev[2], ev[3], usage, done])
    assert per.chunks == 5 and per.itl_ms == [3000.0, 1000.0, 1000.0, 1000.0] and per.done_seen
    # split at every byte: the same count, nothing lost at the seams
    split, _ = _scan([stream[i:i + 1] for i in range(len(stream))])
    assert split.chunks == 5 and split.completion_tokens == 5 and split.done_seen


def test_the_byte_scan_sees_an_error_event_and_a_space_after_colons():
    trace, scan = _scan([b'data: {"choices": [{"index": 0, "text": " x"}]}\n\n',
                         b'data: {"error": {"message": "engine died", "code": 500}}\n\n'])
    assert trace.chunks == 1 and scan.error == "engine died" and not trace.done_seen


def test_an_event_over_the_cap_ends_that_request_with_an_error_and_nothing_else():
    """D sends 9 MiB of one event without its end: that request ends with a final SSE error event
    (never [DONE]), its trace says why, D's connection is closed; a stream beside it and the next
    request are served as usual."""
    from pdtui.core.proxy.sse import MAX_EVENT_BYTES
    from tests.fakes import raw_chunk, raw_head

    token = b'data: {"choices":[{"index":0,"text":" a"}]}\n\n'
    piece = 2**20

    def respond(body):
        if body.get("prompt") == "big":
            start = b'data: {"choices":[{"index":0,"text":"'
            return [raw_head(), raw_chunk(token), raw_chunk(start),
                    *(raw_chunk(b"x" * piece) for _ in range(MAX_EVENT_BYTES // piece + 1)), 20.0, raw_chunk(b"")]
        return [raw_head(), *(x for _ in range(5) for x in (raw_chunk(token), 0.05)), raw_chunk(b"data: [DONE]\n\n"),
                raw_chunk(b"")]

    async def go():
        p = FakeVllm("prefill")
        traces: list = []
        async with serving(p), FakeRawUpstream(respond) as d:
            proxy = Proxy([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)], on_trace=traces.append)
            server = ProxyServer(proxy, "127.0.0.1", free_port())
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                    def post(prompt: str, rid: str):
                        return client.post("/v1/completions", headers={"X-Request-Id": rid},
                                           json={"model": "m", "prompt": prompt, "max_tokens": 5, "stream": True})

                    t0 = asyncio.get_running_loop().time()
                    big, beside = await asyncio.gather(post("big", "big"), post("x", "beside"))
                    took = asyncio.get_running_loop().time() - t0
                    after = await post("x", "after")
            finally:
                await server.stop()
        assert took < 10  # ended at the cap, not when D's 20 s pause would have
        assert big.status_code == 200 and "[DONE]" not in big.text
        err = json.loads(sse_events(big.text)[-1])["error"]
        assert err["code"] == 502 and "over 8 MiB" in err["message"] and "vllm-router" in err["message"]
        for r in (beside, after):
            assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]" and len(sse_events(r.text)) == 6
        by_id = {t.request_id: t for t in traces}
        assert by_id["big"].outcome == "error" and by_id["big"].chunks == 1 and "over 8 MiB" in by_id["big"].error
        assert by_id["beside"].outcome == by_id["after"].outcome == "pair"

    run(go())


def test_every_partial_event_buffer_is_bounded_by_the_cap():
    """The scan's carry, the usage check's hold and a switch's hold: up to the cap a partial event
    is held; one byte more raises EventTooLarge, which the relay turns into that request's error."""
    import time as _time

    from pdtui.core.proxy.relay import WholeEvents
    from pdtui.core.proxy.sse import MAX_EVENT_BYTES, EventTooLarge, SseScan, cut_events
    from pdtui.core.proxy.trace import Trace
    from pdtui.core.proxy.usage import UsageCheck

    assert MAX_EVENT_BYTES == 8 * 2**20
    whole = b'data: {"choices":[{"index":0,"text":" a"}]}\n\n'
    partial = b"data: " + b"x" * (MAX_EVENT_BYTES - 6)
    assert cut_events(b"", whole + partial) == (whole, partial)
    assert cut_events(partial[:100], partial[100:]) == (b"", partial)
    with pytest.raises(EventTooLarge):
        cut_events(partial, b"x")
    with pytest.raises(EventTooLarge):
        cut_events(b"", whole + partial + b"x")
    trace = Trace("r", "/v1/completions", True)
    scan = SseScan(trace, _time.perf_counter())
    holders = [lambda c: scan.feed(c, 0.0), UsageCheck(trace, 16, p_cached=None, drop=True).feed,
               WholeEvents(lambda b: b).feed]
    for feed in holders:
        feed(whole + partial)  # held, at the cap
        with pytest.raises(EventTooLarge):
            feed(b"x")


def test_on_a_switchs_path_an_event_over_the_cap_ends_the_stream_after_whole_events():
    """first_token_from_p: the relay holds a partial event for its filter; past the cap the client
    has whole events only, then the error event, and D's connection is closed."""
    from pdtui.core.proxy import firsttoken
    from pdtui.core.proxy.relay import Stitch, relay_for
    from pdtui.core.proxy.sse import MAX_EVENT_BYTES
    from pdtui.core.proxy.trace import Trace

    class Conn:
        closed = False

        def attach(self, on_chunk, on_end):
            self.on_chunk, self.on_end = on_chunk, on_end

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

        def close(self):
            self.closed = True

    class Resp:
        lost, started = False, True

        def __init__(self):
            self.out, self.finished = [], False
            self.on_lost = self.on_pause = self.on_resume = None

        def write(self, data):
            self.out.append(data)

        def finish(self, data=b""):
            self.out.append(data)
            self.finished = True

    async def go():
        p = firsttoken.PAnswer(id="cmpl-r", created=1, model="m", text=" a", token_id=5, prompt_ids=[1, 2],
                               finish_reason="length", stop_reason=None, raw=None)
        trace, conn, resp = Trace("r", firsttoken.COMPLETIONS, True), Conn(), Resp()
        relay = relay_for(trace, Upstream("D", "decode", "http://127.0.0.1:1"), conn, resp, 0.0,  # type: ignore[arg-type]
                          Stitch(p, want_ids=False, t_first=0.0))
        relay.start(b"text/event-stream")
        token = b'data: {"choices":[{"index":0,"text":" b"}]}\n\n'
        conn.on_chunk(token + b'data: {"choices":[{"index":0,"text":"')
        for _ in range(MAX_EVENT_BYTES // 2**20 + 1):
            conn.on_chunk(b"x" * 2**20)
        assert relay.done.done() and conn.closed and resp.finished
        out = b"".join(resp.out)
        assert out.startswith(token) and out.count(b"\n\n") == 2  # the whole event, then the error
        assert json.loads(sse_events(out.decode())[-1])["error"]["code"] == 502
        assert trace.outcome == "error" and "over 8 MiB" in trace.error and trace.chunks == 1

    run(go())
