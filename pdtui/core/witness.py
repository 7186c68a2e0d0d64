"""Witness requests: a few small streamed completions through someone else's router, for TTFT/ITL
seen from outside (``pdtui attach --observe --witness URL``).

Without pdtui's proxy in the path nothing is measured per request; a witness is one client among
the router's others, measured by the one SSE client (``pdtui.core.sse_client``) and emitted as a
``WitnessSampled`` event. Bounded: one request in flight, one started every ``interval_s`` at most
(5 s by default), ``max_tokens`` tokens each (16), a timeout per request: on a shared deployment it
adds one short stream every few seconds, nothing more.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import httpx

from pdtui.core import sse_client
from pdtui.core.events import Event, WitnessSampled

INTERVAL_S = 5.0
MAX_TOKENS = 16
TIMEOUT_S = 60.0
PROMPT = "pdtui witness request: a short prompt to time this router's first token and token gaps. "
HEADER = "X-Pdtui-Witness"


async def sample(client: httpx.AsyncClient, url: str, model: str, *, max_tokens: int = MAX_TOKENS,
                 timeout_s: float = TIMEOUT_S) -> WitnessSampled:
    """One witness request through ``url`` (its /v1/completions), as an event."""
    rid = f"pdtui-witness-{uuid.uuid4().hex[:12]}"
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    rec = sse_client.SseStream()
    try:
        await asyncio.wait_for(sse_client.stream(client, f"{url.rstrip('/')}/v1/completions", body, rec,
                                                 headers={"X-Request-Id": rid, HEADER: "1"}), timeout_s)
    except TimeoutError:
        rec.transport_error = rec.transport_error or f"no end within {timeout_s:.0f} s"
    return WitnessSampled(url=url, request_id=rid, status=rec.status, ttft_ms=rec.ttft_ms, itl_ms=rec.itl_ms,
                          chunks=len(rec.chunk_t), error=rec.error())


async def run(url: str, model: str, emit: Callable[[Event], None], *, interval_s: float = INTERVAL_S,
              max_tokens: int = MAX_TOKENS, timeout_s: float = TIMEOUT_S) -> None:
    """Send witness requests until cancelled: one at a time, one started every ``interval_s`` at most."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0)) as client:
        while True:
            t0 = time.monotonic()
            emit(await sample(client, url, model, max_tokens=max_tokens, timeout_s=timeout_s))
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
