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
    usage stats, always have a choice."""

    __slots__ = ("block_size", "drop", "extra_prompt", "hold", "p_cached", "trace")

    def __init__(self, trace: Trace, block_size: int, p_cached: int | None, drop: bool) -> None:
        self.trace, self.block_size, self.p_cached, self.drop = trace, block_size, p_cached, drop
        self.extra_prompt = 0
        """Tokens D's prompt had beyond the usage's prompt_tokens (first_token_from_p: P's token,
        which firsttoken.fix_usage moved to the completion before this sees the event)."""
        self.hold = b""

    def record(self, usage: Any) -> None:
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
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

    def feed(self, data: bytes) -> bytes:
        if not self.hold and data.endswith(b"\n\n") and _FINAL_USAGE[0] not in data and _FINAL_USAGE[1] not in data:
            return data  # the usual chunk: whole token events (their choices are never empty)
        data, self.hold = cut_events(self.hold, data)
        if not any(m in data for m in _FINAL_USAGE):
            return data
        return b"".join(self._event(e) for e in data[:-2].split(b"\n\n"))

    def flush(self) -> bytes:
        """What is held when D's stream ends (an event D left unfinished), for the client as it is."""
        data, self.hold = self.hold, b""
        return data

    def _event(self, event: bytes) -> bytes:
        if not any(m in event for m in _FINAL_USAGE) or b'"usage' not in event:
            return event + b"\n\n"
        try:
            obj = json.loads(data_of(event))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event + b"\n\n"
        if not isinstance(obj, dict) or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
            return event + b"\n\n"
        self.record(obj["usage"])
        return b"" if self.drop else self.restore(event) + b"\n\n"

