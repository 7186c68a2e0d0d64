"""Fakes for unit tests of ONE layer (the proxy, the supervisor). Named as fakes on purpose:
they stand in for vLLM only where the test is about pdtui's own logic. End-to-end tests use
real vLLM (tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn

from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AbortConnection(Exception):
    """Raised inside the fake app mid-body: uvicorn drops the connection, like a dying server."""


@dataclass
class FakeVllm:
    """A fake vLLM OpenAI server: P mode answers max_tokens=1 with kv_transfer_params; D mode
    streams ``tokens`` SSE chunks, optionally dying after ``die_after`` of them."""

    role: str
    status: int = 200
    tokens: int = 5
    delay_s: float = 0.01
    die_after: int | None = None
    blocks: int = 3
    prompt_tokens: int = 40
    linger_after_done_s: float = 0.0
    """Keep the stream open this long after [DONE] (clients hang up first)."""
    empty_at: tuple[int, ...] = ()
    """Indices of streamed chunks sent with empty text (vLLM does, for a token with no text yet)."""
    kv_params: bool = True
    """P mode: put kv_transfer_params in the answer (False: a P without a kv_producer config)."""
    p_cached: int | None = None
    """P mode: its prefix-cache hits, sent as kv_transfer_params.remote_prefill_cached_tokens (vLLM 0.32)."""
    cached_tokens: int | None = None
    """D mode, set: D runs with --enable-prompt-tokens-details and reports this many cached prompt
    tokens, or P's remote_prefill_cached_tokens when its params carry them (vLLM 0.32's output
    processor does that); a stream asking for usage gets vLLM's final usage event (choices [],
    compact JSON). -1: details left out, as vLLM 0.22.1 does when D cached nothing. None: the
    plain fake (usage without details, no usage event)."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] == "/health":
            await _json(send, 200, {})
            return
        if scope["path"] == "/v1/models":
            await _json(send, 200, {"data": [{"id": "fake"}]})
            return
        req = json.loads(body)
        self.requests.append(req)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        if self.status != 200:
            await _json(send, self.status, {"error": {"message": f"fake {self.role} says {self.status}"}})
            return
        if self.role == "prefill" and not self.kv_params:
            await _json(send, 200, {"choices": [{"text": " w1"}], "usage": {"prompt_tokens": self.prompt_tokens}})
            return
        if self.role == "prefill":
            await _json(send, 200, {
                "choices": [{"text": " w1"}], "usage": {"prompt_tokens": self.prompt_tokens},
                "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                       "remote_block_ids": [list(range(self.blocks))], "remote_engine_id": "fake-p",
                                       "remote_host": "127.0.0.1", "remote_port": 1,
                                       **({"remote_prefill_cached_tokens": self.p_cached}
                                          if self.p_cached is not None else {})},
            })
            return
        usage = self._usage(req)
        if not req.get("stream"):
            await _json(send, 200, {"choices": [{"text": " w1" * self.tokens}], "usage": usage})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        watch = asyncio.create_task(_wait_disconnect(receive, self.disconnected))
        try:
            for i in range(self.tokens):
                if self.die_after is not None and i == self.die_after:
                    raise AbortConnection("fake decode dies mid-stream")
                chunk = {"choices": [{"index": 0, "text": "" if i in self.empty_at else f" w{i}"}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                            "more_body": True})
                await asyncio.sleep(self.delay_s)
            if self.cached_tokens is not None and (req.get("stream_options") or {}).get("include_usage"):
                event = {"id": "cmpl-fake", "object": "text_completion", "choices": [], "usage": usage}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            await asyncio.sleep(self.linger_after_done_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.cancel()


    def _usage(self, req: dict[str, Any]) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens}
        if self.cached_tokens is None:
            return usage
        usage["total_tokens"] = self.prompt_tokens + self.tokens
        params = req.get("kv_transfer_params") or {}
        cached = self.cached_tokens
        if params.get("do_remote_prefill") and isinstance(params.get("remote_prefill_cached_tokens"), int):
            cached = params["remote_prefill_cached_tokens"]
        usage["prompt_tokens_details"] = {"cached_tokens": cached} if cached >= 0 else None
        return usage


async def _wait_disconnect(receive, flag: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    flag.set()


async def read_body(receive) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


@contextlib.asynccontextmanager
async def proxy_stack(p: Any, d: Any, p_up: bool = True, **settings: Any):
    """The proxy (in this loop) over fake P and D, and a client to it: yields (client, traces).
    ``settings`` go to ProxySettings over short test timeouts and block size 16."""
    traces: list[Any] = []
    async with serving(p), serving(d):
        proxy = Proxy([Upstream("P", "prefill", p.url, is_up=lambda: p_up)], [Upstream("D", "decode", d.url)],
                      ProxySettings(**{"block_size": 16, "prefill_timeout_s": 5, "decode_read_timeout_s": 5,
                                       **settings}),
                      on_trace=traces.append)
        server = ProxyServer(proxy, "127.0.0.1", free_port())
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
                yield client, traces
        finally:
            await server.stop()


async def _json(send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(app: FakeVllm):
    config = uvicorn.Config(app, host="127.0.0.1", port=app.port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield app
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@dataclass
class FakeRawUpstream:
    """A fake upstream at the socket level, for failures an ASGI server cannot make: it reads one
    HTTP request per connection, records its JSON body, then plays ``respond(body)``: bytes are
    written as they are (any split, any cut), a float sleeps that many seconds; then it closes the
    connection. Its responses should say ``connection: close``."""

    respond: Any
    """Callable[[dict], list[bytes | float]]."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            req = json.loads(body) if body else {}
            self.requests.append(req)
            for step in self.respond(req):
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    writer.write(step)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)


def raw_head(status: int = 200, ctype: bytes = b"text/event-stream", length: int | None = None) -> bytes:
    """A response head for FakeRawUpstream: chunked unless ``length`` is given; connection: close."""
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d X\r\ncontent-type: %s\r\n%s\r\nconnection: close\r\n\r\n" % (status, ctype, framing)


def raw_chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (an empty ``data`` is the last one)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


FAKE_VLLM = Path(__file__).resolve().parent / "child_scripts" / "fake_vllm.py"


class FakeVllmEngine:
    """A FAKE vLLM engine in a child process (tests/child_scripts/fake_vllm.py: vLLM 0.32's /health,
    /v1/models, /version, /metrics with cache_config_info and the kv-role traces, completions), for
    `pdtui attach`'s tests: something to attach to, kill by pid and start again on its port."""

    def __init__(self, role: str, *args: str, port: int | None = None) -> None:
        self.role, self.args = role, list(args)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeVllmEngine:
        self.proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "--port", str(self.port), "--role", self.role,
                                      *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait(self, timeout_s: float = 20.0) -> FakeVllmEngine:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code in (200, 503):
                    return self
            assert self.proc is not None and self.proc.poll() is None, "the fake engine exited"
            time.sleep(0.05)
        raise TimeoutError(f"fake engine on {self.port} not up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
