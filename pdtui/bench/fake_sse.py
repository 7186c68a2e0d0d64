"""A fake vLLM for proxy benchmarks: answers like a vLLM OpenAI server, computes nothing.

Run it as its own process::

    python -m pdtui.bench.fake_sse --port 8100 --interval-ms 5

``POST /v1/completions`` and ``/v1/chat/completions`` with ``"stream": true`` answer with an SSE
stream (``Transfer-Encoding: chunked``, ``content-type: text/event-stream``) of vLLM-shaped
chunks of about 230 bytes, one chunk every ``interval`` per stream, on an absolute grid
(``t0 + k * interval`` through ``loop.call_at``, so the fake's own lateness never accumulates),
``max_tokens`` token chunks, then a final chunk (``finish_reason: "length"``), ``data: [DONE]``
and the terminating 0-chunk, in one write, on the grid's next slot. Without ``"stream": true``
the answer is one JSON completion. A body whose ``kv_transfer_params`` has
``do_remote_decode: true`` (a P/D proxy's prefill leg) gets a non-streamed JSON answer with
``kv_transfer_params`` for the decode leg and ``usage``, so a P/D proxy can run against two fakes.
``GET /health`` -> 200, ``GET /v1/models`` -> a models list.

The interval: ``--interval-ms`` for the server, or per request with the body field
``fake_interval_ms`` (a proxy may drop unknown fields: the bench uses the flag). ``--lockstep``
puts every stream on one global grid (``t0`` rounded up to a multiple of the interval), the way a
batched engine emits one token for every running stream per step.

It is built to stay out of the measurement: a raw ``asyncio.Protocol`` on uvloop (plain asyncio
if uvloop is missing), a hand-rolled HTTP/1.1 request parser (requests are small and rare),
keep-alive, and per chunk one timer callback that writes pre-built bytes with
``transport.write``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any, cast

GENERATE_PATHS = (b"/v1/completions", b"/v1/chat/completions")
MODEL = "tiny"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_TOKENS = 16


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (``Transfer-Encoding: chunked``) around ``payload``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: dict[str, Any]) -> bytes:
    # Compact JSON, as vLLM writes it (pydantic's model_dump_json).
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def fake_stream_chunks(chat: bool, request_id: str, created: int, model: str = MODEL) -> tuple[bytes, bytes]:
    """(token chunk, tail) as HTTP chunks: the token chunk is sent ``max_tokens`` times, the tail
    (final chunk, ``[DONE]``, terminating 0-chunk) once. About 230 bytes of SSE per token."""
    if chat:
        def choice(content: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"content": content} if content is not None else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        obj = "chat.completion.chunk"
        rid = f"chatcmpl-{request_id}"
    else:
        def choice(content: str | None, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish,
                    "stop_reason": None}
        obj = "text_completion"
        rid = f"cmpl-{request_id}"

    def event(content: str | None, finish: str | None) -> bytes:
        return _sse({"id": rid, "object": obj, "created": created, "model": model,
                     "choices": [choice(content, finish)], "usage": None})

    token = _chunk(event(" tok", None))
    tail = _chunk(event(None if chat else "", "length")) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return token, tail


def fake_completion(chat: bool, request_id: str, created: int, prompt_tokens: int, completion_tokens: int,
                    kv_transfer_params: dict[str, Any] | None = None, model: str = MODEL) -> bytes:
    """A non-streamed completion body, vLLM-shaped."""
    text = " tok" * completion_tokens
    if chat:
        body: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "length", "stop_reason": None}],
        }
    else:
        body = {
            "id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_logprobs": None}],
        }
    body["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                     "completion_tokens": completion_tokens, "prompt_tokens_details": None}
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    return json.dumps(body, separators=(",", ":")).encode()


FAKE_PREFILL_KV_PARAMS = {
    "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[0, 1, 2]],
    "remote_engine_id": "fake", "remote_host": "127.0.0.1", "remote_port": 5600,
}

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            411: b"Length Required", 413: b"Payload Too Large"}


class FakeVllmProtocol(asyncio.Protocol):
    """One client connection. Requests are served one after another (keep-alive, pipelining
    queued); a streamed answer owns the connection until its 0-chunk."""

    def __init__(self, server: FakeVllmServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pending: deque[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = deque()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.close_after = False

    # ----- transport ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.server.aborted += 1
        self.server.connections -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buf) > MAX_HEADER_BYTES:
                    self._fail(400, "request head too large")
                return
            lines = self.buf[:head_end].split(b"\r\n")
            try:
                method, target, _version = lines[0].split(b" ", 2)
            except ValueError:
                self._fail(400, "bad request line")
                return
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self._fail(411, "the fake takes request bodies with content-length only")
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            if length > MAX_BODY_BYTES:
                self._fail(413, "request body too large")
                return
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body = self.buf[head_end + 4:end]
            self.buf = self.buf[end:]
            self.pending.append((method, target, headers, body))
            if not self.busy:
                self._next()

    def _fail(self, status: int, message: str) -> None:
        self._respond(status, json.dumps({"error": {"message": message, "code": status}}).encode())
        if self.transport is not None:
            self.transport.close()

    # ----- requests -----------------------------------------------------------------------
    def _next(self) -> None:
        while self.pending and not self.busy and self.transport is not None:
            method, target, headers, body = self.pending.popleft()
            self.close_after = headers.get(b"connection", b"").lower() == b"close"
            self._dispatch(method, target.split(b"?", 1)[0], body)
            if self.close_after and not self.busy and self.transport is not None:
                self.transport.close()

    def _dispatch(self, method: bytes, path: bytes, raw: bytes) -> None:
        self.server.requests += 1
        if path == b"/health":
            self._respond(200, b"")
        elif path == b"/v1/models":
            models = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": int(time.time()),
                                                  "owned_by": "fake", "root": MODEL, "max_model_len": 4096}]}
            self._respond(200, json.dumps(models).encode())
        elif path in GENERATE_PATHS:
            if method != b"POST":
                self._respond(405, b'{"error":{"message":"POST only","code":405}}')
                return
            self._generate(path, raw)
        else:
            if self.server.verbose:
                print(f"fake_sse: 404 {method.decode()} {path.decode()}", file=sys.stderr, flush=True)
            self._respond(404, json.dumps({"error": {"message": f"no route {path.decode()}", "code": 404}}).encode())

    def _respond(self, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        if self.transport is None:
            return
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
                % (status, _REASONS.get(status, b"Error"), ctype, len(body)))
        self.transport.write(head + body)

    def _generate(self, path: bytes, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError as e:
            self._respond(400, json.dumps({"error": {"message": f"bad JSON: {e}", "code": 400}}).encode())
            return
        if not isinstance(body, dict):
            self._respond(400, b'{"error":{"message":"the body must be a JSON object","code":400}}')
            return
        chat = path == b"/v1/chat/completions"
        rid = uuid.uuid4().hex
        created = int(time.time())
        prompt = body.get("prompt") if not chat else body.get("messages")
        prompt_tokens = max(1, len(json.dumps(prompt)) // 4) if prompt is not None else 1
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_decode"):
            self.server.prefills += 1
            self._respond(200, fake_completion(chat, rid, created, prompt_tokens, 1, dict(FAKE_PREFILL_KV_PARAMS)))
            return
        if not body.get("stream"):
            self._respond(200, fake_completion(chat, rid, created, prompt_tokens, int(max_tokens)))
            return
        interval = body.get("fake_interval_ms")
        interval_s = float(interval) / 1000 if interval is not None else self.server.interval_s
        token, tail = fake_stream_chunks(chat, rid, created)
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        self.busy = True
        t0 = self.loop.time()
        if self.server.lockstep:
            t0 = -(-t0 // interval_s) * interval_s
        _FakeStream(self, token, tail, int(max_tokens), t0, interval_s).start()

    def stream_done(self) -> None:
        self.busy = False
        self.timer = None
        self.server.streams_done += 1
        if self.close_after and self.transport is not None:
            self.transport.close()
            return
        self._next()


class _FakeStream:
    """One streamed answer: chunk k at t0 + k * interval (k = 1..max_tokens), then the tail."""

    __slots__ = ("interval", "k", "n", "proto", "t0", "tail", "token")

    def __init__(self, proto: FakeVllmProtocol, token: bytes, tail: bytes, n: int, t0: float, interval: float):
        self.proto, self.token, self.tail, self.n = proto, token, tail, n
        self.k, self.t0, self.interval = 0, t0, interval

    def start(self) -> None:
        self.proto.timer = self.proto.loop.call_at(self.t0 + self.interval, self.tick)

    def tick(self) -> None:
        transport = self.proto.transport
        if transport is None:
            return
        self.k += 1
        if self.k <= self.n:
            transport.write(self.token)
            self.proto.server.chunks += 1
            self.proto.timer = self.proto.loop.call_at(self.t0 + (self.k + 1) * self.interval, self.tick)
        else:
            transport.write(self.tail)
            self.proto.stream_done()


class FakeVllmServer:
    """The fake's listening socket and counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float, lockstep: bool = False,
                 verbose: bool = False) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.lockstep = lockstep
        self.verbose = verbose
        self.connections = self.requests = self.chunks = self.streams_done = self.prefills = self.aborted = 0

    async def serve(self, host: str, port: int, stop: asyncio.Event) -> None:
        server = await self.loop.create_server(lambda: FakeVllmProtocol(self), host, port, backlog=1024,
                                               reuse_address=True)
        print(f"fake_sse: listening on http://{host}:{port} interval {self.interval_s * 1000:g} ms"
              f"{' lockstep' if self.lockstep else ''} ({loop_name()}) pid {os.getpid()}",
              file=sys.stderr, flush=True)
        async with server:
            await stop.wait()
        if self.verbose:
            print(f"fake_sse: {self.requests} requests, {self.streams_done} streams, {self.chunks} chunks,"
                  f" {self.prefills} prefills, {self.aborted} aborted", file=sys.stderr, flush=True)


def install_fast_loop() -> str:
    """uvloop as the event loop policy where it is installed; returns the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pdtui.bench.fake_sse",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--interval-ms", type=float, default=10.0,
                    help="gap between two chunks of one stream (default 10 ms = 100 chunks/s per stream)")
    ap.add_argument("--lockstep", action="store_true",
                    help="every stream on one global grid, like a batched engine's decode steps")
    ap.add_argument("-v", "--verbose", action="store_true", help="log unknown routes and the counters at exit")
    args = ap.parse_args(argv)
    install_fast_loop()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await FakeVllmServer(loop, args.interval_ms / 1000, args.lockstep, args.verbose).serve(
            args.host, args.port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
