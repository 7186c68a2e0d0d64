"""Migration (pdtui.core.proxy.migrate, docs/proxy.md "Migration"): a stream whose D dies goes on
on the other D, against FAKE engines (tests/fakes.py FakeChainVllm: the next token a hash of the
whole context, so a continuation from prompt + the ids sent is the unbroken stream's rest, as greedy
decoding is on a real model). The real-engine test (kill D1 of a 1P2D mid-stream, greedy, compared
with an unbroken run) is the e2e suite's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from pdtui.core.proxy.migrate import Tracker, skip_reason
from tests.fakes import (
    CHAIN_FP,
    FakeChainVllm,
    chain_chat_prompt,
    chain_prompt,
    chain_tokens,
    proxy_over,
    serving,
)

PROMPT = "the quick brown fox"
IDS = chain_prompt(PROMPT)
N, K = 12, 5
"""Tokens asked, and after how many D1 dies."""
WANT = chain_tokens(IDS, N)
MESSAGES = [{"role": "user", "content": "hello there"}]
CHAT_IDS = chain_chat_prompt(MESSAGES)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def cbody(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": PROMPT, "max_tokens": N, "stream": True, "temperature": 0.0, **kw}


def chat_body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, "max_tokens": N, "stream": True, "temperature": 0.0, **kw}


def data_events(r: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in r.text.split("\n"):
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def view(r: httpx.Response) -> dict[str, Any]:
    """The client's view of a stream: text, token ids, usage, finish, [DONE]s, errors."""
    v: dict[str, Any] = {"text": "", "ids": [], "usage": None, "finish": None, "done": 0, "errors": [], "roles": 0}
    for e in data_events(r):
        if e == "[DONE]":
            v["done"] += 1
            continue
        if "error" in e:
            v["errors"].append(e["error"]["message"])
            continue
        v["usage"] = e.get("usage") or v["usage"]
        for c in e["choices"]:
            delta = c.get("delta") or {}
            v["roles"] += "role" in delta
            v["text"] += c.get("text") or delta.get("content") or ""
            v["ids"] += c.get("token_ids") or []
            v["finish"] = c.get("finish_reason") or v["finish"]
    return v


async def direct(path: str, body: dict[str, Any], rid: str) -> httpx.Response:
    """An unbroken run: a fresh fake D's own answer to the client's body (created 5, as D1's)."""
    ref = FakeChainVllm("decode")
    async with serving(ref), httpx.AsyncClient(base_url=ref.url, timeout=10) as c:  # type: ignore[arg-type]
        return await c.post(path, json=body, headers={"X-Request-Id": rid})


