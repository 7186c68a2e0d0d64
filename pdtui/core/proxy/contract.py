"""The P/D proxy: the contract, its failures, and a data path that adds no tail.

The contract (DESIGN.md section 3, vLLM's ``toy_proxy_server.py``):

1. One id per request, sent to both legs as ``X-Request-Id``.
2. P leg: the body with ``max_tokens=1`` (and ``max_completion_tokens=1`` if present),
   ``stream=false``, no ``stream_options``/``min_tokens``, and
   ``kv_transfer_params={"do_remote_decode": true, ...}``. Read the body, close it.
3. D leg: the client's body plus P's returned ``kv_transfer_params``, verbatim; D's bytes are
   streamed back with D's status and content type. P's sampled token is discarded. (With
   ``decode_reports_cached``: the exceptions of the silent-recompute check, below.)
4. Failures: no P up, or no connection to P could be made -> D colocated (the plain body),
   counted as a fallback: the only fallback, decided before the request reached a P. P answered
   502/503/504 or broke off after the request was sent -> sent once more (to another P when there
   is one); if that fails too, the error goes to the client. Any other P 5xx, or a 200 without
   ``kv_transfer_params`` -> an error to the client: never a silent prefill on D, which would hurt
   every other stream's ITL (llm-d and Dynamo dropped that fallback). ``ProxySettings.prefill_failure
   = "decode-locally"`` brings the old behaviour back (every P failure -> D colocated). Every branch is
   counted in ``pdtui_prefill_branch_total``. P 4xx -> that error to the client (the input is bad;
   D would say the same). D fails
   before the first byte -> an HTTP error with a JSON body. D dies mid-stream -> a final SSE error
   event, then the end of the body: never ``[DONE]``, never a retry (tokens would repeat). Client
   disconnects -> D's connection is closed, which makes vLLM abort the request.

Every request ends in one ``RequestTraced`` (the ``on_trace`` callback) with its timings.

Silent recompute (``ProxySettings.decode_reports_cached``: D runs with
``--enable-prompt-tokens-details``; docs/architecture.md states the contract): on a paired request
the proxy takes ``remote_prefill_cached_tokens`` (P's prefix-cache hits) out of the params D gets,
so D's usage reports D's own cached tokens; it records ``d_computed_tokens`` = D's prompt_tokens -
cached_tokens and calls the request ``recomputed`` (an error class, counted in
``pdtui_recompute_total``) when that is more than one block. The client's usage gets P's figure
back, as vLLM would report it. A stream whose client did not ask for usage is sent to D with
``stream_options.include_usage`` and D's usage event is dropped on its way: only the final usage
event is parsed and touched, never a token chunk.

The data path (docs/proxy.md): HTTP on asyncio protocols with httptools (``pdtui.core.proxy.httpio``),
one event loop of its own (``pdtui proxy``, a process, uvloop when installed). A chunk D streams is
relayed inside the upstream connection's ``data_received``: a time stamp, a byte scan for SSE
event boundaries and token-carrying events (``_SseScan``; a JSON parse only for the rare usage or
error event), and one write to the client. Per-request work (the JSON body, the P leg, the trace)
is ordinary async code.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdtui.core import connectors, kvmath
from pdtui.core.events import RequestTraced
from pdtui.core.proxy import firsttoken, httpio
from pdtui.core.proxy.httpio import ConnectFailed, Request, Response, UpstreamError, UpstreamPool

MAX_BODY_BYTES = 32 * 2**20
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILL_KV_PARAMS = dict(connectors.NIXL.prefill_kv_params)  # what P gets: pdtui/core/connectors.py
WARMUP_HEADER = "x-pdtui-warmup"
DECODE_CHOICES = ("least-loaded", "round-robin")
PREFILL_FAILURE_POLICIES = ("retry", "decode-locally")
RETRY_STATUSES = (502, 503, 504)
PREFILL_BRANCHES = {
    "fallback_down": "no prefill instance was up: D computed the prompt (before dispatch)",
    "fallback_unreachable": "no connection to P could be made: D computed the prompt (before dispatch)",
    "retry_ok": "P failed with 502/503/504 or broke off; the one retry paired",
    "error_retry_failed": "P failed with 502/503/504 or broke off, and so did the retry: an error to the client",
    "error_5xx": "P answered another 5xx: an error to the client",
    "error_no_kv": "P answered 200 without kv_transfer_params (or not JSON): an error to the client",
    "decode_locally": "prefill_failure=decode-locally: P failed after dispatch and D computed the prompt",
}
"""How a request's P leg ended when it did not simply pair (``RequestTraced.prefill_branch``)."""
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
"""vLLM's content type for a stream (what the proxy sends when it writes a stream itself)."""
_UPSTREAM_ERRORS = (OSError, TimeoutError, UpstreamError)


@dataclass
class Upstream:
    """One vLLM instance as the proxy sees it."""

    name: str
    role: str
    url: str
    is_up: Callable[[], bool] = lambda: True
    inflight: int = 0
    pool: UpstreamPool | None = None

    def open(self, connect_timeout_s: float) -> None:
        if self.pool is None:
            self.pool = UpstreamPool(self.url, connect_timeout_s=connect_timeout_s)

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None


