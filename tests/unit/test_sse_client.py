"""The one SSE client (pdtui.core.sse_client) against fake upstreams on 127.0.0.1: the bench's fake
vLLM (pdtui.bench.fake_sse) for a whole answer, and socket-level fakes (tests/fakes.py
FakeRawUpstream) for the ends a client must tell apart: [DONE], an error event (also after
[DONE]), no [DONE], a status other than 200, a cut body. Then its three users on the same bytes:
the load keys, the drill's witness and the bench's sample."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from pdtui.app import drill, loadgen
from pdtui.bench.fake_sse import FakeVllmServer
from pdtui.bench.workload import Clock, Sample, stream_completion
from pdtui.core import sse_client
from tests.fakes import FakeRawUpstream, free_port, raw_chunk, raw_head

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True}


def _event(text: str | None = None, **obj) -> bytes:
    if text is not None:
        obj = {"choices": [{"index": 0, "text": text}], **obj}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
ERROR = b'data: {"error": {"message": "decode D broke the stream after 2 tokens", "code": 502}}\n\n'


def _raw(*events: bytes, status: int = 200, end: bool = True, split: int | None = None) -> FakeRawUpstream:
    """A socket-level upstream that answers every request with ``events`` as one chunked body (each
    event its own HTTP chunk, or the whole body cut every ``split`` bytes), ended by the 0-chunk
    unless ``end`` is False (the connection then closes with the body unfinished)."""
    body = b"".join(raw_chunk(e) for e in events) + (raw_chunk(b"") if end else b"")

    def respond(req):
        parts = [body] if split is None else [body[i:i + split] for i in range(0, len(body), split)]
        steps: list[bytes | float] = [raw_head(status)]
        for p in parts:
            steps += [p, 0.002]
        return steps

    return FakeRawUpstream(respond)


async def _stream(up: FakeRawUpstream, **kw) -> sse_client.SseStream:
    async with up, httpx.AsyncClient(timeout=10) as client:
        return await sse_client.stream(client, f"{up.url}/v1/completions", BODY, **kw)


def test_a_whole_answer_from_the_bench_s_fake_vllm_ttft_itl_per_chunk_done():
    async def go():
        stop = asyncio.Event()
        port = free_port()
        server = FakeVllmServer(asyncio.get_running_loop(), interval_s=0.02)
        task = asyncio.create_task(server.serve("127.0.0.1", port, stop))
        try:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(timeout=10) as client:
                return await sse_client.stream(client, f"http://127.0.0.1:{port}/v1/completions",
                                               {**BODY, "max_tokens": 5})
        finally:
            stop.set()
            await task

    rec = asyncio.run(go())
    assert rec.status == 200 and rec.done and rec.error() is None and not rec.cancelled
    # 5 token chunks (" tok"), then the final chunk with empty text (finish_reason "length")
    assert len(rec.chunk_t) == 5 and len(rec.empty_t) == 1 and rec.events == 6
    assert rec.ttft_ms is not None and rec.ttft_ms > 10  # the fake's first chunk comes one interval late
    assert len(rec.itl_ms) == 4 and all(g > 10 for g in rec.itl_ms)  # 20 ms apart at the fake
    assert rec.t_send is not None and rec.t_end is not None and rec.t_end >= rec.chunk_t[-1] >= rec.t_send


def test_events_split_anywhere_are_the_same_events():
    events = [_event(" a"), _event(""), _event(" b"), _event(None, choices=[], usage={"prompt_tokens": 1}), DONE]
    whole = asyncio.run(_stream(_raw(*events)))
    for split in (1, 3, 17):
        rec = asyncio.run(_stream(_raw(*events, split=split)))
        assert (len(rec.chunk_t), len(rec.empty_t), rec.events, rec.done) == (2, 1, 4, True), split
        assert (len(whole.chunk_t), len(whole.empty_t), whole.events) == (2, 1, 4)
        assert rec.error() is None


def test_an_error_event_ends_the_read_and_says_why():
    rec = asyncio.run(_stream(_raw(_event(" a"), _event(" b"), ERROR, _event(" never"), DONE)))
    assert rec.error_event == {"message": "decode D broke the stream after 2 tokens", "code": 502}
    assert len(rec.chunk_t) == 2 and rec.events == 2 and not rec.done
    assert rec.error() == "decode D broke the stream after 2 tokens"


def test_an_error_after_done_is_seen_unless_the_caller_stops_at_done():
    events = (_event(" a"), DONE, ERROR)
    rec = asyncio.run(_stream(_raw(*events)))
    assert rec.done and rec.error_event is not None and rec.error() == "decode D broke the stream after 2 tokens"
    rec = asyncio.run(_stream(_raw(*events), stop_at_done=True))
    assert rec.done and rec.error_event is None and rec.error() is None


def test_a_stream_that_ends_without_done_is_not_clean():
    rec = asyncio.run(_stream(_raw(_event(" a"), _event(" b"))))
    assert rec.status == 200 and not rec.done and rec.transport_error is None
    assert rec.error() == "the stream ended without [DONE]"


def test_a_body_cut_inside_its_chunked_framing_is_a_transport_error():
    rec = asyncio.run(_stream(_raw(_event(" a"), _event(" b"), end=False)))
    assert len(rec.chunk_t) == 2 and not rec.done
    assert rec.transport_error and rec.transport_error.startswith("RemoteProtocolError")
    assert rec.error() == rec.transport_error


def test_a_status_other_than_200_keeps_the_answer_and_reads_nothing_more():
    body = json.dumps({"error": {"message": "no decode instance is up", "code": 503}}).encode()
    up = FakeRawUpstream(lambda req: [raw_head(503, b"application/json", len(body)), body])
    rec = asyncio.run(_stream(up))
    assert rec.status == 503 and rec.body == body.decode() and rec.events == 0
    assert rec.error() == f"HTTP 503: {body.decode()}"


def test_no_server_is_a_transport_error_never_a_raise():
    async def go():
        async with httpx.AsyncClient(timeout=5) as client:
            return await sse_client.stream(client, f"http://127.0.0.1:{free_port()}/v1/completions", BODY)

    rec = asyncio.run(go())
    assert rec.status is None and rec.transport_error.startswith("ConnectError") and rec.t_end is not None


def test_the_record_fills_while_the_stream_runs_and_a_cancel_keeps_it():
    def respond(req):
        return [raw_head(), raw_chunk(_event(" a")), raw_chunk(_event(" b")), 5.0, raw_chunk(DONE), raw_chunk(b"")]

    async def go():
        up = FakeRawUpstream(respond)
        mine: list[float] = []
        rec = sse_client.SseStream(chunk_t=mine)
        async with up, httpx.AsyncClient(timeout=10) as client:
            task = asyncio.create_task(sse_client.stream(client, f"{up.url}/v1/completions", BODY, rec))
            for _ in range(200):
                if len(mine) == 2:
                    break
                await asyncio.sleep(0.01)
            seen_live = (len(rec.chunk_t), rec.t_end)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return rec, seen_live

    rec, (live_chunks, live_end) = asyncio.run(go())
    assert live_chunks == 2 and live_end is None  # read while it ran, in the caller's own list
    assert rec.cancelled and rec.t_end is not None and rec.error() is None and len(rec.itl_ms) == 1


# ----- its users, on the same bytes --------------------------------------------------------------
async def _users(up: FakeRawUpstream) -> tuple[loadgen.Result, drill.Witness, Sample]:
    """The load keys' one request, the drill's witness and the bench's sample against ``up``."""
    async with up:
        async with httpx.AsyncClient(timeout=10) as client:
            res = loadgen.Result()
            await loadgen.one_request(loadgen.Load(client, up.url, "tiny"), res, prompt_tokens=8, max_tokens=4)
            sample = Sample(arm="a", workload="follow", request_id="r1", prompt_tokens=8, max_tokens=4, t_send=0.0)
            await stream_completion(client, up.url, "tiny", "hello", sample, Clock())
        w = drill.Witness()
        await drill.witness_stream(up.url, "tiny", 4, w)
    return res, w, sample


