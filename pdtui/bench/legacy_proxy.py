"""A frozen copy of pdtui/core/proxy.py as it was at commit d2a8a0d (uvicorn + httpx), before the
data path moved to asyncio protocols + httptools (e199ea2). Kept, unchanged below this note, only as
the baseline of the transparency bench's ``pdtui-legacy`` arm (``python -m pdtui.bench.transparency
--arms direct,pdtui-legacy``): the numbers the rewrite was measured against can be measured again.
Nothing else imports it. It needs httpx and uvicorn; without them the arm is reported as skipped.

The original module docstring follows.

The embedded P/D proxy: a small ASGI app on uvicorn, httpx to the upstreams.

The contract (DESIGN.md section 3, vLLM's ``toy_proxy_server.py``):

1. One id per request, sent to both legs as ``X-Request-Id``.
2. P leg: the body with ``max_tokens=1`` (and ``max_completion_tokens=1`` if present),
   ``stream=false``, no ``stream_options``/``min_tokens``, and
   ``kv_transfer_params={"do_remote_decode": true, ...}``. Read the body, close it.
3. D leg: the client's body plus P's returned ``kv_transfer_params``, verbatim; D's bytes are
   streamed back with D's status and content type. P's sampled token is discarded.
4. Failures: P down or 5xx before D was called -> D colocated (the plain body), counted as a
   fallback. P 4xx -> that error to the client (the input is bad; D would say the same). D fails
   before the first byte -> an HTTP error with a JSON body. D dies mid-stream -> a final SSE error
   event, then close: never ``[DONE]``, never a retry (tokens would repeat). Client disconnects
   -> D's request is closed, which makes vLLM abort it.

Every request ends in one ``RequestTraced`` (the ``on_trace`` callback) with its timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdtui.core import connectors, kvmath
from pdtui.core.events import RequestTraced

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY_BYTES = 32 * 2**20
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILL_KV_PARAMS = dict(connectors.NIXL.prefill_kv_params)
WARMUP_HEADER = "x-pdtui-warmup"
DECODE_CHOICES = ("least-loaded", "round-robin")


@dataclass
class Upstream:
    """One vLLM instance as the proxy sees it."""

    name: str
    role: str
    url: str
    is_up: Callable[[], bool] = lambda: True
    inflight: int = 0
    client: httpx.AsyncClient | None = None

    def open(self, timeout: httpx.Timeout) -> None:
        if self.client is None:
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
            self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


@dataclass
class ProxySettings:
    block_size: int = 16
    geometry: kvmath.KvGeometry | None = None
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0
    """Whole P leg (the first request after start-up can stall for tens of seconds)."""
    decode_read_timeout_s: float = 300.0
    """Longest silence from D while streaming before the stream is called broken."""
    decode_choice: str = "least-loaded"
    """How a decode instance is picked: "least-loaded" (fewest requests in flight, ties to the
    first: the pair's default) or "round-robin" (each request to the next instance that is up, in
    list order, whatever their load: vLLM's examples/disagg toy proxies, the bench's two-single)."""


class ProxyError(Exception):
    def __init__(self, status: int, message: str, type_: str = "proxy_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


def error_body(status: int, message: str, type_: str = "proxy_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": status}}).encode()


@dataclass
class _Trace:
    """Mutable while a request runs; frozen into a RequestTraced at the end."""

    request_id: str
    endpoint: str
    stream: bool
    t0: float = field(default_factory=time.perf_counter)
    warmup: bool = False
    outcome: str = "error"
    status: int = 0
    prefill: str | None = None
    decode: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prefill_ms: float | None = None
    hop_ms: float | None = None
    decode_ttft_ms: float | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    blocks: int | None = None
    kv_bytes: int | None = None
    fallback_reason: str | None = None
    error: str | None = None
    tokens_seen: int = 0
    paired: bool = False
    done_seen: bool = False
    """D sent [DONE]: a client hanging up after this is a normal end, not an abort."""

    def freeze(self) -> RequestTraced:
        total = (time.perf_counter() - self.t0) * 1000
        return RequestTraced(
            request_id=self.request_id, endpoint=self.endpoint, stream=self.stream, outcome=self.outcome,
            status=self.status, prefill=self.prefill, decode=self.decode, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, chunks=self.tokens_seen,
            prefill_ms=_r(self.prefill_ms), hop_ms=_r(self.hop_ms), decode_ttft_ms=_r(self.decode_ttft_ms),
            ttft_ms=_r(self.ttft_ms), itl_ms=[round(x, 3) for x in self.itl_ms], total_ms=_r(total),
            blocks=self.blocks, kv_bytes=self.kv_bytes, fallback_reason=self.fallback_reason, error=self.error,
            warmup=self.warmup,
        )


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class _SseTimer:
    """Finds token-carrying SSE events in D's byte stream and times them."""

    def __init__(self, trace: _Trace, t_sent: float) -> None:
        self.trace = trace
        self.t_sent = t_sent
        self.last: float | None = None
        self.buf = b""
        self.error: str | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        self.buf += chunk
        while True:
            sep = self.buf.find(b"\n\n")
            if sep < 0:
                return
            event, self.buf = self.buf[:sep], self.buf[sep + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._data(line[5:].strip(), now)

    def _data(self, data: bytes, now: float) -> None:
        if data == b"[DONE]":
            self.trace.done_seen = True
            return
        if not data:
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error"):
            err = obj["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.trace.completion_tokens = usage.get("completion_tokens", self.trace.completion_tokens)
            if usage.get("prompt_tokens") is not None and self.trace.prompt_tokens is None:
                self.trace.prompt_tokens = usage["prompt_tokens"]
        n = 0
        for choice in obj.get("choices") or []:
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                n += 1
        if not n:
            return
        self.trace.tokens_seen += n
        if self.last is None:
            self.trace.decode_ttft_ms = (now - self.t_sent) * 1000
            self.trace.ttft_ms = (now - self.trace.t0) * 1000
        else:
            self.trace.itl_ms.append((now - self.last) * 1000)
        self.last = now


class ProxyMetrics:
    """The proxy's own /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pdtui_requests", "Requests through the proxy", ["outcome"], registry=self.registry)
        self.fallbacks = Counter("pdtui_fallbacks", "Requests served by D colocated", ["reason"], registry=self.registry)
        self.kv_bytes = Counter("pdtui_kv_bytes", "KV bytes offered by P (blocks x block_size x bytes/token)", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("pdtui_ttft_seconds", "Client-facing TTFT", ["outcome"], buckets=buckets, registry=self.registry)
        self.itl = Histogram("pdtui_itl_seconds", "Inter-token gaps", ["outcome"], buckets=buckets, registry=self.registry)

    def observe(self, t: RequestTraced) -> None:
        if t.warmup:
            return
        self.requests.labels(t.outcome).inc()
        if t.outcome == "fallback":
            self.fallbacks.labels(_reason_label(t.fallback_reason)).inc()
        if t.kv_bytes:
            self.kv_bytes.inc(t.kv_bytes)
        if t.ttft_ms is not None:
            self.ttft.labels(t.outcome).observe(t.ttft_ms / 1000)
        for gap in t.itl_ms:
            self.itl.labels(t.outcome).observe(gap / 1000)


def _reason_label(reason: str | None) -> str:
    reason = reason or ""
    for label in ("prefill_down", "prefill_unreachable", "prefill_5xx", "no_kv_transfer_params"):
        if reason.startswith(label):
            return label
    return "other"


class Proxy:
    """The ASGI app. ``prefills`` and ``decodes`` are live lists (restarts keep their objects)."""

    def __init__(
        self,
        prefills: list[Upstream],
        decodes: list[Upstream],
        settings: ProxySettings | None = None,
        on_trace: Callable[[RequestTraced], None] | None = None,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.prefills = prefills
        self.decodes = decodes
        self.settings = settings or ProxySettings()
        self.on_trace = on_trace or (lambda t: None)
        self.health_info = health or (dict)
        self.metrics = ProxyMetrics()
        s = self.settings
        if s.decode_choice not in DECODE_CHOICES:
            raise ValueError(f"decode_choice {s.decode_choice!r}: one of {', '.join(DECODE_CHOICES)}")
        self._next_decode = 0
        self._p_timeout = httpx.Timeout(s.prefill_timeout_s, connect=s.connect_timeout_s)
        self._d_timeout = httpx.Timeout(s.decode_read_timeout_s, connect=s.connect_timeout_s)
        for up in prefills:
            up.open(self._p_timeout)
        for up in decodes:
            up.open(self._d_timeout)

    async def aclose(self) -> None:
        for up in self.prefills + self.decodes:
            await up.aclose()

    # ----- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            if path in GENERATE_PATHS:
                if method != "POST":
                    raise ProxyError(405, f"{path} takes POST", "invalid_request_error")
                await self._generate(scope, receive, send)
            elif path == "/v1/models" and method == "GET":
                await self._forward_get(send, "/v1/models")
            elif path == "/health":
                await self._health(send)
            elif path == "/metrics":
                await _respond(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                raise ProxyError(404, f"no route {method} {path}; the proxy serves {', '.join(GENERATE_PATHS)},"
                                 " /v1/models, /health and /metrics", "not_found_error")
        except ProxyError as e:
            await _respond_json_error(send, e.status, e.message, e.type)
        except _Relay as r:
            await _respond(send, r.status, r.content, r.ctype)

    async def _health(self, send: Send) -> None:
        info = {
            "prefill": {u.name: u.is_up() for u in self.prefills},
            "decode": {u.name: u.is_up() for u in self.decodes},
            **self.health_info(),
        }
        ok = any(u.is_up() for u in self.decodes)
        await _respond(send, 200 if ok else 503, json.dumps(info).encode(), "application/json")

    async def _forward_get(self, send: Send, path: str) -> None:
        for up in self._candidates(self.decodes) + self._candidates(self.prefills):
            assert up.client is not None
            try:
                r = await up.client.get(path)
            except httpx.HTTPError:
                continue
            await _respond(send, r.status_code, r.content, r.headers.get("content-type", "application/json"))
            return
        raise ProxyError(503, "no instance is up to answer", "service_unavailable")

    # ----- the P/D dance ------------------------------------------------------------------
    @staticmethod
    def _candidates(ups: list[Upstream]) -> list[Upstream]:
        return sorted((u for u in ups if u.is_up()), key=lambda u: u.inflight)

    async def _read_body(self, receive: Receive) -> bytes:
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ProxyError(499, "client went away", "client_disconnected")
            body += msg.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                raise ProxyError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
            if not msg.get("more_body"):
                return body

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await self._read_body(receive)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProxyError(400, f"request body is not valid JSON: {e}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise ProxyError(400, "request body must be a JSON object", "invalid_request_error")
        _check_limits(body)
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id") or f"pdtui-{uuid.uuid4().hex[:16]}"
        trace = _Trace(request_id=rid, endpoint=scope["path"], stream=bool(body.get("stream")))
        trace.warmup = WARMUP_HEADER in headers
        # Watch for the client going away while we work; cancel the work if it does.
        work = asyncio.create_task(self._serve(trace, body, send))
        watch = asyncio.create_task(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                if trace.done_seen and trace.error is None:
                    trace.outcome = "pair" if trace.paired else "fallback"
                else:
                    trace.outcome, trace.status = "error", 499
                    trace.error = trace.error or "client disconnected; decode request closed (vLLM aborts it)"
            else:
                work.result()
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            event = trace.freeze()
            self.metrics.observe(event)
            self.on_trace(event)

    async def _serve(self, trace: _Trace, body: dict[str, Any], send: Send) -> None:
        kv_params = await self._prefill(trace, body)
        d_body = dict(body)
        if kv_params is not None:
            d_body["kv_transfer_params"] = kv_params
            trace.paired = True
        t_hop = time.perf_counter()
        await self._decode(trace, d_body, send, t_hop)
        if trace.outcome != "error":
            trace.outcome = "pair" if trace.paired else "fallback"

    async def _prefill(self, trace: _Trace, body: dict[str, Any]) -> dict[str, Any] | None:
        """The P leg. Returns P's kv_transfer_params, or None to fall back to D colocated."""
        ups = self._candidates(self.prefills)
        if not ups:
            trace.fallback_reason = "prefill_down: no prefill instance is up"
            return None
        up = ups[0]
        trace.prefill = up.name
        p_body = dict(body)
        p_body["max_tokens"] = 1
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        p_body["stream"] = False
        for k in ("stream_options", "min_tokens"):
            p_body.pop(k, None)
        p_body["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
        assert up.client is not None
        t = time.perf_counter()
        up.inflight += 1
        try:
            r = await up.client.post(trace.endpoint, json=p_body, headers={"X-Request-Id": trace.request_id})
        except httpx.HTTPError as e:
            trace.fallback_reason = f"prefill_unreachable: {type(e).__name__}: {e}"
            return None
        finally:
            up.inflight -= 1
        trace.prefill_ms = (time.perf_counter() - t) * 1000
        if r.status_code >= 500:
            trace.fallback_reason = f"prefill_5xx: {up.name} answered {r.status_code}: {r.text[:200]}"
            return None
        if r.status_code >= 400:
            # Bad input: D would refuse it the same way. Pass P's answer through.
            trace.status = r.status_code
            trace.error = r.text[:500]
            raise _Relay(r.status_code, r.content, r.headers.get("content-type", "application/json"))
        try:
            data = r.json()
        except json.JSONDecodeError:
            trace.fallback_reason = "prefill_5xx: prefill answered 200 with a body that is not JSON"
            return None
        params = data.get("kv_transfer_params")
        usage = data.get("usage") or {}
        trace.prompt_tokens = usage.get("prompt_tokens")
        if not params:
            trace.fallback_reason = (
                "no_kv_transfer_params: prefill returned none (is it running with a kv_producer"
                " kv_transfer_config?)"
            )
            return None
        trace.blocks = kvmath.count_blocks(params.get("remote_block_ids"))
        if self.settings.geometry is not None:
            trace.kv_bytes = kvmath.shipped_bytes(trace.blocks, self.settings.block_size, self.settings.geometry)
        return params

    def pick_decode(self) -> Upstream | None:
        """The decode instance for the next request (``settings.decode_choice``); None if none is up."""
        if self.settings.decode_choice == "round-robin":
            n = len(self.decodes)
            for k in range(n):
                up = self.decodes[(self._next_decode + k) % n]
                if up.is_up():
                    self._next_decode = (self._next_decode + k + 1) % n
                    return up
            return None
        ups = self._candidates(self.decodes)
        return ups[0] if ups else None

    async def _decode(self, trace: _Trace, body: dict[str, Any], send: Send, t_hop: float) -> None:
        up = self.pick_decode()
        if up is None:
            trace.status, trace.error = 503, "no decode instance is up"
            raise ProxyError(503, "no decode instance is up; the pair cannot serve", "service_unavailable")
        trace.decode = up.name
        assert up.client is not None
        req = up.client.build_request("POST", trace.endpoint, json=body, headers={"X-Request-Id": trace.request_id})
        t_sent = time.perf_counter()
        trace.hop_ms = (t_sent - t_hop) * 1000
        up.inflight += 1
        try:
            try:
                resp = await up.client.send(req, stream=True)
            except httpx.HTTPError as e:
                trace.status, trace.error = 502, f"decode {up.name} unreachable: {type(e).__name__}: {e}"
                raise ProxyError(502, trace.error, "upstream_error") from None
            try:
                await self._relay_decode(trace, up, resp, send, t_sent)
            finally:
                await resp.aclose()
        finally:
            up.inflight -= 1

    async def _relay_decode(
        self, trace: _Trace, up: Upstream, resp: httpx.Response, send: Send, t_sent: float
    ) -> None:
        ctype = resp.headers.get("content-type", "application/json")
        if resp.status_code != 200:
            content = await _read_all(resp)
            trace.status, trace.error = resp.status_code, content[:500].decode("utf-8", "replace")
            if "json" not in ctype:
                content = error_body(resp.status_code, f"decode {up.name}: {trace.error}", "upstream_error")
                ctype = "application/json"
            raise _Relay(resp.status_code, content, ctype)
        if not trace.stream:
            try:
                content = await _read_all(resp)
            except httpx.HTTPError as e:
                trace.status, trace.error = 502, f"decode {up.name} failed before answering: {type(e).__name__}: {e}"
                raise ProxyError(502, trace.error, "upstream_error") from None
            trace.decode_ttft_ms = (time.perf_counter() - t_sent) * 1000
            trace.ttft_ms = (time.perf_counter() - trace.t0) * 1000
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                usage = json.loads(content).get("usage") or {}
                trace.completion_tokens = usage.get("completion_tokens")
                trace.prompt_tokens = trace.prompt_tokens or usage.get("prompt_tokens")
            trace.status, trace.outcome = 200, "ok"
            await _respond(send, 200, content, ctype)
            return
        timer = _SseTimer(trace, t_sent)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode()), (b"x-request-id", trace.request_id.encode()),
                                (b"cache-control", b"no-cache")]})
        trace.status = 200
        try:
            async for chunk in resp.aiter_raw():
                timer.feed(chunk, time.perf_counter())
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as e:
            trace.error = f"decode {up.name} broke the stream after {trace.tokens_seen} tokens: {type(e).__name__}: {e}"
            trace.outcome = "error"
            await send({"type": "http.response.body", "more_body": False,
                        "body": b"data: " + error_body(502, trace.error, "upstream_error") + b"\n\n"})
            return
        if timer.error:
            trace.outcome, trace.error = "error", f"decode {up.name} reported: {timer.error}"
        else:
            trace.outcome = "ok"
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _check_limits(body: dict[str, Any]) -> None:
    """Refuse what the P leg would hide: P always runs with max_tokens=1, so a bad max_tokens would
    only surface at D, after P had prefilled and pinned the KV blocks for nothing."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProxyError(400, f"{key} must be an integer of at least 1, got {value!r}", "invalid_request_error")


class _Relay(Exception):
    """An upstream's non-200 answer, passed through as it is."""

    def __init__(self, status: int, content: bytes, ctype: str) -> None:
        self.status, self.content, self.ctype = status, content, ctype


async def _read_all(resp: httpx.Response) -> bytes:
    return b"".join([c async for c in resp.aiter_raw()])


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(send: Send, status: int, body: bytes, ctype: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _respond_json_error(send: Send, status: int, message: str, type_: str) -> None:
    with contextlib.suppress(Exception):
        await _respond(send, status, error_body(status, message, type_), "application/json")


class ProxyServer:
    """uvicorn in the caller's event loop, without its signal handlers; stopped with should_exit."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.proxy = proxy
        self.host, self.port = host, port
        self._task: asyncio.Task[None] | None = None
        self._server: uvicorn.Server | None = None

    async def start(self) -> None:
        from pdtui.core.supervisor import check_port_free

        check_port_free(self.host, self.port, "proxy")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        config = uvicorn.Config(self.proxy, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        server = _QuietServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="proxy")
        for _ in range(200):
            if server.started or self._task.done():
                break
            await asyncio.sleep(0.025)
        if self._task.done():
            self._task.result()
        if not server.started:
            raise RuntimeError("proxy did not start")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=8)
        await self.proxy.aclose()


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the host application owns the signals
