"""SSE framing on bytes: where D's stream is cut into events, the byte scan that times its
token-carrying events, and the proxy's error as a JSON body or a final SSE event."""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdtui.core.proxy.trace import Trace


MAX_EVENT_BYTES = 8 * 2**20
"""The most of one SSE event the proxy holds while it waits for the event's end (the scan's carry,
the usage check's and a switch's hold), as vllm-router caps a frame at 8 MiB. Past it that request
ends with an error (``EventTooLarge``); nothing else is affected."""


class EventTooLarge(Exception):
    """D sent more than MAX_EVENT_BYTES of one event without its end."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes of one SSE event without its end (the cap: {MAX_EVENT_BYTES})")
        self.size = size


def error_body(status: int, message: str, type_: str = "proxy_error") -> bytes:
    """The proxy's error in OpenAI's shape: an HTTP error's JSON body, or after ``data: `` a stream's
    final event."""
    return json.dumps({"error": {"message": message, "type": type_, "code": status}}).encode()


# A token-carrying event: a "text" (completions) or "content" (chat delta) string that is not
# empty. vLLM writes compact JSON ("text":"x"); json.dumps's default has a space ("text": "x").
_TOKEN = re.compile(rb'"(?:text|content)": ?"(?!")')
_token_search = _TOKEN.search
_USAGE = re.compile(rb'"usage": ?\{')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens": ?(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')


class SseScan:
    """Finds token-carrying SSE events in D's byte stream and times them, without parsing JSON.

    Per chunk: split at event boundaries (a blank line), then per event three substring checks and
    one regex search, all in C. Only an event with a usage object or an error is looked at closer.
    """

    __slots__ = ("carry", "error", "last", "seam", "t_sent", "trace")

    def __init__(self, trace: Trace, t_sent: float, seam: float | None = None) -> None:
        self.trace = trace
        self.t_sent = t_sent
        self.seam = seam
        """When P's token went to the client (first_token_from_p): D's first token is then the
        second, a gap from it (the seam), not the TTFT."""
        self.last: float | None = None
        self.carry = b""
        self.error: str | None = None

    def feed(self, data: bytes, now: float) -> bool:
        """Scan one chunk; True when it was the usual one (no partial event before or after it, no
        usage, error or [DONE]: the relay need not look at it again)."""
        if not self.carry and data.endswith(b"\n\n") and data.find(b"\n\n") == len(data) - 2 \
                and b"[DONE]" not in data \
                and b'"error"' not in data and b'"usage":{' not in data and b'"usage": {' not in data:
            # The usual chunk: one whole token event (vLLM writes one per chunk), nothing rare in it.
            if _token_search(data) is not None:
                self._token(now)
            return True
        whole, self.carry = cut_events(self.carry, data)
        if whole:
            for event in whole[:-2].split(b"\n\n"):
                self._event(event, now)
        return False

    def _event(self, event: bytes, now: float) -> None:
        trace = self.trace
        if b"[DONE]" in event and data_of(event) == b"[DONE]":
            trace.done_seen = True
            return
        if b'"error"' in event:
            self._maybe_error(event)
            if self.error is not None:
                return
        if b'"usage' in event and _USAGE.search(event):
            if (m := _COMPLETION_TOKENS.search(event)) is not None:
                trace.completion_tokens = int(m.group(1))
            if trace.prompt_tokens is None and (m := _PROMPT_TOKENS.search(event)) is not None:
                trace.prompt_tokens = int(m.group(1))
        if _token_search(event) is not None:
            self._token(now)

    def _token(self, now: float) -> None:
        """A token-carrying event arrived at ``now``: TTFT for the first, a gap for the others."""
        trace = self.trace
        trace.chunks += 1
        trace.last_chunk_at = time.time()
        if self.last is None:  # D's first token
            trace.decode_ttft_ms = (now - self.t_sent) * 1000
            if self.seam is None:
                trace.ttft_ms = (now - trace.t0) * 1000
            else:
                trace.itl_ms.append((now - self.seam) * 1000)
        else:
            trace.itl_ms.append((now - self.last) * 1000)
        self.last = now

    def _maybe_error(self, event: bytes) -> None:
        try:
            obj = json.loads(data_of(event))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(obj, dict) and obj.get("error"):
            err = obj["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)


def data_of(event: bytes) -> bytes:
    """The data of one SSE event (its data: lines joined)."""
    return b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))


def cut_events(held: bytes, data: bytes) -> tuple[bytes, bytes]:
    """``held + data`` split after its last event end (a blank line): the whole events, and the
    partial event after them, to hold until the next chunk. No event end: (b"", all of it). A
    partial event over MAX_EVENT_BYTES raises EventTooLarge."""
    data = held + data
    end = data.rfind(b"\n\n")
    if end < 0:
        if len(data) > MAX_EVENT_BYTES:
            raise EventTooLarge(len(data))
        return b"", data
    if len(data) - end - 2 > MAX_EVENT_BYTES:
        raise EventTooLarge(len(data) - end - 2)
    return data[:end + 2], data[end + 2:]

