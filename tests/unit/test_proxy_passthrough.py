"""Content passes through: what the client gets from the proxy is D's answer, field for field, and
what vLLM serves the proxy serves (docs/proxy.md, "What reaches the client"). Against the fake that
writes vLLM 0.32.0's JSON (tests/unit/test_proxy_switches.py FakeTokenVllm: its fields in vLLM's
order, system_fingerprint on the terminal chunk unless a usage event follows, then on that)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from pdtui.core.proxy import PREFILL_KV_PARAMS
from pdtui.core.proxy.usage import UsageCheck, stamp
from tests.unit.test_proxy_switches import FP, FakeTokenVllm, stack

CHANGED: dict[str, str] = {}
"""JSON fields of D's answer the proxy changes on its default path, with why: none. (docs/proxy.md
lists what it does change: headers, the id it picks when the client sends no X-Request-Id, its
own error events; the TTFT switches, docs/ttft-toll.md.)"""


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def events(r: httpx.Response) -> list[Any]:
    """A stream's data events, parsed ("[DONE]" kept as it is); a non-streamed answer as one."""
    if not r.headers["content-type"].startswith("text/event-stream"):
        return [r.json()]
    out: list[Any] = []
    for line in r.text.split("\n"):
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def field_diff(d_events: list[Any], proxy_events: list[Any], skip: dict[str, str] = CHANGED) -> list[str]:
    """Every difference between D's events and the proxy's, field by field (paths like
    ``3.choices.0.finish_reason``), key order included, except the fields in ``skip``."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path.split(".", 1)[-1] in skip:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if list(a) != list(b):
                diffs.append(f"{path}: keys {list(a)} != {list(b)}")
            for k in a.keys() & b.keys():
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}.{i}")
        elif a != b or type(a) is not type(b):
            diffs.append(f"{path}: {a!r} != {b!r}")

    if len(d_events) != len(proxy_events):
        diffs.append(f"{len(d_events)} events from D, {len(proxy_events)} from the proxy")
    for i, (a, b) in enumerate(zip(d_events, proxy_events, strict=False)):
        walk(a, b, str(i))
    return diffs


async def _d_direct(p: FakeTokenVllm, d: FakeTokenVllm, path: str, body: dict[str, Any], rid: str) -> httpx.Response:
    """D's own answer to the client's body with P's kv_transfer_params (what the plain P/D contract
    sends D): the reference the proxy's answer is held against."""
    async with httpx.AsyncClient(timeout=10) as direct:
        p_body = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": dict(PREFILL_KV_PARAMS)}
        p_body.pop("stream_options", None)
        params = (await direct.post(f"{p.url}{path}", json=p_body, headers={"X-Request-Id": rid})).json()
        return await direct.post(f"{d.url}{path}", json={**body, "kv_transfer_params": params["kv_transfer_params"]},
                                 headers={"X-Request-Id": rid})


def _body(path: str, stream: bool, usage: bool | None, **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "m", "max_tokens": 5, "stream": stream, **kw}
    if path == "/v1/completions":
        b["prompt"] = "hello"
    else:
        b["messages"] = [{"role": "user", "content": "hello"}]
    if usage is not None:
        b["stream_options"] = {"include_usage": usage}
    return b


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream,usage", [(True, None), (True, False), (True, True), (False, None)])
@pytest.mark.parametrize("reports_cached", [True, False])
def test_the_proxys_answer_is_ds_field_for_field(path, stream, usage, reports_cached):
    """With decode_reports_cached (pdtui's pairs) the proxy asks D for its usage on a stream whose
    client did not, and drops D's usage event: D then writes system_fingerprint on that event, not
    on the terminal chunk; the client's stream must still have it where D writes it for the client's
    own request (on the terminal chunk), every other field as D sent it, in D's order."""
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode", split=True)
        async with stack(p, d, decode_reports_cached=reports_cached) as (client, traces):
            b = _body(path, stream, usage)
            r = await client.post(path, json=b, headers={"X-Request-Id": "pt-1"})
            assert r.status_code == 200, r.text
            ref = await _d_direct(p, d, path, b, "pt-1")
            got, want = events(r), events(ref)
            assert field_diff(want, got) == []
            assert r.content == ref.content  # byte for byte, then: the stamp is where vLLM writes it
            if stream:
                last_token = [e for e in got if isinstance(e, dict) and e["choices"]][-1]
                assert last_token["choices"][0]["finish_reason"] == "length"
                assert ("system_fingerprint" in last_token) is (not usage)
                asked_d = (d.requests[-2].get("stream_options") or {}).get("include_usage")
                assert bool(asked_d) is bool(reports_cached or usage)  # the proxy asked D for usage
            (t,) = traces
            assert t.outcome == "pair"
            assert t.completion_tokens == (5 if usage or reports_cached or not stream else None)

    run(go())


