"""Fakes for unit tests of ONE layer (the proxy, the supervisor). Named as fakes on purpose:
they stand in for vLLM only where the test is about pdtui's own logic. End-to-end tests use
real vLLM (tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn

from pdtui.core.proxy import Proxy, ProxyServer, ProxySettings, Upstream
from pdtui.core.proxy.contract import RELEASE_MODEL

_HANDED: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, drawn at random from 12000-19999: under the kernel's ephemeral
    range (32768-60999), where any outgoing connection may take a port the moment after it was
    found free (CI saw a fake D fail "Address already in use" on one), and under the e2e tests'
    ports. Never the same one twice in a process, and under pytest-xdist each worker draws from a
    slice of its own (CI at c502b19: two workers drew 18622, the second's proxy could not bind)."""
    import random

    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) % count if worker.startswith("gw") and worker[2:].isdigit() else 0
    span = 8000 // count
    lo = 12000 + index * span
    for _ in range(200):
        port = random.randrange(lo, lo + span)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    raise RuntimeError("no free port in 12000-19999 after 200 tries")


class AbortConnection(Exception):
    """Raised inside the fake app mid-body: uvicorn drops the connection, like a dying server."""


async def refused_release(req: dict[str, Any], send: Any, releases: list[dict[str, Any]]) -> bool:
    """The proxy's release request (a model no engine serves, with P's kv_transfer_params): kept in
    ``releases`` (not in the fake's ``requests``: those are the legs) and answered as vLLM 0.32
    answers a model it does not serve (404, its error body). True when it was one."""
    if req.get("model") != RELEASE_MODEL:
        return False
    releases.append(req)
    await _json(send, 404, {"error": {"message": f"The model `{RELEASE_MODEL}` does not exist.",
                                      "type": "NotFoundError", "param": "model", "code": 404}})
    return True


class FakeAsgiVllm:
    """What the ASGI fake vLLM servers share (a dataclass each, with the fields ``port``,
    ``requests`` and ``releases``): their ``url``, and ``take``, the start of each request."""

    port: int
    requests: list[dict[str, Any]]
    releases: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def take(self, scope: Any, receive: Any, send: Any) -> dict[str, Any] | None:
        """The request's JSON body, kept in ``requests`` with its path; None where it was answered
        here: not HTTP (left), /health (200, {}) or the proxy's release (``refused_release``)."""
        if scope["type"] != "http":
            return None
        body = await read_body(receive)
        if scope["path"] == "/health":
            await _json(send, 200, {})
            return None
        req = json.loads(body)
        if await refused_release(req, send, self.releases):
            return None
        self.requests.append({**req, "path": scope["path"]})
        return req


@dataclass
class FakeVllm(FakeAsgiVllm):
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
    releases: list[dict[str, Any]] = field(default_factory=list)
    """The proxy's release requests (``refused_release``), answered 404."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = field(default_factory=free_port)

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
        if await refused_release(req, send, self.releases):
            return
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
    prefill, decode = [Upstream("P", "prefill", p.url, is_up=lambda: p_up)], [Upstream("D", "decode", d.url)]
    both = ProxySettings(**{"block_size": 16, "prefill_timeout_s": 5, "decode_read_timeout_s": 5, **settings})
    async with serving(p), serving(d), proxy_served(prefill, decode, both) as (client, traces, _):
        yield client, traces


@contextlib.asynccontextmanager
async def proxy_served(prefills: list[Upstream], decodes: list[Upstream],
                       settings: ProxySettings) -> AsyncIterator[tuple[httpx.AsyncClient, list[Any], Proxy]]:
    """The proxy (in this loop) over these upstreams (fakes the caller serves), on a free port of
    127.0.0.1, and a client to it: yields (client, traces, proxy); stopped on the way out."""
    traces: list[Any] = []
    proxy = Proxy(prefills, decodes, settings, on_trace=traces.append)
    server = ProxyServer(proxy, "127.0.0.1", free_port())
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            yield client, traces, proxy
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


def raw_json(obj: Any) -> bytes:
    """A whole JSON answer for FakeRawUpstream: 200, content-length, connection: close."""
    body = json.dumps(obj).encode()
    return raw_head(200, b"application/json", len(body)) + body


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


# ----- a fake whose next token is a function of the whole context (migration) --------------------

CHAIN_VOCAB = 50_000
CHAIN_FP = "fp-chain"
"""FakeChainVllm's system_fingerprint."""