async def metric(client: httpx.AsyncClient, result: str) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(f'pdtui_migrations_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no pdtui_migrations_total{{result={result!r}}}")


@pytest.mark.parametrize("policy", ["via-prefill", "on-decode"])
@pytest.mark.parametrize("reports_cached", [False, True])
def test_d_dying_mid_stream_goes_on_on_the_other_d_equal_to_an_unbroken_run(policy, reports_cached):
    """The client's stream equals an unbroken run's byte for byte (usage asked or not, token ids
    asked or not): no token repeated or skipped, no [DONE] in between, one id/created/model, the
    usage of one request; D2 got prompt + the ids sent and max_tokens less them; via-prefill P got
    that prompt (a second transfer, D2 got its params); the trace has the migration."""
    async def go():
        p = FakeChainVllm("prefill")
        d1, d2 = FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", created=9)
        async with proxy_over([p], [d1, d2], migrate=policy, decode_reports_cached=reports_cached) as (client, traces, _):
            for usage in (None, True):
                for want_ids in (False, True):
                    what = (usage, want_ids)
                    for f in (p, d1, d2):
                        f.requests.clear()
                    traces.clear()
                    b = cbody(**({"stream_options": {"include_usage": usage}} if usage is not None else {}),
                              **({"return_token_ids": True} if want_ids else {}))
                    r = await client.post("/v1/completions", json=b, headers={"X-Request-Id": "m1"})
                    ref = await direct("/v1/completions", b, "m1")
                    assert r.status_code == 200, what
                    assert r.content == ref.content, (what, r.text, ref.text)  # byte for byte
                    v = view(r)
                    assert v["text"] == "".join(f" w{t}" for t in WANT) and v["done"] == 1 and not v["errors"], what
                    assert r.text.rstrip().endswith("data: [DONE]"), what
                    if want_ids:
                        assert v["ids"] == WANT, what
                    else:
                        assert '"token_ids":[' not in r.text and '"prompt_token_ids":[' not in r.text, what
                    if usage:
                        assert v["usage"]["prompt_tokens"] == len(IDS) and v["usage"]["completion_tokens"] == N, what
                    # the legs
                    assert d1.requests[0]["return_token_ids"] is True, what  # the proxy asked D for the ids
                    (q,) = d2.requests
                    assert q["path"] == "/v1/completions" and q["prompt"] == IDS + WANT[:K], what
                    assert q["max_tokens"] == N - K and q["return_token_ids"] is True and q["temperature"] == 0.0, what
                    if policy == "via-prefill":
                        assert len(p.requests) == 2, what
                        p2 = p.requests[1]
                        assert p2["prompt"] == IDS + WANT[:K] and p2["max_tokens"] == 1 and p2["stream"] is False
                        assert p2["kv_transfer_params"]["do_remote_decode"] is True
                        assert q["kv_transfer_params"]["remote_block_ids"] == [[0, 1]], what  # (19 + 5) / 16
                    else:
                        assert len(p.requests) == 1 and "kv_transfer_params" not in q, what
                    (t,) = traces
                    assert t.outcome == "pair" and t.status == 200 and t.error is None and t.failed is None, (what, t)
                    assert t.decode == "D1" and t.chunks == N and len(t.itl_ms) == N - 1, (what, t)
                    assert t.migrated and len(t.migrations) == 1, (what, t)
                    m = t.migrations[0]
                    assert (m["from"], m["to"], m["tokens"], m["result"]) == ("D1", "D2", K, "ok"), (what, m)
                    assert m["path"] == ("prefill" if policy == "via-prefill" else "decode"), m
                    assert m["seam_ms"] > 0 and m["decode_ttft_ms"] > 0, m
                    assert max(t.itl_ms) >= m["decode_ttft_ms"], (t.itl_ms, m)  # the seam is a gap of the stream
                    if policy == "via-prefill":
                        assert m["prefill"] == "P" and m["blocks"] == 2 and m["prefill_ms"] > 0, m
                        assert t.blocks == 2  # the first transfer: 19 tokens
                    if usage or reports_cached:
                        assert t.completion_tokens == N and t.prompt_tokens == len(IDS), (what, t)
            assert await metric(client, "ok") == 4.0
            assert await metric(client, "failed") == 0.0 and await metric(client, "no_decode") == 0.0

    run(go())


@pytest.mark.parametrize("reports_cached", [False, True])
def test_a_chat_stream_goes_on_through_completions_and_reads_as_one_chat_stream(reports_cached):
    """Chat: D2 continues through /v1/completions from the rendered prompt's ids + the ids sent; the
    client gets one chat stream, byte for byte the unbroken one (no second role chunk, the same id)."""
    async def go():
        p = FakeChainVllm("prefill")
        d1, d2 = FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", created=9)
        want = chain_tokens(CHAT_IDS, N)
        async with proxy_over([p], [d1, d2], decode_reports_cached=reports_cached) as (client, traces, _):
            for usage in (None, True):
                for want_ids in (False, True):
                    what = (usage, want_ids)
                    for f in (p, d1, d2):
                        f.requests.clear()
                    traces.clear()
                    b = chat_body(**({"stream_options": {"include_usage": usage}} if usage is not None else {}),
                                  **({"return_token_ids": True} if want_ids else {}))
                    r = await client.post("/v1/chat/completions", json=b, headers={"X-Request-Id": "c1"})
                    ref = await direct("/v1/chat/completions", b, "c1")
                    assert r.content == ref.content, (what, r.text, ref.text)
                    v = view(r)
                    assert v["roles"] == 1 and v["done"] == 1 and v["text"] == "".join(f" w{t}" for t in want), what
                    (q,) = d2.requests
                    assert q["path"] == "/v1/completions" and q["prompt"] == CHAT_IDS + want[:K], what
                    assert q["max_tokens"] == N - K and "messages" not in q, what
                    assert p.requests[1]["path"] == "/v1/completions" and p.requests[1]["prompt"] == q["prompt"], what
                    (t,) = traces
                    assert t.outcome == "pair" and t.migrated and t.chunks == N, (what, t)
                    if usage:
                        assert v["usage"]["prompt_tokens"] == len(CHAT_IDS) and v["usage"]["completion_tokens"] == N

    run(go())


@pytest.mark.parametrize("switch", ["first_token_from_p", "tokenize_once"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_on_a_ttft_switchs_path_goes_on_too(switch, path):
    async def go():
        p = FakeChainVllm("prefill")
        d1, d2 = FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", created=9)
        chat = path.endswith("chat/completions")
        ids = CHAT_IDS if chat else IDS
        want = chain_tokens(ids, N)
        async with proxy_over([p], [d1, d2], **{switch: True}) as (client, traces, _):
            b = (chat_body if chat else cbody)(stream_options={"include_usage": True}, return_token_ids=True)
            got = view(await client.post(path, json=b, headers={"X-Request-Id": "s1"}))
            ref = view(await direct(path, b, "s1"))
            assert got == ref and got["ids"] == want and got["done"] == 1, (got, ref)
            assert got["usage"]["prompt_tokens"] == len(ids) and got["usage"]["completion_tokens"] == N
            first = switch == "first_token_from_p"
            sent = K + (1 if first else 0)  # P's token went first
            (q,) = d2.requests
            assert q["prompt"] == ids + want[:sent] and q["max_tokens"] == N - sent
            (t,) = traces
            assert t.outcome == "pair" and t.migrated and t.migrations[0]["tokens"] == K, t

    run(go())


def test_an_armed_stream_that_does_not_break_is_ds_own_byte_for_byte():
    """With two D the proxy asks D for its token ids; the client gets what D sends its own request."""
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode"), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2], decode_reports_cached=True) as (client, traces, _):
            for path, b in (("/v1/completions", cbody()), ("/v1/chat/completions", chat_body())):
                r = await client.post(path, json=b, headers={"X-Request-Id": "a1"})
                ref = await direct(path, b, "a1")
                assert r.content == ref.content and '"token_ids":[' not in r.text
                assert f'"system_fingerprint":"{CHAIN_FP}"' in r.text
            assert all(q["return_token_ids"] is True for q in d1.requests)
            assert [t.migrations for t in traces] == [[], []] and all(t.outcome == "pair" for t in traces)

    run(go())


def test_with_one_decode_instance_the_error_event_of_today_stays():
    async def go():
        p, d = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=3)
        async with proxy_over([p], [d]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and len(v["errors"]) == 1 and v["text"].count(" w") == 3
            assert "decode D broke the stream after 3 tokens" in v["errors"][0] and "continued" not in v["errors"][0]
            (t,) = traces
            assert t.outcome == "error" and t.failed == "D" and t.migrations == []
            assert "return_token_ids" not in d.requests[0]  # nothing asked, no filter: the plain relay

    run(go())


def test_with_migration_off_two_decodes_end_with_the_error_event():
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=3), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2], migrate="off") as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and len(v["errors"]) == 1 and "broke the stream after 3 tokens" in v["errors"][0]
            assert traces[0].outcome == "error" and traces[0].migrations == [] and d2.requests == []
            assert "return_token_ids" not in d1.requests[0]

    run(go())


