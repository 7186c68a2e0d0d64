"""Typed events: everything the Runtime knows, as it happens.

Every subscriber (the dashboard, ``--headless`` JSON lines, the recorder behind ``replay``, the
benchmark) sees the same stream. Each event is a frozen dataclass; ``to_json()`` and
``from_json()`` round-trip it, so a recording replays into exactly what was seen live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, ClassVar

OUTCOMES = ("pair", "fallback", "error")
"""The only values of RequestTraced.outcome."""
ONLY_D = "only D"
"""RequestTraced.decode_reason when the proxy has one decode instance: no choice was made."""


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    t: float = field(default_factory=time.time, kw_only=True)
    """Wall-clock time (Unix seconds) when it happened."""

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict (fields hold only JSON values): ``dataclasses.asdict`` deep-copied every
        trace's list of gaps, 6% of the proxy's CPU per relayed chunk."""
        return {"event": self.kind, **self.__dict__}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


@dataclass(frozen=True)
class RuntimeStarted(Event):
    """The Runtime's configuration, first in every stream and recording."""

    kind: ClassVar[str] = "runtime_started"
    profile: str
    model: str
    model_shape: str | None
    connector: str
    device: str
    proxy_url: str
    vllm_version: str | None
    kv_bytes_per_token: int | None
    block_size: int
    kv_load_failure_policy: str
    instances: list[dict[str, Any]]
    run_dir: str | None = None
    """Where this run's engine and proxy logs are written."""
    kv_geometry: dict[str, Any] | None = None
    """The KV geometry behind kv_bytes_per_token (kvmath.KvGeometry's fields), so that a replay
    shows the same freight formula as the live run; None in recordings made before it."""
    observe: bool = False
    """Observe only (``pdtui attach --observe``): no pdtui proxy in the path, so no per-request
    figures; metrics (and witness requests) only."""
    router: str | None = None
    """Observe only: the user's router (``--witness URL``), where witness requests go."""
    link: dict[str, Any] | None = None
    """The emulated link between P and D (pdtui.core.link): its spec (text, rate_bps, rtt_s, loss),
    ``describe`` (its words), its namespaces and devices; None: loopback."""


@dataclass(frozen=True)
class InstanceStateChanged(Event):
    """An instance moved: starting -> ready -> (stopping) -> exited; or failed to start."""

    kind: ClassVar[str] = "instance_state"
    instance: str
    role: str
    state: str  # starting | ready | stopping | exited | failed
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""
    elapsed_s: float | None = None
    """Seconds since this instance was started (ready time, time to exit)."""


@dataclass(frozen=True)
class LogLine(Event):
    kind: ClassVar[str] = "log"
    instance: str
    line: str


