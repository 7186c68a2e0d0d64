"""The silent-recompute check on D's usage (``ProxySettings.decode_reports_cached``)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import TYPE_CHECKING, Any

from pdtui.core.proxy.sse import cut_events, data_of

if TYPE_CHECKING:
    from pdtui.core.proxy.trace import Trace

_CACHED_TOKENS = re.compile(rb'("cached_tokens": ?)(-?\d+|null)')
_FINAL_USAGE = (b'"choices":[]', b'"choices": []')
TERMINAL = b'"finish_reason":"'
"""A token event that ends its choice (vLLM writes ``"finish_reason":null`` on the others, compact)."""
_FINGERPRINT = b'"system_fingerprint"'
_AFTER_FINGERPRINT = (b',"prompt_token_ids":', b',"prompt_text":', b',"metrics":')
"""The top-level keys vLLM 0.32.0 writes after system_fingerprint (its models' field order: chat's
prompt_token_ids, prompt_text, metrics; completions' metrics). Inside a JSON string a quote is
escaped, so these bytes are keys; no choice of a chat chunk has them, and a completions chunk's
choice-level prompt_token_ids is never looked for (``stamp``)."""


class UsageCheck:
    """D's usage on a paired request (``ProxySettings.decode_reports_cached``): how many prompt
    tokens D computed itself, and the client's view of it.

    ``record`` reads one usage object: d_computed_tokens = prompt_tokens + ``extra_prompt`` -
    prompt_tokens_details.cached_tokens (absent details: D cached nothing, as vLLM 0.22.1 says it);
    more than ``block_size`` makes the request ``recomputed``. ``feed`` is the stream's, for the
    chunks the byte scan did not call usual: they pass as they are unless they hold an event with
    empty choices or end inside an event (then the partial event waits for its end: a client can
    read no half event anyway); the final usage event (JSON parsed once per request) is dropped when
    the client did not ask for usage (``drop``), else its cached_tokens becomes P's figure
    (``p_cached``), the number vLLM's D would have reported. vLLM writes that event
    (``exclude_none``) as compact JSON, ``"choices":[]``; its token events, even with continuous
    usage stats, always have a choice.

    The fingerprint (``drop``): vLLM stamps ``system_fingerprint`` on the terminal chunk (the token
    event with a finish reason) only when no usage event follows; asked for usage, it writes it on
    the usage event instead. A client that did not ask would lose it with the dropped usage event,
    so a terminal event waits for it: from the first terminal event the stream's events are held, in
    order, until D's usage event, and go on with the usage event's system_fingerprint stamped where
    vLLM writes it (``stamp``) in its place (n = 1: the two events come one after the other). With
    n > 1 a choice that ends early would hold the others' tokens: its terminal event is stamped at
    once with D's fingerprint as seen on D's last usage event (``Upstream.fingerprint``), and held
    only while the proxy has not seen one from that D. A stream that ends before its usage event
    (D broke, or sent none) gets the held events as they are (``flush``)."""

    __slots__ = ("block_size", "counting", "drop", "extra_prompt", "held", "hold", "p_cached", "single", "trace",
                 "up")

    def __init__(self, trace: Trace, block_size: int, p_cached: int | None, drop: bool,
                 single: bool = True) -> None:
        self.trace, self.block_size, self.p_cached, self.drop = trace, block_size, p_cached, drop
        self.extra_prompt = 0
        """Tokens D's prompt had beyond the usage's prompt_tokens (first_token_from_p: P's token,
        which firsttoken.fix_usage moved to the completion before this sees the event)."""
        self.hold = b""
        self.held: list[bytes] | None = None
        """Whole events (each with its blank line) waiting for D's usage event: its fingerprint."""
        self.single = single
        """n = 1: a terminal event always waits for the usage event (the fingerprint is exact)."""
        self.up: Any = None
        """D (contract.Upstream): its ``fingerprint`` as last seen, for n > 1 (set by the relay)."""
        self.counting = True
        """D's usage is the request's (False after a migration: the new D's usage is about its own
        prompt, the original plus the tokens sent; pdtui.core.proxy.migrate records it apart)."""

    def record(self, usage: Any) -> None:
        if not self.counting or not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            return
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        n = max(0, usage["prompt_tokens"] + self.extra_prompt - (cached if isinstance(cached, int) else 0))
        self.trace.d_computed_tokens = n
        self.trace.recomputed = n > self.block_size

    def client_json(self, content: bytes) -> bytes:
        """A non-streamed answer: record D's usage, give the client P's cached_tokens."""
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            self.record(json.loads(content).get("usage"))
        return self.restore(content)

    def restore(self, data: bytes) -> bytes:
        if self.p_cached is None:
            return data
        return _CACHED_TOKENS.sub(lambda m: m.group(1) + str(self.p_cached).encode(), data, count=1)

    def watches(self, data: bytes) -> bool:
        """A usual chunk (one whole token event) that must go through ``feed`` all the same: events
        are held, or this one ends its choice (its fingerprint comes with the usage event)."""
        return self.drop and (self.held is not None or TERMINAL in data)

    def feed(self, data: bytes) -> bytes:
        if not self.hold and self.held is None and data.endswith(b"\n\n") and _FINAL_USAGE[0] not in data \
                and _FINAL_USAGE[1] not in data and not (self.drop and TERMINAL in data):
            return data  # the usual chunk: whole token events (their choices are never empty)
        data, self.hold = cut_events(self.hold, data)
        if not data or (self.held is None and not any(m in data for m in _FINAL_USAGE)
                        and not (self.drop and TERMINAL in data)):
            return data
        return b"".join(self._event(e) for e in data[:-2].split(b"\n\n"))

    def flush(self) -> bytes:
        """What is held when D's stream ends (events waiting for a usage event that did not come, an
        event D left unfinished), for the client as it is."""
        data = b"".join(self.held or ()) + self.hold
        self.held, self.hold = None, b""
        return data

    def _event(self, event: bytes) -> bytes:
        if not any(m in event for m in _FINAL_USAGE) or b'"usage' not in event:
            return self._token_event(event + b"\n\n")
        try:
            obj = json.loads(data_of(event))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._token_event(event + b"\n\n")
        if not isinstance(obj, dict) or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
            return self._token_event(event + b"\n\n")
        self.record(obj["usage"])
        if not self.drop:
            return self.restore(event) + b"\n\n"
        fp = obj.get("system_fingerprint")
        if self.up is not None:
            self.up.fingerprint = fp if isinstance(fp, str) else ""
        held, self.held = self.held or [], None
        if not isinstance(fp, str):  # D runs with --fingerprint-mode none: nothing to stamp
            return b"".join(held)
        return b"".join(stamp(e, fp) if _terminal(e) else e for e in held)

    def _token_event(self, event: bytes) -> bytes:
        """A whole event other than the usage event: on its way, or held (the class's docstring)."""
        if not self.drop:
            return event
        if self.held is not None:
            self.held.append(event)
            return b""
        if not _terminal(event):
            return event
        known = None if self.single or self.up is None else self.up.fingerprint
        if known is None:
            self.held = [event]
            return b""
        return stamp(event, known) if known else event


def _terminal(event: bytes) -> bool:
    return TERMINAL in event and _FINGERPRINT not in event


def stamp(event: bytes, fingerprint: str) -> bytes:
    """``event`` (one whole SSE event, a token chunk) with ``"system_fingerprint"`` where vLLM
    writes it: after the choices (and usage), before the keys its model has after it, else last."""
    body_end = event.rstrip().rfind(b"}")
    if body_end < 0:
        return event
    at = body_end
    keys = _AFTER_FINGERPRINT if b'"chat.completion.chunk"' in event else _AFTER_FINGERPRINT[2:]
    for key in keys:
        i = event.find(key)
        if 0 <= i < at:
            at = i
    value = json.dumps(fingerprint, ensure_ascii=False).encode()
    return event[:at] + b',"system_fingerprint":' + value + event[at:]

