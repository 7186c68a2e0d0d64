"""Property-based tests of the proxy (hypothesis) against fake upstreams at the socket level
(tests/fakes.py FakeRawUpstream) on 127.0.0.1.

One proxy serves every example (a loop in a thread of its own, as ``pdtui proxy`` runs it); each
example sets what the fake P and D answer, sends one request and checks the invariants:

- the proxy never crashes and keeps serving (/health answers after every example);
- every POST to a generate path ends in exactly one trace, with an outcome the event documents;
- a broken upstream never ends as a clean stream (no ``[DONE]`` as the last event, an error event
  or an HTTP error instead, outcome ``error``);
- a client error is a 4xx with a JSON error body, and reaches no engine;
- the in-flight counters (per upstream, the relays, the pools' busy connections) return to zero.

CI runs ``PDTUI_FUZZ_EXAMPLES`` examples per property (default 60, about 10 s in all on 2 cores);
run long by hand with e.g. ``PDTUI_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q
tests/unit/test_proxy_fuzz.py`` (docs/proxy.md says how many were run).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pdtui.core.events import RequestTraced
from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
from tests.fakes import FakeRawUpstream, free_port, raw_chunk, raw_head

EXAMPLES = int(os.environ.get("PDTUI_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
                phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("PDTUI_FUZZ_SHRINK") else []),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
"""Bounded for CI: derandomized (the same examples every run) up to 100, no example database, no
shrinking unless PDTUI_FUZZ_SHRINK=1 (a shrink of a stream failure can take minutes)."""
OUTCOMES = ("pair", "fallback", "error")


@dataclass
class Plan:
    """What the fakes do for the current example."""

    p: Callable[[dict[str, Any]], list[bytes | float]] = lambda body: []
    d: Callable[[dict[str, Any]], list[bytes | float]] = lambda body: []
    p_up: bool = True
    d_up: bool = True


class Rig:
    """The proxy and its fakes, in a loop of their own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proxy: Proxy, url: str, plan: Plan,
                 traces: list[RequestTraced]) -> None:
        self.loop, self.proxy, self.url, self.plan, self.traces = loop, proxy, url, plan, traces

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Rig({self.url}, {len(self.traces)} traces)"

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def traces_of(self, rid: str) -> list[RequestTraced]:
        return [t for t in list(self.traces) if t.request_id == rid]

    def settle(self, rid: str) -> RequestTraced:
        """Wait (bounded) for the request's trace and for nothing to be in flight; then exactly one trace."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.traces_of(rid) and self.idle():
                break
            time.sleep(0.005)
        assert self.idle(), self.inflight()
        (t,) = self.traces_of(rid)
        assert t.outcome in OUTCOMES, t
        return t

    def inflight(self) -> dict[str, Any]:
        ups = self.proxy.prefills + self.proxy.decodes
        return {"inflight": {u.name: u.inflight for u in ups}, "relays": len(self.proxy._relays),
                "busy": {u.name: len(u.pool.busy) if u.pool else 0 for u in ups}}

    def idle(self) -> bool:
        f = self.inflight()
        return not any(f["inflight"].values()) and not f["relays"] and not any(f["busy"].values())

    def healthy(self) -> None:
        r = httpx.get(f"{self.url}/health", timeout=10)
        assert r.status_code in (200, 503) and "decode" in r.json()


@pytest.fixture(scope="module")
def rig():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-proxy", daemon=True)
    thread.start()
    plan = Plan()
    p_fake = FakeRawUpstream(lambda body: plan.p(body))
    d_fake = FakeRawUpstream(lambda body: plan.d(body))
    traces: list[RequestTraced] = []
    proxy = Proxy([Upstream("P", "prefill", p_fake.url, is_up=lambda: plan.p_up)],
                  [Upstream("D", "decode", d_fake.url, is_up=lambda: plan.d_up)],
                  ProxySettings(block_size=16, prefill_timeout_s=10, decode_read_timeout_s=10),
                  on_trace=traces.append)
    server = ProxyServer(proxy, "127.0.0.1", free_port())

    async def up():
        await p_fake.__aenter__()
        await d_fake.__aenter__()
        await server.start()

    r = Rig(loop, proxy, f"http://127.0.0.1:{server.port}", plan, traces)
    r.run(up())
    try:
        yield r
    finally:
        async def down():
            await server.stop()
            await p_fake.__aexit__(None, None, None)
            await d_fake.__aexit__(None, None, None)

        r.run(down())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ----- what the fakes say ---------------------------------------------------------------------------

def json_answer(status: int, obj: Any) -> list[bytes | float]:
    body = json.dumps(obj).encode()
    return [raw_head(status, b"application/json", len(body)) + body]


def p_ok(body: dict[str, Any]) -> list[bytes | float]:
    return json_answer(200, {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 7},
                             "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [[0, 1]],
                                                    "remote_engine_id": "fake-p", "remote_host": "127.0.0.1",
                                                    "remote_port": 1}})


P_ANSWERS: dict[str, Callable[[dict[str, Any]], list[bytes | float]]] = {
    "ok": p_ok,
    "503": lambda b: json_answer(503, {"error": {"message": "fake P overloaded"}}),
    "500": lambda b: json_answer(500, {"error": {"message": "fake P broke"}}),
    "400": lambda b: json_answer(400, {"error": {"message": "fake P: bad input"}}),
    "no_kv": lambda b: json_answer(200, {"choices": [{"text": "x"}]}),
    "not_json": lambda b: [raw_head(200, b"application/json", 5) + b"<html"],
    "drop": lambda b: [],
    "cut_head": lambda b: [b"HTTP/1.1 200 OK\r\ncontent-ty"],
}

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def sse_streams(draw: Any) -> tuple[bytes, int]:
    """An SSE body as vLLM writes it (compact JSON), and how many token-carrying events it has."""
    events, tokens = [], 0
    chat = draw(st.booleans())
    if chat:
        events.append({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for text in draw(st.lists(texts, max_size=12)):
        key = {"delta": {"content": text}} if chat else {"text": text}
        events.append({"choices": [{"index": 0, **key, "logprobs": None}]})
        tokens += text != ""
    if draw(st.booleans()):
        events.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens}})
    sse = b"".join(b"data: " + json.dumps(e, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
                   + b"\n\n" for e in events)
    return sse + b"data: [DONE]\n\n", tokens


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _framed_offset(pieces: list[bytes], sse_offset: int) -> int:
    """Where byte ``sse_offset`` of the SSE body lies once its pieces are framed as chunks."""
    framed = sse_at = 0
    for piece in pieces:
        size_line = len(b"%x\r\n" % len(piece))
        if sse_offset < sse_at + len(piece):
            return framed + size_line + sse_offset - sse_at
        framed += len(raw_chunk(piece))
        sse_at += len(piece)
    raise AssertionError("offset past the end")


D_FAILURES = ("none", "before_headers", "mid_event", "after_done", "slow_drip", "status_500")


@st.composite
def d_plans(draw: Any) -> dict[str, Any]:
    sse, tokens = draw(sse_streams())
    pieces = split_at(sse, draw(st.lists(st.integers(0, 10**6), max_size=10)))
    framed = raw_head() + b"".join(raw_chunk(p) for p in pieces) + raw_chunk(b"")
    failure = draw(st.sampled_from(D_FAILURES))
    writes = split_at(framed, draw(st.lists(st.integers(0, 10**6), max_size=10)))
    head_len = len(raw_head())
    done_at = _framed_offset(pieces, len(sse) - len(b"data: [DONE]\n\n")) + head_len
    if failure == "before_headers":
        writes = [framed[:draw(st.integers(0, head_len - 1))]]
    elif failure == "mid_event":  # inside the body, before [DONE] is whole
        writes = split_at(framed[:draw(st.integers(head_len + 1, done_at + 5))],
                          draw(st.lists(st.integers(0, 10**6), max_size=6)))
    elif failure == "after_done":  # everything but the last chunk: no clean end of the body
        writes = split_at(framed[:-len(raw_chunk(b""))], draw(st.lists(st.integers(0, 10**6), max_size=6)))
    elif failure == "status_500":
        writes = json_answer(500, {"error": {"message": "fake D failed", "code": 500}})  # type: ignore[assignment]
    if failure == "slow_drip":
        steps: list[bytes | float] = []
        for w in writes:
            steps += [w, draw(st.sampled_from([0.0, 0.001, 0.003]))]
    else:
        steps = list(writes)
    return {"steps": steps, "sse": sse, "tokens": tokens, "failure": failure}


header_names = st.from_regex(r"\Ax-[a-z0-9-]{1,16}\Z").filter(lambda h: h not in ("x-request-id", "x-pdtui-warmup"))
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(str.strip)


@st.composite
def good_bodies(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(["m", "tiny", ""]))}
    if draw(st.booleans()):
        body["prompt"] = draw(texts)
    else:
        body["messages"] = [{"role": "user", "content": draw(texts)}]
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        body["max_completion_tokens"] = draw(st.integers(1, 4096))
    body["stream"] = draw(st.booleans())
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(["temperature", "seed", "min_tokens", "logprobs", "n"]), max_size=3)):
        body[key] = draw(st.integers(0, 5))
    return body


def send(rig: Rig, path: str, content: bytes, ctype: str | None, headers: dict[str, str]) -> httpx.Response:
    hdrs = dict(headers)
    if ctype is not None:
        hdrs["content-type"] = ctype
    return httpx.post(f"{rig.url}{path}", content=content, headers=hdrs, timeout=30)


def last_event(text: str) -> str | None:
    events = [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]
    return events[-1] if events else None


# ----- the properties ---------------------------------------------------------------------------

@FUZZ
@given(body=good_bodies(), d=d_plans(), p=st.sampled_from(list(P_ANSWERS)), p_up=st.booleans(),
       d_up=st.integers(0, 9).map(lambda n: n > 0), extra=st.dictionaries(header_names, header_values, max_size=4),
       rid=header_values)
def test_any_request_against_any_upstream_failure_ends_once_and_honestly(rig, body, d, p, p_up, d_up, extra, rid):
    rid = f"{rid}-{uuid.uuid4().hex[:8]}".lstrip("-")
    rig.plan.p, rig.plan.d = P_ANSWERS[p], (lambda b: d["steps"])
    rig.plan.p_up, rig.plan.d_up = p_up, d_up
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = send(rig, path, json.dumps(body).encode(), "application/json", {**extra, "x-request-id": rid})
    t = rig.settle(rid)
    assert t.status == r.status_code
    if not d_up:
        assert r.status_code == 503 and t.outcome == "error" and r.json()["error"]["message"]
        return
    if p_up and p != "ok":
        # the policy: never D colocated once P was asked; a P 4xx is the client's; the rest are errors
        want = {"503": 503, "500": 500, "400": 400, "no_kv": 502, "not_json": 502, "drop": 502, "cut_head": 502}[p]
        assert r.status_code == want and r.json()["error"] and t.outcome == "error" and t.decode is None
        return
    expect = "pair" if p_up else "fallback"
    clean = d["failure"] in ("none", "slow_drip")
    if d["failure"] in ("before_headers", "status_500") or (not clean and not body["stream"]):
        assert r.status_code in (500, 502) and r.json()["error"]["message"] and t.outcome == "error"
        return
    assert r.status_code == 200
    if clean:
        # D's bytes as they were, whatever the splits (the fake streams SSE even when not asked to)
        assert r.content == d["sse"] and t.outcome == expect and t.error is None
        if body["stream"]:
            assert t.chunks == d["tokens"]
        return
    # broken mid-stream: never a clean stream. Before [DONE] an error event ends it; after [DONE]
    # the client had everything, and the break is still reported (an error event after [DONE]).
    assert t.outcome == "error" and t.error
    err = last_event(r.text)
    assert err is not None and err != "[DONE]" and json.loads(err)["error"]["code"] == 502, (r.text, t)


bad_bodies = st.one_of(
    st.binary(max_size=64).filter(lambda b: not _is_json_object(b)),
    st.sampled_from([b"[]", b"1", b'"x"', b"null", b"{", b'{"prompt": "x"'])
    # max_tokens vLLM refuses (pydantic's lax int: "4", 4.0 and true are served, tests/unit/test_proxy_fields.py)
    | st.builds(lambda v: json.dumps({"model": "m", "prompt": "x", "max_tokens": v}).encode(),
                st.one_of(st.integers(max_value=0), st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
                          st.just(False), st.text(alphabet="abcxyz", min_size=1))),
)


def _is_json_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, UnicodeDecodeError):
        return False


@FUZZ
@given(content=bad_bodies, ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", None,
                                                   "text/plain", "application/x-www-form-urlencoded"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       extra=st.dictionaries(header_names, header_values, max_size=4))
def test_a_client_error_is_a_4xx_with_a_json_body_and_reaches_no_engine(rig, content, ctype, path, extra):
    asked: list[str] = []
    rig.plan.p = lambda b: asked.append("P") or p_ok(b)
    rig.plan.d = lambda b: asked.append("D") or []
    rig.plan.p_up = rig.plan.d_up = True
    rid = f"bad-{uuid.uuid4().hex[:8]}"
    r = send(rig, path, content, ctype, {**extra, "x-request-id": rid})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["message"]
    t = rig.settle(rid)
    assert t.outcome == "error" and t.status == r.status_code and t.prefill is None and t.decode is None
    assert asked == []
    rig.healthy()


@FUZZ
@given(d=d_plans(), hang_up_after=st.integers(0, 400))
def test_a_client_hanging_up_at_any_byte_leaves_nothing_in_flight(rig, d, hang_up_after):
    rig.plan.p, rig.plan.d = p_ok, (lambda b: d["steps"])
    rig.plan.p_up = rig.plan.d_up = True
    rid = f"hang-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 5, "stream": True}).encode()

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", int(rig.url.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n"
                     b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (rid.encode(), len(body), body))
        await writer.drain()
        got = b""
        try:
            while len(got) < hang_up_after:
                chunk = await asyncio.wait_for(reader.read(hang_up_after - len(got)), 10)
                if not chunk:
                    break
                got += chunk
        finally:
            writer.close()

    asyncio.run(go())
    t = rig.settle(rid)
    assert t.outcome in ("pair", "error")
    rig.healthy()