@dataclass(frozen=True)
class ConnectorEvent(Event):
    """A connector milestone parsed from an engine's log, with the engine's own words."""

    kind: ClassVar[str] = "connector"
    instance: str
    what: str
    """nixl_available | connector_created | registered | handshake | compat_ok | compat_failed |
    transfer_plan | transfer_failure | kv_metrics | ucx_transport"""
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestTraced(Event):
    """One request through the proxy, from arrival to the last byte."""

    kind: ClassVar[str] = "request"
    request_id: str
    endpoint: str
    stream: bool
    outcome: str
    """pair (P's KV went to D and D answered) | fallback (D colocated computed the prompt: no P was
    up or reachable) | error (anything else, refusals at the proxy's door included): OUTCOMES."""
    status: int
    prefill: str | None = None
    decode: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    """From D's usage, when it reports one (non-streamed, or stream_options.include_usage)."""
    chunks: int = 0
    """Token-carrying SSE chunks D streamed. vLLM merges tokens into one chunk when the API server
    lags, so chunks <= tokens; ITL is measured per chunk, as `vllm bench serve` does."""
    prefill_ms: float | None = None
    """P leg: from sending to P to its response (queue + prefill + 1 token)."""
    hop_ms: float | None = None
    """Proxy: from P's response to sending D's request."""
    decode_ttft_ms: float | None = None
    """D leg: from sending to D to the first token (includes the KV pull)."""
    ttft_ms: float | None = None
    """Client-facing: from the proxy receiving the request to the first token sent on."""
    itl_ms: list[float] = field(default_factory=list)
    """Every gap between token-carrying chunks D streamed."""
    total_ms: float | None = None
    blocks: int | None = None
    """Blocks P offered (remote_block_ids)."""
    kv_bytes: int | None = None
    """blocks x block_size x per-token KV bytes."""
    fallback_reason: str | None = None
    error: str | None = None
    failed: str | None = None
    """The instance whose failure ended the request in error: the P that failed its leg (the last
    one tried), or the D that broke, refused with a 5xx or reported an error. None when nothing
    failed, or the error was no instance's: the client's (a 4xx, a hang-up), the proxy's own (a
    refusal at its door, no D up, shutting down). Each pane counts these as its errors."""
    warmup: bool = False
    prefill_attempts: int = 0
    """P requests sent for it: 0 (no P was up), 1, or 2 (one retry after 502/503/504 or a break)."""
    prefill_branch: str | None = None
    """How the P leg ended when it did not simply pair: a key of pdtui.core.proxy.PREFILL_BRANCHES
    (fallback_down, fallback_unreachable, next_p, retry_ok, error_retry_failed, error_5xx,
    error_no_kv, decode_locally); None when the first P request paired."""
    switch: str | None = None
    """The TTFT switch that served it (pdtui.core.proxy.firsttoken): first_token (P's token sent at once, D
    continued), first_token_p_only (P's token ended it: no D leg), tokenize_once; None: neither."""
    switch_skipped: str | None = None
    """A switch was on but this request took the normal path, and why (firsttoken.first_token_skip's
    and chat_skip's reasons, block_boundary, no_token_ids, chat_parser)."""
    d_computed_tokens: int | None = None
    """Prompt tokens D computed itself (N of prompt_tokens' M), on a paired request whose D reports
    cached tokens (ProxySettings.decode_reports_cached): D's own usage, prompt_tokens -
    prompt_tokens_details.cached_tokens. 0 when the whole prompt came from P's KV. None: not known
    (not paired, D does not report it, or D's answer ended before its usage)."""
    recomputed: bool = False
    """The silent-recompute error class: paired, yet D computed more than one block of the prompt
    (d_computed_tokens > block_size). The outcome stays pair (the client got its answer)."""
    decode_reason: str | None = None
    """Why this D took it, in a few words (pdtui.core.proxy.routing: the policy and what it
    compared, e.g. "headroom: D2 412-24=388 >= 6 needed; D 18-16=2 < 6"; "only D" with one D).
    None: no D was chosen (refused at the door, or no D leg)."""
    migrations: list[dict[str, Any]] = field(default_factory=list)
    """D died under the stream (pdtui.core.proxy.migrate, docs/proxy.md "Migration"): one entry per
    death the proxy saw with migration on and two D or more, in order. Keys: ``from`` (the D that
    died), ``why`` (how), ``tokens`` (tokens it had sent), ``result`` (ok: the stream went on on
    ``to``; failed: the attempt did not get the new D's first token; no_decode: no other D was up;
    limit: ``migrate_max`` reached; ineligible: this request cannot be continued token for token,
    ``error`` says why), ``to``, ``path`` (prefill: P prefilled prompt + tokens and the new D pulled
    it; decode: the new D computed it), ``prefill``, ``prefill_ms``, ``blocks`` and ``kv_bytes`` (the
    second transfer), ``decode_ttft_ms`` (the new D's first token from its request), ``seam_ms``
    (from the old D's last token to the new D's first, as the client saw it), ``d_computed_tokens``
    (the new D's own usage: prompt tokens it computed), ``error``. The outcome stays pair when the
    stream ended clean on the new D."""

    drill: str | None = None
    """The faults a drill injected into this request (``X-Pdtui-Drill``, honoured with
    ProxySettings.drill only: pdtui.core.proxy.drillhooks), e.g. "tamper=reuse"; None otherwise."""
    kv_release: dict[str, Any] | None = None
    """P held this request's KV blocks for a D leg that was never sent (the client left between P's
    answer and D's dispatch, no D was up, D could not be reached, or P's token ended the request):
    what the proxy did so that P need not hold them until its KV lease ends (vLLM 0.32: 30 s,
    ``kv_lease_duration``). Keys: ``result`` (released: a D refused the release request and vLLM's
    rejection path freed P's blocks; failed: the release got no answer in time, or an answer
    other than the refusal; no_decode: no D was up to send it through), ``via`` (the D), ``status``
    (D's answer), ``ms``, ``why``. pdtui.core.proxy.contract.RELEASE_MODEL; docs/drills.md."""

    @property
    def migrated(self) -> bool:
        """The stream went on on another D after its D died (a migration whose result is ok)."""
        return any(m.get("result") == "ok" for m in self.migrations)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"RequestTraced.outcome {self.outcome!r}: one of {', '.join(OUTCOMES)}")


@dataclass(frozen=True)
class MetricsSampled(Event):
    """Selected series from one instance's Prometheus /metrics."""

    kind: ClassVar[str] = "metrics"
    instance: str
    values: dict[str, float]