def test_the_load_keys_the_drill_and_the_bench_read_a_clean_stream_alike():
    res, w, s = asyncio.run(_users(_raw(_event(" a"), _event(" b"), _event(" c"), DONE)))
    assert (res.ok, res.errors) == (1, 0)
    assert w.done and w.error is None and w.chunks == 3 and w.status == 200
    assert s.ok and s.error is None and s.chunks == 3 and len(s.itl_ms) == 2 and s.status == 200


def test_the_load_keys_the_drill_and_the_bench_read_a_broken_stream_alike():
    res, w, s = asyncio.run(_users(_raw(_event(" a"), _event(" b"), ERROR)))
    assert (res.ok, res.errors) == (0, 1) and "decode D broke the stream" in res.first_error
    assert not w.done and w.error == "decode D broke the stream after 2 tokens" and w.chunks == 2
    assert s.chunks == 2 and not s.ok and json.loads(s.error)["code"] == 502


def test_where_the_users_differ_on_purpose_the_end_of_a_stream():
    # No [DONE]: the load keys and the drill count it as an error (a killed D's stream); the bench
    # keeps the sample's chunks and leaves its error unset, as it always did.
    res, w, s = asyncio.run(_users(_raw(_event(" a"), _event(" b"))))
    assert res.errors == 1 and res.first_error == "stream ended without [DONE]"
    assert w.error == "the stream ended without [DONE]"
    assert s.error is None and s.chunks == 2
    # An error after [DONE]: the bench stops reading at [DONE]; the others read on and see it.
    res, w, s = asyncio.run(_users(_raw(_event(" a"), DONE, ERROR)))
    assert res.errors == 1 and w.done and w.error is not None
    assert s.ok and s.error is None
