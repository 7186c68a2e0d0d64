"""D's streamed answer, relayed to the client chunk by chunk.

The data path (docs/proxy.md): HTTP on asyncio protocols with httptools (``pdtui.core.proxy.httpio``),
one event loop of its own (``pdtui proxy``, a process, uvloop when installed). A chunk D streams is
relayed inside the upstream connection's ``data_received``: a time stamp, a byte scan for SSE
event boundaries and token-carrying events (``SseScan``; a JSON parse only for the rare usage or
error event), and one write to the client. Per-request work (the JSON body, the P leg, the trace)
is ordinary async code (``pdtui.core.proxy.contract``).

A relay is put together per request (``relay_for``), not subclassed. A chunk goes through:

1. ``WholeEvents``, only on a TTFT switch's path or with two D (a migration's ``Tracker`` reads D's
   token ids first: ``pdtui.core.proxy.migrate``): a chunk that does not end an event is held until
   it does, so the chunk filters see whole events: ``StitchEdits`` (first_token_from_p on
   /v1/completions: two rare events edited in bytes) or ``firsttoken.ChatStream.translate`` (chat
   served from D's /v1/completions: every event rewritten as chat);
2. the scan (``SseScan``): times the token-carrying events into the trace and says whether the
   chunk was the usual one (one whole token event, nothing rare in it);
3. the usage check (``UsageCheck``, paired with decode_reports_cached), for a chunk the scan did
   not call usual (the scan's carry and the check's hold are the same partial event, so a usual
   chunk leaves it nothing to do), and, when D's usage event is to be dropped, for the usual chunk
   that ends its choice (``"finish_reason":"``, one substring check per chunk): it waits for the
   usage event's system_fingerprint;

then one write to the client. A partial event held by any stage is bounded (``sse.MAX_EVENT_BYTES``,
8 MiB): past it the request ends with a final SSE error event (``Relay.too_large``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdtui.core.proxy import firsttoken, httpio
from pdtui.core.proxy.httpio import Response
from pdtui.core.proxy.sse import MAX_EVENT_BYTES, EventTooLarge, SseScan, cut_events, error_body

if TYPE_CHECKING:
    from pdtui.core.proxy.contract import Upstream
    from pdtui.core.proxy.migrate import Migration
    from pdtui.core.proxy.trace import Trace

ChunkFilter = Callable[[bytes], bytes]
"""Whole SSE events in, the bytes for the client out."""

_perf_counter = time.perf_counter


class Relay:
    """D's streamed answer, relayed chunk by chunk from the upstream's ``data_received`` (the
    module's docstring: the scan, and the filters and the usage check when a request has them)."""

    __slots__ = ("begun", "conn", "done", "events", "last_rx", "migration", "resp", "scan", "trace", "up", "usage")

    def __init__(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response, scan: SseScan,
                 *, events: WholeEvents | None = None, begun: bool = False) -> None:
        self.trace, self.up, self.conn, self.resp, self.scan = trace, up, conn, resp, scan
        self.events = events
        """Whole events for a switch's filters; None: bytes go on as they come."""
        self.usage = trace.usage_check
        if self.usage is not None:
            self.usage.up = up  # D's fingerprint as last seen (UsageCheck: n > 1)
        self.begun = begun
        """The client's response began before D's (P's token went first): no head to send."""
        self.last_rx = _perf_counter()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.migration: Migration | None = None
        """Set when this stream can go on on another D if this one dies (pdtui.core.proxy.migrate)."""

    def start(self, ctype: bytes) -> None:
        trace, resp, conn = self.trace, self.resp, self.conn
        if not self.begun:
            resp.start(200, [(b"content-type", ctype), (b"x-request-id", trace.request_id.encode()),
                             (b"cache-control", b"no-cache")])
            trace.status = 200
        resp.on_lost = self.client_lost
        resp.on_pause = conn.pause_reading
        resp.on_resume = conn.resume_reading
        conn.attach(self.on_chunk if self.events is None else self.on_chunk_events, self.on_end)
        if self.begun and resp.lost:  # the client left while D's head was on its way
            self.client_lost()

    def on_chunk(self, data: bytes) -> None:
        """One chunk of D's stream: scanned, checked if it is not the usual one, written."""
        now = self.last_rx = _perf_counter()
        try:
            if not self.scan.feed(data, now):
                if self.scan.error is not None:
                    self.reported(data)
                    return
                if self.usage is not None:
                    data = self.usage.feed(data)  # the final usage event may be in it
                    if not data:
                        return
            elif self.usage is not None and self.usage.watches(data):
                data = self.usage.feed(data)  # a terminal event: it waits for D's system_fingerprint
                if not data:
                    return
        except EventTooLarge as e:
            self.too_large(e)
            return
        self.resp.write(data)

    def reported(self, data: bytes) -> None:
        """D sent an error event (vLLM does when its engine dies under a stream, and follows it with
        ``data: [DONE]``): the client gets D's events up to the end of that error event, then the end
        of the body: never [DONE] after an error (the README's promise), never a clean end. D's
        connection is closed; the trace says D reported it."""
        if self.done.done():
            return
        start = max(data.find(b'"error"'), 0)  # 0: the error event began in an earlier chunk (held)
        end = data.find(b"\n\n", start)
        data = data[:end + 2] if end >= 0 else data
        if self.usage is not None:
            data = self.usage.feed(data) + self.usage.flush()
        trace = self.trace
        trace.outcome, trace.error = "error", f"decode {self.up.name} reported: {self.scan.error}"
        trace.failed = self.up.name
        self.conn.close()
        self.resp.finish(data)
        self.done.set_result(None)

    def on_chunk_events(self, data: bytes) -> None:
        """A chunk on a switch's path: whole events through the filters first, then as ``on_chunk``."""
        assert self.events is not None
        try:
            data = self.events.feed(data)
        except EventTooLarge as e:
            self.too_large(e)
            return
        if data:
            self.on_chunk(data)
        else:
            self.last_rx = _perf_counter()

    def on_end(self, err: BaseException | None) -> None:
        if self.done.done():
            return
        if err is None and self.events is not None and (rest := self.events.flush()):
            self.on_chunk(rest)  # D ended inside an event: it goes on as it is
            if self.done.done():  # that ended the request (an event over the cap)
                return
        trace = self.trace
        if err is not None:
            self.broken(f"{type(err).__name__}: {err}")
            return
        if self.scan.error:
            trace.outcome, trace.error = "error", f"decode {self.up.name} reported: {self.scan.error}"
            trace.failed = self.up.name
        else:
            trace.outcome = trace.served()
        self.resp.finish(self.usage.flush() if self.usage is not None else b"")
        self.done.set_result(None)

    def broken(self, why: str, d_failed: bool = True) -> None:
        """D's stream broke: a final SSE error event, then the end of the body; never [DONE].
        ``d_failed``: D's failure (its pane counts it), not the proxy's own end."""
        if self.done.done():
            return
        m = self.migration
        if d_failed and m is not None and m.take(self, why):
            return  # D's connection closed, done set: the stream goes on on another D
        note = m.note if m is not None else ""
        self.fail(f"decode {self.up.name} broke the stream after {self.trace.chunks} tokens: {why}{note}",
                  d_failed=d_failed)

    def too_large(self, e: EventTooLarge) -> None:
        """D sent more of one event than the proxy holds (MAX_EVENT_BYTES): this request ends."""
        self.fail(f"decode {self.up.name} sent an SSE event over {MAX_EVENT_BYTES // 2**20} MiB ({e.size} bytes"
                  " held without its end), the most the proxy holds of one event (as vllm-router caps a"
                  " frame); the stream was ended")

    def fail(self, error: str, d_failed: bool = True) -> None:
        """End the request with ``error``: D's connection closed (vLLM aborts the request), a final
        SSE error event to the client, then the end of the body; never [DONE]."""
        if self.done.done():
            return
        trace = self.trace
        trace.error, trace.outcome = error, "error"
        trace.failed = self.up.name if d_failed else None
        self.conn.close()
        # D may have stopped inside an event: end it first, or the error would be glued onto it and
        # the client would see one event of broken JSON instead of the error (found by the fuzzing)
        end_partial = b"\n\n" if self.scan.carry else b""
        held = b"".join(self.usage.held or ()) if self.usage is not None else b""  # whole events D sent
        self.resp.finish(held + end_partial + b"data: " + error_body(502, error, "upstream_error") + b"\n\n")
        self.done.set_result(None)

    def client_lost(self) -> None:
        if self.done.done():
            return
        trace = self.trace
        if trace.done_seen and self.scan.error is None:
            trace.outcome = trace.served()
        else:
            trace.outcome, trace.status = "error", 499
            trace.error = trace.error or "client disconnected; decode request closed (vLLM aborts it)"
        self.conn.close()
        self.done.set_result(None)


class WholeEvents:
    """The first stage of a switch's relay: a chunk that does not end an event is held until it
    does, and whole events go through the chunk filters, in order. What is held when D's stream
    ends goes to the client as it is (``flush``)."""

    __slots__ = ("filter", "hold")

    def __init__(self, *filters: ChunkFilter) -> None:
        self.filter = filters[0] if len(filters) == 1 else _chain(filters)
        self.hold = b""

    def feed(self, data: bytes) -> bytes:
        """``data``'s whole events, filtered (b"": nothing whole yet, all of it held)."""
        if self.hold or not data.endswith(b"\n\n"):
            data, self.hold = cut_events(self.hold, data)
            if not data:
                return data
        return self.filter(data)

    def flush(self) -> bytes:
        data, self.hold = self.hold, b""
        return data


def _chain(filters: tuple[ChunkFilter, ...]) -> ChunkFilter:
    def chained(data: bytes) -> bytes:
        for f in filters:
            data = f(data)
        return data
    return chained


class StitchEdits:
    """first_token_from_p on /v1/completions: D's stream goes on byte for byte except two rare
    events, D's first (its prompt_token_ids, dropped: the client got them with P's token; only when
    the client asked for ids) and its usage (P's token moved from the prompt to the completion)."""

    __slots__ = ("ids_pending",)

    def __init__(self, want_ids: bool) -> None:
        self.ids_pending = want_ids

    def edit(self, data: bytes) -> bytes:
        if self.ids_pending and b'"prompt_token_ids"' in data:
            data, self.ids_pending = firsttoken.drop_prompt_ids(data), False
        if b'"usage' in data:
            data = firsttoken.fix_usage(data)
        return data


@dataclass
class Stitch:
    """A switch's answer in the making. ``first``: first_token_from_p, P's token already sent to
    the client at ``t_first`` (streamed). ``chat``: a chat request whose D leg is /v1/completions
    from P's ids, written back as chat (firsttoken.ChatStream, chat_json); tokenize_once or first."""

    p: firsttoken.PAnswer
    want_ids: bool
    t_first: float | None = None
    first: bool = True
    chat: bool = False


def relay_for(trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response, t_sent: float,
              stitch: Stitch | None, migration: Migration | None = None) -> Relay:
    """The relay of one streamed request: the byte relay; or, on a switch's path, with its filter on
    whole events. A chat request served from D's /v1/completions has every event rewritten as chat
    (ChatStream: a byte rewrite of the usual token event, a JSON parse and dump of the rare ones;
    +2.7 us per chunk over the byte relay, docs/ttft-toll.md "Chat"); with P's token first the
    client's response has begun, with tokenize_once alone it starts here and the role chunk goes
    out with D's first event.

    With a ``migration`` (two D or more, the request one that can go on elsewhere), D's token ids
    are read off every event first (``migrate.Tracker``: whole events, the ids the client did not ask
    for taken out) and a break of D's is the migration's to take (``Relay.broken``)."""
    tracker = migration.tracker if migration is not None else None
    track = (tracker.feed,) if tracker is not None else ()
    if stitch is None:
        relay = Relay(trace, up, conn, resp, SseScan(trace, t_sent), events=WholeEvents(*track) if track else None)
    else:
        edit: ChunkFilter = firsttoken.ChatStream(stitch.p, stitch.want_ids, stitch.first).translate if stitch.chat \
            else StitchEdits(stitch.want_ids).edit
        if stitch.first and trace.usage_check is not None:
            trace.usage_check.extra_prompt = 1  # D's prompt: the client's + P's token (moved to the completion)
        scan = SseScan(trace, t_sent, seam=stitch.t_first if stitch.first else None)
        relay = Relay(trace, up, conn, resp, scan, events=WholeEvents(*track, edit), begun=stitch.first)
    relay.migration = migration
    return relay
