"""The proxy's own /metrics (Prometheus)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pdtui.core.events import RequestTraced
from pdtui.core.proxy.migrate import RESULTS as MIGRATION_RESULTS
from pdtui.core.proxy.trace import PREFILL_BRANCHES

RELEASE_RESULTS = ("released", "failed", "no_decode")
"""RequestTraced.kv_release's results (pdtui.core.proxy.contract.Proxy._release)."""


class BulkHistogram:
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

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=["outcome"])
        for label, (counts, total) in self.series.items():
            cum, buckets = 0, []
            for bound, n in zip([*map(str, self.bounds_s), "+Inf"], counts):
                cum += n
                buckets.append((bound, cum))
            fam.add_metric([label], buckets, total)
        yield fam


class EventCounts:
    """``pdtui_events_written_total`` and ``pdtui_events_dropped_total{reason}``, read from the
    writer's counters at each scrape (nothing per event): the events `pdtui proxy` wrote to its
    stdout, and those it dropped because stdout was not read (``full``: the reader fell more than
    the buffer behind) or was closed or gone (``gone``: ``>&-``, EPIPE, a terminal that hung up)."""

    def __init__(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        written, full, gone = self.counts()
        yield CounterMetricFamily("pdtui_events_written", "Events written to the proxy's stdout (JSON lines)",
                                  value=written)
        dropped = CounterMetricFamily("pdtui_events_dropped", "Events not written to the proxy's stdout: full"
                                      " (not read, past the buffer) or gone (closed, EPIPE, EIO)", labels=["reason"])
        dropped.add_metric(["full"], full)
        dropped.add_metric(["gone"], gone)
        yield dropped


class Inflight:
    """``pdtui_inflight{instance,role}``: the requests the proxy has in flight to each upstream now
    (its leg sent, its answer not yet over), read at each scrape; the load the routing counts. A
    drill reads it to find the D that runs a stream without waiting on a busy engine's /metrics."""

    def __init__(self, upstreams: Callable[[], list[tuple[str, str, int]]]) -> None:
        self.upstreams = upstreams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("pdtui_inflight", "Requests in flight from the proxy to each instance",
                                labels=["instance", "role"])
        for name, role, n in self.upstreams():
            fam.add_metric([name, role], n)
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
        self.migrations = Counter("pdtui_migrations", "Deaths of D under a stream with migration on, by how they"
                                  " ended: ok (the stream went on on another D), failed, no_decode, limit,"
                                  " ineligible (pdtui.core.proxy.migrate.RESULTS)", ["result"], registry=self.registry)
        for result in MIGRATION_RESULTS:
            self.migrations.labels(result)
        self.kv_release = Counter("pdtui_kv_release", "P's blocks held for a D leg that was never sent (client gone"
                                  " before D, no D up, D unreachable, P's token ended it), by what the proxy did:"
                                  " released (a D refused a release request: vLLM freed them), failed, no_decode"
                                  " (P holds them until its KV lease ends)", ["result"], registry=self.registry)
        for result in RELEASE_RESULTS:
            self.kv_release.labels(result)
        self.kv_bytes = Counter("pdtui_kv_bytes", "KV bytes offered by P (blocks x block_size x bytes/token)", registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("pdtui_ttft_seconds", "Client-facing TTFT", ["outcome"], buckets=buckets, registry=self.registry)
        self.itl = BulkHistogram("pdtui_itl_seconds", "Inter-token gaps", buckets)
        self.registry.register(self.itl)

    def count_inflight(self, upstreams: Callable[[], list[tuple[str, str, int]]]) -> None:
        """Export each upstream's requests in flight (Inflight): the proxy calls it once."""
        self.registry.register(Inflight(upstreams))

    def count_events(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        """Export the event writer's counts (EventCounts): ``pdtui proxy`` calls it once."""
        self.registry.register(EventCounts(counts))

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
        for m in t.migrations:
            self.migrations.labels(m.get("result") or "failed").inc()
        if t.kv_release is not None:
            self.kv_release.labels(t.kv_release.get("result") or "failed").inc()
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

