"""D's pane and the bench report from D's measured KV reads (tests/unit/test_kv_reads.py has the
parser): their p50/p99 are numpy's percentiles of the per-request values, the two agree, and no
figure comes from inside a histogram bucket any more, on screen or in a report."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy
import pytest

import pdtui
from pdtui.app import state as state_mod
from pdtui.app.state import WINDOW_S, DashState, bucket_of, bucket_text, buckets
from pdtui.app.widgets.instance_pane import InstancePane
from pdtui.bench import report
from pdtui.bench.runners import _join_reads, add_read
from pdtui.core.connectors import NIXL
from pdtui.core.events import ConnectorEvent, InstanceStateChanged, MetricsSampled
from pdtui.core.logparse import KvRead, LogParser
from pdtui.core.scrape import parse_metrics
from tests.unit.test_bench_report import _s
from tests.unit.test_kv_reads import FIX, metrics, reads_in_fixture

XFER = NIXL.xfer_time_metric


def fold(t0: float = 1000.0) -> tuple[DashState, list[KvRead]]:
    """The fixture's reads into the dashboard's state, one second apart, D's /metrics after."""
    s = DashState()
    s.apply(InstanceStateChanged(instance="D", role="decode", state="ready", t=t0))
    reads = reads_in_fixture()
    parser = LogParser()
    t = t0
    for line in (FIX / "decode-kv-reads.log").read_text().splitlines():
        p = parser.feed(line)
        if p is not None:
            t += 1.0 if p.what == "kv_read" else 0.0
            s.apply(ConnectorEvent(instance="D", what=p.what, text=p.text, fields=p.fields, t=t))
    s.apply(MetricsSampled(instance="D", t=t, values=metrics()))
    return s, reads


def test_ds_pane_figures_are_numpys_percentiles_of_the_measured_reads() -> None:
    s, reads = fold()
    ms = [r.ms for r in reads]
    n = s.snapshot().instance("D").nixl  # type: ignore[union-attr]
    assert n is not None and n.reads == n.kept == 17
    assert n.p50_ms == pytest.approx(float(numpy.percentile(ms, 50)), rel=1e-12)
    assert n.p99_ms == pytest.approx(float(numpy.percentile(ms, 99)), rel=1e-12)
    assert n.mean_ms == pytest.approx(float(numpy.mean(ms)), rel=1e-12)
    # vLLM's exact mean (_sum/_count) is the measured one: a check, not another source
    assert n.hist_mean_ms == pytest.approx(n.mean_ms, rel=1e-9)
    # the last WINDOW_S s: the reads logged in it (one a second here)
    recent = ms[-int(WINDOW_S) - 1:]
    assert n.recent_reads == len(recent)
    assert n.recent_p99_ms == pytest.approx(float(numpy.percentile(recent, 99)), rel=1e-12)
    # each read joined to its request's row
    snap = s.snapshot()
    assert snap.kv_reads["xfer-3-n1600"].ms == 1.422 and snap.kv_reads["xfer-3-n1600"].bytes == 524288
    # a read is no connector milestone (one a request)
    assert "kv_read" not in dict(snap.instance("D").milestones)  # type: ignore[union-attr]


def test_a_restarted_d_counts_its_reads_from_zero() -> None:
    s, _ = fold()
    s.apply(InstanceStateChanged(instance="D", role="decode", state="exited", t=5000.0, exit_code=-9))
    s.apply(InstanceStateChanged(instance="D", role="decode", state="starting", t=5001.0))
    assert s.snapshot().instance("D").nixl is None  # type: ignore[union-attr]


def test_the_pane_shows_the_measured_figures() -> None:
    s, _ = fold()
    v = s.snapshot().instance("D")
    assert v is not None and v.nixl is not None
    n = v.nixl
    wide = InstancePane.nixl_text(v, wide=True)
    assert wide is not None
    assert (f"xfer p50/p99 {state_mod.fmt_ms(n.p50_ms)}/{state_mod.fmt_ms(n.p99_ms)}ms" in wide.plain
            and "(measured, 17 transfers) mean 9.76ms" in wide.plain), wide.plain
    narrow = InstancePane.nixl_text(v, wide=True, width=len(wide.plain) - 1)  # no room for the mean
    assert narrow is not None and narrow.plain.endswith("(measured, 17 transfers)")


