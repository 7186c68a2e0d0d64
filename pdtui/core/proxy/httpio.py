"""HTTP/1.1 on asyncio protocols and httptools: the proxy's data path, with no framework between.

Why not uvicorn + httpx (what the proxy used until 2026-11-30): per relayed SSE chunk they cost
89-158 us of CPU (httpx/httpcore/anyio's async generators to receive, an ASGI ``send`` to write,
a task switch between them, and a JSON parse), so one event loop saturated near 10k chunks/s and
held chunks back in bunches (docs/proxy.md has the profile). Here a chunk from the upstream is
handled inside ``data_received``: httptools (C) strips the chunked framing, the caller's sink
looks at the bytes and writes them to the client's transport. No task switch, no await, no copy
beyond the chunk header. Back-pressure is the transports' own: a client that stops reading pauses
the upstream's reads.

Two halves, no pdtui logic in either:

- ``serve()``/``ServerConnection``: requests are parsed (httptools), the whole body read (bounded),
  then handed to ``handler(request, response)``, one request at a time per connection.
  ``Response`` writes a fixed-length or a chunked answer and reports a client that went away.
- ``UpstreamPool``/``ClientConnection``: keep-alive connections to one upstream; ``request()``
  returns once the response's head has arrived; its body is then either read whole
  (``read_all``) or streamed into a callback (``attach``).
"""

from __future__ import annotations

import asyncio
import collections
import http
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]
Handler = Callable[["Request", "Response"], Awaitable[None]]

MAX_HEADER_COUNT = 200


class BodyTooLarge(Exception):
    pass


class UpstreamError(ConnectionError):
    """The upstream connection failed or closed before the response was complete."""


class ConnectFailed(UpstreamError):
    """No connection to the upstream could be made (refused, unreachable, or the connect timed
    out): the request was never sent."""


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


# ----- server side ----------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes
    body_too_large: bool = False