def test_the_field_diff_sees_a_missing_fingerprint_and_a_moved_key():
    """The comparison itself can fail: a terminal chunk without D's fingerprint, and one with it
    in another place, are both differences."""
    d_ev = [{"id": "x", "choices": [{"finish_reason": "length"}], "system_fingerprint": FP}, "[DONE]"]
    assert field_diff(d_ev, [{"id": "x", "choices": [{"finish_reason": "length"}]}, "[DONE]"])
    assert field_diff(d_ev, [{"system_fingerprint": FP, "id": "x", "choices": [{"finish_reason": "length"}]},
                             "[DONE]"])
    assert field_diff(d_ev, d_ev) == []


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_as_a_string_is_served_as_vllm_serves_it(path, stream):
    """vLLM's pydantic model reads "max_tokens": "4" as 4 (lax mode); the proxy answered 400."""
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d, decode_reports_cached=True) as (client, traces):
            b = _body(path, stream, None)
            b["max_tokens"] = "4"
            r = await client.post(path, json=b, headers={"X-Request-Id": "mt-1"})
            assert r.status_code == 200, r.text
            ref = await _d_direct(p, d, path, b, "mt-1")
            assert field_diff(events(ref), events(r)) == []
            got = events(r)
            text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or c.get("message", {}).get("content")
                           or "" for e in got if isinstance(e, dict) for c in e["choices"])
            assert text == " t7 t8 t9 t10"  # four tokens
            assert p.requests[0]["max_tokens"] == 1 and d.requests[0]["max_tokens"] == "4"  # the client's value
            (t,) = traces
            assert t.outcome == "pair" and t.stream is stream

    run(go())


@pytest.mark.parametrize("value,served", [("false", False), ("off", False), ("true", True), (1, True)])
def test_stream_as_vllm_reads_it(value, served):
    """"stream": "false" is not a stream for vLLM (pydantic's lax bool); bool("false") is True."""
    async def go():
        p, d = FakeTokenVllm("prefill"), FakeTokenVllm("decode")
        async with stack(p, d) as (client, traces):
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3,
                                                           "stream": value})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream") is served
            (t,) = traces
            assert t.stream is served

    run(go())


class _Trace:
    d_computed_tokens = None
    recomputed = False


class _Up:
    fingerprint: str | None = None


def _ev(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _n2_stream() -> list[bytes]:
    """n = 2, completions: choice 1 ends first, choice 0 goes on, then D's usage event."""
    head = {"id": "cmpl-n2", "object": "text_completion", "created": 5, "model": "m"}
    ch = [
        (0, " a", None), (1, " b", None), (1, " c", "length"), (0, " d", None), (0, " e", "length"),
    ]
    out = [_ev({**head, "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f,
                                     "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]})
           for i, t, f in ch]
    out.append(_ev({**head, "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
                    "system_fingerprint": FP}))
    return [*out, b"data: [DONE]\n\n"]


def test_with_n_2_a_choice_that_ends_first_holds_the_others_only_until_ds_fingerprint_is_known():
    up = _Up()
    first = UsageCheck(_Trace(), 16, None, drop=True, single=False)  # type: ignore[arg-type]
    first.up = up
    out = [first.feed(c) for c in _n2_stream()]
    assert out[2] == out[3] == out[4] == b""  # held from choice 1's end until D's usage event
    assert out[5] == b"".join(stamp(c, FP) if b'"finish_reason":"' in c else c for c in _n2_stream()[2:5])
    assert up.fingerprint == FP
    second = UsageCheck(_Trace(), 16, None, drop=True, single=False)  # type: ignore[arg-type]
    second.up = up
    out = [second.feed(c) for c in _n2_stream()]
    assert out[2] == stamp(_n2_stream()[2], FP)  # at once: the fingerprint is D's, as last seen
    assert out[3] == _n2_stream()[3] and out[5] == b""  # the others flow; the usage event is dropped


def test_held_events_reach_the_client_when_d_ends_without_its_usage_event():
    u = UsageCheck(_Trace(), 16, None, drop=True)  # type: ignore[arg-type]
    chunks = _n2_stream()
    assert u.feed(chunks[4]) == b""
    assert u.feed(b"data: [DONE]\n\n") == b""
    assert u.flush() == chunks[4] + b"data: [DONE]\n\n"  # as D sent them, in order


def test_the_stamp_goes_where_vllm_writes_it():
    chat = (b'data: {"id":"c","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,'
            b'"delta":{"content":"x"},"finish_reason":"stop"}],"prompt_token_ids":[1,2]}\n\n')
    assert stamp(chat, "fp") == chat.replace(b',"prompt_token_ids"', b',"system_fingerprint":"fp","prompt_token_ids"')
    cmpl = (b'data: {"id":"c","object":"text_completion","created":5,"model":"m","choices":[{"index":0,"text":"x",'
            b'"finish_reason":"length","prompt_token_ids":[1,2]}]}\n\n')
    assert stamp(cmpl, "fp") == cmpl[:-3] + b',"system_fingerprint":"fp"}\n\n'