def chain_tokens(context: list[int], n: int) -> list[int]:
    """FakeChainVllm's "greedy model": each next id a hash of every id before it (prompt and output),
    so a stream continued from prompt + the ids sent, anywhere, is the unbroken stream's rest."""
    h, out = 0, []
    for t in context:
        h = (h * 31 + t) % 1_000_003
    for _ in range(n):
        t = 100 + (h * 2_654_435_761) % CHAIN_VOCAB
        out.append(t)
        h = (h * 31 + t) % 1_000_003
    return out


def chain_prompt(text: str) -> list[int]:
    """FakeChainVllm's tokenizer: a byte per id."""
    return [1000 + b for b in text.encode()]


def chain_chat_prompt(messages: list[dict[str, Any]]) -> list[int]:
    """FakeChainVllm's chat template, rendered and tokenized."""
    return chain_prompt("".join(f"<{m.get('role')}>{m.get('content')}" for m in messages) + "<assistant>")


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class FakeChainVllm(FakeAsgiVllm):
    """A FAKE vLLM for the migration tests: its "model" is ``chain_tokens`` (the next id depends on
    the whole context, so D continuing from prompt + ids sent gives the unbroken rest: greedy
    decoding as the fake knows it), its JSON vLLM 0.32.0's shapes and order (completions and chat,
    streamed and not: ``prompt_token_ids`` on the first event and ``token_ids`` per event as lists
    with ``return_token_ids``, else null; the chat role chunk; ``system_fingerprint`` on the terminal
    chunk unless a usage event follows, then on that). Takes prompts as text or ids; honours
    max_tokens (chat: max_completion_tokens first), return_token_ids, stream_options.include_usage.
    P mode (kv_transfer_params with do_remote_decode): one token, not streamed, with
    kv_transfer_params (blocks of 16). ``die_after``: a stream's connection drops after that many
    token events (0: right after the head; the role chunk goes first on chat). ``details``: usage
    has prompt_tokens_details, cached_tokens = the whole prompt when D got P's params, else 0."""

    role: str
    created: int = 5
    die_after: int | None = None
    delay_s: float = 0.003
    status: int = 200
    details: bool = False
    fail_after: int | None = None
    """Answer 500 to every request after this many."""
    on_die: Any = None
    """Called when a stream's connection is about to drop (die_after)."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    """The proxy's release requests (``refused_release``), answered 404."""
    port: int = field(default_factory=free_port)

    async def __call__(self, scope, receive, send):
        if (req := await self.take(scope, receive, send)) is None:
            return
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            await _json(send, 500, {"error": {"message": f"fake {self.role} says 500"}})
            return
        if self.status != 200:
            await _json(send, self.status, {"error": {"message": f"fake {self.role} says {self.status}"}})
            return
        rid = dict(scope["headers"]).get(b"x-request-id", b"x").decode()
        chat = scope["path"] == "/v1/chat/completions"
        if chat:
            ids = chain_chat_prompt(req.get("messages") or [])
            n = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        else:
            prompt = req.get("prompt")
            ids = list(prompt) if isinstance(prompt, list) else chain_prompt(str(prompt))
            n = int(req.get("max_tokens") or 16)
        params = req.get("kv_transfer_params") or {}
        p_mode = bool(params.get("do_remote_decode"))
        out = chain_tokens(ids, 1 if p_mode else n)
        want = bool(req.get("return_token_ids"))
        usage: dict[str, Any] = {"prompt_tokens": len(ids), "total_tokens": len(ids) + len(out),
                                 "completion_tokens": len(out)}
        if self.details:
            usage["prompt_tokens_details"] = {"cached_tokens": len(ids) if params.get("do_remote_prefill") else 0}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion" if chat else "text_completion",
                "created": self.created, "model": "m"}
        if p_mode or not req.get("stream"):
            await self._whole(send, head, chat, ids, out, want, usage, p_mode)
            return
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events: list[dict[str, Any]] = []
        if chat:
            head["object"] = "chat.completion.chunk"
            events.append({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}],
                           "prompt_token_ids": ids if want else None, "prompt_text": None})
        for i, t in enumerate(out):
            last = i == len(out) - 1
            if chat:
                c: dict[str, Any] = {"index": 0, "delta": {"content": f" w{t}"}, "logprobs": None,
                                     "finish_reason": "length" if last else None}
                if last:
                    c["stop_reason"] = None
                c["token_ids"] = [t] if want else None
            else:
                c = {"index": 0, "text": f" w{t}", "logprobs": None, "finish_reason": "length" if last else None,
                     "stop_reason": None, "prompt_token_ids": ids if want and i == 0 else None,
                     "token_ids": [t] if want else None}
            events.append({**head, "choices": [c]})
        if include_usage:
            events.append({**head, "choices": [], "usage": usage, "system_fingerprint": CHAIN_FP})
        else:
            events[-1]["system_fingerprint"] = CHAIN_FP
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        tokens = 0
        for ev in events:
            if ev["choices"] and "role" not in ev["choices"][0].get("delta", {}):
                if self.die_after is not None and tokens == self.die_after:
                    if self.on_die is not None:
                        self.on_die()
                    raise AbortConnection("fake decode dies mid-stream")
                tokens += 1
            await send({"type": "http.response.body", "body": b"data: " + _compact(ev) + b"\n\n", "more_body": True})
            await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _whole(self, send, head: dict[str, Any], chat: bool, ids: list[int], out: list[int], want: bool,
                     usage: dict[str, Any], p_mode: bool) -> None:
        text = "".join(f" w{t}" for t in out)
        kv = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [list(range(-(-len(ids) // 16)))],
              "remote_engine_id": "fake-p", "remote_host": "127.0.0.1", "remote_port": 1} if p_mode else None
        if chat:
            obj: dict[str, Any] = {**head, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                        "audio": None, "function_call": None, "reasoning": None},
                "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": out if want else None}],
                "service_tier": None, "system_fingerprint": CHAIN_FP, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": ids if want else None, "prompt_text": None,
                "kv_transfer_params": kv}
        else:
            obj = {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                                        "stop_reason": None, "prompt_token_ids": ids if want else None,
                                        "token_ids": out if want else None}],
                   "system_fingerprint": CHAIN_FP, "usage": usage, "kv_transfer_params": kv}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": _compact(obj)})


@contextlib.asynccontextmanager
async def proxy_over(prefills: list[Any], decodes: list[Any], up: dict[str, bool] | None = None, **settings: Any):
    """The proxy (in this loop) over fake P1.. and D1.. (one of each: P, D), and a client to it:
    yields (client, traces, proxy). ``up``: instance name -> is it up (a dict the test may change).
    ``settings`` go to ProxySettings over short test timeouts and block size 16."""
    up = up if up is not None else {}

    def names(letter: str, n: int) -> list[str]:
        return [letter] if n == 1 else [f"{letter}{i}" for i in range(1, n + 1)]

    def ups(fakes: list[Any], letter: str, role: str) -> list[Upstream]:
        return [Upstream(name, role, f.url, is_up=lambda name=name: up.get(name, True))
                for name, f in zip(names(letter, len(fakes)), fakes, strict=True)]

    async with contextlib.AsyncExitStack() as stack:
        for f in (*prefills, *decodes):
            await stack.enter_async_context(serving(f))
        async with proxy_served(ups(prefills, "P", "prefill"), ups(decodes, "D", "decode"),
                                ProxySettings(**{"block_size": 16, "prefill_timeout_s": 5, "decode_read_timeout_s": 5,
                                                 **settings})) as served:
            yield served