@pytest.mark.parametrize("d2_dies_after", [0, 2])
def test_a_second_death_ends_the_stream_with_the_error_event(d2_dies_after):
    """D2 dies too (before its first token, or after 2): migrate_max (1) is spent, the error event."""
    async def go():
        p = FakeChainVllm("prefill")
        d1, d2 = FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", die_after=d2_dies_after)
        async with proxy_over([p], [d1, d2]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody(return_token_ids=True)))
            assert v["done"] == 0 and len(v["errors"]) == 1, v
            assert v["ids"] == WANT[:K + d2_dies_after]  # nothing repeated or skipped up to the end
            assert f"decode D2 broke the stream after {K + d2_dies_after} tokens" in v["errors"][0]
            assert "migrate_max (1)" in v["errors"][0]
            (t,) = traces
            assert t.outcome == "error" and t.failed == "D2"
            first, second = t.migrations
            assert first["to"] == "D2" and first["result"] == ("ok" if d2_dies_after else "failed")
            assert (second["from"], second["result"], second["tokens"]) == ("D2", "limit", K + d2_dies_after)
            assert await metric(client, "limit") == 1.0

    run(go())


def test_three_decodes_and_migrate_max_2_survive_two_deaths():
    async def go():
        p = FakeChainVllm("prefill")
        ds = [FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", die_after=3), FakeChainVllm("decode")]
        async with proxy_over([p], ds, migrate_max=2) as (client, traces, _):
            b = cbody(return_token_ids=True)
            r = await client.post("/v1/completions", json=b, headers={"X-Request-Id": "x3"})
            assert r.content == (await direct("/v1/completions", b, "x3")).content
            (t,) = traces
            assert t.outcome == "pair" and [(m["from"], m["to"], m["tokens"]) for m in t.migrations] == \
                [("D1", "D2", K), ("D2", "D3", K + 3)]
            assert ds[2].requests[0]["prompt"] == IDS + WANT[:K + 3] and ds[2].requests[0]["max_tokens"] == N - K - 3
            assert len(p.requests) == 3  # a transfer per leg

    run(go())


def test_no_other_decode_up_is_the_error_event_with_the_reason():
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=K), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2], up={"D2": False}) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and "no other decode instance is up" in v["errors"][0]
            (t,) = traces
            assert t.outcome == "error" and t.failed == "D1" and t.migrations[0]["result"] == "no_decode"
            assert d2.requests == [] and await metric(client, "no_decode") == 1.0

    run(go())