@dataclass
class ProxySettings:
    block_size: int = 16
    geometry: kvmath.KvGeometry | None = None
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0
    """Whole P leg (the first request after start-up can stall for tens of seconds)."""
    decode_read_timeout_s: float = 300.0
    """Longest silence from D (before its answer's head, or while streaming) before it is called broken."""
    decode_choice: str = "least-loaded"
    """How a decode instance is picked: "least-loaded" (fewest requests in flight, ties to the
    first: the pair's default) or "round-robin" (each request to the next instance that is up, in
    list order, whatever their load: vLLM's examples/disagg toy proxies, the bench's two-single)."""
    prefill_failure: str = "retry"
    """What a P failure after dispatch does: "retry" (502/503/504 or a broken connection: one more
    try, on another P if there is one, then an error; other 5xx: an error) or "decode-locally"
    (pdtui before issue 14: D computes the prompt itself, a fallback)."""
    tokenize_once: bool = False
    """P is asked for its token ids (``return_token_ids``) and D gets the prompt as those ids, so D
    does not tokenize it again (docs/ttft-toll.md). Chat: D gets /v1/completions from the rendered
    prompt's ids, and the proxy writes its answer back as chat (every chunk rewritten)."""
    first_token_from_p: bool = False
    """P's sampled token goes to the client the moment P answers, and D continues from the prompt's
    ids plus that token with max_tokens - 1 (``pdtui.core.proxy.firsttoken``), for completions and chat.
    Requests it cannot serve token for token (n > 1, echo, logprobs, stop strings, tools, ...) take
    the normal path, counted in ``pdtui_switch_skipped_total``."""
    decode_reports_cached: bool = False
    """The decode instances run with ``--enable-prompt-tokens-details`` (``pdtui up`` starts them
    so): on a paired request the proxy records how many prompt tokens D computed itself and counts
    more than one block as a silent recompute (the module's docstring). vLLM 0.22.1 leaves
    prompt_tokens_details out when D cached nothing, which only this setting lets the proxy read as
    0. False: D's params and usage pass as they are, and d_computed_tokens stays None."""


class ProxyError(Exception):
    def __init__(self, status: int, message: str, type_: str = "proxy_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


def error_body(status: int, message: str, type_: str = "proxy_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": status}}).encode()


_RECORD = tuple(f for f in dataclasses.fields(RequestTraced) if f.init and f.name not in ("t", "total_ms"))
_RECORD_NAMES = tuple(f.name for f in _RECORD)
_ROUNDED_MS = ("prefill_ms", "hop_ms", "decode_ttft_ms", "ttft_ms")


class _Trace:
    """A request's record while it runs: the fields of RequestTraced itself (one definition, no
    twin copied field by field), mutable, plus the working state below. ``freeze()`` hands the
    record to RequestTraced at the end. Slots: the relay's per-chunk updates stay attribute stores."""

    __slots__ = (*_RECORD_NAMES, "done_seen", "p_answer", "paired", "t0", "usage_check")

    def __init__(self, request_id: str, endpoint: str, stream: bool) -> None:
        for f in _RECORD:
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
        self.request_id, self.endpoint, self.stream = request_id, endpoint, stream
        self.outcome: str = "error"
        """pair | fallback | error (events.OUTCOMES): error until the request is served."""
        self.status: int = 0
        self.t0 = time.perf_counter()
        self.paired = False
        """P's kv_transfer_params went to D."""
        self.done_seen = False
        """D sent [DONE]: a client hanging up after this is a normal end, not an abort."""
        self.p_answer: Any = None
        """P's parsed answer (the TTFT switches read its token ids)."""
        self.usage_check: _UsageCheck | None = None
        """Paired with decode_reports_cached: reads D's usage (d_computed_tokens), edits it for the client."""

    # The fields as mypy sees them (set in __init__ from RequestTraced's defaults).
    if TYPE_CHECKING:
        warmup: bool
        prefill: str | None
        decode: str | None
        prompt_tokens: int | None
        completion_tokens: int | None
        chunks: int
        prefill_ms: float | None
        hop_ms: float | None
        decode_ttft_ms: float | None
        ttft_ms: float | None
        itl_ms: list[float]
        blocks: int | None
        kv_bytes: int | None
        fallback_reason: str | None
        error: str | None
        prefill_attempts: int
        prefill_branch: str | None
        switch: str | None
        switch_skipped: str | None
        d_computed_tokens: int | None
        recomputed: bool

    def served(self) -> str:
        """The outcome of a request that was served: pair when P's KV went to D, else fallback."""
        return "pair" if self.paired else "fallback"

    def freeze(self) -> RequestTraced:
        rec = {name: getattr(self, name) for name in _RECORD_NAMES}
        for name in _ROUNDED_MS:
            rec[name] = _r(rec[name])
        rec["itl_ms"] = [round(x, 3) for x in self.itl_ms]
        return RequestTraced(**rec, total_ms=_r((time.perf_counter() - self.t0) * 1000))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# A token-carrying event: a "text" (completions) or "content" (chat delta) string that is not
# empty. vLLM writes compact JSON ("text":"x"); json.dumps's default has a space ("text": "x").
_TOKEN = re.compile(rb'"(?:text|content)": ?"(?!")')
_token_search = _TOKEN.search
_USAGE = re.compile(rb'"usage": ?\{')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens": ?(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens": ?(\d+)')


class _SseScan:
    """Finds token-carrying SSE events in D's byte stream and times them, without parsing JSON.

    Per chunk: split at event boundaries (a blank line), then per event three substring checks and
    one regex search, all in C. Only an event with a usage object or an error is looked at closer.
    """

    __slots__ = ("carry", "error", "last", "t_sent", "trace")

    def __init__(self, trace: _Trace, t_sent: float) -> None:
        self.trace = trace
        self.t_sent = t_sent
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
        whole, self.carry = _cut_events(self.carry, data)
        if whole:
            for event in whole[:-2].split(b"\n\n"):
                self._event(event, now)
        return False

    def _event(self, event: bytes, now: float) -> None:
        trace = self.trace
        if b"[DONE]" in event and _data_of(event) == b"[DONE]":
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
        if self.last is None:
            trace.decode_ttft_ms = (now - self.t_sent) * 1000
            trace.ttft_ms = (now - trace.t0) * 1000
        else:
            trace.itl_ms.append((now - self.last) * 1000)
        self.last = now

    def _maybe_error(self, event: bytes) -> None:
        try:
            obj = json.loads(_data_of(event))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(obj, dict) and obj.get("error"):
            err = obj["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)


def _data_of(event: bytes) -> bytes:
    """The data of one SSE event (its data: lines joined)."""
    return b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))


