"""D's streamed answer, relayed to the client chunk by chunk.

The data path (docs/proxy.md): HTTP on asyncio protocols with httptools (``pdtui.core.proxy.httpio``),
one event loop of its own (``pdtui proxy``, a process, uvloop when installed). A chunk D streams is
relayed inside the upstream connection's ``data_received``: a time stamp, a byte scan for SSE
event boundaries and token-carrying events (``SseScan``; a JSON parse only for the rare usage or
error event), and one write to the client. Per-request work (the JSON body, the P leg, the trace)
is ordinary async code (``pdtui.core.proxy.contract``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdtui.core.proxy import firsttoken, httpio
from pdtui.core.proxy.httpio import Response
from pdtui.core.proxy.sse import SseScan, cut_events, error_body

if TYPE_CHECKING:
    from pdtui.core.proxy.contract import Upstream
    from pdtui.core.proxy.trace import Trace


class Relay:
    """D's streamed answer, relayed chunk by chunk from the upstream's ``data_received``."""

    __slots__ = ("conn", "done", "last_rx", "resp", "scan", "trace", "up")

    def __init__(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float) -> None:
        self.trace, self.up, self.conn, self.resp = trace, up, conn, resp
        self.scan = SseScan(trace, t_sent)
        self.last_rx = time.perf_counter()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, ctype: bytes) -> None:
        trace, resp = self.trace, self.resp
        resp.start(200, [(b"content-type", ctype), (b"x-request-id", trace.request_id.encode()),
                         (b"cache-control", b"no-cache")])
        trace.status = 200
        resp.on_lost = self.client_lost
        resp.on_pause = self.conn.pause_reading
        resp.on_resume = self.conn.resume_reading
        self.conn.attach(self.on_chunk, self.on_end)

    def on_chunk(self, data: bytes) -> None:
        now = self.last_rx = time.perf_counter()
        if not self.scan.feed(data, now) and self.trace.usage_check is not None:
            # not the usual chunk (the scan's carry and the check's hold are the same partial event,
            # so a usual chunk leaves the check nothing to do): the final usage event may be in it
            data = self.trace.usage_check.feed(data)
            if not data:
                return
        self.resp.write(data)

    def on_end(self, err: BaseException | None) -> None:
        if self.done.done():
            return
        trace = self.trace
        if err is not None:
            self.broken(f"{type(err).__name__}: {err}")
            return
        if self.scan.error:
            trace.outcome, trace.error = "error", f"decode {self.up.name} reported: {self.scan.error}"
        else:
            trace.outcome = trace.served()
        self.resp.finish(trace.usage_check.flush() if trace.usage_check is not None else b"")
        self.done.set_result(None)

    def broken(self, why: str) -> None:
        """D's stream broke: a final SSE error event, then the end of the body; never [DONE]."""
        if self.done.done():
            return
        trace = self.trace
        trace.error = f"decode {self.up.name} broke the stream after {trace.chunks} tokens: {why}"
        trace.outcome = "error"
        self.conn.close()
        # D may have stopped inside an event: end it first, or the error would be glued onto it and
        # the client would see one event of broken JSON instead of the error (found by the fuzzing)
        end_partial = b"\n\n" if self.scan.carry else b""
        self.resp.finish(end_partial + b"data: " + error_body(502, trace.error, "upstream_error") + b"\n\n")
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


class StitchScan(SseScan):
    """The scan of D's stream after P's token: D's first token is the second (a gap, the seam)."""

    __slots__ = ()

    def _token(self, now: float) -> None:
        if self.trace.decode_ttft_ms is None:
            self.trace.decode_ttft_ms = (now - self.t_sent) * 1000
        super()._token(now)


class StitchRelay(Relay):
    """D's stream after P's token (first_token_from_p): the client's response has begun. Relayed as
    ``Relay`` does, byte for byte, except two rare events: D's first (its prompt_token_ids, only
    when the client asked for ids) and its usage (P's token moved from prompt to completion). Only
    a chunk that does not end an event is held until it does, so each check sees whole events."""

    __slots__ = ("hold", "ids_pending")

    def __init__(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float, stitch: Stitch) -> None:
        super().__init__(trace, up, conn, resp, t_sent)
        self.scan = StitchScan(trace, t_sent)
        self.scan.last = stitch.t_first
        if trace.usage_check is not None:
            trace.usage_check.extra_prompt = 1  # D's prompt: the client's + P's token (fix_usage moves it)
        self.hold = b""
        self.ids_pending = stitch.want_ids

    def start(self, ctype: bytes) -> None:
        resp = self.resp
        resp.on_lost = self.client_lost
        resp.on_pause = self.conn.pause_reading
        resp.on_resume = self.conn.resume_reading
        self.conn.attach(self.on_chunk, self.on_end)
        if resp.lost:  # the client left while D's head was on its way
            self.client_lost()

    def _whole(self, data: bytes) -> bytes:
        """``data`` up to its last event end, the rest held for the next chunk (b"": nothing whole
        yet, all of it held)."""
        if self.hold or not data.endswith(b"\n\n"):
            data, self.hold = cut_events(self.hold, data)
            if not data:
                self.last_rx = time.perf_counter()
        return data

    def on_chunk(self, data: bytes) -> None:
        data = self._whole(data)
        if not data:
            return
        if self.ids_pending and b'"prompt_token_ids"' in data:
            data, self.ids_pending = firsttoken.drop_prompt_ids(data), False
        if b'"usage' in data:
            data = firsttoken.fix_usage(data)
        super().on_chunk(data)

    def on_end(self, err: BaseException | None) -> None:
        if self.hold and err is None:
            data, self.hold = self.hold, b""
            super().on_chunk(data)
        super().on_end(err)


class ChatRelay(StitchRelay):
    """A chat request served from D's /v1/completions stream (a switch, ``Stitch.chat``): every
    whole event rewritten into the chat chunk vLLM's chat endpoint would send (firsttoken.ChatStream:
    a byte rewrite of the usual token event, a JSON parse and dump of the rare ones; +2.7 us per
    chunk over the byte relay, docs/ttft-toll.md "Chat").
    With P's token first the client's response has begun (as StitchRelay); with tokenize_once
    alone it starts here, and the role chunk goes out with D's first event."""

    __slots__ = ("chat",)

    def __init__(self, trace: Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float, stitch: Stitch) -> None:
        super().__init__(trace, up, conn, resp, t_sent, stitch)
        self.chat = firsttoken.ChatStream(stitch.p, stitch.want_ids, stitch.first)
        if not stitch.first:
            self.scan = SseScan(trace, t_sent)
            if trace.usage_check is not None:
                trace.usage_check.extra_prompt = 0  # D's prompt is the client's: no P token in it

    def start(self, ctype: bytes) -> None:
        if self.chat.first:
            super().start(ctype)
        else:
            Relay.start(self, ctype)

    def on_chunk(self, data: bytes) -> None:
        data = self._whole(data)
        if data:
            Relay.on_chunk(self, self.chat.translate(data))

    def on_end(self, err: BaseException | None) -> None:
        if self.hold and err is None:  # D ended inside an event: pass it on as it is
            data, self.hold = self.hold, b""
            Relay.on_chunk(self, data)
        Relay.on_end(self, err)

