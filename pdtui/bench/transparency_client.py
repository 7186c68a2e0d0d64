"""The transparency bench's load client: N steady SSE streams over raw keep-alive connections, every
event's arrival time.

Not the SSE client of the rest of pdtui (pdtui.core.sse_client, httpx: the load keys, the drill,
`pdtui bench`). This one is an instrument for one job: hold 32 streams at up to 12,800 chunks/s on
a shared core for about 10 us of CPU per chunk, so that the proxy under test, not the client,
makes the gaps (httpx's receive path alone took 62 us per chunk in the old proxy, profiled in
results/2026-11-30-cpu-proxy). Its rule for an event (any
complete ``data: {`` event counts, ``[DONE]`` does not) is the bench's, documented below.

Run as its own process (``pdtui.bench.transparency`` starts it)::

    python -m pdtui.bench.transparency_client --port 8100 --streams 32 --max-tokens 256 \\
        --window-start T0 --window-end T1 --out gaps.json

``T0``/``T1`` are ``time.perf_counter()`` values (``CLOCK_MONOTONIC`` on Linux, so the same clock
in every process); without them the window is 1.5 s from now for 10 s.

One keep-alive connection per stream, a raw ``asyncio.Protocol`` on uvloop (plain asyncio if
uvloop is missing). The streams start spread over ``--ramp`` seconds. Each sends ``POST
/v1/completions`` (``"stream": true``, ``max_tokens`` drawn from ``--max-tokens`` x [1 - S, 1 + S],
``--length-spread`` S, seeded) and, as soon as the answer's terminating 0-chunk arrives, the next
one on the same connection, so the load is steady and the streams do not end in lockstep. Each
read is stamped with ``time.perf_counter()`` in ``data_received``; the body is
de-chunked and split into SSE events at their blank line, and every complete event that starts
with ``data: {`` (a token or the final chunk; not ``data: [DONE]``) arrives at that read's time:
several events in one read are gaps of 0, which is what a real client sees. A gap (between two
events of the same answer) counts when it ends inside the window [T0, T1].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from typing import Any, cast

from pdtui.bench.fake_sse import install_fast_loop, loop_name

TOKEN_PREFIX = b"data: {"
SLOW_GAP_S = 0.020


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder. ``feed`` returns the payload bytes
    decoded so far; ``done`` turns true after the terminating 0-chunk (and its empty trailer);
    ``rest`` is what came after it."""

    __slots__ = ("buf", "done", "remaining", "rest", "state")

    def __init__(self) -> None:
        self.buf = b""
        self.remaining = 0
        self.state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailer
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.state == 1:
                take = min(self.remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = 2
            elif self.state == 2:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                pos += 2
                self.state = 0
            elif self.state == 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.state = 3
                else:
                    self.remaining, self.state = size, 1
            else:  # trailer: header lines until an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self.done = True
                    self.rest = buf[pos:]
                    pos = n
                    break
        self.buf = buf[pos:] if pos < n else b""
        return b"".join(out) if len(out) != 1 else out[0]


class Stats:
    """What every stream of this process measured."""

    def __init__(self, w0: float, w1: float) -> None:
        self.w0, self.w1 = w0, w1
        self.gaps: list[float] = []
        self.slow: list[tuple[float, float]] = []
        """(end - window start, gap) in seconds, for each gap over SLOW_GAP_S: stalls show as clusters."""
        self.events_in_window = 0
        self.events_total = 0
        self.responses = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.reconnects = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what[:300])