_CACHED_TOKENS = re.compile(rb'("cached_tokens": ?)(-?\d+|null)')
_FINAL_USAGE = (b'"choices":[]', b'"choices": []')


def _rebuild(d_body: dict[str, Any], new: dict[str, Any]) -> None:
    """D's body replaced by ``new`` (a chat request served from /v1/completions), keeping the
    stream_options the usage check gave it (D asked for its usage: ``Proxy._check_usage``)."""
    opts = d_body.get("stream_options")
    d_body.clear()
    d_body.update(new)
    if opts is not None:
        d_body["stream_options"] = opts


def _cut_events(held: bytes, data: bytes) -> tuple[bytes, bytes]:
    """``held + data`` split after its last event end (a blank line): the whole events, and the
    partial event after them, to hold until the next chunk. No event end: (b"", all of it)."""
    data = held + data
    end = data.rfind(b"\n\n")
    if end < 0:
        return b"", data
    return data[:end + 2], data[end + 2:]


class _UsageCheck:
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

    def __init__(self, trace: _Trace, block_size: int, p_cached: int | None, drop: bool) -> None:
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
        data, self.hold = _cut_events(self.hold, data)
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
            obj = json.loads(_data_of(event))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event + b"\n\n"
        if not isinstance(obj, dict) or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
            return event + b"\n\n"
        self.record(obj["usage"])
        return b"" if self.drop else self.restore(event) + b"\n\n"


class _BulkHistogram:
    """A labelled Prometheus histogram fed a whole request's gaps at once (bisect per gap, no
    lock): ``prometheus_client.Histogram.observe`` per gap cost ~1 us each, milliseconds per
    long stream, on the relay's loop."""

    def __init__(self, name: str, doc: str, bounds_s: tuple[float, ...]) -> None:
        self.name, self.doc = name, doc
        self.bounds_ms = [b * 1000 for b in bounds_s]
        self.bounds_s = bounds_s
        self.series: dict[str, list[Any]] = {}

    def observe_ms(self, label: str, values_ms: list[float]) -> None:
        if not values_ms:
            return
        s = self.series.setdefault(label, [[0] * (len(self.bounds_ms) + 1), 0.0])
        counts, bounds = s[0], self.bounds_ms
        for v in values_ms:
            counts[bisect.bisect_left(bounds, v)] += 1
        s[1] += sum(values_ms) / 1000

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=["outcome"])
        for label, (counts, total) in self.series.items():
            cum, buckets = 0, []
            for bound, n in zip([*map(str, self.bounds_s), "+Inf"], counts):
                cum += n
                buckets.append((bound, cum))
            fam.add_metric([label], buckets, total)
        yield fam


class ProxyMetrics:
    """The proxy's own /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pdtui_requests", "Requests through the proxy", ["outcome"], registry=self.registry)
        self.fallbacks = Counter("pdtui_fallbacks", "Requests served by D colocated", ["reason"], registry=self.registry)
        self.prefill_branch = Counter("pdtui_prefill_branch", "P legs that did not simply pair, by how they"
                                      " ended (pdtui.core.proxy.PREFILL_BRANCHES)", ["branch"], registry=self.registry)
        self.prefill_retries = Counter("pdtui_prefill_retries", "P legs sent a second time (after 502/503/504 or"
                                       " a broken connection)", registry=self.registry)
        for branch in PREFILL_BRANCHES:
            self.prefill_branch.labels(branch)
        self.switch = Counter("pdtui_switch", "Requests served by a TTFT switch (first_token, first_token_p_only,"
                              " tokenize_once)", ["path"], registry=self.registry)
        self.switch_skipped = Counter("pdtui_switch_skipped", "Requests that took the normal path with a TTFT"
                                      " switch on, by reason", ["reason"], registry=self.registry)
        self.recompute = Counter("pdtui_recompute", "Paired requests whose D computed more than one block of the"
                                 " prompt itself: silent recompute (RequestTraced.recomputed)", registry=self.registry)
        self.d_computed = Counter("pdtui_d_computed_tokens", "Prompt tokens D computed itself on paired requests"
                                  " (RequestTraced.d_computed_tokens)", registry=self.registry)
        self.kv_bytes = Counter("pdtui_kv_bytes", "KV bytes offered by P (blocks x block_size x bytes/token)", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("pdtui_ttft_seconds", "Client-facing TTFT", ["outcome"], buckets=buckets, registry=self.registry)
        self.itl = _BulkHistogram("pdtui_itl_seconds", "Inter-token gaps", buckets)
        self.registry.register(self.itl)  # type: ignore[arg-type]

    def observe(self, t: RequestTraced) -> None:
        if t.warmup:
            return
        self.requests.labels(t.outcome).inc()
        if t.outcome == "fallback":
            self.fallbacks.labels(_reason_label(t.fallback_reason)).inc()
        if t.prefill_branch is not None:
            self.prefill_branch.labels(t.prefill_branch).inc()
        if t.prefill_attempts > 1:
            self.prefill_retries.inc()
        if t.switch is not None:
            self.switch.labels(t.switch).inc()
        if t.switch_skipped is not None:
            self.switch_skipped.labels(t.switch_skipped).inc()
        if t.kv_bytes:
            self.kv_bytes.inc(t.kv_bytes)
        if t.recomputed:
            self.recompute.inc()
        if t.d_computed_tokens:
            self.d_computed.inc(t.d_computed_tokens)
        if t.ttft_ms is not None:
            self.ttft.labels(t.outcome).observe(t.ttft_ms / 1000)
        self.itl.observe_ms(t.outcome, t.itl_ms)


def _reason_label(reason: str | None) -> str:
    reason = reason or ""
    for label in ("prefill_down", "prefill_unreachable", "prefill_5xx", "no_kv_transfer_params"):
        if reason.startswith(label):
            return label
    return "other"


class _Relay:
    """D's streamed answer, relayed chunk by chunk from the upstream's ``data_received``."""

    __slots__ = ("conn", "done", "last_rx", "resp", "scan", "trace", "up")

    def __init__(self, trace: _Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float) -> None:
        self.trace, self.up, self.conn, self.resp = trace, up, conn, resp
        self.scan = _SseScan(trace, t_sent)
        self.last_rx = time.perf_counter()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self, ctype: bytes) -> None:
        trace, resp = self.trace, self.resp
        resp.start(200, [(b"content-type", ctype), (b"x-request-id", trace.request_id.encode()),
                         (b"cache-control", b"no-cache")])
        trace.status = 200
        resp.on_lost = self.client_lost
        resp.on_pause = self.conn.pause_reading
        resp.on_resume = self.conn.resume_reading
        self.conn.attach(self.on_chunk, self.on_end)

    def on_chunk(self, data: bytes) -> None:
        now = self.last_rx = time.perf_counter()
        if not self.scan.feed(data, now) and self.trace.usage_check is not None:
            # not the usual chunk (the scan's carry and the check's hold are the same partial event,
            # so a usual chunk leaves the check nothing to do): the final usage event may be in it
            data = self.trace.usage_check.feed(data)
            if not data:
                return
        self.resp.write(data)

    def on_end(self, err: BaseException | None) -> None:
        if self.done.done():
            return
        trace = self.trace
        if err is not None:
            self.broken(f"{type(err).__name__}: {err}")
            return
        if self.scan.error:
            trace.outcome, trace.error = "error", f"decode {self.up.name} reported: {self.scan.error}"
        else:
            trace.outcome = trace.served()
        self.resp.finish(trace.usage_check.flush() if trace.usage_check is not None else b"")
        self.done.set_result(None)

    def broken(self, why: str) -> None:
        """D's stream broke: a final SSE error event, then the end of the body; never [DONE]."""
        if self.done.done():
            return
        trace = self.trace
        trace.error = f"decode {self.up.name} broke the stream after {trace.chunks} tokens: {why}"
        trace.outcome = "error"
        self.conn.close()
        # D may have stopped inside an event: end it first, or the error would be glued onto it and
        # the client would see one event of broken JSON instead of the error (found by the fuzzing)
        end_partial = b"\n\n" if self.scan.carry else b""
        self.resp.finish(end_partial + b"data: " + error_body(502, trace.error, "upstream_error") + b"\n\n")
        self.done.set_result(None)

    def client_lost(self) -> None:
        if self.done.done():
            return
        trace = self.trace
        if trace.done_seen and self.scan.error is None:
            trace.outcome = trace.served()
        else:
            trace.outcome, trace.status = "error", 499
            trace.error = trace.error or "client disconnected; decode request closed (vLLM aborts it)"
        self.conn.close()
        self.done.set_result(None)