def test_without_measured_reads_the_buckets_give_bounds_never_values() -> None:
    """An engine that logs no reads: vLLM's histogram alone. Its p50 and p99 are shown as the
    buckets they fall in, the mean as _sum/_count: no interpolated value on screen."""
    values = parse_metrics((FIX / "decode.metrics").read_text())  # 2 transfers: one <=5 ms, one 10-25 ms
    s = DashState()
    s.apply(InstanceStateChanged(instance="D", role="decode", state="ready", t=0.0))
    s.apply(MetricsSampled(instance="D", t=1.0, values=values))
    v = s.snapshot().instance("D")
    assert v is not None and v.nixl is not None
    n = v.nixl
    assert n.reads == 0 and n.p50_ms is None and n.p99_ms is None and n.transfers == 2
    assert (n.hist_p50, n.hist_p99) == ((0.0, 0.005), (0.01, 0.025))
    assert n.hist_mean_ms == pytest.approx(values[f"{XFER}_sum"] / 2 * 1000)
    text = InstancePane.nixl_text(v, wide=True)
    assert text is not None
    assert "xfer p50 <=5ms p99 10-25ms mean 5.26ms (vLLM's histogram, not measured per request: 2 transfers)" \
        in text.plain, text.plain
    # Prometheus's histogram_quantile would say 5.0 and 24.7 (linear inside the bucket): not shown
    assert "24.7" not in text.plain and "5.0/" not in text.plain