@dataclass(frozen=True)
class HeadroomReported(Event):
    """One D's headroom as the proxy counts it (pdtui.core.proxy.routing), sent by the proxy each
    time the Runtime tells it a new scrape of that D, and each time a request is sent to that D or
    ends: free blocks at the scrape, the blocks promised to requests in flight that the scrape does
    not show, the pool's size."""

    kind: ClassVar[str] = "headroom"
    instance: str
    total_blocks: int
    free_blocks: int
    promised_blocks: int
    requests: int
    """Requests in flight to it through the proxy."""
    scrape_t: float
    """When the scrape it is measured against was asked for (Unix seconds)."""

    @property
    def headroom(self) -> int:
        """Free blocks less those promised: what a new request can count on."""
        return self.free_blocks - self.promised_blocks


@dataclass(frozen=True)
class Notice(Event):
    """Something a person should read: a warning, an error, a drill's consequence."""

    kind: ClassVar[str] = "notice"
    level: str  # info | warning | error
    text: str
    instance: str | None = None


@dataclass(frozen=True)
class ProxyStarted(Event):
    kind: ClassVar[str] = "proxy_started"
    url: str


@dataclass(frozen=True)
class PairReady(Event):
    """Every instance answers /health and the warm-up request went through."""

    kind: ClassVar[str] = "pair_ready"
    elapsed_s: float
    warmup_outcome: str | None = None


@dataclass(frozen=True)
class PairBroken(Event):
    """Every instance answered /health, but the warm-up says the pair does not work: an engine
    died during it (the start then fails), or the request ended other than as a P/D transfer
    (the pair stays up, and says so)."""

    kind: ClassVar[str] = "pair_broken"
    elapsed_s: float
    reason: str
    instance: str | None = None
    """The instance that died, if one did."""
    warmup_outcome: str | None = None


@dataclass(frozen=True)
class EngineSpan(Event):
    """One request as a vLLM engine traced it ("llm_request", exported over OTLP with
    --otlp-traces-endpoint; pdtui.core.otlp says what each field measures). Milliseconds."""

    kind: ClassVar[str] = "engine_span"
    instance: str
    request_id: str
    """The proxy's X-Request-Id (vLLM's id without its cmpl-/chatcmpl- prefix and prompt index)."""
    engine_request_id: str
    arrival_s: float
    """Unix seconds: the request reached the engine client (after HTTP, JSON and tokenization)."""
    end_s: float
    ttft_ms: float | None = None
    queue_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class WitnessSampled(Event):
    """One small streamed request pdtui sent through someone else's router (``pdtui attach
    --observe --witness URL``): TTFT and ITL as a client of that router sees them. Not a trace: the
    router's path (which P, which D, paired or not) is not known here."""

    kind: ClassVar[str] = "witness"
    url: str
    request_id: str
    status: int | None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    error: str | None = None


@dataclass(frozen=True)
class LinkShaped(Event):
    """The emulated link between P and D was given another rate, delay or loss in place
    (``Runtime.reshape_link``: the bench's --links): what the header and each request's formula use
    from now on. ``link`` as RuntimeStarted's."""

    kind: ClassVar[str] = "link_shaped"
    link: dict[str, Any]


@dataclass(frozen=True)
class AnswerChecked(Event):
    """The correctness witness's verdict on one request through the pair (pdtui.core.known_answer):
    a greedy request whose answer is known, compared token for token. ``ok`` False is an error
    whatever the status: the dashboard's row of that request turns red."""

    kind: ClassVar[str] = "answer_checked"
    request_id: str
    ok: bool
    status: int | None
    detail: str
    expected: list[int] = field(default_factory=list)
    got: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimeStopped(Event):
    kind: ClassVar[str] = "runtime_stopped"
    reason: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RuntimeStarted,
        InstanceStateChanged,
        LogLine,
        ConnectorEvent,
        RequestTraced,
        MetricsSampled,
        HeadroomReported,
        Notice,
        ProxyStarted,
        PairReady,
        PairBroken,
        RuntimeStopped,
        EngineSpan,
        WitnessSampled,
        LinkShaped,
        AnswerChecked,
    )
}


def from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    kind = data.pop("event", None)
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event kind {kind!r}")
    return EVENT_TYPES[kind](**data)


def from_json(line: str) -> Event:
    return from_dict(json.loads(line))


class EventHub:
    """Fan-out of events to subscribers, each with its own queue (the Runtime, the replay)."""

    _END = object()

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[Any]] = []

    def publish(self, event: Event) -> None:
        for q in self._queues:
            q.put_nowait(event)

    def close(self) -> None:
        """End every subscriber's iteration."""
        for q in self._queues:
            q.put_nowait(self._END)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        """An async iterator over every event from now on; it ends at close(). Its ``aclose()``
        unsubscribes early."""
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._queues.append(q)

        async def gen() -> AsyncGenerator[Event, None]:
            try:
                while True:
                    item = await q.get()
                    if item is self._END:
                        return
                    yield item
            finally:
                with contextlib.suppress(ValueError):
                    self._queues.remove(q)

        return gen()