@dataclass
class _Stitch:
    """A switch's answer in the making. ``first``: first_token_from_p, P's token already sent to
    the client at ``t_first`` (streamed). ``chat``: a chat request whose D leg is /v1/completions
    from P's ids, written back as chat (firsttoken.ChatStream, chat_json); tokenize_once or first."""

    p: firsttoken.PAnswer
    want_ids: bool
    t_first: float | None = None
    first: bool = True
    chat: bool = False


class _StitchScan(_SseScan):
    """The scan of D's stream after P's token: D's first token is the second (a gap, the seam)."""

    __slots__ = ()

    def _token(self, now: float) -> None:
        if self.trace.decode_ttft_ms is None:
            self.trace.decode_ttft_ms = (now - self.t_sent) * 1000
        super()._token(now)


class _StitchRelay(_Relay):
    """D's stream after P's token (first_token_from_p): the client's response has begun. Relayed as
    ``_Relay`` does, byte for byte, except two rare events: D's first (its prompt_token_ids, only
    when the client asked for ids) and its usage (P's token moved from prompt to completion). Only
    a chunk that does not end an event is held until it does, so each check sees whole events."""

    __slots__ = ("hold", "ids_pending")

    def __init__(self, trace: _Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float, stitch: _Stitch) -> None:
        super().__init__(trace, up, conn, resp, t_sent)
        self.scan = _StitchScan(trace, t_sent)
        self.scan.last = stitch.t_first
        if trace.usage_check is not None:
            trace.usage_check.extra_prompt = 1  # D's prompt: the client's + P's token (fix_usage moves it)
        self.hold = b""
        self.ids_pending = stitch.want_ids

    def start(self, ctype: bytes) -> None:
        resp = self.resp
        resp.on_lost = self.client_lost
        resp.on_pause = self.conn.pause_reading
        resp.on_resume = self.conn.resume_reading
        self.conn.attach(self.on_chunk, self.on_end)
        if resp.lost:  # the client left while D's head was on its way
            self.client_lost()

    def _whole(self, data: bytes) -> bytes:
        """``data`` up to its last event end, the rest held for the next chunk (b"": nothing whole
        yet, all of it held)."""
        if self.hold or not data.endswith(b"\n\n"):
            data, self.hold = _cut_events(self.hold, data)
            if not data:
                self.last_rx = time.perf_counter()
        return data

    def on_chunk(self, data: bytes) -> None:
        data = self._whole(data)
        if not data:
            return
        if self.ids_pending and b'"prompt_token_ids"' in data:
            data, self.ids_pending = firsttoken.drop_prompt_ids(data), False
        if b'"usage' in data:
            data = firsttoken.fix_usage(data)
        super().on_chunk(data)

    def on_end(self, err: BaseException | None) -> None:
        if self.hold and err is None:
            data, self.hold = self.hold, b""
            super().on_chunk(data)
        super().on_end(err)