def test_bucket_bounds() -> None:
    b = [(0.005, 1.0), (0.01, 1.0), (0.025, 2.0), (float("inf"), 2.0)]
    assert bucket_of(b, 0.5) == (0.0, 0.005) and bucket_of(b, 0.99) == (0.01, 0.025)
    assert bucket_of([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert bucket_of([(0.1, 0.0), (float("inf"), 3.0)], 0.5) == (0.1, float("inf"))
    assert [bucket_text(x) for x in ((0.0, 0.005), (0.005, 0.01), (2.5, float("inf")), None)] == \
        ["<=5ms", "5-10ms", ">2500ms", "-"]
    assert buckets({f'{XFER}_bucket{{le="0.01"}}': 1.0, f'{XFER}_bucket{{le="+Inf"}}': 2.0}, XFER) == \
        [(0.01, 1.0), (float("inf"), 2.0)]


def test_nothing_interpolates_inside_a_histogram_bucket() -> None:
    """The dashboard had quantile(): Prometheus's histogram_quantile, linear inside a bucket, shown
    as "xfer p50/p99". Nothing in pdtui may compute a value from bucket counts again: no function
    of that name or of histogram_quantile's, and the only function that reads bucket bounds
    (state.bucket_of) returns the bounds."""
    pkg = Path(pdtui.__file__).resolve().parent
    found = []
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            # the transparency bench's quantile() takes sorted samples, not buckets
            if (isinstance(node, ast.FunctionDef) and node.name in ("quantile", "histogram_quantile")
                    and path.relative_to(pkg).as_posix() != "bench/transparency.py"):
                found.append(f"{path.relative_to(pkg)}:{node.lineno} {node.name}")
    assert not found, found
    assert not hasattr(state_mod, "quantile") and not hasattr(state_mod, "bucket_diff")


def test_the_warm_ups_read_is_left_out_like_the_warm_up() -> None:
    """The Runtime's warm-up request is in no figure of the dashboard; its read (D's first, often
    the slowest: 91 ms in the fixture) is in none either, whether it comes before the trace that
    says it was the warm-up (as it does: D logs the read before its first token) or after."""
    from pdtui.core.events import RequestTraced

    def warmup(rid: str, t: float) -> RequestTraced:
        return RequestTraced(request_id=rid, endpoint="/v1/completions", stream=False, outcome="pair", status=200,
                             prefill="P", decode="D", warmup=True, t=t)

    s, reads = fold()
    first = reads[0]
    assert first.request_id == "pdtui-0193c4a980604042" and first.ms == 91.362  # the run's warm-up
    s.apply(warmup(first.request_id, 2000.0))
    n = s.snapshot().instance("D").nixl  # type: ignore[union-attr]
    rest = [r.ms for r in reads[1:]]
    assert n is not None and n.reads == n.kept == 16
    assert n.p99_ms == pytest.approx(float(numpy.percentile(rest, 99)), rel=1e-12)
    assert first.request_id not in s.snapshot().kv_reads
    # a read that comes after its warm-up's trace is left out as well
    late = ConnectorEvent(instance="D", what="kv_read", text="", t=2001.0,
                          fields={"req": "cmpl-w2-0-0a1b2c3d", "request_id": "w2", "rank": 0, "handles": 1,
                                  "bytes": 1, "descs": 1, "xfer_ms": 50.0, "post_ms": 1.0})
    s.apply(warmup("w2", 2000.5))
    s.apply(late)
    assert s.snapshot().instance("D").nixl.reads == 16  # type: ignore[union-attr]


def test_the_bench_report_takes_the_same_per_request_values() -> None:
    reads = reads_in_fixture()
    samples = [_s("pair", "follow", i, ttft=100.0, chunk_t=[1.0, 1.01], trace={"outcome": "pair"})
               for i in range(len(reads))]
    samples.append(_s("pair", "follow", "w", ttft=100.0, chunk_t=[0.0], warmup=True, trace={"outcome": "pair"}))
    by_id = {s.request_id: r for s, r in zip(samples, reads, strict=False)}
    _join_reads(samples, {rid: KvRead(rid, r.engine_request_id, r.ms, r.bytes, r.descs, r.handles, r.post_ms)
                          for rid, r in by_id.items()})
    summary = report.summarize_arm(samples, {"follow": [0.0, 3.0]})
    k = summary["kv_read"]
    ms = [r.ms for r in reads]
    assert k["n"] == 17
    assert k["ms"]["mean"] == pytest.approx(float(numpy.mean(ms)), rel=1e-12)
    assert k["ms"]["p50"] == pytest.approx(float(numpy.percentile(ms, 50)), rel=1e-12)
    assert k["ms"]["p99"] == pytest.approx(float(numpy.percentile(ms, 99)), rel=1e-12)
    assert k["gbps"]["p50"] == pytest.approx(float(numpy.percentile([r.gbps for r in reads], 50)), rel=1e-12)
    # the pane's figures over the same reads are the report's
    s, _ = fold()
    n = s.snapshot().instance("D").nixl  # type: ignore[union-attr]
    assert (n.mean_ms, n.p50_ms, n.p99_ms) == pytest.approx((k["ms"]["mean"], k["ms"]["p50"], k["ms"]["p99"]))
    line = report.kv_read_lines({"pair": summary})
    assert line == [(f"pair KV read, measured per request by NIXL on D (17 reads): mean {k['ms']['mean']:.2f} ms,"
                     f" p50 {k['ms']['p50']:.2f}, p99 {k['ms']['p99']:.1f}, max 91.4; 0.31 MiB mean,"
                     f" {k['gbps']['p50']:.3g} GB/s p50")]


def test_a_report_without_measured_reads_says_so_and_shows_no_transfer_time() -> None:
    samples = [_s("pair", "follow", i, ttft=100.0, chunk_t=[1.0, 1.01],
                  trace={"outcome": "pair", "prefill_ms": 50.0, "hop_ms": 1.0, "decode_ttft_ms": 40.0,
                         "ttft_ms": 95.0}) for i in range(3)]
    summary = report.summarize_arm(samples, {"follow": [0.0, 3.0]})
    assert "kv_read" not in summary
    text = report.table({"pair": summary})
    assert "pair KV read: not measured per request" in text and "KV read, measured" not in text


def test_the_bench_keeps_one_read_per_request_merging_ranks() -> None:
    a = KvRead("r", "cmpl-r-0-00000000", ms=2.0, bytes=100, descs=2, handles=1, post_ms=0.5)
    b = KvRead("r", "cmpl-r-0-00000000", ms=3.0, bytes=300, descs=2, handles=1, post_ms=0.25)
    reads: dict[str, KvRead] = {}
    add_read(reads, a)
    add_read(reads, b)
    assert reads["r"].bytes == 400 and reads["r"].ranks == 2 and reads["r"].ms == 3.0
