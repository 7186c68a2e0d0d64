"""Fakes for unit tests of ONE layer (the proxy, the supervisor). Named as fakes on purpose:
they stand in for vLLM only where the test is about pdtui's own logic. End-to-end tests use
real vLLM (tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import uvicorn


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
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
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
        if self.role == "prefill":
            await _json(send, 200, {
                "choices": [{"text": " w1"}], "usage": {"prompt_tokens": self.prompt_tokens},
                "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                       "remote_block_ids": [list(range(self.blocks))], "remote_engine_id": "fake-p",
                                       "remote_host": "127.0.0.1", "remote_port": 1},
            })
            return
        if not req.get("stream"):
            await _json(send, 200, {"choices": [{"text": " w1" * self.tokens}],
                                    "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens}})
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
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            await asyncio.sleep(self.linger_after_done_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.cancel()


async def _wait_disconnect(receive, flag: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    flag.set()


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