class _ChatRelay(_StitchRelay):
    """A chat request served from D's /v1/completions stream (a switch, ``_Stitch.chat``): every
    whole event rewritten into the chat chunk vLLM's chat endpoint would send (firsttoken.ChatStream:
    a byte rewrite of the usual token event, a JSON parse and dump of the rare ones; +2.7 us per
    chunk over the byte relay, docs/ttft-toll.md "Chat").
    With P's token first the client's response has begun (as _StitchRelay); with tokenize_once
    alone it starts here, and the role chunk goes out with D's first event."""

    __slots__ = ("chat",)

    def __init__(self, trace: _Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                 t_sent: float, stitch: _Stitch) -> None:
        super().__init__(trace, up, conn, resp, t_sent, stitch)
        self.chat = firsttoken.ChatStream(stitch.p, stitch.want_ids, stitch.first)
        if not stitch.first:
            self.scan = _SseScan(trace, t_sent)
            if trace.usage_check is not None:
                trace.usage_check.extra_prompt = 0  # D's prompt is the client's: no P token in it

    def start(self, ctype: bytes) -> None:
        if self.chat.first:
            super().start(ctype)
        else:
            _Relay.start(self, ctype)

    def on_chunk(self, data: bytes) -> None:
        data = self._whole(data)
        if data:
            _Relay.on_chunk(self, self.chat.translate(data))

    def on_end(self, err: BaseException | None) -> None:
        if self.hold and err is None:  # D ended inside an event: pass it on as it is
            data, self.hold = self.hold, b""
            _Relay.on_chunk(self, data)
        _Relay.on_end(self, err)