@pytest.mark.parametrize("kw,why", [({"stop": ["zz"]}, "stop_strings"), ({"n": 2}, "n"),
                                    ({"logprobs": 1}, "logprobs"), ({"presence_penalty": 0.5}, "penalties")])
def test_what_cannot_go_on_token_for_token_ends_as_today_and_says_why(kw, why):
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=K), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody(**kw)))
            assert v["done"] == 0 and f"({why})" in v["errors"][0]
            assert "return_token_ids" not in d1.requests[0] and d2.requests == []
            (t,) = traces
            assert t.outcome == "error" and t.migrations[0]["result"] == "ineligible"
            assert await metric(client, "ineligible") == 1.0

    run(go())


def test_a_death_before_the_first_token_is_not_migrated():
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=0), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and "D had sent no token yet" in v["errors"][0]
            assert traces[0].migrations[0]["result"] == "ineligible" and d2.requests == []

    run(go())


def test_via_prefill_with_p_failing_ends_the_migration_and_with_p_down_d2_computes_it():
    async def go():
        p = FakeChainVllm("prefill", fail_after=1)
        d1, d2 = FakeChainVllm("decode", die_after=K), FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and "the migration to D2 failed: prefill P answered 500" in v["errors"][0], v
            (t,) = traces
            assert t.outcome == "error" and t.failed == "P" and t.migrations[0]["result"] == "failed"
            assert d2.requests == [] and await metric(client, "failed") == 1.0
        up: dict[str, bool] = {}
        p = FakeChainVllm("prefill")
        d1 = FakeChainVllm("decode", die_after=K, on_die=lambda: up.__setitem__("P", False))
        d2 = FakeChainVllm("decode")
        async with proxy_over([p], [d1, d2], up=up) as (client, traces, _):
            b = cbody()
            r = await client.post("/v1/completions", json=b, headers={"X-Request-Id": "pd"})
            assert r.content == (await direct("/v1/completions", b, "pd")).content
            m = traces[0].migrations[0]
            assert m["result"] == "ok" and m["path"] == "decode" and m["prefill_skipped"] == "no prefill instance is up"
            assert len(p.requests) == 1 and "kv_transfer_params" not in d2.requests[0]

    run(go())


