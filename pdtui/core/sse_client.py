"""The client of a streamed OpenAI completion: the one the dashboard's load keys, the drill's witness
stream and `pdtui bench` send with, so all three measure and judge a stream the same way.

``await stream(client, url, body, rec)`` POSTs ``body`` (which asks for ``"stream": true``) with
httpx and fills ``rec``, an ``SseStream``, as the answer arrives: a caller may read it while the
stream runs (the drill counts the witness's events, the bench waits for a stream's first token) and
after a cancel (the bench keeps what was measured).

- ``status``: the HTTP status. A status other than 200: ``body`` keeps the answer's first 500
  characters, and nothing more is read.
- Each SSE ``data:`` line is one event, stamped with ``clock()`` when its line is read:
  - ``[DONE]`` sets ``done``. Reading goes on to the end of the body, so an error event that comes
    after it (the proxy's, when D broke the body after its ``[DONE]``) is seen; ``stop_at_done``
    stops there instead (the bench: the answer is complete).
  - An event whose JSON object has an ``error``: ``error_event`` holds that value; reading stops.
  - Every other event counts in ``events``. One with choices is a token chunk when its first
    choice has text (a completion's ``text``, a chat delta's ``content``): ``chunk_t``, so TTFT is
    the first chunk's time less ``t_send`` and ITL the gaps between chunks, per chunk, as `vllm
    bench serve` times them; with empty text (vLLM sends one for a token with no text yet, e.g.
    the first byte of a multi-byte character) it goes to ``empty_t``, where `vllm bench serve`
    still counts it (docs/bench.md, "ITL: two definitions"). An event that is not a JSON object
    is counted and not looked into.
- A failure of the connection, the read or the HTTP framing: ``transport_error``
  (``"ReadError: ..."``).

``rec.error()`` says in one line why the stream was not a clean answer, or None. A stream that ends
without ``[DONE]`` and without an error event is not clean (that is what a client of a killed D
sees when nothing said so); the bench keeps such a stream's chunks and does not count it as an
error (its samples' ``error``, see pdtui.bench.workload).

Nothing here knows the proxy, the engines or the UI: the caller builds the body and reads ``rec``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

BODY_KEPT = 500
"""Characters of a non-200 answer kept in ``SseStream.body``."""


@dataclass
class SseStream:
    """One streamed request as the client saw it, filled in as the answer arrives. Times are the
    caller's ``clock`` (seconds)."""

    t_send: float | None = None
    status: int | None = None
    body: str = ""
    """A non-200 answer: its first ``BODY_KEPT`` characters."""
    chunk_t: list[float] = field(default_factory=list)
    """Arrival of every token chunk (an event whose first choice has text). A caller may pass its
    own list, to see the chunks where it keeps them."""
    empty_t: list[float] = field(default_factory=list)
    """Arrival of every event with choices whose first choice has empty text."""
    events: int = 0
    """Data events other than ``[DONE]`` and an error event: token chunks, empty ones, usage, ..."""
    done: bool = False
    """``data: [DONE]`` arrived."""
    error_event: Any = None
    """The ``error`` value of an SSE error event (the proxy's ``{"message": ..., "code": 502}``)."""
    transport_error: str | None = None
    cancelled: bool = False
    """The caller cancelled the request (a bench window closed, Ctrl-C)."""
    t_end: float | None = None
    """When the request ended, whatever the end; None while it runs."""
    choices: list[dict[str, Any]] | None = None
    """A caller that wants the answer itself passes a list: each event's first choice (a token
    chunk's, an empty one's) is appended (its text, and its token_ids and logprobs where asked for). None: not kept (the load
    and the bench keep times only)."""

    @property
    def ttft_ms(self) -> float | None:
        """From sending to the first token chunk, in ms; None before it."""
        if not self.chunk_t or self.t_send is None:
            return None
        return (self.chunk_t[0] - self.t_send) * 1000.0

    @property
    def itl_ms(self) -> list[float]:
        """The gaps between consecutive token chunks, in ms."""
        t = self.chunk_t
        return [(t[i] - t[i - 1]) * 1000.0 for i in range(1, len(t))]

    def outcome(self) -> str:
        """How the stream ended, or stands while it runs, in a few words (the drills' lines): a
        transport error, a status other than 200 with the start of its body, or the data events
        and how they ended."""
        if self.transport_error:
            return f"transport error {self.transport_error}"
        if self.status not in (None, 200):
            return f"HTTP {self.status} {self.body[:80]!r}"
        end = ("[DONE]" if self.done else f"error event {str(self.error_event)[:80]}" if self.error_event
               else "no end yet")
        return f"{self.events} events, {end}"

    def error(self) -> str | None:
        """Why the stream is not a clean answer, in one line; None while it runs and when it was clean."""
        if self.transport_error is not None:
            return self.transport_error
        if self.status is not None and self.status != 200:
            return f"HTTP {self.status}: {self.body[:200]}"
        if self.error_event is not None:
            return error_message(self.error_event)
        if self.t_end is not None and not self.done and not self.cancelled:
            return "the stream ended without [DONE]"
        return None


def error_message(err: Any) -> str:
    """An error event's value in one line: its ``message`` when it has one."""
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"][:200]
    return json.dumps(err)[:200]


def _text(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    if "text" in choice:
        return choice["text"]
    delta = choice.get("delta")
    return delta.get("content") if isinstance(delta, dict) else None


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: SseStream | None = None, *,
                 headers: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
                 stop_at_done: bool = False) -> SseStream:
    """POST ``body`` to ``url`` and read the SSE answer into ``rec`` (a new one if None), which is
    returned. Never raises for what the server or the network does (``rec`` says); a cancel sets
    ``rec.cancelled`` and propagates."""
    rec = SseStream() if rec is None else rec
    rec.t_send = clock()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.body = (await r.aread()).decode(errors="replace")[:BODY_KEPT]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec.done = True
                    if stop_at_done:
                        break
                    continue
                now = clock()
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and "error" in obj:
                    rec.error_event = obj["error"]
                    break
                rec.events += 1
                choices = obj.get("choices") if isinstance(obj, dict) else None
                if not choices or not isinstance(choices, list):
                    continue
                if rec.choices is not None and isinstance(choices[0], dict):
                    rec.choices.append(choices[0])
                if _text(choices[0]):
                    rec.chunk_t.append(now)
                else:
                    rec.empty_t.append(now)
    except asyncio.CancelledError:
        rec.cancelled = True
        raise
    except (httpx.HTTPError, ValueError) as e:
        rec.transport_error = f"{type(e).__name__}: {e}"
    finally:
        rec.t_end = clock()
    return rec