class StreamProtocol(asyncio.Protocol):
    """One stream: one keep-alive connection, one request after another."""

    def __init__(self, client: SseClient) -> None:
        self.client = client
        self.stats = client.stats
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = client.loop.create_future()
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.status = 0
        self.chunked: ChunkedDecoder | None = None
        self.length = -1
        self.body = b""
        self.sse = b""
        self.last: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self) -> None:
        if self.transport is None or self.client.stopping:
            return
        self._reset()
        self.transport.write(self.client.next_request())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.head[:end].split(b"\r\n")
            data = self.head[end + 4:]
            self.head = b""
            self.in_body = True
            try:
                self.status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = ChunkedDecoder()
                elif name == b"content-length":
                    self.length = int(value)
            if self.chunked is None and self.length < 0:
                self.stats.error(f"status {self.status}: neither chunked nor content-length")
                self._drop()
                return
            if self.chunked is None and self.length == 0:
                self._finish()
                return
            if not data:
                return
        if self.chunked is not None:
            try:
                payload = self.chunked.feed(data)
            except ValueError as e:
                self.stats.error(f"bad chunked framing: {e}")
                self._drop()
                return
            if self.status == 200:
                self._events(payload, now)
            else:
                self.body += payload
            if self.chunked.done:
                self._finish()
        else:
            self.body += data
            if len(self.body) >= self.length:
                self._finish()

    def _events(self, payload: bytes, now: float) -> None:
        sse = self.sse + payload if self.sse else payload
        start = 0
        stats = self.stats
        while True:
            sep = sse.find(b"\n\n", start)
            if sep < 0:
                break
            if sse.startswith(TOKEN_PREFIX, start):
                stats.events_total += 1
                if stats.w0 <= now <= stats.w1:
                    stats.events_in_window += 1
                    if self.last is not None:
                        gap = now - self.last
                        stats.gaps.append(gap)
                        if gap > SLOW_GAP_S:
                            stats.slow.append((now - stats.w0, gap))
                self.last = now
            elif sse.startswith(b"data: ", start) and not sse.startswith(b"data: [DONE]", start):
                stats.error("unexpected SSE event: " + sse[start:sep].decode("utf-8", "replace"))
            start = sep + 2
        self.sse = sse[start:] if start < len(sse) else b""

    def _finish(self) -> None:
        stats = self.stats
        if self.status == 200 and self.chunked is not None:
            stats.responses += 1
            if self.sse.strip():
                stats.error("answer ended inside an SSE event: " + self.sse[:200].decode("utf-8", "replace"))
            self.send()
        else:
            stats.error(f"status {self.status}: {self.body[:200].decode('utf-8', 'replace')}")
            # Do not spin on an error: try again a little later.
            self.client.loop.call_later(0.05, self.send)

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SseClient:
    def __init__(self, host: str, port: int, path: str, streams: int, max_tokens: int, w0: float, w1: float,
                 extra: dict[str, Any] | None = None, ramp_s: float = 0.0, spread: float = 0.0,
                 seed: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.streams = host, port, streams
        self.stats = Stats(w0, w1)
        self.stopping = False
        self.ramp_s = ramp_s
        self.rng = random.Random(seed)
        self.cpu: dict[str, float] = {}
        if path.endswith("/chat/completions"):
            body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
        else:
            body = {"model": "tiny", "prompt": "hello"}
        # Answer lengths spread evenly over max_tokens * [1 - spread, 1 + spread] (mean max_tokens), so
        # that streams which started together do not all end, and restart, at the same instant.
        variants = 17 if spread > 0 else 1
        lengths = sorted({max(1, round(max_tokens * (1 - spread + 2 * spread * k / max(1, variants - 1))))
                          for k in range(variants)})
        self.requests = []
        for n in lengths:
            b = {**body, "max_tokens": n, "stream": True, "ignore_eos": True, **(extra or {})}
            raw = json.dumps(b).encode()
            self.requests.append(
                (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
                 f"accept: text/event-stream\r\ncontent-length: {len(raw)}\r\n\r\n").encode() + raw)

    def next_request(self) -> bytes:
        return self.requests[0] if len(self.requests) == 1 else self.rng.choice(self.requests)

    def _cpu(self, key: str) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu[key] = r.ru_utime + r.ru_stime

    async def _stream(self, i: int) -> None:
        await asyncio.sleep(i * self.ramp_s / self.streams)  # the streams start spread over the ramp
        while not self.stopping:
            try:
                _, proto = await self.loop.create_connection(lambda: StreamProtocol(self), self.host, self.port)
            except OSError as e:
                self.stats.error(f"connect: {e}")
                await asyncio.sleep(0.1)
                continue
            await proto.lost
            if not self.stopping:
                self.stats.reconnects += 1
                await asyncio.sleep(0.01)

    async def run(self) -> dict[str, Any]:
        now = time.perf_counter()
        w0, w1 = self.stats.w0, self.stats.w1
        self.loop.call_later(max(0.0, w0 - now), self._cpu, "w0")
        self.loop.call_later(max(0.0, w1 - now), self._cpu, "w1")
        tasks = [asyncio.ensure_future(self._stream(i)) for i in range(self.streams)]
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()) + 0.01)
        self.stopping = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        s = self.stats
        cpu_s = self.cpu.get("w1", 0.0) - self.cpu.get("w0", 0.0)
        return {
            "loop": loop_name(), "streams": self.streams, "window": [w0, w1],
            "gaps_ms": [round(g * 1000, 4) for g in s.gaps], "events_in_window": s.events_in_window,
            "slow_gaps": [[round(t, 4), round(g * 1000, 3)] for t, g in s.slow],
            "events_total": s.events_total, "responses": s.responses, "errors": s.errors,
            "error_samples": s.error_samples, "reconnects": s.reconnects, "cpu_s_in_window": round(cpu_s, 4),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdtui.bench.transparency_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/completions")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256, help="mean answer length (default 256)")
    ap.add_argument("--length-spread", type=float, default=0.5,
                    help="answer lengths uniform over max_tokens * [1 - S, 1 + S] (default 0.5; 0: all the same)")
    ap.add_argument("--ramp", type=float, default=1.0, help="start the streams spread over this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window-start", type=float, help="perf_counter() value; default now + 1.5 s")
    ap.add_argument("--window-end", type=float, help="perf_counter() value; default window start + 10 s")
    ap.add_argument("--out", help="write the JSON result here (default stdout)")
    args = ap.parse_args(argv)
    install_fast_loop()
    w0 = args.window_start if args.window_start is not None else time.perf_counter() + 1.5
    w1 = args.window_end if args.window_end is not None else w0 + 10.0

    async def run() -> dict[str, Any]:
        return await SseClient(args.host, args.port, args.path, args.streams, args.max_tokens, w0, w1,
                               ramp_s=args.ramp, spread=args.length_spread, seed=args.seed).run()

    result = asyncio.run(run())
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