class Proxy:
    """The request handler. ``prefills`` and ``decodes`` are live lists (restarts keep their objects)."""

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
        if s.prefill_failure not in PREFILL_FAILURE_POLICIES:
            raise ValueError(f"prefill_failure {s.prefill_failure!r}: one of {', '.join(PREFILL_FAILURE_POLICIES)}")
        self._next_decode = 0
        self._relays: set[_Relay] = set()
        self._watchdog: asyncio.Task[None] | None = None
        for up in prefills + decodes:
            up.open(s.connect_timeout_s)

    def start(self) -> None:
        """Start the watchdog of silent D streams (in the running loop)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_silence(), name="proxy-watchdog")

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for relay in list(self._relays):
            relay.broken("the proxy is shutting down")
        for up in self.prefills + self.decodes:
            await up.aclose()

    def upstream_down(self, name: str) -> None:
        """``name`` is gone (its process died or is stopping): end its streams in flight now."""
        for relay in list(self._relays):
            if relay.up.name == name:
                relay.broken(f"{name} went down (pdtui saw its process exit)")

    async def _watch_silence(self) -> None:
        limit = self.settings.decode_read_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.perf_counter()
            for relay in list(self._relays):
                if now - relay.last_rx > limit:
                    relay.broken(f"no byte from D for {limit:g} s")

    # ----- routing ------------------------------------------------------------------------
    async def handle(self, req: Request, resp: Response) -> None:
        method, path = req.method, req.path
        try:
            if path in GENERATE_PATHS:
                if method != "POST":
                    raise ProxyError(405, f"{path} takes POST", "invalid_request_error")
                await self._generate(req, resp)
            elif path == "/v1/models" and method == "GET":
                await self._forward_get(resp, "/v1/models")
            elif path == "/health":
                self._health(resp)
            elif path == "/metrics":
                resp.send(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                raise ProxyError(404, f"no route {method} {path}; the proxy serves {', '.join(GENERATE_PATHS)},"
                                 " /v1/models, /health and /metrics", "not_found_error")
        except ProxyError as e:
            if not resp.started:
                resp.send(e.status, error_body(e.status, e.message, e.type), JSON)
        except _Relayed as r:
            if not resp.started:
                resp.send(r.status, r.content, r.ctype)

    def _health(self, resp: Response) -> None:
        info = {
            "prefill": {u.name: u.is_up() for u in self.prefills},
            "decode": {u.name: u.is_up() for u in self.decodes},
            **self.health_info(),
        }
        ok = any(u.is_up() for u in self.decodes)
        resp.send(200 if ok else 503, json.dumps(info).encode(), JSON)

    async def _forward_get(self, resp: Response, path: str) -> None:
        for up in self._candidates(self.decodes) + self._candidates(self.prefills):
            assert up.pool is not None
            try:
                conn = await up.pool.request("GET", path, [], head_timeout_s=self.settings.connect_timeout_s)
                content = await asyncio.wait_for(conn.read_all(), self.settings.connect_timeout_s)
            except _UPSTREAM_ERRORS:
                continue
            status, ctype = conn.status, conn.headers.get(b"content-type", JSON)
            up.pool.release(conn)
            resp.send(status, content, ctype)
            return
        raise ProxyError(503, "no instance is up to answer", "service_unavailable")

    # ----- the P/D dance ------------------------------------------------------------------
    @staticmethod
    def _candidates(ups: list[Upstream]) -> list[Upstream]:
        return sorted((u for u in ups if u.is_up()), key=lambda u: u.inflight)

    async def _generate(self, req: Request, resp: Response) -> None:
        rid = req.headers.get("x-request-id") or f"pdtui-{uuid.uuid4().hex[:16]}"
        try:
            body = _parse_body(req)
        except ProxyError as e:  # refused at the door, before any engine: traced all the same
            trace = _Trace(request_id=rid, endpoint=req.path, stream=False)
            trace.status, trace.error = e.status, e.message
            self._traced(trace)
            raise
        trace = _Trace(request_id=rid, endpoint=req.path, stream=bool(body.get("stream")))
        trace.warmup = WARMUP_HEADER in req.headers
        work = asyncio.ensure_future(self._serve(trace, body, resp))
        lost = asyncio.ensure_future(resp.wait_lost())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and resp.started:
                await work  # D's answer is being relayed: the relay has seen the loss and ends itself
            elif not work.done():  # the client went away before D's answer began
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                trace.outcome, trace.status = "error", 499
                trace.error = trace.error or "client disconnected before the answer; legs closed"
            else:
                work.result()
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()
            self._traced(trace)

    def _traced(self, trace: _Trace) -> None:
        event = trace.freeze()
        self.metrics.observe(event)
        self.on_trace(event)

    async def _serve(self, trace: _Trace, body: dict[str, Any], resp: Response) -> None:
        if not any(u.is_up() for u in self.decodes):  # before P prefills and pins blocks for nothing
            trace.status, trace.error = 503, "no decode instance is up"
            raise ProxyError(503, "no decode instance is up; the pair cannot serve", "service_unavailable")
        kv_params = await self._prefill(trace, body)
        d_body = dict(body)
        if kv_params is not None:
            if self.settings.decode_reports_cached:
                kv_params = self._check_usage(trace, body, d_body, kv_params)
            d_body["kv_transfer_params"] = kv_params
            trace.paired = True
        t_hop = time.perf_counter()
        stitch = self._switches(trace, body, d_body) if kv_params is not None else None
        if stitch is not None and stitch.first:
            await self._first_token(trace, d_body, resp, t_hop, stitch)
        else:
            await self._decode(trace, d_body, resp, t_hop, stitch)

    def _check_usage(self, trace: _Trace, body: dict[str, Any], d_body: dict[str, Any],
                     kv_params: dict[str, Any]) -> dict[str, Any]:
        """decode_reports_cached, paired: D's params without P's cached tokens (D then reports its
        own), D asked for usage in a stream; returns D's params (the module's docstring)."""
        kv_params = dict(kv_params)
        p_cached = kv_params.pop("remote_prefill_cached_tokens", None)
        opts = body.get("stream_options")
        drop = trace.stream and not (isinstance(opts, dict) and opts.get("include_usage"))
        if drop:  # usage for the proxy only, and no usage in every chunk
            d_body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True,
                                        "continuous_usage_stats": False}
        trace.usage_check = _UsageCheck(trace, self.settings.block_size,
                                        p_cached if isinstance(p_cached, int) else None, drop)
        return kv_params

    def _switches(self, trace: _Trace, body: dict[str, Any], d_body: dict[str, Any]) -> _Stitch | None:
        """The TTFT switches (pdtui.core.proxy.firsttoken), once P has paired: D's body rewritten for
        tokenize_once, or a _Stitch when first_token_from_p serves this request, or a chat request
        is served from D's /v1/completions (either switch)."""
        s = self.settings
        if not (s.first_token_from_p or s.tokenize_once):
            return None
        chat = trace.endpoint == firsttoken.CHAT
        p = (firsttoken.chat_p_answer if chat else firsttoken.p_answer)(trace.p_answer)
        trace.p_answer = None
        after_p = "no_token_ids" if p is None else firsttoken.chat_parser_seen(p) if chat else None
        want_ids = bool(body.get("return_token_ids"))
        kv_params = d_body["kv_transfer_params"]
        if s.first_token_from_p:
            why = firsttoken.first_token_skip(trace.endpoint, body) or after_p
            if why is None and p is not None and firsttoken.crosses_block(p, s.block_size):
                why = "block_boundary"
            if why is None and p is not None and trace.blocks != kvmath.blocks_for_tokens(len(p.prompt_ids), s.block_size):
                why = "block_size_mismatch"  # P's blocks disagree with block_size: the boundary can't be told
            if why is None and p is not None:
                if chat:
                    _rebuild(d_body, firsttoken.chat_decode_body(body, kv_params, p, first=True))
                else:
                    d_body.update(firsttoken.decode_body(body, kv_params, p))
                return _Stitch(p, want_ids=want_ids, chat=chat)
            trace.switch_skipped = why
        if s.tokenize_once:
            why = firsttoken.tokenize_once_skip(trace.endpoint, body) or after_p
            if why is None and p is not None:
                trace.switch = "tokenize_once"
                if chat:
                    _rebuild(d_body, firsttoken.chat_decode_body(body, kv_params, p, first=False))
                    return _Stitch(p, want_ids=want_ids, first=False, chat=True)
                d_body["prompt"] = p.prompt_ids
            else:
                trace.switch_skipped = trace.switch_skipped or why
        return None

    async def _first_token(self, trace: _Trace, d_body: dict[str, Any], resp: Response, t_hop: float,
                           stitch: _Stitch) -> None:
        """first_token_from_p: P's token to the client now; D continues (or P's token ended it)."""
        p = stitch.p
        head = [(b"content-type", SSE), (b"x-request-id", trace.request_id.encode()),
                (b"cache-control", b"no-cache")]
        if p.finished:  # EOS or a stop token at P: no D leg. P keeps the blocks until its KV lease ends.
            trace.switch, trace.decode = "first_token_p_only", None
            trace.ttft_ms = (time.perf_counter() - trace.t0) * 1000
            trace.chunks, trace.completion_tokens, trace.status, trace.outcome = 1, 1, 200, trace.served()
            if trace.stream:
                include_usage = bool((d_body.get("stream_options") or {}).get("include_usage"))
                resp.start(200, head)
                only = firsttoken.chat_p_only_stream if stitch.chat else firsttoken.p_only_stream
                resp.finish(only(p, stitch.want_ids, include_usage))
            else:
                answer = firsttoken.chat_p_only_json if stitch.chat else firsttoken.p_only_json
                resp.send(200, answer(p, stitch.want_ids), JSON, [(b"x-request-id", trace.request_id.encode())])
            return
        trace.switch = "first_token"
        if trace.stream:
            resp.start(200, head)
            first = firsttoken.chat_first_events if stitch.chat else firsttoken.first_event
            resp.write(first(p, stitch.want_ids))
            stitch.t_first = now = time.perf_counter()
            trace.ttft_ms, trace.chunks, trace.status = (now - trace.t0) * 1000, 1, 200
        try:
            await self._decode(trace, d_body, resp, t_hop, stitch)
        except (ProxyError, _Relayed) as e:
            if not resp.started:
                raise
            why = e.message if isinstance(e, ProxyError) else e.content[:300].decode("utf-8", "replace")
            trace.outcome, trace.status = "error", 200
            trace.error = f"decode failed after P's token was sent: {why}"
            resp.finish(b"data: " + error_body(502, trace.error, "upstream_error") + b"\n\n")

    async def _prefill(self, trace: _Trace, body: dict[str, Any]) -> dict[str, Any] | None:
        """The P leg, with the fallback policy (the module's docstring, point 4). Returns P's
        kv_transfer_params, or None to serve the request on D colocated (a fallback)."""
        p_body = dict(body)
        p_body["max_tokens"] = 1
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        p_body["stream"] = False
        for k in ("stream_options", "min_tokens"):
            p_body.pop(k, None)
        p_body["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
        if (self.settings.first_token_from_p or self.settings.tokenize_once) and (
                trace.endpoint == firsttoken.COMPLETIONS or firsttoken.chat_skip(body) is None):
            p_body["return_token_ids"] = True  # the prompt's ids and the token's (pdtui.core.proxy.firsttoken)
        payload = json.dumps(p_body).encode()
        tried: list[str] = []
        first: _PrefillFailed | None = None
        while True:
            ups = self._candidates(self.prefills)
            if not ups:
                after = f" (for the retry, after: {first.message})" if first else ""
                self._fall_back(trace, "fallback_down", f"prefill_down: no prefill instance is up{after}")
                return None
            up = next((u for u in ups if u.name not in tried), ups[0])
            tried.append(up.name)
            trace.prefill = up.name
            trace.prefill_attempts += 1
            try:
                params = await self._prefill_once(trace, up, payload)
            except _PrefillFailed as f:
                if f.kind == "unreachable":
                    self._fall_back(trace, "fallback_unreachable", f"prefill_unreachable: {f.message}")
                    return None
                if self.settings.prefill_failure == "decode-locally":
                    self._fall_back(trace, "decode_locally", f.reason)
                    return None
                if f.kind == "retryable" and first is None:
                    first = f
                    continue
                branch = {"retryable": "error_retry_failed", "no_kv": "error_no_kv"}.get(f.kind, "error_5xx")
                trace.prefill_branch = branch
                message = f.message if first is None else f"{f.message} (retried after: {first.message})"
                trace.status, trace.error = f.status, message
                raise ProxyError(f.status, message, "upstream_error") from None
            if first is not None:
                trace.prefill_branch = "retry_ok"
            return params

    def _fall_back(self, trace: _Trace, branch: str, reason: str) -> None:
        trace.prefill_branch, trace.fallback_reason = branch, reason

    async def _prefill_once(self, trace: _Trace, up: Upstream, payload: bytes) -> dict[str, Any]:
        """One P request. Returns P's kv_transfer_params; raises _PrefillFailed, or _Relayed for a 4xx."""
        assert up.pool is not None
        t = time.perf_counter()
        up.inflight += 1
        conn = None
        try:
            async with asyncio.timeout(self.settings.prefill_timeout_s):
                conn = await up.pool.request("POST", trace.endpoint, _json_headers(trace.request_id), payload)
                content = await conn.read_all()
        except ConnectFailed as e:
            raise _PrefillFailed("unreachable", 502, f"{up.name}: {e}", f"prefill_unreachable: {e}") from None
        except TimeoutError as e:
            if conn is not None:
                conn.close()
            why = f"prefill {up.name} did not answer within {self.settings.prefill_timeout_s:g} s"
            raise _PrefillFailed("retryable", 504, why, f"prefill_unreachable: {why}") from e
        except _UPSTREAM_ERRORS as e:
            if conn is not None:
                conn.close()
            why = f"prefill {up.name} broke off: {type(e).__name__}: {e}"
            raise _PrefillFailed("retryable", 502, why, f"prefill_unreachable: {type(e).__name__}: {e}") from None
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        finally:
            up.inflight -= 1
        status, p_ctype = conn.status, conn.headers.get(b"content-type", JSON)
        up.pool.release(conn)
        trace.prefill_ms = (time.perf_counter() - t) * 1000
        if status >= 500:
            text = content[:200].decode("utf-8", "replace")
            why = f"prefill {up.name} answered {status}: {text}"
            kind = "retryable" if status in RETRY_STATUSES else "fatal"
            raise _PrefillFailed(kind, status, why, f"prefill_5xx: {up.name} answered {status}: {text}")
        if status >= 400:
            # Bad input: D would refuse it the same way. Pass P's answer through.
            trace.status = status
            trace.error = content[:500].decode("utf-8", "replace")
            raise _Relayed(status, content, p_ctype)
        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _PrefillFailed("no_kv", 502, f"prefill {up.name} answered 200 with a body that is not JSON",
                                 "prefill_5xx: prefill answered 200 with a body that is not JSON") from None
        params = data.get("kv_transfer_params") if isinstance(data, dict) else None
        trace.p_answer = data
        usage = (data.get("usage") if isinstance(data, dict) else None) or {}
        trace.prompt_tokens = usage.get("prompt_tokens")
        if not params or not isinstance(params, dict):
            why = (f"prefill {up.name} returned no kv_transfer_params (is it running with a kv_producer"
                   " kv_transfer_config?)")
            raise _PrefillFailed("no_kv", 502, why, f"no_kv_transfer_params: {why}")
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

    async def _decode(self, trace: _Trace, body: dict[str, Any], resp: Response, t_hop: float,
                      stitch: _Stitch | None = None) -> None:
        up = self.pick_decode()
        if up is None:
            trace.status, trace.error = 503, "no decode instance is up"
            raise ProxyError(503, "no decode instance is up; the pair cannot serve", "service_unavailable")
        trace.decode = up.name
        assert up.pool is not None
        path = firsttoken.COMPLETIONS if stitch is not None and stitch.chat else trace.endpoint
        payload = json.dumps(body).encode()
        t_sent = time.perf_counter()
        trace.hop_ms = (t_sent - t_hop) * 1000
        up.inflight += 1
        conn = None
        try:
            try:
                conn = await up.pool.request("POST", path, _json_headers(trace.request_id), payload,
                                             head_timeout_s=self.settings.decode_read_timeout_s)
            except _UPSTREAM_ERRORS as e:
                trace.status, trace.error = 502, f"decode {up.name} unreachable: {type(e).__name__}: {e}"
                raise ProxyError(502, trace.error, "upstream_error") from None
            await self._relay_decode(trace, up, conn, resp, t_sent, stitch)
        finally:
            up.inflight -= 1
            if conn is not None:
                if conn.complete and not resp.lost:
                    up.pool.release(conn)
                else:
                    up.pool.busy.discard(conn)
                    conn.close()

    async def _read_decode(self, trace: _Trace, up: Upstream, conn: httpio.ClientConnection) -> bytes:
        try:
            return await asyncio.wait_for(conn.read_all(), self.settings.decode_read_timeout_s)
        except _UPSTREAM_ERRORS as e:
            trace.status, trace.error = 502, f"decode {up.name} failed before answering: {type(e).__name__}: {e}"
            raise ProxyError(502, trace.error, "upstream_error") from None

    async def _relay_decode(self, trace: _Trace, up: Upstream, conn: httpio.ClientConnection, resp: Response,
                            t_sent: float, stitch: _Stitch | None = None) -> None:
        ctype = conn.headers.get(b"content-type", JSON)
        if conn.status != 200:
            content = await self._read_decode(trace, up, conn)
            trace.status, trace.error = conn.status, content[:500].decode("utf-8", "replace")
            if b"json" not in ctype:
                content = error_body(conn.status, f"decode {up.name}: {trace.error}", "upstream_error")
                ctype = JSON
            raise _Relayed(conn.status, content, ctype)
        if not trace.stream:
            content = await self._read_decode(trace, up, conn)
            now = time.perf_counter()
            trace.decode_ttft_ms = (now - t_sent) * 1000
            trace.ttft_ms = (now - trace.t0) * 1000
            if trace.usage_check is not None:  # D's own usage, before P's token is merged in
                content = trace.usage_check.client_json(content)
            if stitch is not None:  # P's token in front of D's answer (first_token_from_p), or chat from D's
                try:
                    content = firsttoken.chat_json(stitch.p, content, stitch.want_ids, stitch.first) if stitch.chat \
                        else firsttoken.merge_json(stitch.p, content, stitch.want_ids)
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    trace.status, trace.error = 502, f"decode {up.name} answered 200 with a body that is not a completion"
                    raise ProxyError(502, trace.error, "upstream_error") from None
            with contextlib.suppress(json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                usage = json.loads(content).get("usage") or {}
                trace.completion_tokens = usage.get("completion_tokens")
                trace.prompt_tokens = trace.prompt_tokens or usage.get("prompt_tokens")
            trace.status, trace.outcome = 200, trace.served()
            resp.send(200, content, ctype, [(b"x-request-id", trace.request_id.encode())])
            return
        relay = _Relay(trace, up, conn, resp, t_sent) if stitch is None else \
            _ChatRelay(trace, up, conn, resp, t_sent, stitch) if stitch.chat else \
            _StitchRelay(trace, up, conn, resp, t_sent, stitch)
        self._relays.add(relay)
        try:
            relay.start(ctype)
            await relay.done
        finally:
            self._relays.discard(relay)


def _json_headers(request_id: str) -> httpio.Headers:
    return [(b"content-type", JSON), (b"x-request-id", request_id.encode())]


def _parse_body(req: Request) -> dict[str, Any]:
    """The request's JSON object, or a ProxyError with the 4xx that vLLM would answer."""
    if req.body_too_large:
        raise ProxyError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    media_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":  # as vLLM's validate_json_request
        raise ProxyError(415, f"Unsupported Media Type: Only 'application/json' is allowed"
                         f" (got {media_type or 'no content-type'})", "invalid_request_error")
    try:
        body = json.loads(req.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProxyError(400, f"request body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "request body must be a JSON object", "invalid_request_error")
    _check_limits(body)
    return body


def _check_limits(body: dict[str, Any]) -> None:
    """Refuse what the P leg would hide: P always runs with max_tokens=1, so a bad max_tokens would
    only surface at D, after P had prefilled and pinned the KV blocks for nothing."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProxyError(400, f"{key} must be an integer of at least 1, got {value!r}", "invalid_request_error")


class _PrefillFailed(Exception):
    """One P request failed. ``kind``: unreachable (never sent: a fallback is allowed), retryable
    (502/503/504, broke off, timed out), fatal (another 5xx), no_kv (200 without kv_transfer_params).
    ``status`` is what the client gets if it ends the request; ``reason`` is the fallback reason
    under prefill_failure="decode-locally" (the words pdtui used before)."""

    def __init__(self, kind: str, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.kind, self.status, self.message, self.reason = kind, status, message, reason


class _Relayed(Exception):
    """An upstream's non-200 answer, passed through as it is."""

    def __init__(self, status: int, content: bytes, ctype: bytes) -> None:
        self.status, self.content, self.ctype = status, content, ctype


class ProxyServer:
    """The proxy served in the caller's event loop (tests; ``pdtui proxy``'s own process).

    ``pdtui up`` and the bench never run it in their own loop: they run ``pdtui proxy`` as a
    process (``pdtui.core.proxy.process.ProxyProcess``), so the dashboard's drawing, its garbage
    collections and the bench's client never hold a stream back."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.proxy = proxy
        self.host, self.port = host, port
        self._server: httpio.Server | None = None

    async def start(self) -> None:
        from pdtui.core.supervisor import check_port_free

        check_port_free(self.host, self.port, "proxy")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        sock.setblocking(False)
        self.proxy.start()
        self._server = await httpio.serve(self.proxy.handle, sock, max_body=MAX_BODY_BYTES, on_error=_log_error)

    async def stop(self) -> None:
        await self.proxy.aclose()
        if self._server is not None:
            await self._server.close()
            self._server = None


def _log_error(e: BaseException) -> None:
    import sys
    import traceback

    print("pdtui proxy: internal error:", "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