def test_d2_refusing_ends_the_stream_with_its_answer_in_the_error():
    async def go():
        p, d1, d2 = FakeChainVllm("prefill"), FakeChainVllm("decode", die_after=K), FakeChainVllm("decode", status=503)
        async with proxy_over([p], [d1, d2]) as (client, traces, _):
            v = view(await client.post("/v1/completions", json=cbody()))
            assert v["done"] == 0 and "the migration to D2 failed: decode D2 answered 503" in v["errors"][0]
            assert traces[0].failed == "D2" and traces[0].migrations[0]["result"] == "failed"

    run(go())


def test_the_new_ds_usage_is_recorded_apart():
    """decode_reports_cached: the new D's own prompt tokens computed go to the migration (0 when it
    pulled P's KV, all of prompt + tokens sent on-decode); the request's own check is not fooled."""
    async def go():
        for policy, computed in (("via-prefill", 0), ("on-decode", len(IDS) + K)):
            p = FakeChainVllm("prefill", details=True)
            d1 = FakeChainVllm("decode", die_after=K, details=True)
            d2 = FakeChainVllm("decode", details=True)
            async with proxy_over([p], [d1, d2], migrate=policy, decode_reports_cached=True) as (client, traces, _):
                v = view(await client.post("/v1/completions", json=cbody(stream_options={"include_usage": True})))
                assert v["usage"]["prompt_tokens"] == len(IDS) and v["usage"]["completion_tokens"] == N
                assert v["usage"]["prompt_tokens_details"]["cached_tokens"] <= len(IDS)
                (t,) = traces
                assert t.migrations[0]["d_computed_tokens"] == computed, (policy, t.migrations)
                assert not t.recomputed and t.d_computed_tokens is None

    run(go())


def test_the_tracker_reads_ids_and_takes_out_what_the_client_did_not_ask_for():
    first = (b'data: {"id":"cmpl-r","object":"text_completion","created":5,"model":"m","choices":[{"index":0,'
             b'"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[1,2,3],'
             b'"token_ids":[7]}]}\n\n')
    two = (b'data: {"choices":[{"index":0,"text":" b","token_ids":[8,9]}]}\n\n'
           b'data: {"choices":[{"index":0,"text":" \\"token_ids\\":[","token_ids":[10]}]}\n\n')
    t = Tracker(strip=True)
    out = t.feed(first) + t.feed(two)
    assert t.prompt_ids() == [1, 2, 3] and t.ids() == [7, 8, 9, 10] and not t.finished
    assert out.count(b'"token_ids":null') == 3 and b'"prompt_token_ids":null' in out and b"[7]" not in out
    assert t.head == b'{"id":"cmpl-r","object":"text_completion","created":5,"model":"m"'
    keep = Tracker(strip=False)
    assert keep.feed(first) == first and keep.ids() == [7]
    keep.feed(b'data: {"choices":[{"index":0,"text":"","finish_reason":"length","token_ids":[]}]}\n\n')
    assert keep.finished and keep.ids() == [7]


def test_the_skip_reasons():
    assert skip_reason("/v1/completions", cbody()) is None
    assert skip_reason("/v1/completions", cbody(prompt=["a", "b"])) == "prompt_batch"
    assert skip_reason("/v1/completions", cbody(echo=True)) == "echo"
    assert skip_reason("/v1/completions", cbody(response_format={"type": "json_object"})) == "structured_output"
    assert skip_reason("/v1/completions", cbody(min_tokens=3, seed=4, ignore_eos=True)) is None
    assert skip_reason("/v1/chat/completions", chat_body()) is None
    assert skip_reason("/v1/chat/completions", chat_body(max_tokens=None)) == "max_tokens_unset"
    assert skip_reason("/v1/chat/completions", chat_body(tools=[{"type": "function"}])) == "tools"
    answer = {"choices": [{"message": {"content": "x", "reasoning": "hm"}}]}
    assert skip_reason("/v1/chat/completions", chat_body(), answer) == "chat_parser"