class Response:
    """The answer to one request. Not thread-safe; every method is synchronous (no await)."""

    __slots__ = (
        "_conn",
        "_lost_waiter",
        "_transport",
        "chunked",
        "finished",
        "keep_alive",
        "lost",
        "on_lost",
        "on_pause",
        "on_resume",
        "started",
        "status",
    )

    def __init__(self, conn: ServerConnection, keep_alive: bool) -> None:
        self._conn = conn
        self._transport = conn.transport
        self.keep_alive = keep_alive
        self.started = self.finished = self.chunked = self.lost = False
        self.status = 0
        self.on_lost: Callable[[], None] | None = None
        """Called once if the client goes away before ``finish()``."""
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        """Flow control: the client's socket buffer is full / has drained."""
        self._lost_waiter: asyncio.Future[None] | None = None

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), *, length: int | None = None) -> None:
        """Send the head: with ``length`` a fixed-length body follows, without it a chunked one."""
        assert not self.started
        self.started, self.status = True, status
        self.chunked = length is None
        lines = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
        lines.extend(b"%s: %s" % (k, v) for k, v in headers)
        lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length)
        if not self.keep_alive:
            lines.append(b"connection: close")
        if not self.lost:
            self._transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def write(self, data: bytes) -> None:
        if not data or self.lost:
            return
        if self.chunked:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def finish(self, last: bytes = b"") -> None:
        """End the body (``last`` is written first). A second call does nothing."""
        if self.finished:
            return
        self.write(last)
        self.finished = True
        if self.chunked and not self.lost:
            self._transport.write(b"0\r\n\r\n")
        self._conn._response_done(self)

    def send(self, status: int, body: bytes, ctype: bytes | str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A whole answer with a known length."""
        if isinstance(ctype, str):
            ctype = ctype.encode()
        self.start(status, [(b"content-type", ctype), *headers], length=len(body))
        self.finish(body)

    async def wait_lost(self) -> None:
        """Returns when the client has gone away (never, if it stays)."""
        if self.lost:
            return
        if self._lost_waiter is None:
            self._lost_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._lost_waiter)

    def _set_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        if self.on_lost is not None and not self.finished:
            self.on_lost()


class ServerConnection(asyncio.Protocol):
    """One client connection. Requests are served in order, one at a time."""

    def __init__(self, handler: Handler, max_body: int, on_error: Callable[[BaseException], None],
                 registry: set[ServerConnection] | None = None) -> None:
        self.handler = handler
        self.registry = registry
        self.max_body = max_body
        self.on_error = on_error
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.queue: collections.deque[tuple[Request, bool]] = collections.deque()
        self.response: Response | None = None
        self.task: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        if self.registry is not None:
            self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request(b"upgrades are not supported")
        except httptools.HttpParserError as e:
            self._bad_request(str(e).encode()[:200])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        if self.registry is not None:
            self.registry.discard(self)
        if self.response is not None and not self.response.finished:
            self.response._set_lost()

    def pause_writing(self) -> None:
        r = self.response
        if r is not None and r.on_pause is not None:
            r.on_pause()

    def resume_writing(self) -> None:
        r = self.response
        if r is not None and r.on_resume is not None:
            r.on_resume()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size, self._too_large = b"", {}, [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADER_COUNT:
            raise httptools.HttpParserError("too many headers")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._headers.get("expect", "").lower() == "100-continue" and not self.closed:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        req = Request(method=self.parser.get_method().decode(), path=url.path.decode("latin-1"),
                      query=url.query or b"", headers=self._headers, body=b"".join(self._body),
                      body_too_large=self._too_large)
        self.queue.append((req, self.parser.should_keep_alive()))
        if self.task is None:
            self._next()

    # serving
    def _next(self) -> None:
        if self.closed or not self.queue:
            return
        req, keep_alive = self.queue.popleft()
        resp = self.response = Response(self, keep_alive)
        self.task = asyncio.get_running_loop().create_task(self._run(req, resp))

    async def _run(self, req: Request, resp: Response) -> None:
        try:
            await self.handler(req, resp)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - a bug in the handler: answer 500 rather than hang the client
            self.on_error(e)
            if not resp.started:
                resp.keep_alive = False
                resp.send(500, b'{"error":{"message":"internal proxy error","type":"proxy_error","code":500}}',
                          b"application/json")
        if not resp.finished:  # a handler that returned without ending its answer
            resp.keep_alive = False
            if resp.started:
                resp.finish()
            else:
                resp.send(500, b'{"error":{"message":"no answer","type":"proxy_error","code":500}}',
                          b"application/json")

    def _response_done(self, resp: Response) -> None:
        if resp is not self.response:
            return
        self.response = None
        self.task = None
        if not resp.keep_alive:
            if not self.closed:
                self.transport.close()
            self.closed = True
            return
        if self.queue:
            asyncio.get_running_loop().call_soon(self._next)

    def _bad_request(self, why: bytes) -> None:
        if self.closed:
            return
        body = b'{"error":{"message":"bad HTTP request: %s","type":"invalid_request_error","code":400}}' % (
            why.replace(b'"', b"'").replace(b"\\", b"/"))
        if self.response is None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body))
        self.transport.close()
        self.closed = True


class Server:
    """A listening socket and its connections; ``close()`` ends both."""

    def __init__(self) -> None:
        self.conns: set[ServerConnection] = set()
        self.server: asyncio.base_events.Server | None = None

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if conn.task is not None:
                conn.task.cancel()
            if not conn.closed and conn.transport is not None:
                conn.transport.close()
        self.conns.clear()
        await asyncio.sleep(0)


async def serve(handler: Handler, sock: socket.socket, *, max_body: int,
                on_error: Callable[[BaseException], None]) -> Server:
    """Serve ``handler`` on a bound, listening socket."""
    loop = asyncio.get_running_loop()
    srv = Server()

    def factory() -> ServerConnection:
        return ServerConnection(handler, max_body, on_error, srv.conns)

    srv.server = await loop.create_server(factory, sock=sock, backlog=1024)
    return srv


# ----- client side ----------------------------------------------------------------------------


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.got_bytes = False
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self._head: asyncio.Future[None] | None = None
        self._body: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._on_end: Callable[[BaseException | None], None] | None = None
        self._done: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"bad HTTP from upstream: {e}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if not self.complete:
            why = f": {type(exc).__name__}: {exc}" if exc else ""
            self._fail(UpstreamError(f"connection closed before the response was complete{why}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self._on_end is not None:
            self._on_end(None)

    def _fail(self, err: BaseException) -> None:
        if self.error is not None or self.complete:
            return
        self.error = err
        for fut in (self._head, self._done):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: whoever awaits it raises it; nobody awaiting is fine
        if self._on_end is not None:
            self._on_end(err)

    # use
    def send_request(self, method: bytes, path: bytes, headers: Headers, body: bytes) -> None:
        self._head = asyncio.get_running_loop().create_future()
        lines = [b"%s %s HTTP/1.1" % (method, path), b"host: " + self.pool.host_header]
        lines.extend(b"%s: %s" % (k, v) for k, v in headers)
        lines.append(b"content-length: %d" % len(body))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    async def wait_head(self) -> None:
        assert self._head is not None
        await self._head

    async def read_all(self) -> bytes:
        """The whole body (de-chunked). Raises UpstreamError if the connection breaks first."""
        if not self.complete:
            if self.error is not None:
                raise self.error
            self._done = asyncio.get_running_loop().create_future()
            await self._done
        return b"".join(self._body)

    def attach(self, sink: Callable[[bytes], None], on_end: Callable[[BaseException | None], None]) -> None:
        """Stream the rest of the body into ``sink`` (called from data_received); ``on_end`` once,
        with None at the end of the body or the error that cut it. Body bytes that arrived with
        the head go to ``sink`` first."""
        self._sink, self._on_end = sink, on_end
        early, self._body = self._body, []
        for b in early:
            sink(b)
        if self.complete:
            on_end(None)
        elif self.error is not None:
            on_end(self.error)

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection (an upstream vLLM aborts the request). Called from the sink itself,
        the rest of the bytes the parser holds go nowhere: the stream's reader has ended."""
        if self._sink is not None:
            self._sink = _discard
        if not self.closed:
            self.transport.close()
        self.closed = True


def _discard(data: bytes) -> None:
    pass


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream (``http://host:port``)."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0, max_idle: int = 64) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream URL {url!r}: expected http://HOST:PORT")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = f"{self.host}:{self.port}".encode()
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self.idle: list[ClientConnection] = []
        self.busy: set[ClientConnection] = set()

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: ClientConnection(self), self.host, self.port), self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {type(e).__name__}: {e}") from e
        return conn

    async def request(self, method: str, path: str, headers: Headers, body: bytes = b"",
                      head_timeout_s: float | None = None,
                      on_sent: Callable[[], None] | None = None) -> ClientConnection:
        """Send a request; return its connection once the response's status and headers are in.
        A reused keep-alive connection that the upstream had closed is retried once on a new one.
        ``on_sent`` is called once the request is handed to a connection (the upstream may have it
        from then on; before, a cancellation or ConnectFailed means it was never sent)."""
        for attempt in range(2):
            conn = None
            while self.idle:
                c = self.idle.pop()
                if not c.closed:
                    conn = c
                    break
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            self.busy.add(conn)
            conn.send_request(method.encode(), self.prefix + path.encode(), headers, body)
            if on_sent is not None:
                on_sent()
            try:
                await asyncio.wait_for(conn.wait_head(), head_timeout_s)
            except UpstreamError:
                self.busy.discard(conn)
                conn.close()
                if fresh or conn.got_bytes or attempt:
                    raise
                continue
            except BaseException:
                self.busy.discard(conn)
                conn.close()
                raise
            return conn
        raise AssertionError("unreachable")

    def release(self, conn: ClientConnection) -> None:
        """Done with a connection: keep it if its response ended cleanly and it may be reused."""
        self.busy.discard(conn)
        if conn.complete and conn.keep_alive and not conn.closed and len(self.idle) < self.max_idle:
            conn._sink = conn._on_end = conn._done = conn._head = None
            conn._body, conn.headers, conn.status = [], {}, 0
            conn.complete = conn.got_bytes = False
            conn.error = None
            self.idle.append(conn)
        else:
            conn.close()

    def _forget(self, conn: ClientConnection) -> None:
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    async def aclose(self) -> None:
        for conn in list(self.idle) + list(self.busy):
            conn.close()
        self.idle.clear()
        self.busy.clear()
